"""The ``plants`` dataset: confocal fluorescence of dense, homogeneous plant nuclei.

Nuclei of similar size and brightness (bright chromocenters, dark nucleoli) fill the
tissue, with a little background at its edge: per-tile statistics vary little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .generator import Extras
from .nuclei import Nuclei

__all__ = ["Plants"]


class Plants(Nuclei):
    """Confocal nuclei of plant tissue: dense, similar in size and brightness."""

    name = "plants"
    psf, photons = (1.0, 2.5), 220.0
    radius, aspect, gap = (6.5, 9.5), (1.0, 1.35), 2.0
    # the tissue fills nearly everything: a little background at its edge
    region_spacing, region_fraction = 160.0, 0.04
    crowding = 6.0  # dense: many candidates per site

    def _attributes(self, n: int, centers: np.ndarray) -> dict[str, np.ndarray]:
        return {"bright": np.clip(self.rng.normal(1.0, 0.1, n), 0.7, 1.3)}

    def _signal(
        self, origin: Sequence[int], shape: Sequence[int], labels: np.ndarray, extras: Extras
    ) -> np.ndarray:
        inner, lab, rho, bright = self._nucleus_maps(labels, extras)
        fine = self._tex(1, origin, shape, 0.8)
        chromo = self._tex(2, origin, shape, 0.9)
        auto = self._tex(3, origin, shape, 3.0)
        tissue = self._region_weight(origin, shape, 0.2)
        nuc = bright * (0.72 + 0.2 * np.minimum(rho, 1) ** 2 + 0.08 * fine)
        nuc = np.where(chromo > 1.7, nuc + 0.8 * bright, nuc)
        nuc = np.where(extras["nucleolus"][inner], 0.3 * nuc, nuc)
        back = 0.012 + 0.05 * tissue * np.clip(1 + 0.4 * auto, 0, None)
        sig = np.where(lab > 0, nuc, back)
        if self.ndim == 3:
            z, depth = self._depth(origin, shape)
            sig = sig * np.exp(-z / np.float32(4 * depth))
        return np.asarray(sig, np.float32)
