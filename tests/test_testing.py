from __future__ import annotations

import numpy as np
import pytest
import torch

from nahtlos.testing import assert_blockwise_equal, largest_difference


class GlobalMean(torch.nn.Module):
    """Adds the tile mean: the output depends on the whole tile."""

    def forward(self, x):
        return x + x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def test_largest_difference_location():
    a = np.zeros((2, 4, 5))
    b = a.copy()
    b[1, 2, 3] = -0.5
    assert largest_difference(a, b) == (0.5, (1, 2, 3))


def test_failure_message_names_value_channel_voxel_and_block():
    image = np.arange(32 * 24, dtype=np.float32).reshape(32, 24) / 100
    with pytest.raises(AssertionError) as info:
        assert_blockwise_equal(GlobalMean(), image, [(16, 8)], halo=0)
    msg = str(info.value)
    assert "block (16, 8)" in msg and "channel 0" in msg and "Y=" in msg and "X=" in msg
    value = float(msg.split("= ")[1].split(" >")[0])
    assert value > 1.0


def test_failure_message_with_auto_rounding_names_the_rounded_block():
    image = np.arange(32 * 24, dtype=np.float32).reshape(32, 24) / 100
    with pytest.raises(AssertionError) as info, pytest.warns(UserWarning, match="rounded up"):
        assert_blockwise_equal(GlobalMean(), image, [(15, 7)], halo=0, alignment=2, auto=True)
    assert "block (16, 8)" in str(info.value)


def test_pointwise_model_passes_with_zero_halo():
    image = np.random.default_rng(0).normal(size=(9, 11, 13)).astype(np.float32)
    assert assert_blockwise_equal(torch.nn.Tanh(), image, [(4, 4, 4), (8, 5, 3)], halo=0) == 0.0
