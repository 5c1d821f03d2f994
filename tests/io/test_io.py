from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.transform import downscale_local_mean

from nahtlos import open_image, save_image
from nahtlos.engine.geometry import BlockGrid
from nahtlos.errors import BlockShapeError, FormatError, IncompleteOutputError
from nahtlos.io import ChunkCache, PredictionStore, check_output_path, open_source

UM = "micrometer"

# (file name, save_image options, whether the format stores axes and scale)
FORMATS = [
    ("img.npy", {}, False),
    ("img.tif", {}, True),
    ("img.h5", {}, True),
    ("v2.zarr", {"ome": None, "zarr_format": 2}, True),
    ("v3.zarr", {"ome": None, "zarr_format": 3}, True),
    ("ome04.zarr", {"ome": "0.4"}, True),
    ("ome05.zarr", {"ome": "0.5"}, True),
]


@pytest.mark.parametrize(("name", "options", "has_meta"), FORMATS)
@pytest.mark.parametrize("axes", ["czyx", "zyx", "yx"])
def test_round_trip_data_axes_scale(tmp_path, name, options, has_meta, axes):
    rng = np.random.default_rng(len(axes))
    shape = {"c": 2, "z": 5, "y": 12, "x": 9}
    data = rng.integers(0, 4000, [shape[a] for a in axes]).astype(np.uint16)
    scale = tuple(1.0 if a == "c" else float(rng.uniform(0.1, 3.0)) for a in axes)
    units = tuple(None if a == "c" else UM for a in axes)
    path = save_image(tmp_path / name, data, axes=axes, scale=scale, units=units, **options)
    src = open_source(path)
    assert src.dtype == data.dtype
    np.testing.assert_array_equal(np.asarray(src.array[...]), data)
    if has_meta:
        assert src.axes == tuple(axes) and src.axes_known
        np.testing.assert_allclose(src.scale, scale, rtol=1e-6)
        assert src.units == units
    else:  # .npy stores no metadata: axes are guessed from the number of axes
        assert not src.axes_known and src.scale == (1.0,) * len(axes)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    scale=st.tuples(*(st.floats(0.01, 100.0) for _ in range(3))),
    version=st.sampled_from(["0.4", "0.5"]),
)
def test_ome_zarr_round_trip_property(tmp_path_factory, shape, scale, version):
    path = tmp_path_factory.mktemp("ome") / "img.zarr"
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    save_image(path, data, axes="zyx", scale=scale, units=(UM,) * 3, ome=version)
    src = open_source(path)
    np.testing.assert_array_equal(src.array[...], data)
    np.testing.assert_allclose(src.scale, scale, rtol=1e-12)
    assert src.axes == ("z", "y", "x") and src.levels == 1


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


def test_for_model_drops_singletons_and_names_bad_axes(tmp_path):
    tczyx = np.random.default_rng(2).random((1, 2, 1, 8, 7), dtype=np.float32)
    path = save_image(tmp_path / "t.zarr", tczyx, axes="tczyx", scale=(1, 1, 3, 0.5, 0.5))
    view = open_source(path).for_model(2)
    assert view.axes == ("c", "y", "x")
    np.testing.assert_array_equal(view.array[...], tczyx[0, :, 0])
    assert view.axis_info("yx")[0] == (0.5, 0.5)
    save_image(tmp_path / "t3.zarr", np.zeros((3, 4, 8, 7)), axes="tzyx")
    with pytest.raises(BlockShapeError, match="3 entries along axis 't'"):
        open_source(tmp_path / "t3.zarr").for_model(3)
    save_image(tmp_path / "z.zarr", np.zeros((4, 8, 7)), axes="zyx")
    with pytest.raises(BlockShapeError, match="4 z planes along axis 'z'"):
        open_source(tmp_path / "z.zarr").for_model(2)


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


# (4, 16, 16): level 1 is pooled from each block as it is written, in half-block chunks;
# (3, 15, 15): pooling boxes straddle blocks, so level 1 is built from level 0 at the end
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


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_chunk_cache_reads_equal_direct_reads(data):
    shape = data.draw(st.tuples(*(st.integers(1, 12) for _ in range(3))))
    chunks = tuple(data.draw(st.integers(1, n)) for n in shape)
    base = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    store = zarr.create_array(store={}, shape=shape, chunks=chunks, dtype=np.int32)
    store[...] = base
    capacity = data.draw(st.integers(1, 8))
    cache = ChunkCache(store, capacity)
    for _ in range(4):
        key = []
        for n in shape:
            if data.draw(st.booleans()):
                key.append(data.draw(st.integers(-n, n - 1)))
            else:
                a = data.draw(st.integers(0, n))
                key.append(slice(a, data.draw(st.integers(a, n + 2))))
        np.testing.assert_array_equal(cache[tuple(key)], base[tuple(key)])
        assert len(cache._cache) <= capacity
    np.testing.assert_array_equal(cache[...], base)
