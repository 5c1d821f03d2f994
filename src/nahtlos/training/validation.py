"""Validation during training: block-wise Dice per class in eval and train mode.

The validation region is predicted block-wise
(:func:`~nahtlos.engine.predict.predict_blockwise`), every batch of windows in eval mode
and then in train mode on the very same windows; Dice per class in both modes and their
train/eval disparity are counted on the fly, without storing the predictions. The model
is left exactly as it was found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..engine.predict import predict_blockwise
from ..nets.state import activation_function, measuring_mode, preserved_state
from .data import Volume, semantic_target

__all__ = ["validate"]


class _BothModes(torch.nn.Module):
    """Eval-mode and train-mode prediction of the same windows, channels concatenated."""

    def __init__(self, model: torch.nn.Module, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each mode starts from the model as it was: train-mode running-statistics
        # updates (BatchNorm, BatchRenorm) are undone after every batch of windows.
        with measuring_mode(self.model, train=False):
            y_eval = self.activation(self.model(x))
        with measuring_mode(self.model, train=True):
            y_train = self.activation(self.model(x))
        return torch.cat([y_eval, y_train], dim=1)


class _DiceCounts:
    """An output "array" for predict_blockwise that counts overlaps instead of storing.

    Each written block holds ``2C`` channels (eval, then train probabilities); the
    matching label region is converted to one-hot and the intersections and sums of
    the binarized (> 0.5) predictions are accumulated per channel.
    """

    def __init__(self, volume: Volume, channels: int, target: Callable[..., np.ndarray]) -> None:
        self.volume = volume
        self.channels = channels
        self.target = target
        self.shape = (2 * channels, *volume.region_shape)
        self.lock = threading.Lock()
        zeros = lambda: np.zeros(channels, np.int64)  # noqa: E731
        self.gt, self.ev, self.tr = zeros(), zeros(), zeros()
        self.ev_gt, self.tr_gt, self.ev_tr = zeros(), zeros(), zeros()

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        spatial = key[1:]
        region = tuple(
            slice(r.start + k.start, r.start + k.stop)
            for r, k in zip(self.volume.region, spatial, strict=True)
        )
        gt = self.target(self.volume, region).astype(bool)
        ev = value[: self.channels] > 0.5
        tr = value[self.channels :] > 0.5
        axes = tuple(range(1, gt.ndim))
        sums = [a.sum(axis=axes) for a in (gt, ev, tr, ev & gt, tr & gt, ev & tr)]
        with self.lock:
            for acc, s in zip(
                (self.gt, self.ev, self.tr, self.ev_gt, self.tr_gt, self.ev_tr), sums, strict=True
            ):
                acc += s


def _dice(inter: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = (a + b).astype(np.float64)
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def validate(
    model: torch.nn.Module,
    volumes: Sequence[Volume],
    *,
    block: Sequence[int],
    halo: Sequence[int],
    alignment: Sequence[int],
    activation: str = "sigmoid",
    labels: str = "instances",
    num_classes: int | None = None,
    boundary_mode: str = "thick",
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Block-wise Dice per class in eval and train mode, and their disparity.

    Each volume's region is predicted block-wise once, every batch of windows in
    eval mode and then in train mode (dropout off). Dice per class is computed over
    the whole region from the binarized (> 0.5) probabilities; a class absent from a
    volume's labels gives NaN there. Over several volumes the median is reported (as
    in the paper). The disparity is ``1 - Dice(train, eval)`` per class. The model's
    buffers and modes are restored afterwards.

    Returns
    -------
    dict
        ``dice_eval``, ``dice_train``, ``disparity``: arrays of one value per class.
    """
    act = activation_function(activation)
    assert act is not None

    def target(vol: Volume, region: tuple[slice, ...]) -> np.ndarray:
        return semantic_target(vol, region, labels, num_classes, boundary_mode)  # type: ignore[arg-type]

    results: dict[str, list[np.ndarray]] = {"dice_eval": [], "dice_train": [], "disparity": []}
    with preserved_state(model):  # restores the train/eval flags, too
        both = _BothModes(model, act)
        for vol in volumes:
            probe = target(vol, tuple(slice(r.start, r.start + 1) for r in vol.region))
            counts = _DiceCounts(vol, probe.shape[0], target)
            predict_blockwise(
                both,
                vol.image_region(),
                block,
                halo,
                alignment,
                ndim=vol.ndim,
                batch_size=batch_size,
                out=counts,
                input_transform=vol.normalization,
                progress=progress,
            )
            present = counts.gt > 0
            results["dice_eval"].append(
                np.where(present, _dice(counts.ev_gt, counts.ev, counts.gt), np.nan)
            )
            results["dice_train"].append(
                np.where(present, _dice(counts.tr_gt, counts.tr, counts.gt), np.nan)
            )
            results["disparity"].append(1.0 - _dice(counts.ev_tr, counts.ev, counts.tr))
    out = {}
    for key, values in results.items():
        stack = np.stack(values)  # (volumes, classes)
        out[key] = np.array(
            [
                np.median(col[~np.isnan(col)]) if (~np.isnan(col)).any() else np.nan
                for col in stack.T
            ]
        )
    return out
