from __future__ import annotations

import dask.array as da
import h5py
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_unet
from nahtlos import predict_blockwise, predict_whole
from nahtlos.engine.geometry import BlockGrid
from nahtlos.engine.predict import PredictionStats, predict_grid, read_window
from nahtlos.errors import ShapeMismatchError
from nahtlos.testing import assert_blockwise_equal

# (ndim, levels) -> (alignment, a halo covering the receptive field of make_unet)
HALO = {(2, 2): 12, (2, 3): 24, (3, 2): 12, (3, 3): 24}


@pytest.mark.parametrize("norm", ["batch", None])
@pytest.mark.parametrize(
    ("ndim", "levels", "shape", "blocks"),
    [
        (2, 2, (70, 53), [(32, 32), (16, 48), (64, 20), (72, 56)]),
        (2, 3, (61, 90), [(32, 40), (16, 24), (64, 96)]),
        (3, 2, (21, 38, 29), [(8, 16, 12), (12, 20, 32), (24, 40, 32)]),
        (3, 3, (19, 30, 27), [(8, 16, 8), (16, 24, 16), (24, 32, 32)]),
    ],
)
def test_monai_unet_blockwise_equals_whole_image(norm, ndim, levels, shape, blocks, rng):
    net = make_unet(ndim, levels, norm=norm or ("instance", {"affine": False}), seed=levels)
    if norm is None:  # MONAI has no "no norm" switch: replace the norms by identities
        for module in list(net.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm):
                    setattr(module, child_name, torch.nn.Identity())
        assert not any("Norm" in type(m).__name__ for m in net.modules())
    image = rng.random(shape, dtype=np.float32)
    worst = assert_blockwise_equal(net, image, blocks, HALO[(ndim, levels)], 2**levels, atol=1e-5)
    assert worst <= 1e-5


