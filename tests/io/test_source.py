"""ImageSource views: the model layout and the chunk cache."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nahtlos import save_image
from nahtlos.errors import BlockShapeError
from nahtlos.io import ChunkCache, open_source


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
