"""Fluorescent nuclei, the objects of the ``plants`` and ``embryo`` datasets.

Irregular ellipsoids (kidney and egg shapes from a few cubic harmonics), randomly
rotated, placed without overlap inside a region outlined by a smooth field, each
with a brightness and a nucleolus. The two datasets differ in density, sizes,
brightness and their signal (:mod:`.plants`, :mod:`.embryo`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .fields import SmoothField
from .generator import Extras, Generator
from .placement import Objects, random_rotations, random_sequential_adsorption

__all__ = ["Nuclei"]


class Nuclei(Generator):
    """Fluorescent nuclei: random non-overlapping irregular ellipsoids in a region.

    Subclasses set the region (a smooth field thresholded so that ``region_fraction``
    of the image lies outside it, regions about ``region_spacing`` wide), how densely
    candidates are drawn, each nucleus' brightness, and the signal.
    """

    radius = (6.5, 9.5)  # range of the largest semi-axis, XY pixels
    aspect = (1.0, 1.4)
    gap = 2.0
    bumps = 0.12  # amplitude of the shape irregularity
    region_spacing: float  # lattice of the field that outlines the region (XY pixels)
    region_fraction: float  # share of the image outside the region
    # candidate centres per site of a dense packing of the mean nucleus (with its gap),
    # before those outside the region and overlapping ones are dropped
    crowding: float
    region_share = 1.0  # expected share of the image in the region (for the density)

    def __init__(self, shape: tuple[int, ...], seed: int, anisotropy: float) -> None:
        self.max_extent = self.radius[1] * (1 + self.bumps) + 1
        super().__init__(shape, seed, anisotropy)

    def _region(self) -> tuple[SmoothField, float]:
        field = self._field(self.region_spacing)
        return field, self._quantile(field, self.region_fraction)

    def _candidates(self) -> np.ndarray:
        volume = float(np.prod(np.asarray(self.shape) * self.scale))
        mean_r = float(np.mean(self.radius))
        site = (2 * mean_r + self.gap) ** self.ndim
        return self._uniform_points(int(self.crowding * volume / site / self.region_share) + 8)

    def _region_weight(
        self, origin: Sequence[int], shape: Sequence[int], softness: float
    ) -> np.ndarray:
        """A soft 0..1 mask of the region on a window (its edge ``softness`` wide)."""
        return 1 / (1 + np.exp(-(self.region.grid(origin, shape) - self.threshold) / softness))

    def _depth(self, origin: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, float]:
        """Physical Z of a 3D window's slices (broadcastable) and the image's depth."""
        z = self._coords(origin, shape)[0].reshape(-1, 1, 1)
        return z, self.shape[0] * self.scale[0]

    def _nucleus_maps(
        self, labels: np.ndarray, extras: Extras
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
        """The tile without its one-voxel rim, and there: labels, the radial coordinate
        inside each nucleus, and each voxel's nucleus brightness (0 outside nuclei)."""
        inner = (slice(1, -1),) * self.ndim
        bright = np.concatenate([[0.0], self.objects.attrs["bright"]]).astype(np.float32)
        lab = labels[inner]
        return inner, lab, extras["rho"][inner], bright[lab]

    def _make_objects(self) -> Objects:
        self.region, self.threshold = self._region()
        cand = self._candidates()
        cand = cand[self.region.points(self._voxels(cand)) > self.threshold]
        n = len(cand)
        rmax = self.rng.uniform(*self.radius, n)
        extent = rmax * (1 + self.bumps)
        keep = random_sequential_adsorption(cand, extent, self.gap)
        centers, rmax, extent = cand[keep], rmax[keep], extent[keep]
        n = len(centers)
        axes = np.empty((n, self.ndim))
        axes[:, 0] = rmax
        for a in range(1, self.ndim):
            axes[:, a] = rmax / self.rng.uniform(*self.aspect, n)
        rot = random_rotations(self.rng, n, self.ndim)
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
        return Objects(centers, extent, attrs)

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _labels(self, origin: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, Extras]:
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
