"""Preparing a prediction from a model file: metadata, measured geometry, whole-image statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_unet
from nahtlos.engine.global_stats import freeze_norms, placeholder_stats
from nahtlos.engine.predict import predict_whole
from nahtlos.engine.prepare import prepare_prediction
from nahtlos.errors import SettingsError
from nahtlos.io import open_source
from nahtlos.nets.checkpoint import load_model, save_torchscript
from nahtlos.testing import largest_difference


def test_prepare_fills_in_from_the_metadata(tmp_path):
    meta = {
        "ndim": 3,
        "halo": [12, 12, 12],
        "alignment": [4, 4, 4],
        "activation": "identity",
        "classes": ["a", "b"],
    }
    path = tmp_path / "unet.pt"
    save_torchscript(make_unet(3, 2), path, example=torch.zeros(1, 1, 16, 16, 16), metadata=meta)
    np.save(tmp_path / "img.npy", np.zeros((20, 28, 24), np.float32))
    loaded, source = load_model(path), open_source(tmp_path / "img.npy")
    messages: list[str] = []
    out = tmp_path / "out.zarr"
    prepared = prepare_prediction(loaded, source, out, block=(8, 12, 12), log=messages.append)
    assert prepared.geometry == {
        "block": (8, 12, 12),
        "halo": [12] * 3,
        "alignment": [4] * 3,
        "ndim": 3,
    }
    assert not prepared.auto and prepared.model is loaded and prepared.normalization is None
    assert prepared.activation == "none" and prepared.channel_names == ["a", "b"]
    assert messages == []
    # the block is measured from a memory budget: a bad budget is named
    with pytest.raises(SettingsError, match="--max-memory: memory size 'lots'"):
        prepare_prediction(loaded, source, out, max_memory="lots")


@pytest.fixture(scope="module")
def instance_checkpoint(tmp_path_factory):
    """A briefly trained InstanceNorm U-Net checkpoint and an image to predict."""
    import tifffile

    from nahtlos.training.config import validate_config
    from nahtlos.training.loop import train

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
    other = np.random.default_rng(4).random((70, 53), dtype=np.float32)
    other[:, : 53 // 3] *= 3  # regions with different statistics
    other *= 300
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
