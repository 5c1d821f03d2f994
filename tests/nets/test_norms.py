"""Tests of nahtlos.nets.norms against an independent float64 reference of Ioffe's equations."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from conftest import make_unet
from nahtlos import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    NahtlosWarning,
    RenormSchedule,
    convert_norms,
    make_norm,
    monai_norm,
)
from nahtlos.cli import app
from nahtlos.errors import NormError
from nahtlos.nets.checkpoint import convert_model_file, load_model, save_torchscript
from nahtlos.nets.norms import NORM_NAMES, group_count

BRN = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# --- the reference: DESIGN.md §4 written out in numpy float64 ------------------------------


def reference(x, mean, var, weight, bias, eps, momentum, r_max, d_max, grad_out=None):
    """Ioffe's Algorithm 1 in float64 numpy, with σ = sqrt(running_var + eps).

    Returns y, r, d, the updated running mean and var, and (given dL/dy) the gradients
    of x, weight and bias derived by hand with r and d held constant.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(((x - mu_b.reshape(shape)) ** 2).mean(axis=axes) + eps)
    sigma = np.sqrt(np.asarray(var, np.float64) + eps)
    mean = np.asarray(mean, np.float64)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
    x_hat_b = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape)
    x_hat = x_hat_b * r.reshape(shape) + d.reshape(shape)
    w = np.asarray(weight, np.float64).reshape(shape)
    y = w * x_hat + np.asarray(bias, np.float64).reshape(shape)
    new_mean = mean + momentum * (mu_b - mean)
    new_sigma = sigma + momentum * (sigma_b - sigma)
    out = {"y": y, "r": r, "d": d, "mean": new_mean, "var": new_sigma**2 - eps}
    if grad_out is not None:
        g = np.asarray(grad_out, np.float64)
        g_hat_b = g * w * r.reshape(shape)  # dL/dx̂_B
        m1 = g_hat_b.mean(axis=axes).reshape(shape)
        m2 = (g_hat_b * x_hat_b).mean(axis=axes).reshape(shape)
        out["grad_x"] = (g_hat_b - m1 - x_hat_b * m2) / sigma_b.reshape(shape)
        out["grad_w"] = (g * x_hat).sum(axis=axes)
        out["grad_b"] = g.sum(axis=axes)
    return out


def _layer(ndim, c, seed, dtype=torch.float64, **kwargs):
    layer = BRN[ndim](c, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=dtype))
        layer.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) * 2 + 0.1)
        if layer.affine:
            layer.weight.copy_(torch.randn(c, generator=gen, dtype=dtype))
            layer.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
    return layer


def _input(ndim, n, c, size, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, c) + (size,) * ndim
    scale = torch.rand(1, c, *([1] * ndim), generator=gen, dtype=dtype) * 3 + 0.2
    shift = torch.randn(1, c, *([1] * ndim), generator=gen, dtype=dtype) * 2
    return torch.randn(shape, generator=gen, dtype=dtype) * scale + shift


# --- the layer ------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_equals_batch_norm_bitwise(ndim, affine):
    layer = _layer(ndim, 5, seed=ndim, dtype=torch.float32, affine=affine).eval()
    x = _input(ndim, 2, 5, 6, seed=1, dtype=torch.float32)
    expected = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, eps=layer.eps
    )
    assert torch.equal(layer(x), expected)
    assert layer.num_batches_tracked.item() == 0


def test_affine_false_registers_no_parameters():
    layer = BatchRenorm2d(3, affine=False)
    assert list(layer.parameters()) == []
    assert layer.weight is None and layer.bias is None


