"""Where objects go: the object record, random rotations and non-overlapping placement.

Objects are drawn once per image, in physical units (XY pixels), before any voxel is
generated; every block then renders the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Objects", "random_rotations", "random_sequential_adsorption"]


@dataclass
class Objects:
    """Objects of an image: physical centres, anchor voxels and per-object attributes."""

    centers: np.ndarray  # (n, ndim) physical units (XY pixels)
    extent: np.ndarray  # (n,) physical radius that bounds the object around its centre
    attrs: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.centers)


def random_rotations(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
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


def random_sequential_adsorption(
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
