from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nahtlos.errors import ShapeMismatchError
from nahtlos.io import SEMANTIC_CLASSES, InputNormalization, instances_to_semantic
from nahtlos.training.data import (
    PatchSampler,
    RegionView,
    open_volume,
    semantic_target,
    split_volume,
)


def _thick_boundaries_reference(lab: np.ndarray) -> np.ndarray:
    """A pixel is on a boundary iff a face neighbour inside the image has another label."""
    out = np.zeros(lab.shape, bool)
    for idx in np.ndindex(lab.shape):
        for axis in range(lab.ndim):
            for step in (-1, 1):
                n = list(idx)
                n[axis] += step
                if 0 <= n[axis] < lab.shape[axis] and lab[tuple(n)] != lab[idx]:
                    out[idx] = True
    return out


def test_instances_to_semantic_hand_made():
    lab = np.zeros((7, 9), np.int32)
    lab[1:4, 1:4] = 1  # a 3x3 object ...
    lab[1:4, 4:7] = 2  # ... touching a second one
    lab[5:7, 7:9] = 3  # an object in the corner
    sem = instances_to_semantic(lab)
    assert sem.shape == (3, 7, 9) and sem.dtype == np.uint8
    boundaries, foreground, background = sem.astype(bool)
    # objects 1 and 2 keep only their centres; background pixels next to objects are
    # boundaries ("thick"), so are the pixels on both sides of the 1|2 contact
    assert foreground.sum() == 3 and foreground[2, 2] and foreground[2, 5]
    assert boundaries[2, 3] and boundaries[2, 4] and boundaries[0, 2] and boundaries[4, 5]
    assert boundaries[6, 8] == 0 and foreground[6, 8]  # corner object: no border outside
    assert background[0, 0] and not boundaries[0, 0]
    np.testing.assert_array_equal(boundaries, _thick_boundaries_reference(lab))
    np.testing.assert_array_equal(sem.sum(0), 1)  # every pixel in exactly one class
    assert SEMANTIC_CLASSES == ("boundaries", "foreground", "background")


def test_inner_mode_keeps_boundaries_inside_objects():
    lab = np.zeros((6, 6), np.int32)
    lab[1:5, 1:5] = 4
    b, f, bg = instances_to_semantic(lab, mode="inner").astype(bool)
    assert not (b & (lab == 0)).any()
    assert f.sum() == 4 and b.sum() == 12 and bg.sum() == 20


