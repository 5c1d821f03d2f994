"""Receptive fields against an independent interval calculus, exactness of the halo,
tile dependence and its culprits, alignment by shifting, the ERF and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from conftest import make_unet
from nahtlos import NahtlosWarning, predict_whole
from nahtlos.cli import app
from nahtlos.nets.checkpoint import save_torchscript
from nahtlos.nets.receptive_field import (
    MASSES,
    ReceptiveField,
    ReceptiveFieldError,
    erf_mass_radius,
    plot_receptive_field,
    receptive_field,
    recommend_halo,
)
from nahtlos.testing import assert_blockwise_equal

runner = CliRunner()

# --------------------------------------------------------------------------------------
# An independent reference: per-axis interval calculus over a layer spec.
#
#   ("conv", k, d)        stride-1 convolution, padding d*(k-1)//2
#   ("sconv", k, s)       strided convolution, padding (k-1)//2
#   ("pool", k)           max pooling, kernel = stride = k
#   ("up", f)             nearest up-sampling
#   ("tconv", k, s, p)    transposed convolution (output padding makes it s x)
#   ("sum", [spec, ...])  parallel branches added (the empty spec is the identity)
#
# The TRF of output position p is the interval obtained by mapping [p, p] backwards
# through the layers; branches give the hull. The reported TRF is the maximum extent
# over the positions of one alignment cell.
# --------------------------------------------------------------------------------------


def _layer_map(layer, lo, hi):
    kind = layer[0]
    if kind == "conv":
        _, k, d = layer
        r = d * (k - 1) // 2
        return lo - r, hi + r
    if kind == "sconv":
        _, k, s = layer
        p = (k - 1) // 2
        return lo * s - p, hi * s - p + k - 1
    if kind == "pool":
        _, k = layer
        return lo * k, hi * k + k - 1
    if kind == "up":
        _, f = layer
        return lo // f, hi // f
    if kind == "tconv":
        _, k, s, p = layer
        return math.ceil((lo - k + 1 + p) / s), (hi + p) // s
    if kind == "sum":
        spans = [_ref_trf(branch, lo, hi) for branch in layer[1]]
        return min(a for a, _ in spans), max(b for _, b in spans)
    raise ValueError(kind)


def _ref_trf(spec, lo, hi):
    for layer in reversed(spec):
        lo, hi = _layer_map(layer, lo, hi)
    return lo, hi


def reference_extents(spec, alignment):
    """(before, after): max over one alignment cell of the interval calculus."""
    start = 64 * alignment
    before = after = 0
    for p in range(start, start + alignment):
        lo, hi = _ref_trf(spec, p, p)
        before, after = max(before, p - lo), max(after, hi - p)
    return before, after


def _max_factor(spec):
    """Largest down-sampling factor reached inside the spec."""
    best, factor = 1, 1
    for layer in spec:
        if layer[0] == "pool":
            factor *= layer[1]
        elif layer[0] == "sconv":
            factor *= layer[2]
        elif layer[0] == "up":
            factor //= layer[1]
        elif layer[0] == "tconv":
            factor //= layer[2]
        elif layer[0] == "sum":
            best = max(best, factor * max(_max_factor(b) for b in layer[1]))
        best = max(best, factor)
    return best


class Sum(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        out = x
        for b in self.branches:
            out = out + b(x)
        return out


def build(spec, channels=2, relu=False, dead=False, zero=False):
    """A 2D torch model of a spec (channels kept constant)."""
    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            _, k, d = layer
            conv = nn.Conv2d(channels, channels, k, padding=d * (k - 1) // 2, dilation=d)
        elif kind == "sconv":
            _, k, s = layer
            conv = nn.Conv2d(channels, channels, k, stride=s, padding=(k - 1) // 2)
        elif kind == "tconv":
            _, k, s, p = layer
            conv = nn.ConvTranspose2d(
                channels, channels, k, stride=s, padding=p, output_padding=s - k + 2 * p
            )
        elif kind == "pool":
            layers.append(nn.MaxPool2d(layer[1]))
            continue
        elif kind == "up":
            layers.append(nn.Upsample(scale_factor=layer[1]))
            continue
        else:
            branches = [build(b, channels, relu, dead, zero) for b in layer[1] if b]
            layers.append(Sum(branches))
            continue
        with torch.no_grad():
            if zero:
                conv.weight.zero_()
            if dead:
                conv.bias.fill_(-1e3)
        layers.append(conv)
        if relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def wrap(body, channels=2):
    return nn.Sequential(nn.Conv2d(1, channels, 1), body, nn.Conv2d(channels, 1, 1)).eval()


convs = st.lists(
    st.tuples(st.just("conv"), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2])),
    max_size=2,
)


@st.composite
def unet_specs(draw, level=0):
    """Random encoder-decoders: convolutions, dilations, pooling or strided down-sampling,
    nearest or transposed-convolution up-sampling, skip connections."""
    spec = list(draw(convs))
    if level < 2 and draw(st.booleans()):
        down = draw(st.sampled_from([("pool", 2), ("sconv", 3, 2)]))
        up = draw(st.sampled_from([("up", 2), ("tconv", 2, 2, 0), ("tconv", 3, 2, 1)]))
        inner = [down, *draw(unet_specs(level + 1)), up]
        spec.append(("sum", [[], inner]))
        spec += draw(convs)
    return spec


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=unet_specs(),
    relu=st.booleans(),
    dead=st.booleans(),
    zero=st.booleans(),
    seed=st.integers(0, 100),
)
def test_trf_matches_interval_calculus_and_halo_is_exact(spec, relu, dead, zero, seed):
    torch.manual_seed(seed)
    alignment = _max_factor(spec)
    net = wrap(build(spec, relu=relu, dead=dead and relu, zero=zero))
    rf = receptive_field(net, 2)
    before, after = reference_extents(spec, alignment)
    # Dead ReLUs, zero weights and max-pooling's arg-max do not shrink the TRF.
    assert rf.trf_before == (before, before) and rf.trf_after == (after, after)
    assert rf.alignment == (alignment, alignment)
    assert rf.exact and rf.verified and not rf.culprits
    if zero or (dead and relu):
        return  # constant models: block-wise prediction is trivially exact
    halo = recommend_halo(rf)
    a = rf.alignment[0]
    image = np.random.default_rng(seed).random((3 * a + 7, 2 * a + 11), dtype=np.float32)
    assert_blockwise_equal(net, image, [(a, a), (2 * a, 3 * a)], halo, rf.alignment)


def test_halo_smaller_than_trf_is_not_exact():
    torch.manual_seed(0)
    net = wrap(build([("conv", 3, 1), ("conv", 5, 2), ("conv", 3, 1)]))
    rf = receptive_field(net, 2)
    assert rf.trf_radius == (6, 6)
    image = np.random.default_rng(0).random((40, 37), dtype=np.float32)
    assert_blockwise_equal(net, image, [(8, 8), (13, 16)], rf.halo(), 1)
    with pytest.raises(AssertionError, match="differs from the whole-image reference"):
        assert_blockwise_equal(net, image, [(8, 8)], 5, 1)


def test_asymmetric_kernels_give_before_and_after():
    # A 4x4 kernel with padding (1, 2) reaches 1 voxel before and 2 after.
    net = nn.Sequential(
        nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(1, 1, 4), nn.Conv2d(1, 1, 3, padding=1)
    )
    rf = receptive_field(net.eval(), 2)
    assert rf.trf_before == (2, 2) and rf.trf_after == (3, 3)
    assert rf.halo() == (3, 3)


@pytest.mark.parametrize("num_res_units", [0, 1])
def test_monai_unet_matches_reference(num_res_units):
    net = make_unet(2, 2, norm="batch", num_res_units=num_res_units)
    up = [("tconv", 3, 2, 1)] + ([("conv", 3, 1)] if num_res_units else [])
    spec = [
        ("sconv", 3, 2),
        ("sum", [[], [("sconv", 3, 2), ("sum", [[], [("conv", 3, 1)]]), *up]]),
        *up,
    ]
    rf = receptive_field(net, 2)
    before, after = reference_extents(spec, 4)
    assert rf.trf_before == (before, before) and rf.trf_after == (after, after)
    assert rf.alignment == (4, 4) and rf.exact
    image = np.random.default_rng(1).random((45, 38), dtype=np.float32)
    assert_blockwise_equal(net, image, [(12, 16), (20, 8)], recommend_halo(rf), rf.alignment)


def test_monai_basic_unet_matches_reference():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(2, 1, 1, features=(2, 2, 2, 2, 2, 2), norm="batch").eval()

    def level(n):
        spec = [("pool", 2), ("conv", 3, 1), ("conv", 3, 1)]
        if n < 4:
            spec += [("sum", [[], level(n + 1)]), ("conv", 3, 1), ("conv", 3, 1)]
        return [*spec, ("tconv", 2, 2, 0)]

    spec = [("conv", 3, 1), ("conv", 3, 1), ("sum", [[], level(1)]), ("conv", 3, 1), ("conv", 3, 1)]
    rf = receptive_field(net, 2)
    before, after = reference_extents(spec, 16)
    assert rf.trf_before == (before, before) and rf.trf_after == (after, after)
    assert rf.alignment == (16, 16) and rf.exact
    image = np.random.default_rng(2).random((100, 70), dtype=np.float32)
    assert_blockwise_equal(net, image, [(48, 32)], recommend_halo(rf), rf.alignment)


def test_3d_unet_and_torchscript_agree(tmp_path):
    net = make_unet(3, 2, norm="batch")
    rf = receptive_field(net, 3)
    path = tmp_path / "unet.pt"
    save_torchscript(net, path, example=torch.zeros(1, 1, 16, 16, 16))
    from nahtlos.nets.checkpoint import load_model

    rf_ts = receptive_field(load_model(path), 3)
    assert rf.trf_before == rf_ts.trf_before and rf.trf_after == rf_ts.trf_after
    assert rf.alignment == rf_ts.alignment == (4, 4, 4) and rf.verified
    image = np.random.default_rng(3).random((20, 26, 17), dtype=np.float32)
    assert_blockwise_equal(net, image, [(8, 12, 8)], recommend_halo(rf), rf.alignment)


def test_anisotropic_strides():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.MaxPool2d((1, 2)),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Upsample(scale_factor=(1, 2)),
        nn.Conv2d(2, 1, 1),
    ).eval()
    rf = receptive_field(net, 2)
    assert rf.alignment == (1, 2)
    assert rf.trf_radius == (
        2,
        reference_extents([("conv", 3, 1), ("pool", 2), ("conv", 3, 1), ("up", 2)], 2)[0],
    )


class DeadBranch(nn.Module):
    """Pools by 4 in a branch whose result is thrown away: the shapes say 4, shifting says 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        _unused = nn.functional.avg_pool2d(h, 4)
        return self.b(nn.functional.interpolate(nn.functional.max_pool2d(h, 2), scale_factor=2))


