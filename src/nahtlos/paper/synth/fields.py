"""Random fields that depend on global coordinates only: noise, textures, smooth fields.

White noise comes from a fixed lattice of chunks, each seeded by its index, so a
voxel's noise does not depend on the window it is drawn in; textures filter it with a
halo that covers the kernel; smooth fields interpolate iid normals on a coarse
lattice. A window of any of them is therefore bit-identical however an image is cut
into blocks, which is what block-wise generation rests on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "CHUNK",
    "INDEX_OFFSET",
    "TRUNCATE",
    "SmoothField",
    "gauss_kernel",
    "kernel_radius",
    "texture",
    "white_noise",
]

# White noise comes from a fixed lattice of chunks, each seeded by its index, so that a
# voxel's noise does not depend on the block it is generated in. Blocks align to it.
CHUNK = {2: 64, 3: 32}
INDEX_OFFSET = 1 << 24  # keeps chunk indices (negative beyond the image) non-negative
TRUNCATE = 4.0  # Gaussian kernels are cut at 4 sigma, as scipy does by default


def gauss_kernel(sigma: float) -> np.ndarray:
    """The discrete kernel scipy's ``gaussian_filter`` uses for ``sigma``."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def kernel_radius(sigma: Sequence[float]) -> tuple[int, ...]:
    """Radius per axis of the Gaussian kernels of ``sigma`` (as scipy truncates them)."""
    return tuple(int(TRUNCATE * s + 0.5) for s in sigma)


def white_noise(seed: int, key: int, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Zero-mean, unit-variance white noise on a window, from the lattice of seeded chunks.

    Uniform rather than normal (it is several times faster to draw): the textures
    filter it, which makes it Gaussian for all practical purposes.
    """
    ndim = len(shape)
    c = CHUNK.get(ndim, 64)
    out = np.empty(tuple(shape), np.float32)
    ranges = [range(o // c, (o + s - 1) // c + 1) for o, s in zip(origin, shape, strict=True)]
    for idx in itertools.product(*ranges):
        rng = np.random.default_rng([seed, key, ndim, *(i + INDEX_OFFSET for i in idx)])
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


def texture(
    seed: int, key: int, origin: Sequence[int], shape: Sequence[int], sigma: Sequence[float]
) -> np.ndarray:
    """Gaussian-filtered white noise with unit variance (a band-limited texture)."""
    r = kernel_radius(sigma)
    noise = white_noise(
        seed,
        key,
        [o - ri for o, ri in zip(origin, r, strict=True)],
        [s + 2 * ri for s, ri in zip(shape, r, strict=True)],
    )
    # The halo covers the kernel, so every kept voxel is exact whatever the window.
    ndimage.gaussian_filter(noise, sigma, truncate=TRUNCATE, mode="constant", output=noise)
    crop = tuple(slice(ri, ri + s) for ri, s in zip(r, shape, strict=True))
    std = math.prod(math.sqrt(float(np.sum(gauss_kernel(s) ** 2))) for s in sigma)
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


class SmoothField:
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
        if len(points) == 0:  # e.g. no candidate left after thinning
            return np.zeros(0, np.float32)
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
