"""Synthetic microscopy datasets like the paper's three: organoids, plants and embryo.

Each generator builds, deterministically from a seed, an image and its instance labels
in 2D or 3D at any size, and carries the property that makes the paper's dataset hard
for tile-wise normalization:

``organoids``
    FIB/SEM-like electron microscopy: densely packed cells (nuclei, organelles) whose
    membranes form the boundary class, beside large regions of textured extracellular
    matrix that are larger than a tile, so tiles full of cells and tiles full of matrix
    have very different statistics. Semantic classes: matrix, foreground (cell
    interior), boundaries (membranes).
``plants``
    Confocal fluorescence of dense, fairly homogeneous nuclei (bright chromocenters,
    dark nucleoli) filling the tissue: per-tile statistics vary little.
``embryo``
    Confocal fluorescence of sparse nuclei with strong intensity heterogeneity:
    bright and dim regions, an illumination gradient, depth attenuation, mitotic
    nuclei and large empty background: per-tile statistics vary most.

Image formation is that of a microscope: a clean signal, blurred by a Gaussian PSF
(wider along Z), sampled with Z spacing ``anisotropy`` times the XY pixel size, then
Poisson (shot) noise plus Gaussian read noise and digitization to ``uint8`` (EM) or
``uint16`` (fluorescence).

Every value is a function of global coordinates only: object geometry is drawn once
per image, textures come from white noise on a fixed lattice of chunks, each seeded by
its chunk index, and smooth fields from a fixed coarse lattice. A block therefore
comes out bit-identical however the image is cut into blocks, which is what lets
:func:`write_synthetic` generate volumes far larger than memory straight to disk.

Instance labels are consistent: each object is one face-connected component that
contains its anchor (its seed or centre), label 0 is background (or matrix), and the
semantic classes follow :func:`skimage.segmentation.find_boundaries` (``mode="thick"``):
boundaries, foreground = objects minus boundaries, background = the rest.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from ..errors import FormatError, InputNotFoundError, NahtlosError

__all__ = [
    "SYNTHETIC_DATASETS",
    "SynthError",
    "SynthSample",
    "SynthWritten",
    "class_names",
    "open_synthetic",
    "save_preview",
    "semantic_classes",
    "synthesize",
    "tile_means",
    "write_synthetic",
]

SYNTHETIC_DATASETS = ("organoids", "plants", "embryo")
"""Names of the synthetic datasets."""

BACKGROUND, FOREGROUND, BOUNDARIES = 0, 1, 2

# White noise comes from a fixed lattice of chunks, each seeded by its index, so that a
# voxel's noise does not depend on the block it is generated in. Blocks align to it.
_CHUNK = {2: 64, 3: 32}
_INDEX_OFFSET = 1 << 24  # keeps chunk indices (negative beyond the image) non-negative
_TRUNCATE = 4.0  # Gaussian kernels are cut at 4 sigma, as scipy does by default
# voxels per generated block (core) before it is split, per number of dimensions
_BLOCK_VOXELS = {2: 4096 * 4096, 3: 8 * 2**20}

# stream keys: every random quantity has its own stream
_K_OBJECTS, _K_FIELDS, _K_NOISE = 1, 2, 3
_K_TEX = 100


class SynthError(NahtlosError, ValueError):
    """Invalid parameters for a synthetic dataset (name, shape, seed, anisotropy, block)."""


def class_names(name: str) -> tuple[str, str, str]:
    """Names of semantic classes 0, 1 and 2 of dataset ``name``."""
    check_norm_name(name)
    first = "matrix" if name == "organoids" else "background"
    return (first, "foreground", "boundaries")


def semantic_classes(labels: np.ndarray) -> np.ndarray:
    """Semantic classes of an instance label image, by the ``find_boundaries`` convention.

    Returns ``uint8``: 2 = boundaries (``find_boundaries(labels, mode="thick")``),
    1 = foreground (objects minus boundaries), 0 = background (or matrix).
    """
    from skimage.segmentation import find_boundaries

    out = np.where(labels > 0, FOREGROUND, BACKGROUND).astype(np.uint8)
    out[find_boundaries(labels, mode="thick")] = BOUNDARIES
    return out


def tile_means(image: np.ndarray, tile: int | Sequence[int]) -> np.ndarray:
    """Mean intensity of every complete tile of a regular grid (partial tiles dropped).

    Useful to measure how much per-tile statistics vary over an image, the property
    that makes tile-wise normalization fragile.
    """
    tiles = _per_axis(tile, image.ndim, "tile")
    counts = [s // t for s, t in zip(image.shape, tiles, strict=True)]
    if min(counts) < 1:
        raise SynthError(f"tile {tiles} is larger than image {image.shape}")
    crop = image[tuple(slice(0, c * t) for c, t in zip(counts, tiles, strict=True))]
    shape = [v for c, t in zip(counts, tiles, strict=True) for v in (c, t)]
    axes = tuple(range(1, 2 * image.ndim, 2))
    return crop.reshape(shape).mean(axis=axes, dtype=np.float64)


@dataclass
class SynthSample:
    """An image of a synthetic dataset with its ground truth.

    Attributes
    ----------
    name, seed, anisotropy
        What generated it.
    image
        ``uint8`` (organoids, EM) or ``uint16`` (fluorescence), axes ``[Z,]Y,X``.
    labels
        ``uint32`` instance labels (0 = background / matrix).
    semantic
        ``uint8`` classes (0 matrix, 1 foreground, 2 boundaries) for organoids, whose
        ground truth is semantic; ``None`` for the others (use :func:`semantic_classes`).
    """

    name: str
    seed: int
    anisotropy: float
    image: np.ndarray
    labels: np.ndarray
    semantic: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size per axis in units of the XY pixel size."""
        return (self.anisotropy, 1.0, 1.0)[-self.image.ndim :]

    @property
    def class_names(self) -> tuple[str, str, str]:
        """Names of semantic classes 0, 1, 2."""
        return class_names(self.name)


# ----------------------------------------------------------------------------- helpers


def check_norm_name(name: str) -> None:
    if name not in SYNTHETIC_DATASETS:
        raise SynthError(
            f"unknown synthetic dataset {name!r}; choose one of {', '.join(SYNTHETIC_DATASETS)}"
        )


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    if len(values) != ndim:
        raise SynthError(f"{what} {values} has {len(values)} axes, the image has {ndim}")
    return values


def _gauss_kernel(sigma: float) -> np.ndarray:
    """The discrete kernel scipy's ``gaussian_filter`` uses for ``sigma``."""
    radius = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _radius(sigma: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(_TRUNCATE * s + 0.5) for s in sigma)


