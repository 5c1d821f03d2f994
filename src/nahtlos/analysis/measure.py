"""The measurements of a diagnosis, each predicted the same way.

A :class:`Workbench` holds the diagnosed region and the model with everything that
decides a prediction (input normalization, activation, batch size, eval mode, mask
threshold), so that the whole-image reference, the tiled predictions, the tile
mismatch, the sweep and the global-statistics comparison are comparable by
construction. The step functions below turn its predictions into the report's
numbers: the seam map, the train/eval disparity with its worst tile, and Dice
against the labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.geometry import Block, BlockGrid
from ..engine.predict import predict_grid, predict_whole
from ..errors import NahtlosError, NahtlosWarning
from ..nets.receptive_field import ReceptiveField
from ..nets.receptive_field import receptive_field as measure_receptive_field
from ..nets.state import activation_function, measuring_mode
from .metrics import (
    TileMismatch,
    TrainEvalDisparity,
    binarize,
    dice_per_channel,
    mask_agreement,
    tile_mismatch,
    train_eval_disparity,
)
from .plan import mismatch_geometry

__all__ = [
    "DisparityResult",
    "Workbench",
    "label_dice",
    "largest_difference",
    "measure_disparity",
    "probe_receptive_field",
    "seam_map",
]


@dataclass
class Workbench:
    """The diagnosed region, the model, and how every prediction of it is made.

    Attributes
    ----------
    module
        The model (left as it was by every method).
    arr
        The region, ``(C, *shape)`` float32 before input normalization.
    ndim, activation, transform, batch_size
        Spatial dimensions, the output activation's name, the input normalization
        and the windows per forward pass.
    threshold, tolerance, max_windows
        Mask threshold, the largest difference still called "no", and the most
        tile-mismatch windows.
    """

    module: torch.nn.Module
    arr: np.ndarray
    ndim: int
    activation: str
    transform: Callable[[np.ndarray], np.ndarray] | None
    batch_size: int
    threshold: float
    tolerance: float
    max_windows: int
    act: Callable[[torch.Tensor], torch.Tensor] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.act = activation_function(self.activation)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the region."""
        return tuple(int(s) for s in self.arr.shape[1:])

    def whole(
        self,
        halo: tuple[int, ...],
        alignment: tuple[int, ...],
        module: torch.nn.Module | None = None,
    ) -> np.ndarray:
        """Probabilities of the zero-padded region in one pass, in eval mode."""
        model = self.module if module is None else module
        with measuring_mode(model, train=False):
            return predict_whole(
                model,
                self.arr,
                halo,
                alignment,
                ndim=self.ndim,
                input_transform=self.transform,
                output_transform=self.act,
            )

    def tiled(self, grid: BlockGrid, module: torch.nn.Module | None = None) -> np.ndarray:
        """Probabilities predicted block by block on ``grid`` and stitched, in eval mode."""
        model = self.module if module is None else module
        with measuring_mode(model, train=False):
            return np.asarray(
                predict_grid(
                    model,
                    self.arr,
                    grid,
                    batch_size=self.batch_size,
                    input_transform=self.transform,
                    output_transform=self.act,
                    progress=False,
                )
            )

    def mismatch(
        self,
        grid: BlockGrid,
        window: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        module: torch.nn.Module | None = None,
    ) -> TileMismatch:
        """Tile mismatch with the halo and alignment of ``grid`` (windows: see
        :func:`~nahtlos.analysis.plan.mismatch_geometry`)."""
        win, step, split = mismatch_geometry(grid, window, stride)
        return tile_mismatch(
            self.module if module is None else module,
            self.arr,
            window=win,
            halo=grid.halo,
            alignment=grid.alignment,
            stride=step,
            split_axis=split,
            ndim=self.ndim,
            activation=self.activation,
            threshold=self.threshold,
            tolerance=self.tolerance,
            input_transform=self.transform,
            max_windows=self.max_windows,
        )

    def agreement(self, prediction: np.ndarray, reference: np.ndarray) -> list[float]:
        """Per channel, the Dice of the two predictions' masks."""
        return mask_agreement(prediction, reference, self.threshold)

    def dice(self, prediction: np.ndarray, masks: np.ndarray) -> list[float | None]:
        """Per channel, the Dice of the prediction's masks against the labels (``None``
        where the labels are empty)."""
        return dice_per_channel(binarize(prediction, self.threshold), masks, skip_empty_target=True)


