from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nahtlos import NahtlosWarning
from nahtlos.engine.geometry import BlockGrid
from nahtlos.errors import BlockShapeError


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=2, max_size=3),
    block=st.integers(1, 6),
    halo=st.integers(0, 3),
    align=st.sampled_from([1, 2, 4]),
)
def test_blocks_tile_the_image_exactly_once(shape, block, halo, align):
    grid = BlockGrid(shape, block * align, halo * align, align)
    count = np.zeros(shape, np.int32)
    for blk in grid:
        count[blk.inner] += 1
        # origins and halos on the alignment grid, every window the same full shape
        assert all(s % a == 0 for s, a in zip(blk.start, grid.alignment, strict=True))
        assert all(w % a == 0 for w, a in zip(blk.window_start, grid.alignment, strict=True))
        assert blk.window_shape == grid.window_shape
        src, dst = blk.read_slices(shape)
        for s, d in zip(src, dst, strict=True):
            assert s.stop - s.start == d.stop - d.start
        # the crop of the window is the inner region
        for c, a, w0 in zip(blk.crop, blk.start, blk.window_start, strict=True):
            assert w0 + c.start == a
    assert (count == 1).all()


def test_window_read_slices_and_padding():
    grid = BlockGrid((10, 7), block=4, halo=2)
    blk = grid[(2, 1)]
    assert blk.inner == (slice(8, 10), slice(4, 7))
    assert blk.window_start == (6, 2) and blk.window_stop == (14, 10)
    src, dst = blk.read_slices((10, 7))
    assert src == (slice(6, 10), slice(2, 7))
    assert dst == (slice(0, 4), slice(0, 5))
    assert blk.crop == (slice(2, 4), slice(2, 5))


def test_block_larger_than_image_is_clipped_to_aligned_image():
    grid = BlockGrid((10, 30), block=64, halo=4, alignment=4)
    assert grid.block == (12, 32)
    assert len(grid) == 1
    assert grid.padded_shape == (20, 40)


def test_unaligned_block_is_rejected_with_the_working_values():
    with pytest.raises(
        BlockShapeError, match=r"block 30 along axis X .* alignment 4 .* use 28 or 32"
    ):
        BlockGrid((64, 64), block=(32, 30), halo=8, alignment=4)
    with pytest.raises(ValueError, match=r"halo 6 along axis Z .* use 4 or 8"):
        BlockGrid((64, 64, 64), block=32, halo=(6, 8, 8), alignment=4)


def test_auto_rounds_up_with_a_warning():
    with pytest.warns(NahtlosWarning) as caught:
        grid = BlockGrid((64, 64), block=32, halo=5, alignment=4, auto=True)
    assert grid.halo == (8, 8)
    # one warning naming every axis that was rounded
    assert len(caught) == 1
    assert "halo 5 along axis Y rounded up to 8" in str(caught[0].message)
    assert "halo 5 along axis X rounded up to 8" in str(caught[0].message)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": (8, 8, 8)}, "3 entries but the image has 2 spatial axes"),
        ({"block": 0}, "block 0 along axis Y must be at least 1"),
        ({"block": 8, "halo": -1}, "must not be negative"),
        ({"block": 8, "alignment": 0}, "alignment 0"),
    ],
)
def test_invalid_values_name_the_problem(kwargs, message):
    with pytest.raises(BlockShapeError, match=message):
        BlockGrid((16, 16), **kwargs)
