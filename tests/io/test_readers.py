"""Reading images: levels of OME-Zarr, ImageJ TIFF and Fiji HDF5 metadata."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from nahtlos import open_image, save_image
from nahtlos.errors import FormatError
from nahtlos.io import open_source

UM = "micrometer"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels(tmp_path, version):
    data = np.random.default_rng(0).random((2, 6, 32, 24), dtype=np.float32)
    path = save_image(
        tmp_path / "img.zarr",
        data,
        axes="czyx",
        scale=(1, 2.0, 0.5, 0.5),
        ome=version,
        pyramid_levels=2,
    )
    fmt = zarr.open_group(path, mode="r").info._zarr_format
    assert fmt == (2 if version == "0.4" else 3)
    full = open_source(path)
    assert full.levels == 3
    for level in (1, 2):
        src = open_source(path, level=level)
        f = 2**level
        assert src.shape == (2, 6, 32 // f, 24 // f)
        np.testing.assert_allclose(src.scale, (1, 2.0, 0.5 * f, 0.5 * f))
        stored = zarr.open_group(path, mode="r")[f"s{level}"]
        np.testing.assert_array_equal(open_image(path, level=level)[...], stored[...])
    with pytest.raises(FormatError, match="3 resolution levels"):
        open_source(path, level=3)
    with pytest.raises(FormatError, match="single resolution level"):
        save_image(tmp_path / "a.npy", data)
        open_source(tmp_path / "a.npy", level=1)


def test_imagej_tiff_axes_and_channel_view(tmp_path):
    czyx = np.random.default_rng(1).integers(0, 255, (3, 4, 10, 8)).astype(np.uint8)
    path = tmp_path / "ij.tif"
    # ImageJ stores hyperstacks as TZCYX: the channel axis comes after z
    tifffile.imwrite(
        path,
        czyx.transpose(1, 0, 2, 3),
        imagej=True,
        resolution=(4.0, 4.0),
        metadata={"axes": "ZCYX", "spacing": 1.5, "unit": "um"},
    )
    src = open_source(path)
    assert src.axes == ("z", "c", "y", "x")
    assert src.axis_info("zyx") == ((1.5, 0.25, 0.25), (UM, UM, UM))
    view = src.for_model(3)
    assert view.axes == ("c", "z", "y", "x") and view.shape == czyx.shape
    np.testing.assert_array_equal(view.array[...], czyx)
    np.testing.assert_array_equal(view.array[1:3, :, 2:7, ::2], czyx[1:3, :, 2:7, ::2])


def test_fiji_hdf5_element_size(tmp_path):
    path = tmp_path / "fiji.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((4, 6, 5), np.float32)
        f["raw"].attrs["element_size_um"] = [2.0, 0.3, 0.3]
    src = open_source(f"{path}:raw")
    assert src.axis_info("zyx") == ((2.0, 0.3, 0.3), (UM, UM, UM))


@pytest.fixture
def tiff_opens(monkeypatch):
    """The paths of every ``tifffile.TiffFile`` made while the test runs."""
    opened: list[str] = []
    init = tifffile.TiffFile.__init__

    def counting(self, file, *args, **kwargs):
        opened.append(str(file))
        init(self, file, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "__init__", counting)
    return opened


@pytest.mark.parametrize("compressed", [False, True])
def test_a_tiff_is_opened_once(tmp_path, tiff_opens, compressed):
    data = np.random.default_rng(3).random((5, 40, 36), dtype=np.float32)
    path = tmp_path / "img.tif"
    options = {"compression": "zlib", "tile": (16, 16)} if compressed else {}
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"}, **options)
    tiff_opens.clear()
    src = open_source(path)
    assert isinstance(src.array, np.memmap) != compressed
    assert src.axes == ("z", "y", "x") and src.axes_known
    # reads go through the handle the header was parsed with
    np.testing.assert_array_equal(src.array[1:4, 3:30, 5:], data[1:4, 3:30, 5:])
    np.testing.assert_array_equal(src.array[...], data)
    assert tiff_opens == [str(path)]