def test_alignment_is_measured_by_shifting_not_read_from_shapes():
    rf = receptive_field(DeadBranch().eval(), 2)
    assert rf.downsampling == (4, 4)
    assert rf.alignment == (2, 2)


class PositionEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        return self.conv(x) * (1 + ramp)


def test_position_dependent_model_is_not_shift_equivariant():
    rf = receptive_field(PositionEmbedding().eval(), 2)
    assert rf.trf_radius == (1, 1) and not rf.tile_dependent
    assert rf.shift_equivariant is False and not rf.exact
    with pytest.warns(NahtlosWarning, match="not shift-equivariant"):
        recommend_halo(rf)


# --------------------------------------------------------------------------------------
# Tile dependence and its culprits
# --------------------------------------------------------------------------------------


def _names_of(net, kind):
    return {n for n, m in net.named_modules() if isinstance(m, kind)}


def test_instance_norm_unet_is_tile_dependent_with_every_instance_norm_named(tmp_path):
    net = make_unet(2, 2, norm="instance")
    rf = receptive_field(net, 2)
    assert rf.tile_dependent and rf.trf_radius is None and not rf.exact
    assert {c.name for c in rf.culprits} == _names_of(net, nn.InstanceNorm2d)
    assert {c.type for c in rf.culprits} == {"InstanceNorm2d"}
    # With the tile statistics frozen, the InstanceNorm U-Net is the BatchNorm one.
    rf_bn = receptive_field(make_unet(2, 2, norm="batch"), 2)
    assert rf.local_trf_radius == rf_bn.trf_radius and rf.alignment == rf_bn.alignment
    # The halo-relevant ERF does not grow with the tile, the plain one does.
    small = receptive_field(net, 2, erf_shape=64)
    large = receptive_field(net, 2, erf_shape=128)
    assert small.erf_radius(0.99) == large.erf_radius(0.99)
    assert large.erf_radius(0.99, full=True) > small.erf_radius(0.99, full=True)
    with pytest.warns(NahtlosWarning, match=r"exact stitching is impossible.*InstanceNorm2d"):
        halo = recommend_halo(rf)
    assert halo == rf.halo() and all(h % a == 0 for h, a in zip(halo, rf.alignment, strict=True))
    # The same names come out of a TorchScript file.
    path = tmp_path / "in.pt"
    save_torchscript(net, path)
    from nahtlos.nets.checkpoint import load_model

    rf_ts = receptive_field(load_model(path), 2)
    assert rf_ts.tile_dependent
    assert sorted(map(str, rf_ts.culprits)) == sorted(map(str, rf.culprits))