@pytest.mark.parametrize("ndim", [2, 3])
def test_instance_norm_network_shows_a_seam(ndim, rng):
    net = make_unet(ndim, 2, norm="instance")
    shape = (64, 64) if ndim == 2 else (24, 32, 32)
    image = rng.random(shape, dtype=np.float32)
    image[..., : shape[-1] // 2] *= 3  # tiles with different statistics
    with pytest.raises(AssertionError, match="largest") as info:
        assert_blockwise_equal(net, image, [(16,) * ndim], 12, 4, atol=1e-3)
    assert "block-wise prediction differs" in str(info.value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(5, 60), st.integers(5, 60)),
    block=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    extra_halo=st.integers(0, 2),
    batch_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_blockwise_equals_whole(shape, block, extra_halo, batch_size, seed):
    net = _PROPERTY_NET
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    halo = 12 + 4 * extra_halo
    ref = predict_whole(net, image, halo, 4)
    got = predict_blockwise(
        net, image, (block[0] * 4, block[1] * 4), halo, 4, batch_size=batch_size, progress=False
    )
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


_PROPERTY_NET = make_unet(2, 2, norm="batch", seed=7)


def test_halo_too_small_is_caught(rng):
    net = make_unet(2, 2)
    image = rng.random((64, 64), dtype=np.float32)
    with pytest.raises(AssertionError, match="channel"):
        assert_blockwise_equal(net, image, [(16, 16)], halo=4, alignment=4)


def test_multichannel_input_and_output(rng):
    net = make_unet(3, 2, in_channels=3, out_channels=4)
    image = rng.random((3, 20, 24, 28), dtype=np.float32)
    got = predict_blockwise(net, image, (8, 12, 16), 12, 4, progress=False)
    assert got.shape == (4, 20, 24, 28)
    np.testing.assert_allclose(got, predict_whole(net, image, 12, 4, ndim=3), atol=1e-5)


def test_array_likes_in_and_zarr_out(tmp_path, rng):
    net = make_unet(3, 2)
    image = rng.random((20, 30, 26), dtype=np.float32)
    ref = predict_whole(net, image, 12, 4)
    z_in = zarr.create_array(tmp_path / "in.zarr", shape=image.shape, chunks=(8, 8, 8), dtype="f4")
    z_in[...] = image
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["raw"] = image
    h5 = h5py.File(tmp_path / "in.h5", "r")["raw"]
    dask_image = da.from_array(image, chunks=(10, 10, 10))
    for i, source in enumerate((z_in, h5, dask_image, image.astype(np.uint8))):
        out = zarr.create_array(
            tmp_path / f"out-{i}.zarr",
            shape=(2, *image.shape),
            chunks=(2, 8, 12, 12),
            dtype="f4",
        )
        got = predict_blockwise(net, source, (8, 12, 12), 12, 4, out=out, progress=False)
        assert got is out
        expected = (
            ref if source.dtype != np.uint8 else predict_whole(net, image.astype(np.uint8), 12, 4)
        )
        np.testing.assert_allclose(out[...], expected, atol=1e-5)


def test_output_factory_called_once_with_shape(rng):
    calls = []

    def factory(shape):
        calls.append(shape)
        return np.full(shape, np.nan, np.float32)

    got = predict_blockwise(
        make_unet(2, 2), rng.random((40, 30)), 16, 12, 4, out=factory, progress=False
    )
    assert calls == [(2, 40, 30)]
    assert np.isfinite(got).all()


def test_model_changing_the_shape_is_reported():
    class Shrink(torch.nn.Module):
        def forward(self, x):
            return x[..., 1:-1, 1:-1]

    with pytest.raises(
        ShapeMismatchError,
        match=r"returned shape \(1, 1, 14, 14\) for the input window of shape \(1, 1, 16, 16\)",
    ):
        predict_blockwise(Shrink(), np.zeros((32, 32), np.float32), 8, 4, progress=False)


def test_image_with_wrong_number_of_axes():
    with pytest.raises(ShapeMismatchError, match=r"image of shape \(2, 3, 4, 5, 6\)"):
        predict_blockwise(make_unet(3, 2), np.zeros((2, 3, 4, 5, 6)), (4, 4, 4), 0, progress=False)


def test_windows_in_flight_are_bounded_and_stats_filled(rng):
    stats = PredictionStats()
    predict_blockwise(
        make_unet(2, 2),
        rng.random((128, 128)),
        16,
        12,
        4,
        batch_size=2,
        prefetch=2,
        progress=False,
        stats=stats,
    )
    assert stats.blocks == 64
    assert 0 < stats.windows_in_flight_max <= (2 * 2 + 1) * 2
    assert 0 < stats.forward <= stats.total


def test_only_requested_blocks_are_written(rng):
    from nahtlos.engine.geometry import BlockGrid

    image = rng.random((32, 32), dtype=np.float32)
    grid = BlockGrid(image.shape, 16, 12, 4)
    done = []
    out = np.full((2, 32, 32), -7.0, np.float32)
    first = next(iter(grid))
    predict_blockwise(
        make_unet(2, 2),
        image,
        16,
        12,
        4,
        out=out,
        blocks=[first],
        on_block_done=done.append,
        progress=False,
    )
    assert done == [first]
    assert (out[(slice(None), *first.inner)] != -7.0).all()
    assert (out[:, 16:, :] == -7.0).all()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_read_window_transforms_the_image_and_pads_with_zeros(data):
    shape = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
    window = data.draw(st.tuples(st.integers(1, 12), st.integers(1, 12)))
    start = tuple(data.draw(st.integers(-w - 2, n + 2)) for w, n in zip(window, shape, strict=True))
    channels = data.draw(st.booleans())
    image = np.arange(2 * np.prod(shape), dtype=np.float32).reshape(2, *shape) + 1
    image = image if channels else image[0]
    got = read_window(image, start, window, channels, lambda r: r * 2)
    # the reference: the whole image transformed, then zero-padded and cut
    pad = max(window) + 3
    full = np.pad(2 * (image if channels else image[None]), [(0, 0), (pad, pad), (pad, pad)])
    key = (slice(None), *(slice(a + pad, a + pad + w) for a, w in zip(start, window, strict=True)))
    np.testing.assert_array_equal(got, full[key])


def test_predict_grid_is_predict_blockwise_over_the_grid(rng):
    net = make_unet(2, 2, in_channels=2, seed=1)
    image = rng.random((2, 40, 30), dtype=np.float32)
    grid = BlockGrid(image.shape[1:], (16, 12), 12, 4)
    got = predict_grid(net, image, grid, batch_size=2, progress=False)
    expected = predict_blockwise(net, image, (16, 12), 12, 4, ndim=2, batch_size=2, progress=False)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ShapeMismatchError, match="does not fit the block grid"):
        predict_grid(net, image[:, :20], grid, progress=False)
