"""The ``embryo`` dataset: confocal fluorescence of sparse, strongly varying nuclei.

Sparse nuclei of varying density with strong intensity heterogeneity: bright and dim
regions, an illumination gradient along X, depth attenuation, condensed bright mitotic
nuclei and large empty background: per-tile statistics vary most.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .generator import Extras
from .nuclei import Nuclei
from .placement import Objects

__all__ = ["Embryo"]


class Embryo(Nuclei):
    """Confocal nuclei of an embryo: sparse, strongly varying in brightness."""

    name = "embryo"
    psf, photons = (1.2, 3.0), 260.0
    # larger nuclei, kept further apart
    radius, aspect, gap = (7.0, 11.0), (1.0, 1.6), 5.0
    # the embryo covers 38% of the image; within it, candidates are thinned further
    region_spacing, region_fraction, region_share = 150.0, 0.62, 0.38
    crowding = 1.6

    def _candidates(self) -> np.ndarray:
        cand = super()._candidates()
        # varying density: thin candidates by a smooth field
        density = self._field(70.0)
        p = 1 / (1 + np.exp(-1.5 * density.points(self._voxels(cand))))
        return cand[self.rng.random(len(cand)) < p]

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        mitotic = self.rng.random(n) < 0.06
        bright = np.exp(self.rng.normal(0.0, 0.5, n)) * np.where(mitotic, 2.2, 1.0)
        return {"bright": bright, "mitotic": mitotic.astype(np.float64)}

    def _make_objects(self) -> Objects:
        objects = super()._make_objects()
        # mitotic nuclei are condensed: shrink them
        small = objects.attrs["mitotic"] > 0
        objects.attrs["axes"][small] *= 0.7
        self.light = self._field(100.0)
        return objects

    def _signal(
        self, origin: Sequence[int], shape: Sequence[int], labels: np.ndarray, extras: Extras
    ) -> np.ndarray:
        inner, lab, rho, bright = self._nucleus_maps(labels, extras)
        mitotic = np.concatenate([[0.0], self.objects.attrs["mitotic"]])[lab] > 0
        fine = self._tex(1, origin, shape, 0.9)
        chromo = self._tex(2, origin, shape, 1.1)
        nuc = bright * (0.85 + 0.1 * np.minimum(rho, 1) ** 2 + 0.1 * fine)
        nuc = np.where(mitotic, bright * np.where(chromo > 0.3, 1.0, 0.35), nuc)
        nuc = np.where(extras["nucleolus"][inner] & ~mitotic, 0.5 * nuc, nuc)
        embryo = self._region_weight(origin, shape, 0.25)
        sig = np.where(lab > 0, nuc, 0.06 * embryo)
        # bright and dim regions, an illumination gradient along X, depth attenuation
        sig = sig * np.exp(0.6 * self.light.grid(origin, shape))
        x = self._coords(origin, shape)[-1]
        width = self.shape[-1] * self.scale[-1]
        sig = sig * (1 - 0.7 * x / np.float32(width))
        if self.ndim == 3:
            z, depth = self._depth(origin, shape)
            sig = sig * np.exp(-1.2 * z / np.float32(depth))
        return np.asarray(sig + 0.004, np.float32)
