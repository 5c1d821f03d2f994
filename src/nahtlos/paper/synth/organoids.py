"""The ``organoids`` dataset: FIB/SEM-like electron microscopy of organoid tissue.

Densely packed cells (nuclei, organelles) whose membranes form the boundary class,
beside large regions of textured extracellular matrix that are larger than a tile, so
tiles full of cells and tiles full of matrix have very different statistics. Cells are
the Voronoi cells of random seeds in a smoothly warped space, which bends the
membranes like real ones. Semantic classes: matrix, foreground (cell interior),
boundaries (membranes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from .generator import Extras, Generator
from .placement import Objects, random_sequential_adsorption

__all__ = ["Organoids"]


class Organoids(Generator):
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

    def _make_objects(self) -> Objects:
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
        keep = random_sequential_adsorption(cand, np.repeat(r, len(cand)), 0.0)
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
        keep2 = random_sequential_adsorption(
            grid, np.repeat(r, len(grid)), 0.0, seeds, np.repeat(r, len(seeds))
        )
        centers = np.concatenate([seeds, grid[keep2]])
        n = len(centers)
        attrs = {
            "nucleus": self.rng.uniform(0.27, 0.37, n) * self.cell,
            "cyto": 0.47 + self.rng.normal(0, 0.03, n) - 0.09 * (self.rng.random(n) < 0.12),
        }
        return Objects(centers, self._cell_extents(centers), attrs)

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
        return self.tissue.points(self._voxels(points)) > self.threshold

    def _labels(self, origin: Sequence[int], shape: Sequence[int]) -> tuple[np.ndarray, Extras]:
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
        self, origin: Sequence[int], shape: Sequence[int], labels: np.ndarray, extras: Extras
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
        curtain = self._texture(8, plane_o, plane_s, sig_c)
        sig = sig * (1 + 0.04 * np.expand_dims(curtain, self.ndim - 2))
        return np.asarray(sig, np.float32)