def largest_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a − b|``, computed in float64."""
    return float(np.abs(a.astype(np.float64) - b).max())


def probe_receptive_field(
    module: torch.nn.Module, ndim: int, in_channels: int, device: torch.device
) -> ReceptiveField | None:
    """The receptive field (:mod:`nahtlos.nets.receptive_field`), or ``None`` if it cannot be probed."""
    try:
        return measure_receptive_field(module, ndim, in_channels, device=device)
    except NahtlosError as exc:
        # the rest of the diagnosis stands without it when the halo is known otherwise
        warnings.warn(
            f"the receptive field could not be measured ({exc}); the report leaves it out",
            NahtlosWarning,
            stacklevel=3,
        )
        return None


def seam_map(
    bench: Workbench, tiled: np.ndarray, whole: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """``|tiled − whole|`` per channel, and the report's ``seam`` section."""
    seam = np.abs(tiled.astype(np.float64) - whole).astype(np.float32)
    per_channel_max = [float(seam[c].max()) for c in range(seam.shape[0])]
    info = {
        "max_difference": max(per_channel_max),
        "per_channel_max": per_channel_max,
        "agreement": bench.agreement(tiled, whole),
        "seamless": max(per_channel_max) <= bench.tolerance,
    }
    return seam, info


@dataclass
class DisparityResult:
    """The train/eval disparity on the diagnosed tiles.

    ``train`` (the train-mode prediction), ``worst_block`` and ``worst`` (the tile
    whose modes differ most, as in the report) are ``None`` when the disparity is not
    measurable.
    """

    disparity: TrainEvalDisparity
    train: np.ndarray | None = None
    worst_block: Block | None = None
    worst: dict[str, Any] | None = None


def measure_disparity(
    bench: Workbench, grid: BlockGrid, tiled: np.ndarray, frozen: bool
) -> DisparityResult:
    """Train/eval disparity on the tiles of ``grid`` (``tiled``: their eval-mode prediction).

    A model whose normalization ignores train/eval mode (``frozen``, see
    :func:`~nahtlos.analysis.layers.mode_frozen`) has no disparity to measure.
    """
    if frozen:
        return DisparityResult(TrainEvalDisparity(per_channel=None))
    disparity = train_eval_disparity(
        bench.module,
        bench.arr,
        block=grid.block,
        halo=grid.halo,
        alignment=grid.alignment,
        ndim=bench.ndim,
        batch_size=bench.batch_size,
        activation=bench.activation,
        threshold=bench.threshold,
        input_transform=bench.transform,
        keep_predictions=True,
        eval_prediction=tiled,
    )
    train = disparity.train_prediction
    assert train is not None
    disparity.train_prediction = disparity.eval_prediction = None  # keep reports small
    block, worst = _worst_tile(grid, train, tiled, bench.threshold)
    return DisparityResult(disparity, train, block, worst)


def _worst_tile(
    grid: BlockGrid, train: np.ndarray, evaluated: np.ndarray, threshold: float
) -> tuple[Block | None, dict[str, Any]]:
    """The tile whose train- and eval-mode masks differ most (ties: largest difference)."""
    best: tuple[float, float] = (-1.0, -1.0)
    chosen: Block | None = None
    info: dict[str, Any] = {}
    for blk in grid:
        k = (slice(None), *blk.inner)
        a, b = train[k], evaluated[k]
        losses = [1.0 - d for d in mask_agreement(a, b, threshold)]
        diff = largest_difference(a, b)
        score = (float(np.mean(losses)), diff)
        if score > best:
            best, chosen = score, blk
            info = {
                "index": list(blk.index),
                "start": list(blk.start),
                "stop": list(blk.stop),
                "per_channel": losses,
                "max_difference": diff,
            }
    return chosen, info


def label_dice(
    bench: Workbench,
    masks: np.ndarray | None,
    whole: np.ndarray,
    tiled: np.ndarray,
    train: np.ndarray | None,
) -> dict[str, list[float | None]] | None:
    """Dice against the labels of the tiled (eval and train mode) and whole predictions.

    ``None`` without labels; ``train`` is ``None`` on every channel when there is no
    train-mode prediction (a model whose normalization ignores train/eval mode).
    """
    if masks is None:
        return None
    return {
        "eval": bench.dice(tiled, masks),
        "train": [None] * len(masks) if train is None else bench.dice(train, masks),
        "whole": bench.dice(whole, masks),
    }