def _white(seed: int, key: int, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Zero-mean, unit-variance white noise on a window, from the lattice of seeded chunks.

    Uniform rather than normal (it is several times faster to draw): the textures
    filter it, which makes it Gaussian for all practical purposes.
    """
    ndim = len(shape)
    c = _CHUNK.get(ndim, 64)
    out = np.empty(tuple(shape), np.float32)
    ranges = [range(o // c, (o + s - 1) // c + 1) for o, s in zip(origin, shape, strict=True)]
    for idx in itertools.product(*ranges):
        rng = np.random.default_rng([seed, key, ndim, *(i + _INDEX_OFFSET for i in idx)])
        chunk = rng.random((c,) * ndim, dtype=np.float32)
        src, dst = [], []
        for a in range(ndim):
            lo = max(origin[a], idx[a] * c)
            hi = min(origin[a] + shape[a], (idx[a] + 1) * c)
            src.append(slice(lo - idx[a] * c, hi - idx[a] * c))
            dst.append(slice(lo - origin[a], hi - origin[a]))
        out[tuple(dst)] = chunk[tuple(src)]
    out -= np.float32(0.5)
    out *= np.float32(math.sqrt(12.0))
    return out


def _texture(
    seed: int, key: int, origin: Sequence[int], shape: Sequence[int], sigma: Sequence[float]
) -> np.ndarray:
    """Gaussian-filtered white noise with unit variance (a band-limited texture)."""
    r = _radius(sigma)
    noise = _white(
        seed,
        key,
        [o - ri for o, ri in zip(origin, r, strict=True)],
        [s + 2 * ri for s, ri in zip(shape, r, strict=True)],
    )
    # The halo covers the kernel, so every kept voxel is exact whatever the window.
    ndimage.gaussian_filter(noise, sigma, truncate=_TRUNCATE, mode="constant", output=noise)
    crop = tuple(slice(ri, ri + s) for ri, s in zip(r, shape, strict=True))
    std = math.prod(math.sqrt(float(np.sum(_gauss_kernel(s) ** 2))) for s in sigma)
    return noise[crop] / np.float32(std)


def _bspline_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First lattice node and the 4 normalized cubic B-spline weights at positions ``t``."""
    i = np.floor(t).astype(np.intp)
    f = t - i
    w = np.stack(
        [
            (1 - f) ** 3 / 6,
            (3 * f**3 - 6 * f**2 + 4) / 6,
            (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
            f**3 / 6,
        ],
        axis=-1,
    )
    # Interpolating iid unit normals with weights w gives variance sum(w**2):
    # dividing by its root makes the field's marginal distribution exactly N(0, 1).
    w /= np.sqrt(np.sum(w**2, axis=-1, keepdims=True))
    return i - 1, w.astype(np.float32)


def _plane(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``array[..., index:index+1, ...]`` along ``axis`` (keeps the axis for broadcasting)."""
    sl = [slice(None)] * array.ndim
    sl[axis] = slice(index, index + 1)
    return array[tuple(sl)]


class _SmoothField:
    """A smooth Gaussian random field with unit variance, defined at every voxel.

    Cubic B-spline interpolation of iid normals on a coarse lattice (node distance
    ``spacing`` voxels per axis) covering ``[lo, hi)`` in voxel coordinates. Grid and
    point evaluation perform the same float32 operations, so they agree bit for bit.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        lo: Sequence[float],
        hi: Sequence[float],
        spacing: Sequence[float],
    ) -> None:
        self.spacing = np.asarray(spacing, np.float64)
        self.lo = np.asarray(lo, np.float64) - 2 * self.spacing
        n = np.ceil((np.asarray(hi, np.float64) - self.lo) / self.spacing).astype(int) + 4
        self.values = rng.standard_normal(tuple(n)).astype(np.float32)

    def _weights(self, a: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first, w = _bspline_weights((coords - self.lo[a]) / self.spacing[a])
        if first.min() < 0 or first.max() + 4 > self.values.shape[a]:
            raise AssertionError("smooth field evaluated outside its lattice")
        return first, w

    def grid(self, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """The field on the voxels of a window."""
        ndim = len(shape)
        firsts, weights = [], []
        for a in range(ndim):
            f, w = self._weights(a, np.arange(origin[a], origin[a] + shape[a], dtype=np.float64))
            firsts.append(f)
            weights.append(w)
        out = self.values[tuple(slice(f.min(), f.max() + 4) for f in firsts)]
        # Reduce the last axis first, while the array is still small; along each axis,
        # the voxels between two lattice nodes share their 4 nodes, so each run of them
        # is a broadcast multiply-add of 4 node slabs (no gathers).
        for a in reversed(range(ndim)):
            idx = firsts[a] - firsts[a].min()
            w = weights[a]
            new_shape = list(out.shape)
            new_shape[a] = len(idx)
            new = np.empty(new_shape, np.float32)
            cuts = np.concatenate([[0], np.flatnonzero(np.diff(idx)) + 1, [len(idx)]])
            bshape = [1] * ndim
            bshape[a] = -1
            for start, stop in itertools.pairwise(cuts):
                k = int(idx[start])
                ww = w[start:stop]
                acc = _plane(out, a, k) * ww[:, 0].reshape(bshape)
                for j in range(1, 4):
                    acc = acc + _plane(out, a, k + j) * ww[:, j].reshape(bshape)
                sl = [slice(None)] * ndim
                sl[a] = slice(int(start), int(stop))
                new[tuple(sl)] = acc
            out = new
        return out

    def points(self, points: np.ndarray) -> np.ndarray:
        """The field at integer voxel positions ``points`` (N, ndim), as grid() computes it."""
        ndim = points.shape[1]
        firsts, weights = [], []
        for a in range(ndim):
            f, w = self._weights(a, points[:, a].astype(np.float64))
            firsts.append(f)
            weights.append(w)
        offsets = np.stack(np.meshgrid(*([np.arange(4)] * ndim), indexing="ij"), axis=-1).reshape(
            -1, ndim
        )
        node = tuple(firsts[a][:, None] + offsets[None, :, a] for a in range(ndim))
        vals = self.values[node].reshape((-1,) + (4,) * ndim)
        # the same float32 operations in the same order as grid(): last axis first
        for a in reversed(range(ndim)):
            w = weights[a].reshape((-1,) + (1,) * a + (4,))
            acc = vals[..., 0] * w[..., 0]
            for j in range(1, 4):
                acc = acc + vals[..., j] * w[..., j]
            vals = acc
        return vals


def _random_rotations(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    """``n`` uniformly random rotation matrices (n, ndim, ndim)."""
    if ndim == 2:
        t = rng.uniform(0, 2 * np.pi, n)
        c, s = np.cos(t), np.sin(t)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    det = np.linalg.det(q)
    q[:, :, 0] *= det[:, None]
    return q


def _random_sequential_adsorption(
    centers: np.ndarray,
    radii: np.ndarray,
    gap: float,
    fixed: np.ndarray | None = None,
    fixed_radii: np.ndarray | None = None,
) -> np.ndarray:
    """Greedily keep candidates (in order) whose spheres do not come closer than ``gap``.

    ``fixed`` spheres are already placed; returns the boolean mask of kept candidates.
    """
    n = len(centers)
    keep = np.ones(n, bool)
    if n == 0:
        return keep
    reach = 2 * float(radii.max()) + gap
    if fixed is not None and fixed_radii is not None and len(fixed):
        reach_f = float(radii.max() + fixed_radii.max()) + gap
        hits = cKDTree(fixed).query_ball_point(centers, reach_f)
        for i, js in enumerate(hits):
            if js and np.any(
                np.linalg.norm(fixed[js] - centers[i], axis=1) < fixed_radii[js] + radii[i] + gap
            ):
                keep[i] = False
    pairs = cKDTree(centers).query_pairs(reach, output_type="ndarray")
    if len(pairs):
        dist = np.linalg.norm(centers[pairs[:, 0]] - centers[pairs[:, 1]], axis=1)
        pairs = pairs[dist < radii[pairs[:, 0]] + radii[pairs[:, 1]] + gap]
    if len(pairs) == 0:
        return keep
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    order = np.argsort(hi, kind="stable")
    lo, hi = lo[order], hi[order]
    start = np.searchsorted(hi, np.arange(n), "left")
    stop = np.searchsorted(hi, np.arange(n), "right")
    for c in np.flatnonzero(stop > start):
        if keep[c] and keep[lo[start[c] : stop[c]]].any():
            keep[c] = False
    return keep


@dataclass
class _Objects:
    """Objects of an image: physical centres, anchor voxels and per-object attributes."""

    centers: np.ndarray  # (n, ndim) physical units (XY pixels)
    extent: np.ndarray  # (n,) physical radius that bounds the object around its centre
    attrs: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.centers)


# ------------------------------------------------------------------------- generators


class _Generator:
    """Image formation shared by the datasets; subclasses draw objects and the signal."""

    name = ""
    dtype: Any = np.uint16
    psf = (1.0, 2.5)  # Gaussian PSF sigma (lateral, axial) in XY pixels
    photons = 250.0  # expected photo-electrons at signal 1
    offset, gain, read_noise = 100.0, 1.6, 3.0  # ADU offset, ADU per electron, ADU rms
    max_extent = 16.0  # physical bound of any object's extent around its centre

    def __init__(self, shape: tuple[int, ...], seed: int, anisotropy: float) -> None:
        self.shape = shape
        self.ndim = len(shape)
        self.seed = seed
        self.anisotropy = anisotropy
        self.scale = np.array((anisotropy, 1.0, 1.0)[-self.ndim :])
        psf = (self.psf[1], self.psf[0], self.psf[0])[-self.ndim :]
        self.sigma = tuple(float(p / s) for p, s in zip(psf, self.scale, strict=True))
        self.blur_halo = _radius(self.sigma)
        # Labels are generated with a margin around the voxels needed, wide enough to
        # hold the whole path from any needed voxel to its object's anchor, so that the
        # connectivity clean-up decides alike in every block.
        # (+3 voxels: the anchor's rounding, and digital paths straying from straight lines)
        self.label_margin = tuple(math.ceil(self.max_extent / s) + 3 for s in self.scale)
        # voxels generated around a block, per axis
        self.margin = tuple(
            b + 1 + m for b, m in zip(self.blur_halo, self.label_margin, strict=True)
        )
        self.pad = tuple(m + 2 for m in self.margin)
        self.rng = np.random.default_rng([seed, _K_OBJECTS])
        self.field_rng = np.random.default_rng([seed, _K_FIELDS])
        self.objects = self._make_objects()
        self.anchors = np.clip(
            np.rint(self.objects.centers / self.scale).astype(np.int64),
            0,
            np.asarray(shape) - 1,
        )

    # -- helpers for subclasses

    def _field(self, spacing: float) -> _SmoothField:
        lo = [-p - 2 for p in self.pad]
        hi = [s + p + 2 for s, p in zip(self.shape, self.pad, strict=True)]
        return _SmoothField(self.field_rng, lo, hi, [spacing / s for s in self.scale])

    def _quantile(self, field: _SmoothField, q: float) -> float:
        """The q-quantile of ``field`` over this image (on a grid finer than its lattice).

        Thresholding there gives every image, small or large, the intended fraction,
        while the lattice spacing alone sets how large the regions are.
        """
        steps = [
            max(1, min(int(sp / 4), n // 4))
            for sp, n in zip(field.spacing, self.shape, strict=True)
        ]
        axes = [np.arange(st // 2, n, st) for n, st in zip(self.shape, steps, strict=True)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, self.ndim)
        return float(np.quantile(field.points(grid), q))

    def _tex(
        self, key: int, origin: Sequence[int], shape: Sequence[int], sigma: float
    ) -> np.ndarray:
        return _texture(self.seed, _K_TEX + key, origin, shape, [sigma / s for s in self.scale])

    def _uniform_points(self, n: int) -> np.ndarray:
        """Points uniform over the image, in physical units, whose anchors are inside."""
        lo = -0.5 * self.scale
        hi = (np.asarray(self.shape) - 0.5) * self.scale
        return self.rng.uniform(lo, hi, (n, self.ndim))

    def _coords(self, origin: Sequence[int], shape: Sequence[int]) -> list[np.ndarray]:
        """Physical coordinates per axis (1D, float32) of a window's voxels."""
        return [
            (np.arange(o, o + s, dtype=np.float64) * sc).astype(np.float32)
            for o, s, sc in zip(origin, shape, self.scale, strict=True)
        ]

    def _boxes(
        self, origin: Sequence[int], shape: Sequence[int], extent: np.ndarray
    ) -> Iterator[tuple[int, tuple[slice, ...]]]:
        """Objects whose extent box meets the window, with that box in window indices."""
        c = self.objects.centers
        lo = np.ceil((c - extent[:, None]) / self.scale).astype(np.int64) - np.asarray(origin)
        hi = np.floor((c + extent[:, None]) / self.scale).astype(np.int64) + 1 - np.asarray(origin)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.asarray(shape))
        for i in np.flatnonzero(np.all(hi > lo, axis=1)):
            yield int(i), tuple(slice(a, b) for a, b in zip(lo[i], hi[i], strict=True))

    # -- to implement

    def _make_objects(self) -> _Objects:
        raise NotImplementedError

    def _labels(
        self, origin: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Raw instance labels (id = object index + 1) and per-voxel extras on a window."""
        raise NotImplementedError

    def _signal(
        self,
        origin: Sequence[int],
        shape: Sequence[int],
        labels: np.ndarray,
        extras: dict[str, np.ndarray],
    ) -> np.ndarray:
        """Clean signal (float32, about 0..1) on a window, given labels one voxel wider."""
        raise NotImplementedError

    # -- the pipeline

    def block_alignment(self) -> int:
        return _CHUNK[self.ndim]

    def block(
        self, origin: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image, labels and semantic classes of the block at ``origin`` with ``shape``.

        The block must start on a multiple of :meth:`block_alignment` and end on one
        or at the image border.
        """
        origin, shape = tuple(int(o) for o in origin), tuple(int(s) for s in shape)
        c = self.block_alignment()
        for a in range(self.ndim):
            end = origin[a] + shape[a]
            if (
                origin[a] < 0
                or shape[a] < 1
                or end > self.shape[a]
                or origin[a] % c
                or (end % c and end != self.shape[a])
            ):
                raise SynthError(
                    f"block at {origin} of shape {shape} does not fit image {self.shape} "
                    f"on the {c}-voxel lattice along axis {a}; blocks start on multiples of {c} "
                    "and end on one or at the image border"
                )
        halo = self.blur_halo
        need_o = tuple(o - h - 1 for o, h in zip(origin, halo, strict=True))
        need_s = tuple(s + 2 * h + 2 for s, h in zip(shape, halo, strict=True))
        m = self.label_margin
        win_o = tuple(o - mm for o, mm in zip(need_o, m, strict=True))
        win_s = tuple(s + 2 * mm for s, mm in zip(need_s, m, strict=True))
        labels, extras = self._labels(win_o, win_s)
        self._clean_up(labels, win_o)
        crop = tuple(slice(mm, mm + s) for mm, s in zip(m, need_s, strict=True))
        labels = labels[crop]
        extras = {k: v[crop] for k, v in extras.items()}
        sig_o = tuple(o + 1 for o in need_o)
        sig_s = tuple(s - 2 for s in need_s)
        signal = self._signal(sig_o, sig_s, labels, extras)
        ndimage.gaussian_filter(
            signal, self.sigma, truncate=_TRUNCATE, mode="constant", output=signal
        )
        core = tuple(slice(h, h + s) for h, s in zip(halo, shape, strict=True))
        image = self._detect(origin, signal[core])
        # Semantic classes from the labels inside the image, one voxel wider than the
        # block where the image goes on: find_boundaries then sees what it would see
        # on the whole image.
        lo = [max(o - 1, 0) for o in origin]
        hi = [min(o + s + 1, full) for o, s, full in zip(origin, shape, self.shape, strict=True)]
        lab_in = labels[tuple(slice(a - n, b - n) for a, b, n in zip(lo, hi, need_o, strict=True))]
        sem = semantic_classes(lab_in)
        back = tuple(slice(o - a, o - a + s) for o, a, s in zip(origin, lo, shape, strict=True))
        return image, np.ascontiguousarray(lab_in[back]), np.ascontiguousarray(sem[back])

    def _detect(self, origin: Sequence[int], signal: np.ndarray) -> np.ndarray:
        """Shot noise, read noise and digitization, chunk by chunk of the noise lattice."""
        c = self.block_alignment()
        out = np.empty(signal.shape, self.dtype)
        top = float(np.iinfo(self.dtype).max)
        lam = np.clip(signal, 0, None).astype(np.float64) * self.photons
        ranges = [range(0, s, c) for s in signal.shape]
        for start in itertools.product(*ranges):
            sl = tuple(slice(b, b + c) for b in start)
            idx = [(o + b) // c + _INDEX_OFFSET for o, b in zip(origin, start, strict=True)]
            rng = np.random.default_rng([self.seed, _K_NOISE, *idx])
            electrons = rng.poisson(lam[sl])
            adu = (
                self.offset
                + self.gain * electrons
                + rng.normal(0.0, self.read_noise, electrons.shape)
            )
            out[sl] = np.clip(np.rint(adu), 0, top).astype(self.dtype)
        return out

    def _clean_up(self, labels: np.ndarray, origin: Sequence[int]) -> None:
        """Make every object one face-connected component holding its anchor, in place.

        Pieces cut off from their anchor (by the organoid surface, or digitization at
        sharp corners) join the object they touch most, or background if they touch
        none. Only voxels inside the image are considered. Decisions depend on labels
        within ``label_margin`` only, so every block decides alike.
        """
        from skimage.measure import label as components

        inside = tuple(
            slice(max(0, -o), min(s, full - o))
            for o, s, full in zip(origin, labels.shape, self.shape, strict=True)
        )
        sub = labels[inside]
        sub_origin = np.array([o + sl.start for o, sl in zip(origin, inside, strict=True)])
        for _ in range(4):
            comp = components(sub, connectivity=1, background=0)
            n = int(comp.max())
            if n == 0:
                return
            value = np.zeros(n + 1, labels.dtype)
            value[comp.ravel()] = sub.ravel()
            # main component of each object = the one holding its anchor voxel
            main = np.zeros(n + 1, bool)
            a = self.anchors - sub_origin
            ok = np.all((a >= 0) & (a < np.asarray(sub.shape)), axis=1)
            ids = np.flatnonzero(ok)
            at = tuple(a[ids].T)
            hit = sub[at] == ids + 1
            main[comp[at][hit]] = True
            # objects whose anchor lies beyond this window cannot be judged: keep them
            judged = np.zeros(len(self.objects) + 2, bool)
            judged[ids + 1] = True
            main |= ~judged[np.minimum(value, len(self.objects) + 1)]
            main[0] = True
            fragments = np.flatnonzero(~main)
            if len(fragments) == 0:
                return
            boxes = ndimage.find_objects(comp)
            decisions = []
            for f in fragments:
                box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[f - 1])
                piece = comp[box] == f
                ring = ndimage.binary_dilation(piece) & ~piece
                touching = sub[box][ring]
                touching = touching[touching != value[f]]
                nonzero = touching[touching > 0]
                if len(nonzero):
                    ids_, counts = np.unique(nonzero, return_counts=True)
                    target = ids_[np.argmax(counts)]  # ties: the smallest id
                else:
                    target = 0
                decisions.append((box, piece, target))
            for box, piece, target in decisions:
                sub[box][piece] = target


class _Organoids(_Generator):
    """FIB/SEM of organoid tissue: cells with membranes, nuclei, organelles; matrix."""

    name = "organoids"
    dtype = np.uint8
    psf = (0.6, 0.8)
    photons = 90.0  # backscattered electrons per pixel at signal 1
    offset, gain, read_noise = 8.0, 255.0 / 90.0 / 0.95, 4.0
    cell = 30.0  # minimal distance of cell seeds (about the cell diameter)
    matrix_fraction = 0.45
    tissue_spacing = 120.0  # lattice of the tissue/matrix field: regions >> a tile
    warp_spacing, warp_amp, warp_max = 14.0, 1.6, 3.0

    def __init__(self, shape: tuple[int, ...], seed: int, anisotropy: float) -> None:
        self.r_cap = 1.3 * self.cell
        self.max_extent = self.r_cap + self.warp_max + 1  # as _cell_extents bounds it
        super().__init__(shape, seed, anisotropy)

    def _make_objects(self) -> _Objects:
        self.tissue = self._field(self.tissue_spacing)
        self.threshold = self._quantile(self.tissue, self.matrix_fraction)
        self.warp = [self._field(self.warp_spacing) for _ in range(self.ndim)]
        volume = float(np.prod(np.asarray(self.shape) * self.scale))
        r = np.full(1, self.cell / 2)
        # stage 1: random candidates; stage 2: a fine jittered grid fills every gap, so
        # that every tissue voxel has a seed within about 1.15 cell distances
        n1 = int(8 * volume / self.cell**self.ndim) + 8
        cand = self._uniform_points(n1)
        cand = cand[self._in_tissue(cand)]
        keep = _random_sequential_adsorption(cand, np.repeat(r, len(cand)), 0.0)
        seeds = cand[keep]
        step = self.cell / 3
        axes = [np.arange(0, s * sc, step) for s, sc in zip(self.shape, self.scale, strict=True)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, self.ndim)
        grid += self.rng.uniform(-step / 2, step / 2, grid.shape)
        grid = np.clip(grid, -0.5 * self.scale, (np.asarray(self.shape) - 0.51) * self.scale)
        grid = grid[self._in_tissue(grid)]
        if len(seeds):
            dist, _ = cKDTree(seeds).query(grid, distance_upper_bound=self.cell)
            grid = grid[~np.isfinite(dist)]
        grid = grid[self.rng.permutation(len(grid))]
        keep2 = _random_sequential_adsorption(
            grid, np.repeat(r, len(grid)), 0.0, seeds, np.repeat(r, len(seeds))
        )
        centers = np.concatenate([seeds, grid[keep2]])
        n = len(centers)
        attrs = {
            "nucleus": self.rng.uniform(0.27, 0.37, n) * self.cell,
            "cyto": 0.47 + self.rng.normal(0, 0.03, n) - 0.09 * (self.rng.random(n) < 0.12),
        }
        return _Objects(centers, self._cell_extents(centers), attrs)

    def _cell_extents(self, centers: np.ndarray) -> np.ndarray:
        """Bound of each cell's extent: its Voronoi circumradius (at most ``r_cap``) + warp.

        A voxel x belongs to cell i when x + w(x) lies in i's Voronoi region, so
        |x - s_i| <= circumradius + max|w|. Only speeds up rendering (smaller boxes).
        """
        cap = np.full(len(centers), self.r_cap)
        if len(centers) > self.ndim + 1:
            from scipy.spatial import QhullError, Voronoi

            try:
                vor = Voronoi(centers)
            except QhullError:
                vor = None
            if vor is not None:
                for i, region in enumerate(vor.point_region):
                    verts = vor.regions[region]
                    if verts and -1 not in verts:
                        far = np.linalg.norm(vor.vertices[verts] - centers[i], axis=1).max()
                        cap[i] = min(far, self.r_cap)
        return cap + self.warp_max + 1

    def _in_tissue(self, points: np.ndarray) -> np.ndarray:
        vox = np.clip(np.rint(points / self.scale), 0, np.asarray(self.shape) - 1)
        return self.tissue.points(vox.astype(np.int64)) > self.threshold

    def _labels(
        self, origin: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        coords = self._coords(origin, shape)
        # warped coordinates: cells are Voronoi cells of the seeds in a smoothly
        # displaced space, which bends the membranes like real ones
        warped = []
        for a in range(self.ndim):
            w = self.warp[a].grid(origin, shape) * np.float32(self.warp_amp)
            np.clip(w, -self.warp_max, self.warp_max, out=w)
            bshape = [1] * self.ndim
            bshape[a] = -1
            w += coords[a].reshape(bshape)
            warped.append(w)
        best = np.full(tuple(shape), np.float32(self.r_cap**2))
        labels = np.zeros(tuple(shape), np.uint32)
        centers = self.objects.centers.astype(np.float32)
        for i, box in self._boxes(origin, shape, self.objects.extent):
            d2 = np.square(warped[0][box] - centers[i, 0])
            for a in range(1, self.ndim):
                d2 += np.square(warped[a][box] - centers[i, a])
            closer = d2 < best[box]
            best[box][closer] = d2[closer]
            labels[box][closer] = i + 1
        tissue = self.tissue.grid(origin, shape) > self.threshold
        labels[~tissue] = 0
        return labels, {"dist": np.sqrt(best)}

    def _signal(
        self,
        origin: Sequence[int],
        shape: Sequence[int],
        labels: np.ndarray,
        extras: dict[str, np.ndarray],
    ) -> np.ndarray:
        from skimage.segmentation import find_boundaries

        inner = (slice(1, -1),) * self.ndim
        membrane = find_boundaries(labels, mode="thick")[inner]
        lab = labels[inner]
        dist = extras["dist"][inner]
        cell = lab > 0
        nuc_r = np.concatenate([[0.0], self.objects.attrs["nucleus"]]).astype(np.float32)[lab]
        cyto = np.concatenate([[0.0], self.objects.attrs["cyto"]]).astype(np.float32)[lab]
        nucleus = cell & (dist < nuc_r)
        envelope = cell & (np.abs(dist - nuc_r) < 0.8)
        # four textures serve disjoint compartments (matrix fibres and chromatin share one)
        fine = self._tex(1, origin, shape, 0.8)
        organelle = self._tex(2, origin, shape, 2.0)
        chromatin = self._tex(3, origin, shape, 1.5)
        patch = self._tex(4, origin, shape, 5.0)

        # extracellular matrix: grey, granular, clumpy, with a loose network of dark
        # fibres (the zero crossings of a texture) and dark debris
        sig = 0.57 + 0.05 * patch + 0.05 * fine
        fibres = (np.abs(chromatin) < 0.18) & (patch > -0.3)
        sig = np.where(fibres, sig - 0.2, sig)
        sig = np.where(organelle > 2.5, 0.35, sig)
        # cytoplasm: per-cell grey level, mitochondria (dark), vesicles (light), ribosomes
        cyt = cyto + 0.05 * fine
        cyt = np.where(organelle > 1.5, 0.25 + 0.04 * fine, cyt)
        cyt = np.where(organelle < -2.2, 0.74, cyt)
        # nucleus: lighter euchromatin, dark heterochromatin clumps and rim
        rim = nucleus & (dist > 0.84 * nuc_r)
        nuc = np.where((chromatin > 0.8) | rim, 0.34, 0.6) + 0.04 * fine
        sig = np.where(cell, np.where(nucleus, nuc, cyt), sig)
        sig = np.where(envelope, 0.26, sig)
        sig = np.where(membrane, 0.14, sig)
        # FIB curtaining: faint streaks along Y, fixed along the milling direction
        plane_o = [o for a, o in enumerate(origin) if a != self.ndim - 2]
        plane_s = [s for a, s in enumerate(shape) if a != self.ndim - 2]
        # streaks are thin along X and persist over several slices along Z
        sig_c = [6.0 / float(self.scale[0]), 1.0] if self.ndim == 3 else [1.0]
        curtain = _texture(self.seed, _K_TEX + 8, plane_o, plane_s, sig_c)
        sig = sig * (1 + 0.04 * np.expand_dims(curtain, self.ndim - 2))
        return np.asarray(sig, np.float32)


class _Nuclei(_Generator):
    """Fluorescent nuclei: random non-overlapping irregular ellipsoids."""

    radius = (6.5, 9.5)  # range of the largest semi-axis, XY pixels
    aspect = (1.0, 1.4)
    gap = 2.0
    bumps = 0.12  # amplitude of the shape irregularity

    def __init__(self, shape: tuple[int, ...], seed: int, anisotropy: float) -> None:
        self.max_extent = self.radius[1] * (1 + self.bumps) + 1
        super().__init__(shape, seed, anisotropy)

    def _region(self) -> tuple[_SmoothField, float]:
        raise NotImplementedError

    def _candidates(self) -> np.ndarray:
        raise NotImplementedError

    def _nucleus_maps(
        self, labels: np.ndarray, extras: dict[str, np.ndarray]
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
        """The tile without its one-voxel rim, and there: labels, the radial coordinate
        inside each nucleus, and each voxel's nucleus brightness (0 outside nuclei)."""
        inner = (slice(1, -1),) * self.ndim
        bright = np.concatenate([[0.0], self.objects.attrs["bright"]]).astype(np.float32)
        lab = labels[inner]
        return inner, lab, extras["rho"][inner], bright[lab]

    def _make_objects(self) -> _Objects:
        self.region, self.threshold = self._region()
        cand = self._candidates()
        vox = np.clip(np.rint(cand / self.scale), 0, np.asarray(self.shape) - 1).astype(np.int64)
        cand = cand[self.region.points(vox) > self.threshold]
        n = len(cand)
        rmax = self.rng.uniform(*self.radius, n)
        extent = rmax * (1 + self.bumps)
        keep = _random_sequential_adsorption(cand, extent, self.gap)
        centers, rmax, extent = cand[keep], rmax[keep], extent[keep]
        n = len(centers)
        axes = np.empty((n, self.ndim))
        axes[:, 0] = rmax
        for a in range(1, self.ndim):
            axes[:, a] = rmax / self.rng.uniform(*self.aspect, n)
        rot = _random_rotations(self.rng, n, self.ndim)
        # shape irregularity: r_eff = 1 + sum_k c_k (n . v_k)**3 (kidney/egg shapes)
        vdir = self.rng.standard_normal((n, 3, self.ndim))
        vdir /= np.linalg.norm(vdir, axis=-1, keepdims=True)
        coef = self.rng.uniform(-1, 1, (n, 3))
        coef *= self.bumps / np.maximum(np.abs(coef).sum(axis=1, keepdims=True), 1e-9)
        nucleolus = self.rng.standard_normal((n, self.ndim))
        nucleolus *= 0.35 / np.linalg.norm(nucleolus, axis=1, keepdims=True)
        attrs = {
            "axes": axes,
            "rot": rot,
            "vdir": vdir,
            "coef": coef,
            "nucleolus": nucleolus,
            **self._attributes(n, centers),
        }
        return _Objects(centers, extent, attrs)

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _labels(
        self, origin: Sequence[int], shape: Sequence[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        coords = self._coords(origin, shape)
        labels = np.zeros(tuple(shape), np.uint32)
        rho = np.full(tuple(shape), 2.0, np.float32)  # normalized radius inside nuclei
        nucleolus = np.zeros(tuple(shape), bool)
        at = self.objects.attrs
        nd = self.ndim
        for i, box in self._boxes(origin, shape, self.objects.extent):
            rel = []
            for a in range(nd):
                bshape = [1] * nd
                bshape[a] = -1
                rel.append(
                    (coords[a][box[a]] - np.float32(self.objects.centers[i, a])).reshape(bshape)
                )
            # body coordinates: rotate, then scale the semi-axes to 1
            u = [
                sum(rel[a] * np.float32(at["rot"][i, a, k]) for a in range(nd))
                / np.float32(at["axes"][i, k])
                for k in range(nd)
            ]
            r = np.sqrt(sum(uk * uk for uk in u))
            r_safe = np.maximum(r, np.float32(1e-6))
            bump = sum(
                np.float32(at["coef"][i, m])
                * (sum(u[k] * np.float32(at["vdir"][i, m, k]) for k in range(nd)) / r_safe) ** 3
                for m in range(3)
            )
            reff = r / (1 + bump)
            inside = reff < 1
            labels[box][inside] = i + 1
            rho[box][inside] = reff[inside]
            dn = sum((u[k] - np.float32(at["nucleolus"][i, k])) ** 2 for k in range(nd))
            nucleolus[box] |= inside & (dn < np.float32(0.3**2))
        return labels, {"rho": rho, "nucleolus": nucleolus}


class _Plants(_Nuclei):
    """Confocal nuclei of plant tissue: dense, similar in size and brightness."""

    name = "plants"
    psf = (1.0, 2.5)
    photons = 220.0
    offset, gain, read_noise = 100.0, 1.6, 3.0
    radius = (6.5, 9.5)
    aspect = (1.0, 1.35)
    gap = 2.0

    def _region(self) -> tuple[_SmoothField, float]:
        # the tissue fills nearly everything: a little background at its edge
        field = self._field(160.0)
        return field, self._quantile(field, 0.04)

    def _candidates(self) -> np.ndarray:
        volume = float(np.prod(np.asarray(self.shape) * self.scale))
        mean_r = float(np.mean(self.radius))
        n = int(6 * volume / (2 * mean_r + self.gap) ** self.ndim) + 8
        return self._uniform_points(n)

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        return {"bright": np.clip(self.rng.normal(1.0, 0.1, n), 0.7, 1.3)}

    def _signal(
        self,
        origin: Sequence[int],
        shape: Sequence[int],
        labels: np.ndarray,
        extras: dict[str, np.ndarray],
    ) -> np.ndarray:
        inner, lab, rho, bright = self._nucleus_maps(labels, extras)
        fine = self._tex(1, origin, shape, 0.8)
        chromo = self._tex(2, origin, shape, 0.9)
        auto = self._tex(3, origin, shape, 3.0)
        tissue = 1 / (1 + np.exp(-(self.region.grid(origin, shape) - self.threshold) / 0.2))
        nuc = bright * (0.72 + 0.2 * np.minimum(rho, 1) ** 2 + 0.08 * fine)
        nuc = np.where(chromo > 1.7, nuc + 0.8 * bright, nuc)
        nuc = np.where(extras["nucleolus"][inner], 0.3 * nuc, nuc)
        back = 0.012 + 0.05 * tissue * np.clip(1 + 0.4 * auto, 0, None)
        sig = np.where(lab > 0, nuc, back)
        if self.ndim == 3:
            z = self._coords(origin, shape)[0].reshape(-1, 1, 1)
            depth = self.shape[0] * self.scale[0]
            sig = sig * np.exp(-z / np.float32(4 * depth))
        return np.asarray(sig, np.float32)


class _Embryo(_Nuclei):
    """Confocal nuclei of an embryo: sparse, strongly varying in brightness."""

    name = "embryo"
    psf = (1.2, 3.0)
    photons = 260.0
    offset, gain, read_noise = 100.0, 1.6, 3.0
    radius = (7.0, 11.0)
    aspect = (1.0, 1.6)
    gap = 5.0

    def _region(self) -> tuple[_SmoothField, float]:
        field = self._field(150.0)
        return field, self._quantile(field, 0.62)

    def _candidates(self) -> np.ndarray:
        volume = float(np.prod(np.asarray(self.shape) * self.scale))
        mean_r = float(np.mean(self.radius))
        n = int(1.6 * volume / (2 * mean_r + self.gap) ** self.ndim / 0.38) + 8
        cand = self._uniform_points(n)
        # varying density: thin candidates by a smooth field
        density = self._field(70.0)
        vox = np.clip(np.rint(cand / self.scale), 0, np.asarray(self.shape) - 1).astype(np.int64)
        p = 1 / (1 + np.exp(-1.5 * density.points(vox)))
        return cand[self.rng.random(len(cand)) < p]

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        mitotic = self.rng.random(n) < 0.06
        bright = np.exp(self.rng.normal(0.0, 0.5, n)) * np.where(mitotic, 2.2, 1.0)
        return {"bright": bright, "mitotic": mitotic.astype(np.float64)}

    def _make_objects(self) -> _Objects:
        objects = super()._make_objects()
        # mitotic nuclei are condensed: shrink them
        small = objects.attrs["mitotic"] > 0
        objects.attrs["axes"][small] *= 0.7
        self.light = self._field(100.0)
        return objects

    def _signal(
        self,
        origin: Sequence[int],
        shape: Sequence[int],
        labels: np.ndarray,
        extras: dict[str, np.ndarray],
    ) -> np.ndarray:
        inner, lab, rho, bright = self._nucleus_maps(labels, extras)
        mitotic = np.concatenate([[0.0], self.objects.attrs["mitotic"]])[lab] > 0
        fine = self._tex(1, origin, shape, 0.9)
        chromo = self._tex(2, origin, shape, 1.1)
        nuc = bright * (0.85 + 0.1 * np.minimum(rho, 1) ** 2 + 0.1 * fine)
        nuc = np.where(mitotic, bright * np.where(chromo > 0.3, 1.0, 0.35), nuc)
        nuc = np.where(extras["nucleolus"][inner] & ~mitotic, 0.5 * nuc, nuc)
        embryo = 1 / (1 + np.exp(-(self.region.grid(origin, shape) - self.threshold) / 0.25))
        sig = np.where(lab > 0, nuc, 0.06 * embryo)
        # bright and dim regions, an illumination gradient along X, depth attenuation
        sig = sig * np.exp(0.6 * self.light.grid(origin, shape))
        x = self._coords(origin, shape)[-1]
        width = self.shape[-1] * self.scale[-1]
        sig = sig * (1 - 0.7 * x / np.float32(width))
        if self.ndim == 3:
            z = self._coords(origin, shape)[0].reshape(-1, 1, 1)
            depth = self.shape[0] * self.scale[0]
            sig = sig * np.exp(-1.2 * z / np.float32(depth))
        return np.asarray(sig + 0.004, np.float32)


_GENERATORS: dict[str, type[_Generator]] = {
    "organoids": _Organoids,
    "plants": _Plants,
    "embryo": _Embryo,
}


def _generator(name: str, shape: Sequence[int], seed: int, anisotropy: float) -> _Generator:
    check_norm_name(name)
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) not in (2, 3):
        raise SynthError(f"shape {shape_t} must have 2 (Y,X) or 3 (Z,Y,X) axes")
    if min(shape_t) < 8:
        raise SynthError(f"shape {shape_t} is too small: every axis needs at least 8 voxels")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed {seed!r} must be a non-negative integer")
    if not (0.1 <= anisotropy <= 10):
        raise SynthError(f"anisotropy {anisotropy} must be between 0.1 and 10 (Z step / XY pixel)")
    if len(shape_t) == 2 and anisotropy != 1:
        raise SynthError(
            f"anisotropy {anisotropy} applies to the Z axis of 3D shapes; shape {shape_t} is 2D"
        )
    return _GENERATORS[name](shape_t, int(seed), float(anisotropy))


def _blocks(
    shape: tuple[int, ...], block: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    starts = [range(0, s, b) for s, b in zip(shape, block, strict=True)]
    return [
        (o, tuple(min(b, s - oo) for oo, b, s in zip(o, block, shape, strict=True)))
        for o in itertools.product(*starts)
    ]


def _default_block(
    shape: tuple[int, ...], unit: Sequence[int], margin: Sequence[int]
) -> tuple[int, ...]:
    """Block shape splitting ``shape`` evenly into the fewest blocks within the voxel budget.

    Blocks are multiples of ``unit`` per axis (the noise lattice or the output chunks).
    Each block is generated with ``margin`` voxels around it, so the axis split next is
    the one whose block is longest relative to its margin: blocks stay close to the
    shape that wastes least on margins.
    """
    budget = _BLOCK_VOXELS[len(shape)]
    counts = [1] * len(shape)

    def size(a: int) -> int:
        n = math.ceil(shape[a] / counts[a])
        return min(shape[a], math.ceil(n / unit[a]) * unit[a])

    while math.prod(size(a) for a in range(len(shape))) > budget:
        candidates = [a for a in range(len(shape)) if size(a) > unit[a]]
        if not candidates:
            break
        counts[max(candidates, key=lambda a: size(a) / max(margin[a], 1))] += 1
    return tuple(size(a) for a in range(len(shape)))


def synthesize(
    name: str,
    shape: Sequence[int],
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    progress: bool = False,
) -> SynthSample:
    """Generate an image of a synthetic dataset in memory.

    Parameters
    ----------
    name
        ``"organoids"``, ``"plants"`` or ``"embryo"``.
    shape
        ``(Y, X)`` or ``(Z, Y, X)`` in voxels.
    seed
        Non-negative seed; the same seed and shape give the same arrays.
    anisotropy
        Z step in units of the XY pixel size (3D only): objects keep their physical
        size, so with ``anisotropy=4`` a nucleus spans 4 times fewer slices.
    progress
        Show a progress bar over generated blocks.

    Returns
    -------
    SynthSample
        Image, instance labels and (organoids) semantic classes.
    """
    gen = _generator(name, shape, seed, anisotropy)
    image = np.empty(gen.shape, gen.dtype)
    labels = np.empty(gen.shape, np.uint32)
    semantic = np.empty(gen.shape, np.uint8)
    align = gen.block_alignment()
    blocks = _blocks(gen.shape, _default_block(gen.shape, [align] * gen.ndim, gen.margin))
    for origin, bshape in tqdm(
        blocks, desc=f"synth {name}", disable=not progress or len(blocks) < 2
    ):
        sl = tuple(slice(o, o + s) for o, s in zip(origin, bshape, strict=True))
        image[sl], labels[sl], semantic[sl] = gen.block(origin, bshape)
    return SynthSample(
        name, int(seed), float(anisotropy), image, labels, semantic if name == "organoids" else None
    )


# ----------------------------------------------------------------------------- writing


@dataclass
class SynthWritten:
    """What :func:`write_synthetic` wrote."""

    format: str
    paths: dict[str, Path]  # "image", "labels" (and "semantic") -> where
    shape: tuple[int, ...]
    dtype: str
    objects: int
    levels: int = 1

    def describe(self) -> str:
        """A few lines for a person."""
        lines = []
        for key, path in self.paths.items():
            what = {
                "image": f"image {self.dtype} {self.shape}",
                "labels": f"instance labels uint32, {self.objects} objects",
                "semantic": "semantic classes uint8",
            }[key]
            lines.append(f"  {path}  ({what})")
        return "\n".join(lines)


def _format_of(out: Path, format: str | None) -> str:
    suffix = out.suffix.lower()
    by_suffix = {".zarr": "ome-zarr", ".tif": "tif", ".tiff": "tif"}.get(suffix)
    if format is None:
        if by_suffix is None:
            raise FormatError(
                f"cannot tell the format of {str(out)!r}: end it in .zarr (OME-Zarr) or "
                ".tif/.tiff, or pass format"
            )
        return by_suffix
    fmt = format.lower().replace("_", "-")
    fmt = {"omezarr": "ome-zarr", "zarr": "ome-zarr", "tiff": "tif"}.get(fmt, fmt)
    if fmt not in ("ome-zarr", "tif"):
        raise FormatError(f"unknown format {format!r}; choose ome-zarr or tif")
    if by_suffix is not None and by_suffix != fmt:
        raise FormatError(f"output {str(out)!r} has a {suffix} suffix but format is {fmt!r}")
    return fmt


def remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_synthetic(
    name: str,
    out: str | os.PathLike[str],
    shape: Sequence[int],
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    format: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthWritten:
    """Generate a synthetic image block by block straight to disk.

    Memory stays bounded by the block size, whatever the image size. Outputs are
    written under temporary names and moved into place when complete.

    Parameters
    ----------
    name, shape, seed, anisotropy
        As for :func:`synthesize` (the arrays written are identical to its arrays).
    out
        ``NAME.zarr`` for OME-Zarr (image with ``labels/instances``, and
        ``labels/semantic`` for organoids), or ``NAME.tif`` for TIFF (``NAME.tif``,
        ``NAME_labels.tif``, ``NAME_semantic.tif``).
    format
        ``"ome-zarr"`` or ``"tif"``; default from the suffix of ``out``.
    chunks
        OME-Zarr chunk shape (multiples of 64 in 2D, 32 in 3D); default 256x256 or 64x128x128.
    overwrite
        Replace existing outputs.
    progress
        Show a progress bar.
    """
    out = Path(out)
    fmt = _format_of(out, format)
    gen = _generator(name, shape, seed, anisotropy)
    if not out.parent.exists():
        raise InputNotFoundError(f"the folder of output {str(out)!r} does not exist")
    align = gen.block_alignment()
    chunk: tuple[int, ...]
    if chunks is None:
        chunk = (256, 256) if gen.ndim == 2 else (64, 128, 128)
    else:
        chunk = _per_axis(list(chunks), gen.ndim, "chunks")
    chunk = tuple(min(c, s) if s < c else c for c, s in zip(chunk, gen.shape, strict=True))
    for c, s in zip(chunk, gen.shape, strict=True):
        if c % align and c != s:
            raise SynthError(f"chunks {chunk} must be multiples of {align} voxels per axis")
    block = _default_block(gen.shape, chunk, gen.margin)
    if fmt == "ome-zarr":
        written = _write_ome_zarr(gen, out, chunk, block, overwrite, progress)
    else:
        written = _write_tiff(gen, out, block, overwrite, progress)
    return written


def _targets(paths: dict[str, Path], overwrite: bool) -> dict[str, Path]:
    for path in paths.values():
        if path.exists() and not overwrite:
            raise FormatError(f"output {str(path)!r} exists; remove it or pass overwrite")
    return {k: p.with_name(f".{p.name}.partial") for k, p in paths.items()}


def _commit(tmp: dict[str, Path], final: dict[str, Path]) -> None:
    for key, path in final.items():
        remove_output(path)
        os.replace(tmp[key], path)


def _fill(gen: _Generator, block: tuple[int, ...], arrays: dict[str, Any], progress: bool) -> int:
    """Generate every block into the array-likes; returns the number of objects seen."""
    blocks = _blocks(gen.shape, block)
    seen = np.zeros(len(gen.objects) + 1, bool)
    for origin, bshape in tqdm(blocks, desc=f"synth {gen.name}", disable=not progress):
        sl = tuple(slice(o, o + s) for o, s in zip(origin, bshape, strict=True))
        image, labels, semantic = gen.block(origin, bshape)
        arrays["image"][sl] = image
        arrays["labels"][sl] = labels
        if "semantic" in arrays:
            arrays["semantic"][sl] = semantic
        seen[labels.ravel()] = True
    return int(seen[1:].sum())


def _levels(shape: tuple[int, ...]) -> int:
    """Pyramid levels: halve Y and X while the smaller stays at least 256 pixels."""
    n, yx = 1, min(shape[-2:])
    while yx // 2 >= 256 and n < 5:
        yx //= 2
        n += 1
    return n


def _write_ome_zarr(
    gen: _Generator,
    out: Path,
    chunk: tuple[int, ...],
    block: tuple[int, ...],
    overwrite: bool,
    progress: bool,
) -> SynthWritten:
    import dask.array as da
    import zarr
    from ome_zarr.format import FormatV05

    with warnings.catch_warnings():
        # ome_zarr.writer builds a deprecated Scaler as a default argument at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    tmp = _targets({"image": out}, overwrite)["image"]
    remove_output(tmp)
    fmt = FormatV05()
    axes = [{"name": n, "type": "space"} for n in ("z", "y", "x")[-gen.ndim :]]
    levels = _levels(gen.shape)
    shapes = [gen.shape[:-2] + tuple(max(1, s >> k) for s in gen.shape[-2:]) for k in range(levels)]
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        keys = ["image", "labels"] + (["semantic"] if gen.name == "organoids" else [])
        groups = {"image": root}
        labels_group = root.create_group("labels")
        groups["labels"] = labels_group.create_group("instances")
        if "semantic" in keys:
            groups["semantic"] = labels_group.create_group("semantic")
        dtypes = {
            "image": np.dtype(gen.dtype),
            "labels": np.dtype(np.uint32),
            "semantic": np.dtype(np.uint8),
        }
        pyramids: dict[str, list[Any]] = {}
        for key in keys:
            pyramids[key] = [
                groups[key].create_array(
                    str(k),
                    shape=s,
                    chunks=tuple(min(c, v) for c, v in zip(chunk, s, strict=True)),
                    dtype=dtypes[key],
                    fill_value=0,
                    dimension_names=[a["name"] for a in axes],
                )
                for k, s in enumerate(shapes)
            ]
        objects = _fill(gen, block, {k: v[0] for k, v in pyramids.items()}, progress)
        # lower resolutions: mean of 2x2 in Y, X for the image, every other pixel for labels
        for key in keys:
            for k in range(1, levels):
                src = da.from_zarr(pyramids[key][k - 1])
                if key == "image":
                    axes_ = {gen.ndim - 2: 2, gen.ndim - 1: 2}
                    low = da.coarsen(np.mean, src.astype(np.float32), axes_, trim_excess=True)
                    low = da.round(low).astype(dtypes[key])
                else:
                    low = src[(Ellipsis, slice(None, None, 2), slice(None, None, 2))]
                target = pyramids[key][k]
                # one task per output chunk: no two tasks may write the same chunk
                low = low[tuple(slice(0, s) for s in shapes[k])].rechunk(target.chunks)
                da.store(low, target, lock=False)
        for key in keys:
            datasets = [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {
                            "type": "scale",
                            "scale": [float(v) for v in gen.scale[:-2]]
                            + [float(2**k), float(2**k)],
                        }
                    ],
                }
                for k in range(levels)
            ]
            write_multiscales_metadata(
                groups[key], datasets, fmt=fmt, axes=axes, name=key if key != "image" else gen.name
            )
        # "source" points the label images back at their image, as readers expect
        source = {"image": "../../"}
        write_label_metadata(labels_group, "instances", fmt=fmt, source=source)
        if "semantic" in keys:
            names = class_names(gen.name)
            write_label_metadata(
                labels_group,
                "semantic",
                fmt=fmt,
                properties=[{"label-value": i, "class": n} for i, n in enumerate(names)],
                source=source,
            )
        root.attrs["nahtlos"] = {
            "dataset": gen.name,
            "seed": gen.seed,
            "anisotropy": gen.anisotropy,
            "class_names": list(class_names(gen.name)),
        }
    except BaseException:
        remove_output(tmp)
        raise
    _commit({"image": tmp}, {"image": out})
    paths = {"image": out, "labels": out / "labels" / "instances"}
    if gen.name == "organoids":
        paths["semantic"] = out / "labels" / "semantic"
    return SynthWritten("ome-zarr", paths, gen.shape, np.dtype(gen.dtype).name, objects, levels)


def _write_tiff(
    gen: _Generator, out: Path, block: tuple[int, ...], overwrite: bool, progress: bool
) -> SynthWritten:
    import tifffile

    stem = out.with_suffix("")
    suffix = out.suffix
    final = {"image": out, "labels": stem.with_name(f"{stem.name}_labels{suffix}")}
    if gen.name == "organoids":
        final["semantic"] = stem.with_name(f"{stem.name}_semantic{suffix}")
    tmp = _targets(final, overwrite)
    dtypes = {
        "image": np.dtype(gen.dtype),
        "labels": np.dtype(np.uint32),
        "semantic": np.dtype(np.uint8),
    }
    axes = "ZYX"[-gen.ndim :]
    arrays: dict[str, Any] = {}
    try:
        for key, path in tmp.items():
            remove_output(path)
            nbytes = math.prod(gen.shape) * dtypes[key].itemsize
            arrays[key] = tifffile.memmap(
                path,
                shape=gen.shape,
                dtype=dtypes[key],
                bigtiff=nbytes > 2**31,
                metadata={
                    "axes": axes,
                    "dataset": gen.name,
                    "seed": gen.seed,
                    "anisotropy": gen.anisotropy,
                    "content": key,
                },
            )
        objects = _fill(gen, block, arrays, progress)
        for arr in arrays.values():
            arr.flush()
        arrays.clear()
    except BaseException:
        arrays.clear()
        for path in tmp.values():
            remove_output(path)
        raise
    _commit(tmp, final)
    return SynthWritten("tif", final, gen.shape, np.dtype(gen.dtype).name, objects)


def open_synthetic(path: str | os.PathLike[str]) -> SynthSample:
    """Open a dataset written by :func:`write_synthetic`, lazily.

    ``path`` is the ``.zarr`` folder or the image ``.tif``. The arrays of the returned
    sample are zarr arrays or memory maps: slicing reads only what is sliced.
    """
    from ..io import open_image

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"synthetic dataset {str(p)!r} does not exist")
    if p.suffix.lower() == ".zarr":
        import zarr

        root: Any = zarr.open_group(str(p), mode="r")
        meta: dict[str, Any] = dict(root.attrs).get("nahtlos") or {}
        if not meta:
            raise FormatError(
                f"{str(p)!r} was not written by write_synthetic (no 'nahtlos' attributes)"
            )
        image = open_image(p)
        labels = open_image(f"{p}:labels/instances/0")
        semantic = open_image(f"{p}:labels/semantic/0") if "semantic" in root["labels"] else None
    elif p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(p) as tif:
            meta = dict((tif.shaped_metadata or [{}])[0])
        if "dataset" not in meta:
            raise FormatError(
                f"{str(p)!r} was not written by write_synthetic (no dataset metadata)"
            )
        stem = p.with_suffix("")
        image = open_image(p)
        labels = open_image(stem.with_name(f"{stem.name}_labels{p.suffix}"))
        sem_path = stem.with_name(f"{stem.name}_semantic{p.suffix}")
        semantic = open_image(sem_path) if sem_path.exists() else None
    else:
        raise FormatError(f"cannot open {str(p)!r}: expected a .zarr folder or a .tif file")
    return SynthSample(
        str(meta["dataset"]), int(meta["seed"]), float(meta["anisotropy"]), image, labels, semantic
    )


# ----------------------------------------------------------------------------- preview


def _colorize(labels: np.ndarray) -> np.ndarray:
    """Random but stable colours per label id, black background."""
    ids = labels.astype(np.uint64)
    h = (ids * np.uint64(2654435761)) % np.uint64(2**32)
    rgb = np.stack(
        [((h >> np.uint64(s)) & np.uint64(255)).astype(np.float32) / 255 for s in (0, 8, 16)], -1
    )
    rgb = 0.25 + 0.75 * rgb
    rgb[labels == 0] = 0
    return rgb


def _section(sample: SynthSample, axis: int, index: int) -> tuple[np.ndarray, ...]:
    """Image, labels and classes of one plane, reading only a 3-plane slab.

    Works on array-likes opened from disk. Classes come from the slab's 3D labels, so
    they are the 3D boundaries of the volume, not those of the plane alone.
    """
    lo, hi = max(index - 1, 0), min(index + 2, sample.image.shape[axis])

    def slab(arr: Any) -> np.ndarray:
        sl = [slice(None)] * sample.image.ndim
        sl[axis] = slice(lo, hi)
        return np.asarray(arr[tuple(sl)])

    labels = slab(sample.labels)
    sem = slab(sample.semantic) if sample.semantic is not None else semantic_classes(labels)
    take = index - lo
    return tuple(np.take(a, take, axis=axis) for a in (slab(sample.image), labels, sem))


def save_preview(
    samples: Sequence[SynthSample], path: str | os.PathLike[str], *, dpi: int = 100
) -> Path:
    """Save a PNG montage: per sample a row of image, instance labels and classes.

    3D samples show their middle Z slice and, below it, the middle XZ section (drawn
    with the Z step to scale). Arrays may be array-likes opened from disk: only the
    planes shown are read.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float, str]] = []
    for s in samples:
        names = " / ".join(class_names(s.name))
        shape = tuple(s.image.shape)
        if len(shape) == 2:
            img, lab, sem = (
                np.asarray(s.image),
                np.asarray(s.labels),
                np.asarray(s.semantic) if s.semantic is not None else None,
            )
            sem = semantic_classes(lab) if sem is None else sem
            rows.append((f"{s.name} 2D {shape}", img, lab, sem, 1.0, names))
        else:
            z, y = shape[0] // 2, shape[1] // 2
            title = f"{s.name} 3D {shape}, anisotropy {s.anisotropy:g}"
            img, lab, sem = _section(s, 0, z)
            rows.append((f"{title}, z={z}", img, lab, sem, 1.0, names))
            img, lab, sem = _section(s, 1, y)
            rows.append((f"XZ section y={y}", img, lab, sem, s.anisotropy, names))
    heights = [r[1].shape[0] * r[4] / r[1].shape[1] for r in rows]
    fig, axs = plt.subplots(
        len(rows),
        3,
        figsize=(9.6, 3.2 * sum(heights) + 0.35 * len(rows)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    cmap = ListedColormap(["#1b1b1b", "#3b8bd9", "#f2c12e"])
    for (title, img, lab, sem, aspect, names), ax in zip(rows, axs, strict=True):
        lo, hi = np.percentile(img, (0.5, 99.8))
        ax[0].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax[1].imshow(_colorize(lab), aspect=aspect, interpolation="nearest")
        ax[2].imshow(sem, cmap=cmap, vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
        ax[0].set_title(title, fontsize=8, loc="left")
        ax[1].set_title("instances", fontsize=8, loc="left")
        ax[2].set_title(f"classes: {names}", fontsize=8, loc="left")
        for a in ax:
            a.set_axis_off()
    fig.tight_layout(pad=0.4)
    out = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    # a 256-colour palette keeps noisy microscopy PNGs small, with no visible loss
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)
    return out