@settings(max_examples=30, deadline=None)
@given(
    ndim=st.sampled_from([1, 2, 3]),
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    size=st.integers(2, 5),
    r_max=st.floats(1.0, 4.0),
    d_max=st.floats(0.0, 6.0),
    momentum=st.floats(0.001, 1.0),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_training_matches_reference(ndim, n, c, size, r_max, d_max, momentum, affine, seed):
    layer = _layer(ndim, c, seed, momentum=momentum, r_max=r_max, d_max=d_max, affine=affine)
    layer.train()
    x = _input(ndim, n, c, size, seed + 1).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=x.dtype)
    ones, zeros = np.ones(c), np.zeros(c)
    w = layer.weight.detach().numpy().copy() if affine else ones
    b = layer.bias.detach().numpy().copy() if affine else zeros
    ref = reference(
        x.detach().numpy(),
        layer.running_mean.numpy().copy(),
        layer.running_var.numpy().copy(),
        w,
        b,
        layer.eps,
        momentum,
        r_max,
        d_max,
        grad_out=g.numpy(),
    )
    r, d = layer.renorm_factors(x)
    np.testing.assert_allclose(r.numpy(), ref["r"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.numpy(), ref["d"], rtol=1e-12, atol=1e-12)
    y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), ref["y"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.running_mean.numpy(), ref["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), ref["var"], rtol=1e-10, atol=1e-12)
    assert layer.num_batches_tracked.item() == 1
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), ref["grad_x"], rtol=1e-7, atol=1e-8)
    if affine:
        np.testing.assert_allclose(layer.weight.grad.numpy(), ref["grad_w"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(layer.bias.grad.numpy(), ref["grad_b"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_plain_batchnorm_at_r1_d0_forward_and_gradients(ndim):
    x = _input(ndim, 3, 4, 5, seed=7).requires_grad_()
    x_bn = x.detach().clone().requires_grad_()
    brn = _layer(ndim, 4, seed=3).train()
    bn = BN[ndim](4).double().train()
    bn.load_state_dict(brn.state_dict())
    g = torch.randn_like(x)
    y, y_bn = brn(x), bn(x_bn)
    torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
    y.backward(g)
    y_bn.backward(g)
    torch.testing.assert_close(x.grad, x_bn.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gradcheck_float64_at_r1_d0(ndim):
    # With r_max = 1, d_max = 0, r and d are constants, so Ioffe's stop-gradient rule
    # coincides with the true derivative and finite differences must agree.
    layer = _layer(ndim, 3, seed=5).train()
    layer.freeze_statistics = True
    x = _input(ndim, 2, 3, 3, seed=9).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("ndim", [2, 3])
def test_unclipped_renorm_uses_running_statistics(ndim):
    layer = _layer(ndim, 3, seed=11, r_max=1e6, d_max=1e6).train()
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    x = _input(ndim, 3, 3, 4, seed=12).requires_grad_()
    y = layer(x)
    shape = (1, -1) + (1,) * ndim
    expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
    expected = expected * layer.weight.view(shape) + layer.bias.view(shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    # Gradients still flow through the batch statistics: they sum to zero per channel.
    y.backward(torch.randn_like(y))
    sums = x.grad.sum(dim=(0, *range(2, x.dim())))
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-10)
    # One sample's output does not depend on the others in the batch.
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    others = _input(ndim, 3, 3, 4, seed=13) * 5 - 2
    mixed = torch.cat([x.detach()[:1], others[1:]])
    torch.testing.assert_close(layer(mixed)[:1], y.detach()[:1], rtol=1e-10, atol=1e-10)


def test_clipping_lands_exactly_on_bounds_only_where_expected():
    r_max, d_max = 2.0, 1.5
    c = 6
    layer = BatchRenorm2d(c, r_max=r_max, d_max=d_max).double().train()
    x = _input(2, 2, c, 6, seed=21)
    xs = x.numpy()
    mu_b = xs.mean(axis=(0, 2, 3))
    sigma_b = np.sqrt(xs.var(axis=(0, 2, 3)) + layer.eps)
    # running σ per channel: σ_B/σ = 4, 0.25, 1.3 (ratio above, below, inside [1/2, 2]),
    # running mean so that (μ_B − μ)/σ = 3, −3, 0.7, ...
    ratios = np.array([4.0, 0.25, 1.3, 0.9, 2.5, 0.6])
    offsets = np.array([3.0, -3.0, 0.7, -1.6, 1.4, 0.0])
    sigma = sigma_b / ratios
    with torch.no_grad():
        layer.running_var.copy_(torch.from_numpy(sigma**2 - layer.eps))
        layer.running_mean.copy_(torch.from_numpy(mu_b - offsets * sigma))
    r, d = (t.numpy() for t in layer.renorm_factors(x))
    r_clipped = (ratios > r_max) | (ratios < 1 / r_max)
    d_clipped = np.abs(offsets) > d_max
    on_r_bound = (r == r_max) | (r == 1 / r_max)
    on_d_bound = np.abs(d) == d_max
    np.testing.assert_array_equal(on_r_bound, r_clipped)
    np.testing.assert_array_equal(on_d_bound, d_clipped)
    np.testing.assert_allclose(r[~r_clipped], ratios[~r_clipped], rtol=1e-9)
    np.testing.assert_allclose(d[~d_clipped], offsets[~d_clipped], rtol=1e-9, atol=1e-12)
    assert np.all(np.sign(d[d_clipped]) == np.sign(offsets[d_clipped]))


def test_counter_and_frozen_statistics():
    layer = _layer(3, 2, seed=31, r_max=3, d_max=5)
    x = _input(3, 2, 2, 4, seed=32)
    for step in range(1, 4):
        layer.train()(x)
        assert layer.num_batches_tracked.item() == step
        layer.eval()(x)
        assert layer.num_batches_tracked.item() == step
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.freeze_statistics = True
    y = layer.train()(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Frozen statistics still renormalize in training: output matches the reference.
    ref = reference(
        x.numpy(),
        before["running_mean"].numpy(),
        before["running_var"].numpy(),
        before["weight"].numpy(),
        before["bias"].numpy(),
        layer.eps,
        layer.momentum,
        3,
        5,
    )
    np.testing.assert_allclose(y.detach().numpy(), ref["y"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_edge_shapes_give_finite_values(ndim):
    # C = 1, batch 1, and a constant channel (zero batch variance).
    for c, n in ((1, 1), (3, 1), (3, 2)):
        layer = _layer(ndim, c, seed=41, dtype=torch.float32, r_max=3, d_max=5).train()
        x = _input(ndim, n, c, 3, seed=42, dtype=torch.float32)
        x[:, 0] = 2.5
        x.requires_grad_()
        y = layer(x)
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()
        assert torch.isfinite(layer.running_var).all() and (layer.running_var >= 0).all()


def test_one_value_per_channel_is_an_error_like_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(3).train()(torch.randn(1, 3))


def test_wrong_input_rank_is_an_error():
    with pytest.raises(ValueError, match="5 dimensions"):
        BatchRenorm3d(3)(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize(
    "kwargs", [{"r_max": 0.5}, {"d_max": -1.0}, {"momentum": 0.0}, {"eps": 0.0}, {"r_max": np.nan}]
)
def test_invalid_settings_are_errors(kwargs):
    with pytest.raises(NormError):
        BatchRenorm2d(3, **kwargs)


def test_channels_last_and_non_contiguous_inputs():
    layer = _layer(3, 4, seed=51, dtype=torch.float32, r_max=3, d_max=5).train()
    x = _input(3, 2, 4, 6, seed=52, dtype=torch.float32)
    reference_layer = copy.deepcopy(layer)
    x_ref = x.clone().requires_grad_()
    y_ref = reference_layer(x_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    variants = {
        "channels_last": x.clone().to(memory_format=torch.channels_last_3d),
        "transposed": x.transpose(2, 4).contiguous().transpose(2, 4),
        "strided": torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2],
    }
    for name, xv in variants.items():
        assert not xv.is_contiguous(), name
        xv.requires_grad_()
        lv = copy.deepcopy(layer)
        yv = lv(xv)
        yv.backward(g)
        torch.testing.assert_close(yv, y_ref, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(xv.grad, x_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(lv.running_var, reference_layer.running_var, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_float32_statistics(dtype):
    torch.manual_seed(0)
    conv = nn.Conv3d(1, 4, 3, padding=1)
    layer = BatchRenorm3d(4, r_max=3, d_max=5, momentum=0.5)
    x = torch.randn(2, 1, 8, 8, 8) * 30
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        y = layer(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert layer.running_mean.dtype == torch.float32 == layer.running_var.dtype
    # The statistics are those of the reduced-precision activations, computed in float32.
    ref = reference(h.float().detach().numpy(), np.zeros(4), np.ones(4), np.ones(4), np.zeros(4),
                    1e-5, 0.5, 3, 5)  # fmt: skip
    np.testing.assert_allclose(layer.running_mean.numpy(), ref["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_var.numpy(), ref["var"], rtol=1e-5, atol=1e-4)
    y.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_state_dict_round_trip_and_batchnorm_compatibility(tmp_path):
    layer = _layer(3, 4, seed=61, dtype=torch.float32, r_max=2.5, d_max=3.0)
    x = _input(3, 2, 4, 5, seed=62, dtype=torch.float32)
    layer.train()(x)
    torch.save(layer.state_dict(), tmp_path / "brn.pt")
    loaded = BatchRenorm3d(4, r_max=2.5, d_max=3.0)
    loaded.load_state_dict(torch.load(tmp_path / "brn.pt"))
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.train()(x), layer(x))
    assert torch.equal(loaded.eval()(x), layer.eval()(x))
    # Same keys as BatchNorm: weights move both ways with strict loading.
    bn = nn.BatchNorm3d(4)
    bn.load_state_dict(layer.state_dict())
    assert set(bn.state_dict()) == set(layer.state_dict())
    assert torch.equal(bn.eval()(x), layer.eval()(x))
    BatchRenorm3d(4).load_state_dict(bn.state_dict())


def test_torchscript_round_trip_of_a_batchrenorm_unet(tmp_path):
    net = make_unet(3, 2, norm="batchrenorm")
    x = torch.randn(1, 1, 16, 16, 16)
    net.train()(x)  # non-trivial running statistics
    net.eval()
    path = save_torchscript(net, tmp_path / "brn.pt", metadata={"ndim": 3})
    loaded = load_model(path)
    torch.testing.assert_close(loaded.module(x), net(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    scripted.train()
    torch.testing.assert_close(scripted(x), copy.deepcopy(net).train()(x))


# --- the schedule -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    warmup=st.integers(0, 50),
    ramp=st.integers(0, 50),
    r_max=st.floats(1.0, 10.0),
    d_max=st.floats(0.0, 10.0),
)
def test_schedule_boundaries(warmup, ramp, r_max, d_max):
    s = RenormSchedule(warmup, ramp, r_max, d_max)
    if warmup:
        assert s.values(0) == (1.0, 0.0)
        assert s.values(warmup - 1) == (1.0, 0.0)
    end = warmup + ramp
    assert s.values(end) == (r_max, d_max)
    assert s.values(end + 7) == (r_max, d_max)
    if ramp:
        assert s.values(warmup) == (1.0, 0.0)
        r_mid, d_mid = s.values(warmup + ramp / 2)
        assert r_mid == pytest.approx((1 + r_max) / 2) and d_mid == pytest.approx(d_max / 2)
        previous = (1.0, 0.0)
        for step in range(warmup, end + 1):  # monotone ramp
            r, d = s.values(step)
            assert previous[0] <= r <= r_max and previous[1] <= d <= d_max
            previous = (r, d)
    else:
        assert s.values(warmup) == (r_max, d_max)


def test_schedule_apply_step_and_state_round_trip(tmp_path):
    net = make_unet(3, 2, norm="batchrenorm")
    s = RenormSchedule(2, 4)
    assert s.step(net) == (1.0, 0.0) and s.last_step == 0
    for _ in range(3):
        s.step(net)
    assert s.last_step == 3
    layers = [m for m in net.modules() if isinstance(m, BatchRenorm3d)]
    assert layers and all((m.r_max, m.d_max) == (1.5, 1.25) for m in layers)
    state = json.loads(json.dumps(s.state_dict()))
    torch.save(state, tmp_path / "sched.pt")
    resumed = RenormSchedule(0, 0)
    resumed.load_state_dict(torch.load(tmp_path / "sched.pt"))
    assert resumed.state_dict() == s.state_dict()
    assert resumed.step(net) == s.values(4) == (2.0, 2.5)
    with pytest.raises(NormError):
        resumed.load_state_dict({"warmup_steps": 1})
    with pytest.raises(NormError):
        RenormSchedule(-1, 3)
    with pytest.raises(NormError):
        s.values(-1)


# --- the factory and MONAI -------------------------------------------------------------


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_make_norm_builds_working_layers(name, ndim):
    layer = make_norm(name, 12, ndim)
    x = torch.randn((2, 12) + (4,) * ndim)
    assert layer.train()(x).shape == x.shape
    assert layer.eval()(x).shape == x.shape
    if name == "group":
        assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 6
    if name == "instance_running":
        assert layer.track_running_stats and layer.affine
    if name == "batchrenorm":
        assert isinstance(layer, BRN[ndim])


def test_make_norm_errors():
    with pytest.raises(NormError, match="unknown norm"):
        make_norm("layer", 4, 2)
    with pytest.raises(NormError, match="does not divide"):
        make_norm("group", 12, 2, num_groups=5)
    with pytest.raises(NormError, match="ndim"):
        make_norm("batch", 4, 4)
    with pytest.raises(NormError, match="invalid options"):
        make_norm("batch", 4, 2, r_max=3)


@given(channels=st.integers(1, 512), max_groups=st.integers(1, 64))
def test_group_count_is_the_largest_divisor_below_the_bound(channels, max_groups):
    g = group_count(channels, max_groups)
    assert channels % g == 0 and 1 <= g <= max_groups
    assert not any(channels % h == 0 for h in range(g + 1, max_groups + 1))


def _monai_nets(norm):
    from monai.networks.nets import BasicUNet, UNet

    yield "UNet", UNet(3, 1, 2, channels=(4, 12, 16), strides=(2, 2), norm=norm), 16
    # BasicUNet halves four times: 32 leaves InstanceNorm two voxels per axis.
    yield "BasicUNet", BasicUNet(3, 1, 2, features=(4, 6, 8, 8, 16, 4), norm=norm), 32
    try:
        from monai.networks.nets import UNETR

        yield "UNETR", UNETR(
            1, 2, (16, 16, 16), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4,
            norm_name=norm,
        ), 16  # fmt: skip
    except ImportError:  # UNETR needs einops
        pass


@pytest.mark.parametrize("name", NORM_NAMES)
def test_monai_norm_builds_monai_networks(name):
    expected = {
        "batch": nn.BatchNorm3d,
        "instance": nn.InstanceNorm3d,
        "instance_running": nn.InstanceNorm3d,
        "batchrenorm": BatchRenorm3d,
        "group": nn.GroupNorm,
        "identity": nn.Identity,
    }[name]
    for net_name, net, size in _monai_nets(monai_norm(name)):
        x = torch.randn(2, 1, size, size, size)
        kinds = {type(m) for m in net.modules()} & {
            nn.BatchNorm3d, nn.InstanceNorm3d, BatchRenorm3d, nn.GroupNorm,
        }  # fmt: skip
        if name == "identity":
            assert not kinds, net_name
        else:
            assert kinds == {expected}, (net_name, kinds)
        assert net.train()(x).shape == (2, 2, size, size, size)
        assert net.eval()(x).shape == (2, 2, size, size, size)
        if name == "instance_running":
            assert all(m.track_running_stats for m in net.modules() if isinstance(m, expected))


@pytest.mark.parametrize("monai_first", [False, True])
def test_import_registers_batchrenorm_with_monai(monai_first):
    # nahtlos registers at once if MONAI is imported, else right after MONAI's import.
    code = (
        ("import monai.networks.layers.factories\n" if monai_first else "") + "import nahtlos\n"
        "from monai.networks.nets import UNet\n"
        "net = UNet(2, 1, 1, channels=(4, 8), strides=(2,), norm='batchrenorm')\n"
        "print(sorted({type(m).__name__ for m in net.modules() if 'Renorm' in type(m).__name__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['BatchRenorm2d']"


# --- conversion -----------------------------------------------------------------------


def _norm_types(model):
    return {type(m) for m in model.modules()} & {
        *BN.values(), *BRN.values(), nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.GroupNorm,
    }  # fmt: skip


@pytest.mark.parametrize("num_res_units", [0, 2])
def test_batchnorm_unet_to_batchrenorm_and_back_keeps_eval_outputs(num_res_units):
    net = make_unet(3, 2, norm="batch", num_res_units=num_res_units)
    x = torch.randn(2, 1, 16, 16, 16)
    expected = net(x)
    brn = convert_norms(copy.deepcopy(net), "batchrenorm", r_max=3.0, d_max=5.0)
    assert _norm_types(brn) == {BatchRenorm3d}
    assert not brn.training
    assert torch.equal(brn(x), expected)
    # Train the BatchRenorm model (changes statistics and weights), then export to BatchNorm.
    brn.train()
    opt = torch.optim.SGD(brn.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        brn(x).square().mean().backward()
        opt.step()
    brn.eval()
    trained = brn(x)
    bn = convert_norms(copy.deepcopy(brn), "batch")
    assert _norm_types(bn) == {nn.BatchNorm3d}
    assert torch.equal(bn(x), trained)
    assert next(m.momentum for m in bn.modules() if isinstance(m, nn.BatchNorm3d)) == 0.1


def test_conversion_of_monai_networks_keeps_affine_parameters():
    from monai.networks.nets import BasicUNet

    net = BasicUNet(3, 1, 2, features=(4, 6, 8, 8, 16, 4))  # affine InstanceNorm
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    before = [(m.weight.clone(), m.bias.clone()) for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]  # fmt: skip
    with pytest.warns(NahtlosWarning, match="running statistics"):
        convert_norms(net, "batchrenorm")
    after = [(m.weight, m.bias) for m in net.modules() if isinstance(m, BatchRenorm3d)]
    assert len(after) == len(before) > 0
    for (w0, b0), (w1, b1) in zip(before, after, strict=True):
        assert torch.equal(w0, w1) and torch.equal(b0, b1)
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.isfinite(net.train()(x)).all()


def test_conversion_of_unetr_if_available():
    pytest.importorskip("einops")
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(1, 2, (16, 16, 16), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4,
                norm_name="batch").eval()  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 1, 16, 16, 16)
    expected = net(x)
    convert_norms(net, "batchrenorm")
    assert _norm_types(net) == {BatchRenorm3d}
    assert torch.equal(net(x), expected)


class _NNUNetStyle(nn.Module):
    """Conv-norm-nonlin stages in ModuleLists/ModuleDicts, as nnU-Net's generic nets."""

    def __init__(self, norm: type[nn.Module]):
        super().__init__()
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, padding=1), norm(o, affine=True), nn.LeakyReLU())
            for i, o in ((1, 4), (4, 8))
        )
        self.heads = nn.ModuleDict({"seg": nn.Conv2d(8, 2, 1)})
        self.shared = self.encoder[1][1]  # the same layer reachable twice

    def forward(self, x):
        for stage in self.encoder:
            x = stage(x)
        return self.heads["seg"](x)


def test_conversion_of_nnunet_style_instance_running_net():
    net = _NNUNetStyle(
        lambda c, affine: nn.InstanceNorm2d(c, affine=affine, track_running_stats=True)
    )
    x = torch.randn(3, 1, 12, 12)
    net.train()
    for _ in range(3):
        net(x)  # running statistics
    net.eval()
    expected = net(x)
    bn = convert_norms(copy.deepcopy(net), "batch")
    assert _norm_types(bn) == {nn.BatchNorm2d}
    assert bn.shared is bn.encoder[1][1]
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-6)
    for old, new in zip(net.modules(), bn.modules(), strict=True):
        if isinstance(new, nn.BatchNorm2d):
            assert torch.equal(new.running_mean, old.running_mean)
            assert torch.equal(new.running_var, old.running_var)
            assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)


def test_conversion_of_sequential_with_group_norm_and_root_layer():
    seq = nn.Sequential(nn.Conv3d(1, 8, 3), nn.GroupNorm(4, 8), nn.ReLU())
    with pytest.warns(NahtlosWarning):
        convert_norms(seq, "batchrenorm")
    assert isinstance(seq[1], BatchRenorm3d)
    back = convert_norms(seq, "group")
    assert isinstance(back[1], nn.GroupNorm) and back[1].num_groups == 8
    with pytest.raises(NormError, match="pass ndim"):
        convert_norms(nn.GroupNorm(2, 4), "batch")
    with pytest.warns(NahtlosWarning):
        layer = convert_norms(nn.GroupNorm(2, 4), "batchrenorm", ndim=2)
    assert isinstance(layer, BatchRenorm2d)
    ident = convert_norms(nn.Sequential(nn.BatchNorm2d(3)), "identity")
    assert isinstance(ident[0], nn.Identity)
    # Same kind without options: the very same layer is kept.
    keep = nn.Sequential(nn.BatchNorm2d(3))
    layer0 = keep[0]
    assert convert_norms(keep, "batch")[0] is layer0


def test_conversion_keeps_dtype_and_batchrenorm_settings():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), BatchRenorm2d(4, r_max=2.0, d_max=1.0)).double()
    seq[1].freeze_statistics = True
    convert_norms(seq, "batchrenorm", momentum=0.2)
    new = seq[1]
    assert (new.r_max, new.d_max, new.momentum, new.freeze_statistics) == (2.0, 1.0, 0.2, True)
    assert new.running_mean.dtype == torch.float64 == new.weight.dtype


def test_convert_norms_rejects_torchscript_and_unknown_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(NormError, match="TorchScript"):
        convert_norms(scripted, "batchrenorm")
    with pytest.raises(NormError, match="unknown norm"):
        convert_norms(nn.Sequential(), "renorm")


# --- files and the command line -------------------------------------------------------


def test_convert_file_and_cli_on_torchscript_explain_what_to_do(tmp_path):
    path = tmp_path / "bn.pt"
    save_torchscript(make_unet(3, 2, norm="batch"), path, example=torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(NormError, match=r"TorchScript.*BatchNorm3d.*convert_norms"):
        convert_model_file(path, tmp_path / "out.pt", "batchrenorm")
    result = CliRunner().invoke(
        app, ["convert", str(path), str(tmp_path / "out.pt"), "--to", "batchrenorm"]
    )
    assert result.exit_code == 2
    assert "convert_norms" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.pt").exists()
    result = CliRunner().invoke(app, ["convert", str(path), str(path), "--to", "batch"])
    assert result.exit_code == 2 and "exists" in result.output
    result = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "o.pt"), "--to", "x"])
    assert result.exit_code == 2 and "batchrenorm" in result.output
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "nope.pt"), "o.pt", "--to", "batch"]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
