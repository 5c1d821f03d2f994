from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from typer.testing import CliRunner

from conftest import make_unet
from nahtlos import open_image, predict_whole
from nahtlos.cli import app
from nahtlos.nets.checkpoint import load_model, save_torchscript

runner = CliRunner()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "unet.pt"
    net = make_unet(3, 2)
    save_torchscript(net, path, example=torch.zeros(1, 1, 16, 16, 16), metadata={"ndim": 3})
    return path, net


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).random((20, 28, 24), dtype=np.float32)


def _write_input(kind, path, image):
    if kind == "npy":
        target = path / "img.npy"
        np.save(target, image)
    elif kind == "tif":
        target = path / "img.tif"
        tifffile.imwrite(target, image)
    elif kind == "tif-compressed":
        target = path / "img.tif"
        tifffile.imwrite(target, image, compression="zlib", tile=(16, 16))
    elif kind == "zarr":
        target = path / "img.zarr"
        zarr.create_array(target, shape=image.shape, chunks=(8, 8, 8), dtype="f4")[...] = image
    else:
        target = path / "img.h5"
        with h5py.File(target, "w") as f:
            f["volume/raw"] = image
            f["other"] = np.zeros(3)
        return f"{target}:volume/raw"
    return str(target)


@pytest.mark.parametrize("kind", ["npy", "tif", "tif-compressed", "zarr", "h5"])
@pytest.mark.parametrize("out_ext", [".zarr", ".npy", ".tif"])
def test_predict_formats_round_trip(kind, out_ext, tmp_path, model_file, image):
    path, net = model_file
    source = _write_input(kind, tmp_path, image)
    out = tmp_path / f"pred{out_ext}"
    result = runner.invoke(
        app,
        [
            "predict",
            str(path),
            source,
            str(out),
            "--block",
            "8,12,12",
            "--halo",
            "12",
            "--alignment",
            "4",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    got = np.asarray(open_image(out)[...])
    assert got.dtype == np.float32 and got.shape == (2, *image.shape)
    np.testing.assert_allclose(got, predict_whole(net, image, 12, 4), atol=1e-5)
    assert not list(tmp_path.glob(".*partial*"))


def _invoke_error(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nahtlos: error:"), result.output
    return lines[0]


def test_errors_are_one_line_exit_2_and_leave_nothing(tmp_path, model_file, image):
    path, _ = model_file
    np.save(tmp_path / "img.npy", image)
    (tmp_path / "img.png").write_bytes(b"not an image")
    common = ["--block", "8,12,12", "--halo", "12", "--alignment", "4", "--no-progress"]
    msg = _invoke_error(
        ["predict", str(path), str(tmp_path / "img.png"), str(tmp_path / "o.zarr"), *common]
    )
    assert "unknown extension '.png'" in msg
    msg = _invoke_error(
        ["predict", str(path), str(tmp_path / "missing.npy"), str(tmp_path / "o.zarr"), *common]
    )
    assert "does not exist" in msg
    msg = _invoke_error(
        ["predict", str(path), str(tmp_path / "img.npy"), str(tmp_path / "o.png"), *common]
    )
    assert "cannot write" in msg
    msg = _invoke_error(
        [
            "predict",
            str(tmp_path / "img.npy"),
            str(tmp_path / "img.npy"),
            str(tmp_path / "o.zarr"),
            *common,
        ]
    )
    assert "not a TorchScript file" in msg
    np.save(tmp_path / "flat.npy", image[0])
    msg = _invoke_error(
        ["predict", str(path), str(tmp_path / "flat.npy"), str(tmp_path / "o.zarr"), *common]
    )
    assert "(28, 24)" in msg and "3D block" in msg
    msg = _invoke_error(
        [
            "predict",
            str(path),
            str(tmp_path / "img.npy"),
            str(tmp_path / "o.zarr"),
            "--block",
            "8,10,12",
            "--halo",
            "12",
            "--alignment",
            "4",
        ]
    )
    assert "block 10 along axis Y" in msg and "8 or 12" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.npy", "img.npy", "img.png"]


def test_model_error_mid_run_leaves_no_output(tmp_path, image):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x[..., :-1]

    path = tmp_path / "bad.pt"
    torch.jit.save(torch.jit.script(Bad()), str(path))
    np.save(tmp_path / "img.npy", image)
    msg = _invoke_error(
        [
            "predict",
            str(path),
            str(tmp_path / "img.npy"),
            str(tmp_path / "o.zarr"),
            "--block",
            "8",
            "--halo",
            "0",
            "--no-progress",
        ]
    )
    assert "returned shape" in msg
    assert not (tmp_path / "o.zarr").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_existing_output_needs_overwrite(tmp_path, model_file, image):
    path, _ = model_file
    np.save(tmp_path / "img.npy", image)
    (tmp_path / "o.npy").write_bytes(b"x")
    args = [
        "predict",
        str(path),
        str(tmp_path / "img.npy"),
        str(tmp_path / "o.npy"),
        "--block",
        "8,12,12",
        "--halo",
        "12",
        "--alignment",
        "4",
        "--no-progress",
    ]
    assert "exists" in _invoke_error(args)
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert np.load(tmp_path / "o.npy").shape == (2, *image.shape)


def test_torchscript_metadata_round_trip(model_file):
    loaded = load_model(model_file[0])
    assert loaded.metadata == {"ndim": 3}
    assert loaded.kind == "torchscript" and not loaded.module.training


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "predict" in result.output and "demo" in result.output


@pytest.mark.parametrize("kind", ["tif", "tif-compressed"])
def test_predict_opens_a_tiff_input_once(kind, tmp_path, image, monkeypatch):
    # a model whose metadata asks for global input percentiles: they are fitted on the
    # input too, and the output is checked against the normalized whole-image prediction
    net = make_unet(3, 2)
    path = tmp_path / "unet.pt"
    norm = {"mode": "global", "low": 1.0, "high": 99.8, "clip": False, "values": None}
    meta = {"ndim": 3, "halo": [12, 12, 12], "alignment": [4, 4, 4], "input_normalization": norm}
    save_torchscript(net, path, example=torch.zeros(1, 1, 16, 16, 16), metadata=meta)
    source = _write_input(kind, tmp_path, image)
    opened: list[str] = []
    init = tifffile.TiffFile.__init__

    def counting(self, file, *args, **kwargs):
        opened.append(str(file))
        init(self, file, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "__init__", counting)
    out = tmp_path / "pred.zarr"
    args = [str(path), source, str(out), "--block", "8,12,12", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    assert opened == [source]
    from nahtlos.io import InputNormalization

    fitted = InputNormalization.from_dict(norm)
    fitted.fit(image)
    expected = predict_whole(net, image, 12, 4, input_transform=fitted)
    np.testing.assert_allclose(open_image(out)[...], expected, atol=1e-4)