def test_group_norm_layer_norm_and_global_pooling_are_named():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.gate = nn.AdaptiveAvgPool2d(1)
            self.out = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            h = self.conv(x)
            return self.out(h * torch.sigmoid(self.gate(h)))

    models = {
        "1": nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 3, padding=1)
        ),
        "gate": SqueezeExcite(),
        # LayerNorm over the channels only is local; over channels and space it is not.
        "2": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.LayerNorm([4, 32, 32])),
    }
    expected = {"1": "GroupNorm", "gate": "AdaptiveAvgPool2d", "2": "LayerNorm"}
    for name, net in models.items():
        rf = receptive_field(net.eval(), 2, shape=(32, 32) if name == "2" else None)
        assert rf.tile_dependent, name
        assert [(c.name, c.type) for c in rf.culprits] == [(name, expected[name])]


def test_channel_layer_norm_is_local():
    class ChannelNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            h = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.out(h)

    rf = receptive_field(ChannelNorm().eval(), 2)
    assert not rf.tile_dependent and rf.trf_radius == (2, 2) and rf.exact


def test_unetr_is_tile_dependent_through_attention_and_instance_norm():
    pytest.importorskip("einops")
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(
        1, 1, img_size=(32, 32), feature_size=2, hidden_size=8, mlp_dim=8, num_heads=1,
        spatial_dims=2,
    ).eval()  # fmt: skip
    rf = receptive_field(net, 2)
    assert rf.tile_dependent and rf.alignment == (16, 16)
    attention = {c.name for c in rf.culprits if c.type == "SABlock"}
    assert attention == {n for n, m in net.named_modules() if type(m).__name__ == "SABlock"}
    assert {c.name for c in rf.culprits if c.type == "InstanceNorm2d"} == _names_of(
        net, nn.InstanceNorm2d
    )
    assert rf.local_trf_radius is None  # attention stays global with statistics frozen
    with pytest.warns(NahtlosWarning, match="SABlock"):
        recommend_halo(rf)


