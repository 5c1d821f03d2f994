"""Tile-wise normalization vs whole-image statistics, measured on the diagnosed region.

For a model with InstanceNorm/GroupNorm layers the diagnosis also predicts with those
layers frozen to the statistics of the whole region (:mod:`nahtlos.engine.global_stats`,
what ``nahtlos predict --norm-stats global`` does, no retraining needed) and reports
its tile mismatch, its difference from the whole-image prediction and, with labels,
its Dice: the measured case for the advice in the verdict.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..axes import round_up
from ..engine.geometry import BlockGrid
from ..engine.global_stats import compute_global_stats, freeze_norms, tile_norm_layers
from ..nets.receptive_field import ReceptiveField
from ..nets.state import measuring_mode
from .measure import Workbench, largest_difference

__all__ = ["compare_global_statistics"]


def _frozen_grid(grid: BlockGrid, rf: ReceptiveField | None) -> BlockGrid:
    """The diagnosed tile with the halo of the frozen network: its receptive field with
    statistics held constant (else the diagnosed halo)."""
    local = rf.local_trf_radius if rf is not None else None
    halo = (
        tuple(round_up(r, a) for r, a in zip(local, grid.alignment, strict=True))
        if local is not None
        else grid.halo
    )
    return BlockGrid(grid.shape, grid.block, halo, grid.alignment, auto=True)


def compare_global_statistics(
    bench: Workbench,
    grid: BlockGrid,
    rf: ReceptiveField | None,
    whole: np.ndarray,
    masks: np.ndarray | None,
) -> dict[str, Any] | None:
    """Tile-wise norms vs whole-image statistics on the diagnosed image.

    ``None`` when the model has no layer to freeze (or is TorchScript, whose layers
    cannot be measured one by one) or the input normalization is tile-wise. Else the
    report's ``global_statistics`` section without its tile-wise side (which the
    diagnosis measured already); ``dice`` is ``None`` without labels.
    """
    module = bench.module
    if isinstance(module, torch.jit.ScriptModule) or not tile_norm_layers(module):
        return None
    if getattr(bench.transform, "mode", None) == "tilewise":
        return None
    t0 = time.perf_counter()
    g_grid = _frozen_grid(grid, rf)
    with measuring_mode(module, train=False):
        stats = compute_global_stats(
            module,
            bench.arr,
            block=g_grid.block,
            halo=g_grid.halo,
            alignment=g_grid.alignment,
            ndim=bench.ndim,
            batch_size=bench.batch_size,
            input_transform=bench.transform,
            progress=False,
        )
        frozen = freeze_norms(module, stats).eval()
    g_tiled = bench.tiled(g_grid, module=frozen)
    reference = whole if g_grid.halo == grid.halo else bench.whole(g_grid.halo, g_grid.alignment)
    mismatch = bench.mismatch(g_grid, module=frozen)
    return {
        "layers": len(stats.layers),
        "halo": list(g_grid.halo),
        "tile_mismatch": mismatch.to_dict(),
        "max_difference_to_whole": largest_difference(g_tiled, reference),
        "agreement_with_whole": bench.agreement(g_tiled, reference),
        "seconds": round(time.perf_counter() - t0, 3),
        "dice": None if masks is None else bench.dice(g_tiled, masks),
    }