def test_float_instance_labels_are_rejected():
    with pytest.raises(ValueError, match="float"):
        instances_to_semantic(np.zeros((4, 4), np.float32))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(20, 23), (6, 11, 9)]),
    seed=st.integers(0, 10_000),
    frac=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_patch_conversion_equals_crop_of_whole(shape, seed, frac):
    rng = np.random.default_rng(seed)
    # blocky instances with touching objects and background
    coarse = rng.integers(0, 5, tuple(-(-s // 3) for s in shape))
    lab = np.kron(coarse, np.ones((3,) * len(shape), np.int64))[tuple(slice(0, s) for s in shape)]
    vol = open_volume(np.zeros(shape, np.float32), lab, len(shape), input_norm=None)
    whole = instances_to_semantic(lab)
    starts = [int(f * (s - 1)) for f, s in zip(frac, shape, strict=False)]
    region = tuple(
        slice(a, min(s, a + 1 + int(rng.integers(0, s - a))))
        for a, s in zip(starts, shape, strict=True)
    )
    got = semantic_target(vol, region)
    np.testing.assert_array_equal(got, whole[(slice(None), *region)])


def test_semantic_labels_one_hot_and_range_error():
    cls = np.array([[0, 1], [2, 1]], np.uint8)
    vol = open_volume(np.zeros((2, 2), np.float32), cls, 2, input_norm=None)
    t = semantic_target(vol, (slice(0, 2), slice(0, 2)), "semantic", 3)
    np.testing.assert_array_equal(t.argmax(0), cls)
    np.testing.assert_array_equal(t.sum(0), 1)
    with pytest.raises(ValueError, match=r"value 2, outside 0\.\.1"):
        semantic_target(vol, (slice(0, 2), slice(0, 2)), "semantic", 2)


def _write(tmp_path, image, labels):
    """The image as TIFF, the labels as HDF5 and zarr: real files of three formats."""
    tifffile.imwrite(tmp_path / "img.tif", image)
    with h5py.File(tmp_path / "lab.h5", "w") as f:
        f["seg"] = labels
    z = zarr.create_array(
        store=str(tmp_path / "lab.zarr"), shape=labels.shape, dtype=labels.dtype, chunks=(8, 8)
    )
    z[...] = labels
    return str(tmp_path / "img.tif"), str(tmp_path / "lab.h5:seg"), str(tmp_path / "lab.zarr")


def test_open_volume_from_files_and_global_normalization(tmp_path, rng):
    image = rng.integers(0, 4000, (24, 30)).astype(np.uint16)
    labels = rng.integers(0, 3, (24, 30)).astype(np.uint16)
    tif, h5, zr = _write(tmp_path, image, labels)
    for lab in (h5, zr):
        vol = open_volume(tif, lab, 2, input_norm=InputNormalization("global"))
        assert vol.spatial_shape == (24, 30) and not vol.channels
        lo, hi = np.percentile(image, [1, 99.8])
        assert vol.normalization.values is not None
        np.testing.assert_allclose(vol.normalization.values[0], (lo, hi), rtol=1e-6)
        got = vol.read_image((slice(2, 10), slice(0, 30)))
        want = np.clip((image[2:10].astype(np.float32) - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(vol.labels[...]), labels)


def test_tilewise_normalization_uses_the_patch_only(rng):
    image = rng.normal(100, 20, (40, 40)).astype(np.float32)
    image[:, 20:] += 500
    vol = open_volume(
        image, np.zeros((40, 40), np.int32), 2, input_norm=InputNormalization("tilewise")
    )
    region = (slice(0, 16), slice(24, 40))
    got = vol.read_image(region)[0]
    patch = image[region]
    lo, hi = np.percentile(patch, [1, 99.8])
    np.testing.assert_allclose(got, np.clip((patch - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mismatched_shapes_name_both(tmp_path, rng):
    tif, _, _ = _write(tmp_path, np.zeros((24, 30), np.uint16), np.zeros((24, 30), np.uint16))
    np.save(tmp_path / "bad.npy", np.zeros((24, 31), np.uint16))
    with pytest.raises(ShapeMismatchError, match=r"\(24, 31\).*\(24, 30\)"):
        open_volume(tif, str(tmp_path / "bad.npy"), 2)
    with pytest.raises(ShapeMismatchError, match=r"\(24, 30\).*3D"):
        open_volume(tif, str(tmp_path / "bad.npy"), 3)


def test_split_volume_is_complementary():
    vol = open_volume(
        np.zeros((2, 30, 40), np.float32), np.zeros((30, 40), np.int32), 2, input_norm=None
    )
    assert vol.channels and vol.in_channels == 2
    tr, va = split_volume(vol, 0.3, 1)
    assert tr.region == (slice(0, 30), slice(0, 28)) and va.region == (slice(0, 30), slice(28, 40))
    assert va.image_region().shape == (2, 30, 12)
    with pytest.raises(ShapeMismatchError, match="too few"):
        split_volume(open_volume(np.zeros((1, 4)), np.zeros((1, 4), np.int32), 2), 0.3, 0)


def test_region_view_matches_array_slicing(rng):
    arr = rng.random((3, 20, 25))
    view = RegionView(arr, (slice(5, 15), slice(3, 25)), channels=True)
    assert view.shape == (3, 10, 22)
    np.testing.assert_array_equal(view[:, 2:7, 0:22], arr[:, 7:12, 3:25])
    np.testing.assert_array_equal(view[...], arr[:, 5:15, 3:25])


def _marked_volume():
    # image value = column index, so a patch tells where it came from
    image = np.tile(np.arange(64, dtype=np.float32), (48, 1))
    labels = np.zeros((48, 64), np.int32)
    labels[30:36, 8:14] = 1
    return open_volume(image, labels, 2, input_norm=InputNormalization("none"))


def test_sampler_stays_in_region_and_is_reproducible_from_state():
    tr, _ = split_volume(_marked_volume(), 0.5, 1)
    s = PatchSampler([tr], (16, 16), flips=False, seed=3)
    for _ in range(50):
        img, tgt = s.sample()
        assert img.shape == (1, 16, 16) and tgt.shape == (3, 16, 16)
        assert img.max() < 32  # never from the validation half
        np.testing.assert_array_equal(tgt.sum(0), 1)
    state = s.state_dict()
    a = [s.sample() for _ in range(5)]
    s2 = PatchSampler([tr], (16, 16), flips=False, seed=99)
    s2.load_state_dict(state)
    b = [s2.sample() for _ in range(5)]
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_flips_happen_about_half_the_time():
    s = PatchSampler([_marked_volume()], (16, 16), seed=0)
    flipped = 0
    for _ in range(200):
        img, _ = s.sample()
        flipped += img[0, 0, 0] > img[0, 0, -1]  # columns decrease: flipped along x
    assert 70 < flipped < 130


def test_foreground_bias_finds_objects():
    vol = _marked_volume()

    def share(bias):
        s = PatchSampler([vol], (8, 8), foreground_bias=bias, seed=1)
        return np.mean([s.sample()[1][:2].any() for _ in range(200)])

    assert share(1.0) > share(0.0) + 0.2


def test_patch_larger_than_region_is_an_error():
    with pytest.raises(ShapeMismatchError, match=r"patch \(64, 16\).*\(48, 64\)"):
        PatchSampler([_marked_volume()], (64, 16))


def test_volumes_are_drawn_in_proportion_to_their_size():
    small = open_volume(np.zeros((16, 16), np.float32), np.zeros((16, 16), np.int32), 2)
    big = open_volume(np.ones((48, 16), np.float32), np.zeros((48, 16), np.int32), 2)
    for v in (small, big):
        v.normalization = InputNormalization("none")
    s = PatchSampler([small, big], (8, 8), seed=0)
    share_big = np.mean([s.sample()[0].mean() for _ in range(400)])
    assert 0.68 < share_big < 0.82  # 3/4 of the pixels are in the big volume


def test_ome_zarr_image_and_labels(tmp_path):
    from nahtlos.paper.synth import synthesize, write_synthetic

    write_synthetic("plants", tmp_path / "p.zarr", (64, 64), seed=1, progress=False)
    vol = open_volume(str(tmp_path / "p.zarr"), str(tmp_path / "p.zarr:labels/instances"), 2)
    sample = synthesize("plants", (64, 64), seed=1)
    np.testing.assert_array_equal(np.asarray(vol.image[...]), sample.image)
    target = semantic_target(vol, (slice(0, 64), slice(0, 64)))
    np.testing.assert_array_equal(target, instances_to_semantic(sample.labels))
