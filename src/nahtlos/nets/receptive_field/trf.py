"""The theoretical receptive field (TRF) per axis, on thin probes, checked by a full probe.

The TRF of a down-sampling network depends on the output position modulo the
alignment; the reported extent is the maximum over one alignment cell. Each axis is
measured on a *thin* probe, long along that axis and a few alignment cells wide along
the others, which is exact for networks whose layers depend on boxes of voxels
(convolutions of any dilation, pooling, up-sampling, strided layers) and costs a tiny
fraction of a full 3D probe; where a full probe is affordable it checks the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ...axes import axis_names, round_up
from .culprits import CulpritFinder
from .prober import Prober
from .result import ReceptiveFieldError

__all__ = ["axis_trf", "check_full", "extent"]


def extent(support: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last index along ``axis`` where ``support`` holds anywhere.

    Raises
    ------
    ReceptiveFieldError
        If the support is empty: the output does not depend on the input.
    """
    others = tuple(a for a in range(support.ndim) if a != axis)
    along = support.any(axis=others) if others else support
    idx = np.nonzero(along)[0]
    if idx.size == 0:
        raise ReceptiveFieldError(
            "the probe's output does not depend on its input at all (is the model constant?)"
        )
    return int(idx[0]), int(idx[-1])


def axis_trf(
    prober: Prober, finder: CulpritFinder, axis: int, known_global: bool = False
) -> tuple[int, int] | None:
    """(before, after) along ``axis``, max over the alignment cell; ``None`` if global.

    The probe grows until the extent is the same at two sizes without touching
    the border. It is global when it covers the whole probe at two sizes and some
    layer mixes its whole input (or ``known_global``: the model was already found
    tile-dependent and this is the statistics-frozen pass).
    """
    name = axis_names(prober.ndim)[axis]
    what = "local TRF" if known_global else "TRF"
    prober.bar.set_description(f"receptive field: {what} along {name}")
    shape = _settled_shape(prober, finder, axis, known_global)
    return None if shape is None else _cell_extent(prober, shape, axis)


def _settled_shape(
    prober: Prober, finder: CulpritFinder, axis: int, known_global: bool
) -> tuple[int, ...] | None:
    """The thin probe on which the TRF of the central cell stopped growing; ``None`` if global."""
    name = axis_names(prober.ndim)[axis]
    p = prober.downsampling[axis]
    length = prober.base[axis] if prober.fixed else prober.start_length(axis)
    previous: tuple[int, int] | None = None
    previous_whole = False
    while True:
        shape = prober.thin_shape(axis, length)
        error = prober.accepts(shape)
        if error is not None:
            if previous is None and not prober.fixed:
                # The model only takes its base shape (e.g. a position embedding).
                prober.fixed = True
                length = prober.base[axis]
                continue
            raise ReceptiveFieldError(
                f"the model rejects the probe shape {shape} needed along axis {name}: {error}"
            )
        cell, union = prober.central_cell(shape)
        (sup,) = prober.supports(shape, [union])
        lo, hi = extent(sup, axis)
        whole = bool(sup.all())
        ext = (cell[axis] - lo, hi - (cell[axis] + p - 1))
        touching = lo == 0 or hi == shape[axis] - 1
        if not touching and (ext == previous or prober.fixed):
            return shape
        if prober.fixed:
            # One size only: the whole tile is global only if some layer makes it so.
            if known_global or finder.culprits():
                return None
            raise ReceptiveFieldError(
                f"the TRF along axis {name} reaches the border of the probe shape "
                f"{shape}; give a larger shape"
            )
        # Whole at two sizes: the TRF grows with the tile.
        # (The statistics-frozen pass has no such shortcut: it may be local but large.)
        if whole and previous_whole and not known_global and finder.any_leaf():
            return None
        if math.prod(prober.thin_shape(axis, 2 * length)) > prober.max_voxels:
            if whole or known_global or finder.any_leaf():
                return None
            raise ReceptiveFieldError(
                f"the TRF along axis {name} reaches beyond the largest probe "
                f"({shape[axis]} voxels, shape {shape}); raise max_voxels"
            )
        previous, previous_whole = ext, whole
        length *= 2


def _cell_extent(prober: Prober, shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """Exact extents per output offset inside the central cell (one backward pass each)."""
    p = prober.downsampling[axis]
    cell, union = prober.central_cell(shape)
    selections = []
    for t in range(p):
        sel = list(union)
        sel[axis] = slice(cell[axis] + t, cell[axis] + t + 1)
        selections.append(tuple(sel))
    before = after = 0
    for t, sup in enumerate(prober.supports(shape, selections)):
        lo, hi = extent(sup, axis)
        before = max(before, cell[axis] + t - lo)
        after = max(after, hi - (cell[axis] + t))
    return before, after


def check_full(prober: Prober, before: tuple[int, ...], after: tuple[int, ...]) -> bool | None:
    """Compare the thin-probe TRF with a full probe: True, False, or None if too large."""
    shape = _full_shape(prober, before, after)
    if math.prod(shape) > prober.max_voxels or prober.accepts(shape) is not None:
        return None
    prober.bar.set_description("receptive field: full check")
    cell, union = prober.central_cell(shape)
    (sup,) = prober.supports(shape, [union])
    for d in range(prober.ndim):
        lo, hi = extent(sup, d)
        p = prober.downsampling[d]
        # The union over the cell reaches exactly as far as the farthest slab does.
        if cell[d] - lo > before[d] or hi - (cell[d] + p - 1) > after[d]:
            return False
    return True


def _full_shape(prober: Prober, before: Sequence[int], after: Sequence[int]) -> tuple[int, ...]:
    if prober.fixed:
        return prober.base
    # The cell at the centre with its TRF inside and a margin of one cell.
    return tuple(
        round_up(max(2 * max(b, a) + 3 * p + 2, 4 * p), p)
        for b, a, p in zip(before, after, prober.downsampling, strict=True)
    )
