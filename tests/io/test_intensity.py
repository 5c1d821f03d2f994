from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nahtlos.io import InputNormalization, StreamingHistogram, streaming_percentiles

Q = (0.0, 1.0, 37.5, 50.0, 99.8, 100.0)


_int_arrays = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32]).flatmap(
    lambda dt: hnp.arrays(
        dtype=dt,
        shape=hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12),
        elements={
            "min_value": max(np.iinfo(dt).min, -(2**19)),
            "max_value": min(np.iinfo(dt).max, 2**19 - 1),
        },
    )
)


@settings(max_examples=60, deadline=None)
@given(data=_int_arrays, chunk=st.integers(1, 7))
def test_integer_percentiles_are_exact(data, chunk):
    got = streaming_percentiles(data, Q, chunks=(chunk,) * data.ndim)
    np.testing.assert_allclose(
        got,
        np.percentile(data.astype(np.float64), Q),
        rtol=0,
        atol=1e-9 * max(1, np.abs(data).max()),
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e6),
    offset=st.floats(-1e4, 1e4),
    chunk=st.integers(3, 40),
)
def test_float_percentiles_within_1e4_of_range(seed, scale, offset, chunk):
    rng = np.random.default_rng(seed)
    data = (rng.lognormal(size=(24, 30)) * scale + offset).astype(np.float32)
    # chunks arrive in an order that keeps extending the range
    got = streaming_percentiles(data, Q, chunks=(chunk, chunk))
    ref = np.percentile(data.astype(np.float64), Q)
    span = float(data.max()) - float(data.min())
    assert np.all(np.abs(got - ref) <= 1e-4 * span + 1e-12), (got, ref)


def test_wide_integer_range_within_1e4_of_range():
    data = np.array([[16776897, -319, 5, 7, 123456]], dtype=np.int32)
    got = streaming_percentiles(data, Q, chunks=(1, 1))
    span = 16776897 + 319
    assert np.all(np.abs(got - np.percentile(data.astype(np.float64), Q)) <= 1e-4 * span)


def test_per_channel_and_zarr_input(tmp_path):
    rng = np.random.default_rng(0)
    data = np.stack([rng.integers(0, 1000, (16, 20)), rng.integers(500, 4000, (16, 20))]).astype(
        np.uint16
    )
    z = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, chunks=(1, 5, 7), dtype="u2")
    z[...] = data
    got = streaming_percentiles(z, (1, 99.8), channel_axis=0)
    ref = np.percentile(data.reshape(2, -1).astype(np.float64), (1, 99.8), axis=1).T
    np.testing.assert_allclose(got, ref)


def test_constant_and_nan_data():
    h = StreamingHistogram(integer=False)
    h.update(np.array([np.nan, 2.5, 2.5, np.inf]))
    assert h.percentiles([0, 50, 100]).tolist() == [2.5, 2.5, 2.5]


def test_input_normalization_global_and_tilewise_and_round_trip():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 20, (1, 32, 32)).astype(np.float32)
    norm = InputNormalization("global").fit(image, channel_axis=0)
    lo, hi = np.percentile(image, (1, 99.8))
    out = norm(image[:, :8, :8])
    np.testing.assert_allclose(out, np.clip((image[:, :8, :8] - lo) / (hi - lo), 0, 1), atol=1e-4)
    tile = InputNormalization("tilewise")(image[:, :8, :8])
    assert tile.min() == 0.0 and tile.max() == 1.0
    again = InputNormalization.from_dict(norm.to_dict())
    assert again == norm
    with pytest.raises(ValueError, match="'sometimes'"):
        InputNormalization("sometimes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before fit"):
        InputNormalization("global")(image)
