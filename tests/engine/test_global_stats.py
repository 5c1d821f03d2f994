from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_unet
from nahtlos.analysis.metrics import tile_mismatch
from nahtlos.engine.global_stats import (
    GlobalNormStats,
    compute_global_stats,
    freeze_norms,
    placeholder_stats,
    tile_norm_layers,
)
from nahtlos.engine.predict import predict_blockwise, predict_whole
from nahtlos.testing import largest_difference

NORMS = {
    "instance": "instance",
    "instance_affine": ("instance", {"affine": True}),
    "group": ("group", {"num_groups": 2}),
}


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    img[..., : shape[-1] // 3] *= 3  # regions with different statistics
    return img


def _perturb_affine(net):
    gen = torch.Generator().manual_seed(5)
    for _, m in tile_norm_layers(net):
        if getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return net


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize(
    ("ndim", "shape", "blocks"),
    [(2, (70, 53), [(32, 32), (16, 48)]), (3, (20, 30, 26), [(8, 16, 12), (16, 8, 8)])],
)
def test_global_statistics_blockwise_equals_whole_image(norm, ndim, shape, blocks):
    net = _perturb_affine(make_unet(ndim, 2, norm=NORMS[norm], seed=2))
    image = _image(shape)
    halo, align = 12, 4
    reference = predict_whole(net, image, halo, align)
    span = float(reference.max() - reference.min())
    # the plain tile-wise prediction really is different
    tiled = predict_blockwise(net, image, blocks[0], halo, align, progress=False)
    assert largest_difference(tiled, reference)[0] > 1e-3 * span
    for block in blocks:
        stats = compute_global_stats(
            net, image, block=block, halo=halo, alignment=align, progress=False
        )
        assert len(stats.layers) == len(tile_norm_layers(net)) > 0
        frozen = freeze_norms(net, stats)
        got = predict_blockwise(frozen, image, block, halo, align, progress=False, batch_size=2)
        diff, where = largest_difference(got, reference)
        assert diff <= 1e-4 * span, (block, diff, where)


def test_frozen_model_is_seamless_and_original_untouched():
    net = make_unet(2, 2, norm="instance")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = _image((96, 96))
    stats = compute_global_stats(net, image, block=32, halo=12, alignment=4, progress=False)
    frozen = freeze_norms(net, stats)
    assert tile_mismatch(frozen, image, window=64, halo=12, alignment=4, stride=32).seamless
    assert not tile_mismatch(net, image, window=64, halo=12, alignment=4, stride=32).seamless
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules())


def test_sampled_statistics_close_to_exact_and_stderr_reported(tmp_path):
    net = make_unet(2, 2, norm="instance")
    image = _image((160, 160))
    exact = compute_global_stats(net, image, block=16, halo=12, alignment=4, progress=False)
    sampled = compute_global_stats(
        net, image, block=16, halo=12, alignment=4, fraction=0.25, progress=False
    )
    assert sampled.mode == "sampled" and sampled.blocks_used < sampled.blocks_total
    assert sampled.max_stderr is not None and sampled.max_stderr > 0
    for e, s in zip(exact.layers, sampled.layers, strict=True):
        sigma = np.sqrt(e.var)
        # within 5 estimated standard errors (and well within a tenth of a standard deviation)
        err = np.abs(s.mean - e.mean) / sigma
        assert err.max() <= max(5 * sampled.max_stderr, 1e-6)
        assert err.max() < 0.1
        assert np.abs(np.sqrt(s.var) / sigma - 1).max() < 0.1
    path = exact.save(tmp_path / "stats.npz")
    again = GlobalNormStats.load(path)
    assert again.fingerprint == exact.fingerprint
    for a, b in zip(again.layers, exact.layers, strict=True):
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.var, b.var)


def test_fingerprint_changes_with_model_and_image():
    net = make_unet(2, 2, norm="instance")
    image = _image((32, 32))
    a = compute_global_stats(net, image, block=32, halo=12, alignment=4, progress=False)
    b = compute_global_stats(net, image * 2, block=32, halo=12, alignment=4, progress=False)
    assert (
        a.fingerprint
        == compute_global_stats(
            net, image, block=16, halo=12, alignment=4, progress=False
        ).fingerprint
    )
    assert (
        a.fingerprint
        != compute_global_stats(
            make_unet(2, 2, norm="instance", seed=9),
            image,
            block=32,
            halo=12,
            alignment=4,
            progress=False,
        ).fingerprint
    )
    assert b.layers[0].mean.tolist() != a.layers[0].mean.tolist()


def test_running_stats_instance_norm_only_when_ignored():
    net = make_unet(2, 2, norm=("instance", {"track_running_stats": True, "affine": True}))
    assert tile_norm_layers(net) == []
    assert len(tile_norm_layers(net, ignore_running_stats=True)) > 0


