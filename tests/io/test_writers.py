"""Writing images: save_image in every format, read back with their axes and pixel size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nahtlos import save_image
from nahtlos.io import open_source

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
