"""Synthetic datasets: determinism, exact block-wise generation, label consistency,
the property each dataset is built to carry, image formation, and file round trips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.measure import label as components
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from nahtlos import open_image
from nahtlos.cli import app
from nahtlos.errors import FormatError
from nahtlos.paper.synth import (
    SYNTHETIC_DATASETS,
    SynthError,
    open_synthetic,
    save_preview,
    semantic_classes,
    synthesize,
    tile_means,
    write_synthetic,
)
from nahtlos.paper.synth import datasets as synth_datasets
from nahtlos.paper.synth.datasets import make_generator
from nahtlos.paper.synth.fields import SmoothField
from nahtlos.paper.synth.generator import Generator
from nahtlos.paper.synth.placement import random_sequential_adsorption

SHAPE_2D = (160, 192)
SHAPE_3D = (16, 64, 96)


def _sample(name, shape, seed=0, anisotropy=1.0):
    return synthesize(name, shape, seed=seed, anisotropy=anisotropy)


def _cut(shape, block):
    """Origins and shapes of the blocks of a regular cut (partial blocks at the far end)."""
    starts = [range(0, s, b) for s, b in zip(shape, block, strict=True)]
    for origin in itertools.product(*starts):
        yield origin, tuple(min(b, s - o) for o, b, s in zip(origin, block, shape, strict=True))


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", SYNTHETIC_DATASETS)
@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D], ids=["2d", "3d"])
def test_same_seed_same_arrays_other_seed_other_arrays(name, shape):
    a = _sample(name, shape, seed=5)
    b = _sample(name, shape, seed=5)
    c = _sample(name, shape, seed=6)
    assert a.image.shape == a.labels.shape == shape
    assert a.image.dtype == (np.uint8 if name == "organoids" else np.uint16)
    assert a.labels.dtype == np.uint32
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)
    assert (a.semantic is not None) == (name == "organoids")


@pytest.mark.parametrize(
    ("name", "shape", "block", "anisotropy"),
    [
        ("organoids", (192, 320), (64, 128), 1.0),
        ("plants", (192, 256), (64, 64), 1.0),
        ("embryo", (130, 200), (64, 128), 1.0),  # partial blocks at the border
        ("organoids", (40, 64, 96), (32, 32, 64), 2.0),
        ("plants", (40, 64, 96), (32, 64, 32), 1.5),
        ("embryo", (36, 64, 64), (32, 32, 32), 3.0),
    ],
)
def test_blockwise_generation_equals_whole_image(name, shape, block, anisotropy):
    # The out-of-core guarantee: any cut into blocks gives the very same arrays.
    whole = _sample(name, shape, seed=2, anisotropy=anisotropy)
    gen = make_generator(name, shape, 2, anisotropy)
    image = np.zeros_like(whole.image)
    labels = np.zeros_like(whole.labels)
    semantic = np.zeros(shape, np.uint8)
    for origin, bshape in _cut(shape, block):
        sl = tuple(slice(o, o + s) for o, s in zip(origin, bshape, strict=True))
        image[sl], labels[sl], semantic[sl] = gen.block(origin, bshape)
    np.testing.assert_array_equal(image, whole.image)
    np.testing.assert_array_equal(labels, whole.labels)
    # block-wise classes equal the classes of the whole label image
    np.testing.assert_array_equal(semantic, semantic_classes(whole.labels))


def test_blocks_off_the_noise_lattice_are_refused():
    gen = make_generator("plants", (128, 128), 0, 1.0)
    with pytest.raises(SynthError, match="lattice"):
        gen.block((10, 0), (64, 64))
    with pytest.raises(SynthError, match="lattice"):
        gen.block((0, 0), (50, 64))


# ------------------------------------------------------------------------------ labels


def test_an_image_without_objects():
    # this seed's embryo region holds no nucleus candidate (found by hypothesis below)
    s = _sample("embryo", (12, 48, 64), seed=1_643_053_220)
    assert not s.labels.any() and s.image.std() > 0
    assert len(make_generator("embryo", (12, 48, 64), 1_643_053_220, 1.0).objects) == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SYNTHETIC_DATASETS),
    seed=st.integers(0, 2**31),
    three_d=st.booleans(),
    anisotropy=st.sampled_from([1.0, 2.0, 3.5]),
)
def test_labels_are_consistent(name, seed, three_d, anisotropy):
    shape = (12, 48, 64) if three_d else (96, 128)
    s = _sample(name, shape, seed=seed, anisotropy=anisotropy if three_d else 1.0)
    ids = np.unique(s.labels)
    ids = ids[ids > 0]
    # every instance is one face-connected object
    assert components(s.labels, connectivity=1, background=0).max() == len(ids)
    # ids are object indices + 1: within range
    gen = make_generator(name, shape, seed, anisotropy if three_d else 1.0)
    assert ids.size == 0 or ids.max() <= len(gen.objects)
    # boundary / foreground / background partition by the find_boundaries convention
    sem = semantic_classes(s.labels)
    boundary = find_boundaries(s.labels, mode="thick")
    np.testing.assert_array_equal(sem == 2, boundary)
    np.testing.assert_array_equal(sem == 1, (s.labels > 0) & ~boundary)
    np.testing.assert_array_equal(sem == 0, (s.labels == 0) & ~boundary)
    if s.semantic is not None:
        np.testing.assert_array_equal(s.semantic, sem)


def test_clean_up_gives_cut_off_pieces_to_the_object_they_touch():
    gen = make_generator("plants", (128, 128), 0, 1.0)
    labels, _ = gen._labels((0, 0), (128, 128))
    gen._clean_up(labels, (0, 0))
    ids = [i for i in np.unique(labels) if i]
    k, j = ids[0], ids[len(ids) // 2]
    broken = labels.copy()
    # a piece of k inside j (away from j's anchor), and a piece of k in empty space
    inside_j = np.argwhere(ndimage.binary_erosion(labels == j, iterations=2))
    ay, ax = gen.anchors[j - 1]
    far = inside_j[np.argmax(np.abs(inside_j - [ay, ax]).sum(axis=1))]
    broken[far[0], far[1]] = k
    empty = np.argwhere(ndimage.binary_erosion(labels == 0, iterations=4))[0]
    broken[empty[0] - 1 : empty[0] + 1, empty[1] - 1 : empty[1] + 1] = k
    gen._clean_up(broken, (0, 0))
    np.testing.assert_array_equal(broken, labels)
    assert components(broken, connectivity=1, background=0).max() == len(ids)


def _reference_nuclei(gen, shape):
    """Ellipsoid membership recomputed independently, in float64 on the full grid."""
    grids = np.meshgrid(
        *[np.arange(n) * sc for n, sc in zip(shape, gen.scale, strict=True)], indexing="ij"
    )
    at = gen.objects.attrs
    ref = np.zeros(shape, np.uint32)
    margin = np.full(shape, np.inf)  # |r_eff - 1| at the voxel, for float rounding
    for i, c in enumerate(gen.objects.centers):
        rel = np.stack([g - c[a] for a, g in enumerate(grids)], -1)
        u = (rel @ at["rot"][i]) / at["axes"][i]
        r = np.linalg.norm(u, axis=-1)
        n = u / np.maximum(r, 1e-6)[..., None]
        bump = sum(at["coef"][i, m] * (n @ at["vdir"][i, m]) ** 3 for m in range(3))
        reff = r / (1 + bump)
        ref[reff < 1] = i + 1
        margin = np.minimum(margin, np.abs(reff - 1))
    return ref, margin


@pytest.mark.parametrize("name", ["plants", "embryo"])
@pytest.mark.parametrize(
    ("shape", "anisotropy"), [((128, 160), 1.0), ((16, 48, 64), 2.5)], ids=["2d", "3d"]
)
def test_nuclei_labels_match_an_independent_rasterization(name, shape, anisotropy):
    gen = make_generator(name, shape, 7, anisotropy)
    labels = _sample(name, shape, seed=7, anisotropy=anisotropy).labels
    ref, margin = _reference_nuclei(gen, shape)
    differ = labels != ref
    # only float32-vs-float64 rounding on the very surface may differ
    assert np.all(margin[differ] < 1e-4), margin[differ].max()
    assert differ.mean() < 1e-3
    # nuclei do not overlap, so every voxel inside one is labelled with it
    c = gen.objects.centers
    d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(len(c)) * 1e9
    ext = gen.objects.extent
    assert np.all(d >= ext[:, None] + ext[None, :] + gen.gap - 1e-9)


def test_organoid_cells_are_warped_voronoi_cells_of_the_seeds():
    from scipy.spatial import cKDTree

    shape = (200, 240)
    gen = make_generator("organoids", shape, 4, 1.0)
    labels = _sample("organoids", shape, seed=4).labels
    origin = (0, 0)
    warped = []
    for a in range(2):
        w = np.clip(gen.warp[a].grid(origin, shape) * gen.warp_amp, -gen.warp_max, gen.warp_max)
        warped.append(w + np.arange(shape[a]).reshape([-1 if b == a else 1 for b in range(2)]))
    pts = np.stack(warped, -1).reshape(-1, 2).astype(np.float64)
    dist, nearest = cKDTree(gen.objects.centers).query(pts)
    ref = (nearest + 1).reshape(shape).astype(np.uint32)
    ref[dist.reshape(shape) > gen.r_cap] = 0
    ref[gen.tissue.grid(origin, shape) <= gen.threshold] = 0
    agree = (labels == ref).mean()
    assert agree > 0.999, agree  # the rest: clean-up of cut-off pieces, float ties
    # matrix is where the tissue field says so, never a cell
    assert np.all(labels[gen.tissue.grid(origin, shape) <= gen.threshold] == 0)


@pytest.mark.parametrize("name", ["plants", "embryo"])
def test_fluorescence_background_is_dark_and_nuclei_bright(name):
    s = _sample(name, (256, 256), seed=3)
    img = s.image.astype(np.float64)
    far = ndimage.binary_erosion(s.labels == 0, iterations=6)
    inside = ndimage.binary_erosion(s.labels > 0, iterations=2)
    assert far.any()
    assert inside.any()
    assert np.median(img[inside]) > np.median(img[far]) + 50


# ------------------------------------------------------------ the property of each set


def _pure_windows(mask, size):
    """Number of size x size windows lying entirely in ``mask``."""
    return int(ndimage.minimum_filter(mask.astype(np.uint8), size, mode="constant").sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_organoids_have_matrix_regions_larger_than_a_tile(seed):
    s = _sample("organoids", (512, 512), seed=seed)
    matrix = s.labels == 0
    # windows of pure matrix exist at tile sizes of the 2D experiments
    assert _pure_windows(matrix, 96) > 0
    assert _pure_windows(s.labels > 0, 96) > 0
    # and tiles of matrix look nothing like tiles of cells
    means = tile_means(s.image.astype(np.float64), 64)
    frac = tile_means(matrix.astype(np.float64), 64)
    assert (frac == 1).any()
    assert (frac == 0).any()
    # every pure-matrix tile is brighter than every pure-cell tile, by far on average
    assert means[frac == 1].min() > means[frac == 0].max()
    assert means[frac == 1].mean() > means[frac == 0].mean() + 25


def test_organoids_3d_matrix_region_larger_than_a_tile():
    # 64 x 64 x 64 pixels (32 slices at Z step 2) of pure matrix, and of pure cells
    s = _sample("organoids", (32, 192, 192), seed=1, anisotropy=2.0)
    assert _pure_windows(s.labels == 0, (16, 64, 64)) > 0
    assert _pure_windows(s.labels > 0, (16, 64, 64)) > 0


def _tile_cv(image, tile, offset):
    m = tile_means(image.astype(np.float64) - offset, tile)
    return m.std() / m.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embryo_tiles_vary_far_more_than_plants_tiles(seed):
    plants = _sample("plants", (384, 384), seed=seed)
    embryo = _sample("embryo", (384, 384), seed=seed)
    cv_p = _tile_cv(plants.image, 64, 100)  # 100 = camera offset
    cv_e = _tile_cv(embryo.image, 64, 100)
    assert cv_e > 2 * cv_p, (cv_e, cv_p)
    # embryo: empty background tiles exist; plants: nuclei everywhere (dense)
    assert (tile_means(embryo.labels > 0, 64) == 0).any()
    assert (tile_means(plants.labels > 0, 64) > 0).mean() > 0.9
    assert (plants.labels > 0).mean() > 2 * (embryo.labels > 0).mean()


def test_anisotropy_keeps_physical_size():
    iso = _sample("plants", (48, 64, 64), seed=1, anisotropy=1.0)
    aniso = _sample("plants", (16, 64, 64), seed=1, anisotropy=3.0)

    def mean_extent(labels, axis):
        boxes = [b for b in ndimage.find_objects(labels) if b is not None]
        return np.mean([b[axis].stop - b[axis].start for b in boxes])

    ratio_iso = mean_extent(iso.labels, 0) / mean_extent(iso.labels, 2)
    ratio_aniso = mean_extent(aniso.labels, 0) / mean_extent(aniso.labels, 2)
    assert 0.75 < ratio_iso < 1.3
    assert 0.2 < ratio_aniso < 0.5  # about 1/3: nuclei span 3x fewer slices


# --------------------------------------------------------------------- image formation


@pytest.mark.parametrize("name", SYNTHETIC_DATASETS)
def test_detection_is_poisson_plus_gaussian_noise(name):
    gen = make_generator(name, (256, 256), 0, 1.0)
    for level in (0.2, 0.5):
        adu = gen._detect((0, 0), np.full((256, 256), level, np.float32)).astype(np.float64)
        lam = level * gen.photons
        mean = gen.offset + gen.gain * lam
        var = gen.gain**2 * lam + gen.read_noise**2
        assert abs(adu.mean() - mean) < 4 * np.sqrt(var / adu.size) + 0.5
        assert abs(adu.var() / (var + 1 / 12) - 1) < 0.05


def test_psf_blurs_more_along_z():
    gen = make_generator("plants", (64, 64, 64), 0, 1.0)
    assert gen.sigma[0] > gen.sigma[1] == gen.sigma[2]
    gen4 = make_generator("plants", (64, 64, 64), 0, 4.0)
    assert gen4.sigma[0] == pytest.approx(gen.sigma[0] / 4)


def test_smooth_field_is_window_independent_unit_variance_and_pointwise_equal():
    f = SmoothField(np.random.default_rng(1), [-20, -20], [300, 300], [6.0, 9.0])
    big = f.grid((-10, -5), (280, 290))
    small = f.grid((37, 11), (50, 70))
    np.testing.assert_array_equal(big[47:97, 16:86], small)
    pts = np.array([[0, 0], [37, 11], [100, 200], [269, 284]])
    np.testing.assert_array_equal(f.points(pts), big[pts[:, 0] + 10, pts[:, 1] + 5])
    assert abs(big.std() - 1) < 0.25
    assert abs(big.mean()) < 0.3


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), gap=st.floats(0, 3), ndim=st.sampled_from([2, 3]))
def test_sequential_adsorption_never_overlaps(seed, gap, ndim):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 60, (300, ndim))
    radii = rng.uniform(2, 6, 300)
    fixed = rng.uniform(0, 60, (5, ndim))
    fixed_r = rng.uniform(2, 6, 5)
    keep = random_sequential_adsorption(centers, radii, gap, fixed, fixed_r)
    c, r = centers[keep], radii[keep]
    d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(len(c)) * 1e9
    assert np.all(d >= r[:, None] + r[None] + gap - 1e-9)
    df = np.linalg.norm(c[:, None] - fixed[None], axis=-1)
    assert np.all(df >= r[:, None] + fixed_r[None] + gap - 1e-9)
    # greedy: every rejected candidate conflicts with a kept one or a fixed one
    for i in np.flatnonzero(~keep):
        dk = np.linalg.norm(c - centers[i], axis=1) < r + radii[i] + gap
        dfx = np.linalg.norm(fixed - centers[i], axis=1) < fixed_r + radii[i] + gap
        assert dk.any() or dfx.any()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "brains"}, "unknown synthetic dataset 'brains'"),
        ({"shape": (4, 64)}, r"too small"),
        ({"shape": (2, 3, 4, 5)}, r"2 \(Y,X\) or 3"),
        ({"anisotropy": 2.0}, "applies to the Z axis"),
        ({"shape": (16, 64, 64), "anisotropy": 50.0}, "anisotropy 50"),
        ({"seed": -1}, "seed -1"),
    ],
)
def test_bad_parameters_name_the_value(kwargs, match):
    args = {"name": "plants", "shape": (64, 64), "seed": 0, "anisotropy": 1.0, **kwargs}
    with pytest.raises(SynthError, match=match):
        synthesize(args.pop("name"), args.pop("shape"), **args)


# ------------------------------------------------------------------------------- files


def test_ome_zarr_round_trip(tmp_path, monkeypatch):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from nahtlos.engine import BlockGrid

    # small blocks: the file is written in several pieces
    monkeypatch.setattr(synth_datasets, "BLOCK_VOXELS", {2: 64 * 64, 3: 16 * 96 * 64})

    shape, seed = (16, 96, 128), 3
    out = tmp_path / "organoids.zarr"
    written = write_synthetic(
        "organoids", out, shape, seed=seed, anisotropy=2.0, chunks=(32, 64, 64), progress=False
    )
    assert len(BlockGrid(shape, synth_datasets.default_block(shape, (16, 64, 64), (1, 1, 1)))) == 2
    ref = _sample("organoids", shape, seed=seed, anisotropy=2.0)
    assert written.paths["image"] == out
    assert written.objects == len(np.unique(ref.labels)) - 1
    nodes = list(Reader(parse_url(str(out)))())
    image_node = nodes[0]
    np.testing.assert_array_equal(np.asarray(image_node.data[0]), ref.image)
    axes = [a["name"] for a in image_node.metadata["axes"]]
    assert axes == ["z", "y", "x"]
    assert image_node.metadata["coordinateTransformations"][0][0]["scale"] == [2.0, 1.0, 1.0]
    by_name = {n.zarr.basename(): n for n in nodes}
    np.testing.assert_array_equal(np.asarray(by_name["instances"].data[0]), ref.labels)
    np.testing.assert_array_equal(np.asarray(by_name["semantic"].data[0]), ref.semantic)
    # nahtlos' own reader: level 0 of the image, and the label arrays by key
    np.testing.assert_array_equal(open_image(out)[:], ref.image)
    np.testing.assert_array_equal(open_image(f"{out}:labels/instances/0")[:], ref.labels)
    back = open_synthetic(out)
    assert (back.name, back.seed, back.anisotropy) == ("organoids", seed, 2.0)
    np.testing.assert_array_equal(back.semantic[:], ref.semantic)
    assert not list(tmp_path.glob(".*partial"))


def test_ome_zarr_pyramid_levels(tmp_path):
    import zarr

    out = tmp_path / "plants.zarr"
    written = write_synthetic("plants", out, (512, 640), seed=1, progress=False)
    assert written.levels == 2
    root = zarr.open_group(str(out), mode="r")
    level0, level1 = np.asarray(root["0"]), np.asarray(root["1"])
    expected = np.round(level0.reshape(256, 2, 320, 2).astype(np.float32).mean(axis=(1, 3)))
    np.testing.assert_array_equal(level1, expected.astype(np.uint16))
    labels = root["labels/instances"]
    np.testing.assert_array_equal(np.asarray(labels["1"]), np.asarray(labels["0"])[::2, ::2])


def test_tiff_round_trip(tmp_path):
    out = tmp_path / "embryo.tif"
    written = write_synthetic("embryo", out, (20, 64, 96), seed=9, anisotropy=2.0, progress=False)
    ref = _sample("embryo", (20, 64, 96), seed=9, anisotropy=2.0)
    assert set(written.paths) == {"image", "labels"}
    np.testing.assert_array_equal(tifffile.imread(out), ref.image)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "embryo_labels.tif"), ref.labels)
    back = open_synthetic(out)
    assert (back.name, back.seed, back.anisotropy) == ("embryo", 9, 2.0)
    np.testing.assert_array_equal(np.asarray(back.labels), ref.labels)
    assert back.semantic is None


def test_tiff_organoids_write_semantic_classes(tmp_path):
    out = tmp_path / "org.tiff"
    write_synthetic("organoids", out, (128, 128), seed=1, progress=False)
    ref = _sample("organoids", (128, 128), seed=1)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "org_semantic.tiff"), ref.semantic)


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "p.zarr"
    write_synthetic("plants", out, (64, 64), seed=1, progress=False)
    with pytest.raises(FormatError, match="exists"):
        write_synthetic("plants", out, (64, 64), seed=2, progress=False)
    np.testing.assert_array_equal(open_image(out)[:], _sample("plants", (64, 64), seed=1).image)
    write_synthetic("plants", out, (64, 64), seed=2, overwrite=True, progress=False)
    np.testing.assert_array_equal(open_image(out)[:], _sample("plants", (64, 64), seed=2).image)


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, suffix):
    calls = {"n": 0}
    original = Generator.block

    def failing(self, origin, shape):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, origin, shape)

    monkeypatch.setattr(Generator, "block", failing)
    monkeypatch.setattr(synth_datasets, "BLOCK_VOXELS", {2: 64 * 64, 3: 32**3})
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(
            "plants", tmp_path / f"p{suffix}", (128, 128), chunks=(64, 64), progress=False
        )
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_format_mismatch_is_refused(tmp_path):
    with pytest.raises(FormatError, match="suffix"):
        write_synthetic("plants", tmp_path / "a.zarr", (64, 64), format="tif")
    with pytest.raises(FormatError, match="cannot tell"):
        write_synthetic("plants", tmp_path / "a.h5", (64, 64))


def test_preview_png(tmp_path):
    a = _sample("organoids", (96, 128), seed=0)
    b = _sample("embryo", (12, 64, 64), seed=0, anisotropy=2.0)
    path = save_preview([a, b], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_synth_writes_and_reports(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o.zarr"
    res = runner.invoke(
        app,
        [
            "synth",
            "organoids",
            str(out),
            "--shape",
            "12,64,64",
            "--seed",
            "4",
            "--anisotropy",
            "2",
            "--preview",
            str(tmp_path / "o.png"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "labels/instances" in res.output
    assert "labels/semantic" in res.output
    assert (tmp_path / "o.png").exists()
    ref = _sample("organoids", (12, 64, 64), seed=4, anisotropy=2.0)
    np.testing.assert_array_equal(open_image(out)[:], ref.image)
    res = runner.invoke(app, ["synth", "worms", str(tmp_path / "w.zarr")])
    assert res.exit_code == 2
    assert "unknown synthetic dataset 'worms'" in res.output
    res = runner.invoke(app, ["synth", "plants", str(tmp_path / "x.tif"), "--shape", "64,x"])
    assert res.exit_code == 2