def test_model_that_changes_the_shape_is_rejected():
    from nahtlos.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="returned shape"):
        receptive_field(nn.Conv2d(1, 1, 3).eval(), 2)


def test_model_rejecting_every_probe_shape():
    class Picky(nn.Module):
        def forward(self, x):
            if x.shape[-1] != 7:
                raise RuntimeError("only width 7")
            return x

    with pytest.raises(ReceptiveFieldError, match="shape="):
        receptive_field(Picky(), 2)


# --------------------------------------------------------------------------------------
# ERF
# --------------------------------------------------------------------------------------


def test_erf_radius_of_a_box_filter():
    net = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    rf = receptive_field(net.eval(), 2)
    # A uniform 5x5 gradient: the rows within r of the centre hold (2r+1)/5 of the mass.
    for mass in (0.2, 0.5, 0.6, 0.9, 1.0):
        r = math.ceil((5 * mass - 1) / 2 - 1e-9)
        assert rf.erf_radius(mass) == (r, r)
    assert rf.trf_radius == (2, 2)


@settings(max_examples=20, deadline=None)
@given(
    st.integers(5, 30).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(0, 2**31))
    )
)
def test_erf_radius_is_the_smallest_holding_the_mass(args):
    n, c, seed = args
    profile = np.random.default_rng(seed).random(n) ** 4
    erf = np.outer(np.ones(3), profile)
    for mass in MASSES:
        (_, r) = erf_mass_radius(erf, (1, c), mass)
        held = profile[max(c - r, 0) : c + r + 1].sum()
        assert held >= mass * profile.sum() * (1 - 1e-9)
        if r > 0:
            assert profile[max(c - r + 1, 0) : c + r].sum() < mass * profile.sum()


