"""The resumable prediction store: blocks, resume, pyramid, labels, plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from skimage.transform import downscale_local_mean

from nahtlos import open_image, save_image
from nahtlos.engine.geometry import BlockGrid
from nahtlos.errors import FormatError, IncompleteOutputError
from nahtlos.io import PredictionStore, check_output_path, open_source

UM = "micrometer"


def _filled_store(path, data, block, **kwargs):
    grid = BlockGrid(data.shape[1:], block)
    store = PredictionStore.create(path, shape=data.shape, block=grid.block, **kwargs)
    return store, grid


def test_store_incomplete_until_finalized(tmp_path):
    data = np.random.default_rng(3).random((2, 9, 20, 14), dtype=np.float32)
    path = tmp_path / "pred.ome.zarr"
    store, grid = _filled_store(path, data, (4, 8, 8), plan={"x": 1})
    blocks = list(grid)
    for blk in blocks[:-1]:
        store.write_block(blk, data[(slice(None), *blk.inner)])
    assert store.progress() == (len(blocks) - 1, len(blocks))
    for read in (lambda: open_image(path), lambda: open_source(path)):
        with pytest.raises(IncompleteOutputError, match=f"{len(blocks) - 1} of {len(blocks)}"):
            read()
    with pytest.raises(FormatError, match=r"interrupted run.*--resume"):
        check_output_path(path)
    with pytest.raises(IncompleteOutputError, match="1 of"):
        store.finalize()
    # another process (a resumed run) finishes it
    again = PredictionStore.open(path)
    assert again.plan == {"x": 1} and not again.complete
    assert again.done().sum() == len(blocks) - 1
    again.write_block(blocks[-1], data[(slice(None), *blocks[-1].inner)])
    again.finalize()
    np.testing.assert_array_equal(open_image(path)[...], data)
    assert PredictionStore.open(path, mode="r").complete
    assert "nahtlos_done" not in zarr.open_group(path, mode="r")


def test_store_chunks_are_blocks_and_dtypes(tmp_path):
    rng = np.random.default_rng(4)
    probs = rng.random((3, 10, 17), dtype=np.float32)
    probs[0, 0, :3] = (0.0, 1.0, 0.5 / 255)  # exact ends and a rounding tie
    for dtype in ("float32", "float16", "uint8"):
        path = tmp_path / f"{dtype}.zarr"  # a plain array
        store, grid = _filled_store(path, probs, (8, 8), dtype=dtype)
        assert zarr.open_array(path).chunks == (3, 8, 8)
        for blk in grid:
            store.write_block(blk, probs[(slice(None), *blk.inner)])
        store.finalize()
        got = np.asarray(open_image(path)[...])
        assert got.dtype == np.dtype(dtype)
        if dtype == "uint8":
            np.testing.assert_array_equal(got, np.rint(probs * 255).astype(np.uint8))
        else:
            np.testing.assert_array_equal(got, probs.astype(dtype))


@pytest.mark.parametrize("block", [(4, 16, 16), (3, 15, 15)])
def test_ome_zarr_output_reader_pyramid_and_labels(tmp_path, block):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    rng = np.random.default_rng(5)
    probs = rng.random((3, 8, 40, 36), dtype=np.float32)
    path = tmp_path / "pred.ome.zarr"
    store, grid = _filled_store(
        path,
        probs,
        block,
        pyramid_levels=2,
        scale=(2.0, 0.25, 0.25),
        units=(UM,) * 3,
        translation=(10.0, 0.0, 5.0),
        segmentation="argmax",
        channel_names=["background", "foreground", "boundaries"],
    )
    for blk in grid:
        store.write_block(blk, probs[(slice(None), *blk.inner)])
    store.finalize()

    nodes = list(Reader(parse_url(str(path)))())
    image = next(n for n in nodes if n.load(Multiscales) and not n.load(Label))
    # napari-style axes: a leading channel axis (napari's channel_axis=0), then z, y, x
    axes = image.metadata["axes"]
    assert [(a["name"], a["type"]) for a in axes] == [
        ("c", "channel"),
        ("z", "space"),
        ("y", "space"),
        ("x", "space"),
    ]
    assert [a.get("unit") for a in axes] == [None, UM, UM, UM]
    assert image.metadata["name"] == "pred.ome.zarr"
    shapes = [tuple(d.shape) for d in image.data]
    # z (2 µm) is coarser than y, x (0.25 µm): halved only once they reach it
    assert shapes == [(3, 8, 40, 36), (3, 8, 20, 18), (3, 8, 10, 9)]
    transforms = image.metadata["coordinateTransformations"]
    assert transforms[1][0]["scale"] == [1.0, 2.0, 0.5, 0.5]
    assert transforms[1][1]["translation"] == [0.0, 10.0, 0.125, 5.125]
    # the pyramid is the box mean of the level below (an independent reference)
    level1 = downscale_local_mean(probs, (1, 1, 2, 2))
    np.testing.assert_allclose(np.asarray(image.data[1]), level1, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(image.data[2]), downscale_local_mean(level1, (1, 1, 2, 2)), rtol=1e-6
    )
    chunks = [zarr.open_group(path, mode="r")[f"s{i}"].chunks for i in range(3)]
    assert chunks[0] == (3, *block)
    assert chunks[1] == chunks[2] == ((3, 4, 8, 8) if block[1] == 16 else (3, *block))
    label = next(n for n in nodes if n.load(Label))
    assert label.metadata["name"] == "argmax"
    np.testing.assert_array_equal(np.asarray(label.data[0]), np.argmax(probs, axis=0))
    argmax = np.argmax(probs, axis=0)
    np.testing.assert_array_equal(np.asarray(label.data[1]), argmax[:, ::2, ::2])
    np.testing.assert_array_equal(np.asarray(label.data[2]), argmax[:, ::4, ::4])
    assert label.metadata["properties"][2]["channel"] == "boundaries"
    # the labels are an image of their own, with the image's spatial scale
    src = open_source(f"{path}:labels/argmax")
    assert src.axes == ("z", "y", "x") and src.scale == (2.0, 0.25, 0.25)


def test_threshold_labels(tmp_path):
    probs = np.random.default_rng(6).random((2, 12, 10), dtype=np.float32)
    path = tmp_path / "pred.ome.zarr"
    store, grid = _filled_store(path, probs, (8, 8), segmentation="threshold", threshold=0.3)
    for blk in grid:
        store.write_block(blk, probs[(slice(None), *blk.inner)])
    store.finalize()
    for c in range(2):
        got = open_image(f"{path}:labels/c{c}")[...]
        np.testing.assert_array_equal(got, (probs[c] > 0.3).astype(np.uint8))


def test_plain_zarr_output_is_an_array_with_axes_and_scale(tmp_path):
    probs = np.random.default_rng(8).random((2, 9, 20, 14), dtype=np.float32)
    path = tmp_path / "pred.zarr"
    store, grid = _filled_store(path, probs, (4, 8, 8), scale=(3.0, 0.5, 0.5), units=(UM,) * 3)
    blocks = list(grid)
    for blk in blocks[:3]:
        store.write_block(blk, probs[(slice(None), *blk.inner)])
    assert PredictionStore.blocks_path(path).exists()
    with pytest.raises(IncompleteOutputError, match=f"3 of {len(blocks)}"):
        open_image(path)
    with pytest.raises(FormatError, match="interrupted run"):
        check_output_path(path)
    again = PredictionStore.open(path)
    assert again.progress() == (3, len(blocks))
    for blk in blocks[3:]:
        again.write_block(blk, probs[(slice(None), *blk.inner)])
    again.finalize()
    assert not PredictionStore.blocks_path(path).exists()
    arr = zarr.open_array(path, mode="r")  # any zarr reader sees one array
    np.testing.assert_array_equal(arr[...], probs)
    src = open_source(path)
    assert src.axes == ("c", "z", "y", "x") and src.scale == (1.0, 3.0, 0.5, 0.5)
    assert src.units == (None, UM, UM, UM)
    with pytest.raises(FormatError, match=r"name it pred\.ome\.zarr"):
        PredictionStore.create(
            tmp_path / "x" / "pred.zarr", shape=(2, 4, 4), block=(4, 4), segmentation="argmax"
        )


def test_existing_non_nahtlos_zarr_is_not_resumed(tmp_path):
    save_image(tmp_path / "other.zarr", np.zeros((4, 4)), ome=None)
    with pytest.raises(FormatError, match="not a nahtlos prediction output"):
        PredictionStore.open(tmp_path / "other.zarr")
    with pytest.raises(FormatError, match=r"only \.zarr outputs"):
        check_output_path(tmp_path / "x.npy", resume=True)