# ------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def instance_checkpoint(tmp_path_factory):
    """A briefly trained InstanceNorm U-Net checkpoint and an image to predict."""
    import tifffile

    from nahtlos.training.config import validate_config
    from nahtlos.training.train import train

    tmp = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.int32)
    labels[10:30, 10:30], labels[40:60, 30:50] = 1, 2
    image = (200.0 * (labels > 0) + rng.normal(50, 15, labels.shape)).astype(np.float32)
    tifffile.imwrite(tmp / "image.tif", image)
    np.save(tmp / "labels.npy", labels)
    cfg = validate_config(
        {
            "data": {
                "train": [{"image": str(tmp / "image.tif"), "labels": str(tmp / "labels.npy")}],
                "split": {"fraction": 0.5, "axis": "x"},
                "patch": [32, 32],
            },
            "model": {"ndim": 2, "norm": "instance", "channels": [4, 8, 16]},
            "train": {"steps": 2, "batch_size": 2, "val_every": 100, "val_block": [32, 32]},
            "out": str(tmp / "run"),
        }
    )
    train(cfg, progress=False)
    other = _image((70, 53), seed=4) * 300
    np.save(tmp / "other.npy", other)
    return tmp / "run" / "model.pt", tmp / "other.npy", other


def _predict_cli(*args):
    from typer.testing import CliRunner

    from nahtlos.cli import app

    return CliRunner().invoke(app, ["predict", *map(str, args), "--no-progress"])


def test_cli_norm_stats_global_equals_whole_image_and_reuses_statistics(
    instance_checkpoint, tmp_path
):
    from nahtlos.io import InputNormalization, open_image
    from nahtlos.nets.checkpoint import load_model

    ckpt, source, image = instance_checkpoint
    loaded = load_model(ckpt)
    norm = InputNormalization.from_dict({**loaded.metadata["input_normalization"], "values": None})
    norm.fit(image)
    reference = predict_whole(
        loaded.module, image, 12, 4, input_transform=norm, output_transform=torch.sigmoid
    )
    tiled = None
    for mode in ("tile", "global"):
        out = tmp_path / f"{mode}.zarr"
        result = _predict_cli(
            ckpt, source, out, "--block", "16,16", "--halo", "12", "--norm-stats", mode
        )
        assert result.exit_code == 0, result.output
        got = np.asarray(open_image(out)[...])
        diff = largest_difference(got, reference)[0]
        if mode == "tile":
            tiled = diff
        else:
            assert diff <= 1e-4, diff
            assert (
                "computed" in result.output and (tmp_path / "global.zarr.norm-stats.npz").is_file()
            )
    assert tiled is not None and tiled > 1e-3
    # a second prediction of the same image reuses the statistics
    again = _predict_cli(
        ckpt,
        source,
        tmp_path / "again.zarr",
        "--block",
        "16,16",
        "--halo",
        "12",
        "--norm-stats",
        "global",
        "--norm-stats-file",
        tmp_path / "global.zarr.norm-stats.npz",
    )
    assert again.exit_code == 0, again.output
    assert "reused from" in again.output
    np.testing.assert_array_equal(
        open_image(tmp_path / "again.zarr")[...], open_image(tmp_path / "global.zarr")[...]
    )


def test_cli_norm_stats_auto_halo_is_the_frozen_receptive_field(instance_checkpoint, tmp_path):
    from nahtlos.nets.checkpoint import load_model
    from nahtlos.nets.receptive_field import receptive_field, recommend_halo

    ckpt, source, _ = instance_checkpoint
    loaded = load_model(ckpt)
    frozen = freeze_norms(loaded.module, placeholder_stats(loaded.module))
    expected = recommend_halo(receptive_field(frozen, 2, 1), warn=False)
    result = _predict_cli(ckpt, source, tmp_path / "auto.zarr", "--norm-stats", "sampled:0.5")
    assert result.exit_code == 0, result.output
    assert f"halo {','.join(map(str, expected))} (auto: TRF radius)" in result.output


def test_cli_norm_stats_errors(instance_checkpoint, tmp_path):
    ckpt, source, _ = instance_checkpoint
    bad = _predict_cli(
        ckpt,
        source,
        tmp_path / "x.zarr",
        "--block",
        "16",
        "--halo",
        "12",
        "--norm-stats",
        "sampled:2",
    )
    assert bad.exit_code == 2 and "fraction" in bad.output
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(make_unet(2, 2, norm="instance")), str(scripted))
    bad = _predict_cli(
        scripted,
        source,
        tmp_path / "y.zarr",
        "--block",
        "16",
        "--halo",
        "12",
        "--norm-stats",
        "global",
    )
    assert bad.exit_code == 2 and "TorchScript" in bad.output
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_cli_norm_stats_global_opens_a_tiff_input_once(instance_checkpoint, tmp_path, monkeypatch):
    import tifffile

    from nahtlos.io import open_image

    ckpt, source, image = instance_checkpoint
    tiff = tmp_path / "image.tif"
    tifffile.imwrite(tiff, image)
    opened: list[str] = []
    init = tifffile.TiffFile.__init__

    def counting(self, file, *args, **kwargs):
        opened.append(str(file))
        init(self, file, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "__init__", counting)
    out = tmp_path / "global.zarr"
    result = _predict_cli(
        ckpt, tiff, out, "--block", "16,16", "--halo", "12", "--norm-stats", "global"
    )
    assert result.exit_code == 0, result.output
    # input percentiles, whole-image statistics and prediction all read the one open file
    assert opened == [str(tiff)]
    npy = _predict_cli(
        ckpt,
        source,
        tmp_path / "npy.zarr",
        "--block",
        "16,16",
        "--halo",
        "12",
        "--norm-stats",
        "global",
    )
    assert npy.exit_code == 0, npy.output
    np.testing.assert_array_equal(open_image(out)[...], open_image(tmp_path / "npy.zarr")[...])
