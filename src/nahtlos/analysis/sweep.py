"""The tile-size sweep: how the prediction changes with the inference tile size.

Like the paper's Fig. 6: cubic tile sizes, doubling up to the whole region within a
compute budget, each predicted block-wise and compared with the whole-image
prediction (and, with labels, scored against them). A seamless network gives the
same prediction at every size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..axes import round_up
from ..engine.geometry import BlockGrid
from ..errors import BlockShapeError
from .measure import Workbench, largest_difference
from .results import SweepPoint

__all__ = ["run_sweep", "sweep_sizes"]


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def sweep_sizes(
    spatial: tuple[int, ...],
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
    max_cost: float,
    max_total: float,
) -> list[int]:
    """Cubic tile sizes, doubling up to the whole image, within a compute budget.

    Costs are voxels predicted relative to the image's: a size is skipped when its
    windows cost more than ``max_cost`` times the image, and the smallest sizes are
    dropped until the sweep costs at most ``max_total`` times the image.
    """
    step = _lcm(alignment)
    largest = max(round_up(n, a) for n, a in zip(spatial, alignment, strict=True))
    size = round_up(max(max(halo), 2 * step, 8), step)
    sizes = []
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(round_up(largest, step))
    volume = math.prod(spatial)

    def cost(s: int) -> float:
        grid = BlockGrid(spatial, s, halo, alignment)
        return len(grid) * math.prod(grid.window_shape) / volume

    costs = {s: cost(s) for s in sizes}
    kept = [s for s in sizes if costs[s] <= max_cost] or [sizes[-1]]
    while len(kept) > 1 and sum(costs[s] for s in kept) > max_total:
        kept.pop(0)
    return kept


def _plans(sizes: Sequence[int], grid: BlockGrid) -> list[tuple[tuple[int, ...], int]]:
    """(block, size) per distinct block of ``sizes``, the diagnosed tile included, by size."""
    plans: dict[tuple[int, ...], int] = {}
    for s in sizes:
        if s < 1:
            raise BlockShapeError(f"tile size {s} of the sweep must be at least 1")
        g = BlockGrid(grid.shape, s, grid.halo, grid.alignment, auto=True)
        plans.setdefault(g.block, s)
    plans.setdefault(grid.block, max(grid.block))  # the diagnosed tile, already predicted
    return sorted(plans.items(), key=lambda kv: (kv[1], kv[0]))


def run_sweep(
    bench: Workbench,
    sizes: Sequence[int],
    grid: BlockGrid,
    tiled: np.ndarray,
    whole: np.ndarray,
    masks: np.ndarray | None,
    on_start: Callable[[int], Any] | None = None,
    on_point: Callable[[], Any] | None = None,
) -> list[SweepPoint]:
    """Predict the region at each tile size and compare with the whole-image prediction.

    ``tiled`` is the prediction at the diagnosed tile of ``grid``, reused. ``on_start``
    gets the number of points, ``on_point`` is called after each (a progress bar).
    """
    plans = _plans(sizes, grid)
    if on_start is not None:
        on_start(len(plans))
    points = []
    for block, size in plans:
        g = BlockGrid(grid.shape, block, grid.halo, grid.alignment)
        t0 = time.perf_counter()
        pred = tiled if block == grid.block else bench.tiled(g)
        points.append(
            SweepPoint(
                size=int(size),
                tile=g.block,
                window=g.window_shape,
                blocks=len(g),
                max_difference=largest_difference(pred, whole),
                agreement=bench.agreement(pred, whole),
                dice=None if masks is None else bench.dice(pred, masks),
                seconds=round(time.perf_counter() - t0, 3),
            )
        )
        if on_point is not None:
            on_point()
    return points