def test_erf_does_not_change_the_model():
    net = make_unet(2, 1, norm="batch").train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    receptive_field(net, 2)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_to_dict_and_plot(tmp_path):
    rf = receptive_field(make_unet(2, 1, norm="batch"), 2)
    d = json.loads(json.dumps(rf.to_dict()))
    assert d["trf_radius"] == list(rf.trf_radius) and d["halo"] == list(rf.halo())
    assert d["alignment"] == [2, 2] and d["tile_dependent"] is False
    assert d["erf_radius"] == list(rf.erf_radius(0.99))
    for ndim in (2, 3):
        r = rf if ndim == 2 else receptive_field(make_unet(3, 1, norm="instance"), 3)
        out = plot_receptive_field(r, tmp_path / f"rf{ndim}.png")
        import matplotlib.image

        img = matplotlib.image.imread(out)
        assert img.ndim == 3 and img.shape[0] > 300 and img.std() > 0.05


def test_receptive_field_type():
    assert isinstance(receptive_field(nn.Identity(), 2), ReceptiveField)
    rf = receptive_field(nn.Identity(), 3)
    assert rf.trf_radius == (0, 0, 0) and rf.alignment == (1, 1, 1) and rf.halo() == (0, 0, 0)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rf-models")
    out = {}
    for norm in ("batch", "instance"):
        net = make_unet(2, 2, norm=norm)
        path = root / f"{norm}.pt"
        save_torchscript(net, path, metadata={"ndim": 2})
        out[norm] = (path, net)
    return out


def test_cli_rf_json_and_plot(models, tmp_path):
    path, net = models["batch"]
    plot = tmp_path / "rf.png"
    result = runner.invoke(
        app,
        [
            "rf",
            str(path),
            "--dims",
            "2",
            "--in-channels",
            "1",
            "--json",
            "--plot",
            str(plot),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    for key in ("trf_radius", "alignment", "tile_dependent", "erf_radius", "halo"):
        assert key in d
    rf = receptive_field(net, 2)
    assert d["trf_radius"] == list(rf.trf_radius) and d["halo"] == list(rf.halo())
    assert plot.stat().st_size > 10_000


def test_cli_rf_table_warns_for_instance_norm(models):
    path, _ = models["instance"]
    result = runner.invoke(app, ["rf", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "tile-dependent      YES" in result.stdout and "InstanceNorm2d" in result.stdout
    assert "exact stitching is impossible" in result.stderr


def test_cli_rf_needs_dims(tmp_path):
    path = tmp_path / "m.pt"
    save_torchscript(make_unet(2, 1), path)
    result = runner.invoke(app, ["rf", str(path)])
    assert result.exit_code == 2 and "--dims is required" in result.stderr


def test_cli_predict_auto_is_exact_and_fits_memory(models, tmp_path):
    import zarr

    path, net = models["batch"]
    image = np.random.default_rng(5).random((70, 90), dtype=np.float32)
    np.save(tmp_path / "img.npy", image)
    rf = receptive_field(net, 2)
    reference = predict_whole(net, image, rf.halo(), rf.alignment)
    for budget, expect_split in (("1G", False), ("400K", True)):
        out = tmp_path / f"pred-{budget}.zarr"
        args = ["predict", str(path), str(tmp_path / "img.npy"), str(out), "--no-progress"]
        result = runner.invoke(app, [*args, "--block", "auto", "--max-memory", budget])
        assert result.exit_code == 0, result.output
        assert "halo 12,12 (auto: TRF radius)" in result.stderr
        pred = zarr.open_array(out, mode="r")
        np.testing.assert_allclose(pred[...], reference, atol=1e-5)
        split = tuple(pred.chunks[1:]) != image.shape
        assert split == expect_split, pred.chunks
    explicit = ["--halo", "12", "--alignment", "4", "--overwrite"]
    result = runner.invoke(app, [*args, *explicit, "--max-memory", "1K"])
    assert result.exit_code == 2 and "memory budget" in result.stderr
