"""Image formation shared by the datasets, and generation of one block of an image.

A :class:`Generator` draws an image's objects once, in physical units, and then makes
any block of the image from global coordinates alone: instance labels (cleaned up so
that every object is one connected component holding its anchor), a clean signal,
blurred by a Gaussian PSF that is wider along Z, with Z spacing ``anisotropy`` times
the XY pixel size, then shot noise, read noise and digitization. Each block is
generated with a margin wide enough for the blur and the label clean-up, so a block
comes out bit-identical however the image is cut. The datasets subclass it with their
objects and signal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ...engine import BlockGrid
from .fields import CHUNK, INDEX_OFFSET, TRUNCATE, SmoothField, kernel_radius, texture
from .placement import Objects
from .sample import SynthError, semantic_classes

__all__ = ["Extras", "Generator"]

Extras = dict[str, np.ndarray]
"""Per-voxel maps that come with a window's labels (distances, radial coordinates, ...)."""

# stream keys: every random quantity has its own stream
_K_OBJECTS, _K_FIELDS, _K_NOISE = 1, 2, 3
_K_TEX = 100


class Generator:
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
        self.blur_halo = kernel_radius(self.sigma)
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
        self.anchors = self._voxels(self.objects.centers)

    # -- helpers for subclasses

    def _field(self, spacing: float) -> SmoothField:
        lo = [-p - 2 for p in self.pad]
        hi = [s + p + 2 for s, p in zip(self.shape, self.pad, strict=True)]
        return SmoothField(self.field_rng, lo, hi, [spacing / s for s in self.scale])

    def _quantile(self, field: SmoothField, q: float) -> float:
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

    def _texture(
        self, key: int, origin: Sequence[int], shape: Sequence[int], sigma: Sequence[float]
    ) -> np.ndarray:
        """Texture number ``key`` of this image on a window, ``sigma`` in voxels per axis."""
        return texture(self.seed, _K_TEX + key, origin, shape, sigma)

    def _tex(
        self, key: int, origin: Sequence[int], shape: Sequence[int], sigma: float
    ) -> np.ndarray:
        """Texture number ``key`` of features of ``sigma`` physical units, on a window."""
        return self._texture(key, origin, shape, [sigma / s for s in self.scale])

    def _uniform_points(self, n: int) -> np.ndarray:
        """Points uniform over the image, in physical units, whose anchors are inside."""
        lo = -0.5 * self.scale
        hi = (np.asarray(self.shape) - 0.5) * self.scale
        return self.rng.uniform(lo, hi, (n, self.ndim))

    def _voxels(self, points: np.ndarray) -> np.ndarray:
        """The voxels (N, ndim) nearest to physical ``points``, clipped into the image."""
        vox = np.clip(np.rint(points / self.scale), 0, np.asarray(self.shape) - 1)
        return vox.astype(np.int64)

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

    def _make_objects(self) -> Objects:
        raise NotImplementedError

    def _labels(self, origin: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, Extras]:
        """Raw instance labels (id = object index + 1) and per-voxel extras on a window."""
        raise NotImplementedError

    def _signal(
        self, origin: Sequence[int], shape: Sequence[int], labels: np.ndarray, extras: Extras
    ) -> np.ndarray:
        """Clean signal (float32, about 0..1) on a window, given labels one voxel wider."""
        raise NotImplementedError

    # -- the pipeline

    def block_alignment(self) -> int:
        """The noise lattice: blocks start on multiples of it."""
        return CHUNK[self.ndim]

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
            signal, self.sigma, truncate=TRUNCATE, mode="constant", output=signal
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
        for chunk in BlockGrid(signal.shape, c):
            sl = chunk.inner
            idx = [(o + b) // c + INDEX_OFFSET for o, b in zip(origin, chunk.start, strict=True)]
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
