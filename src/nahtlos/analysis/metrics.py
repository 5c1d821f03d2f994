"""The paper's indicators: Dice, tile mismatch and train/eval disparity.

Definitions (DESIGN.md §2):

- **Dice** of binary masks: ``2|A∩B| / (|A|+|B|)``, 1 when both are empty. Predictions
  are probabilities (sigmoid per channel unless the model says otherwise) binarized at
  0.5; Dice against ground truth skips channels that are empty in the ground truth.
- **tile mismatch**: windows on a grid over the image; each window is split into two
  overlapping sub-tiles predicted independently and compared on the *valid* overlap
  (the overlap minus one halo from every sub-tile border). The *indicator* is the
  largest absolute difference over all channels and windows ("no" below a tolerance);
  the *magnitude* per channel is the mean over windows of 1 − Dice.
- **train/eval disparity**: per channel 1 − Dice between the binarized train-mode and
  eval-mode predictions of the same tiles.

Measuring never changes the model: parameters, buffers (running statistics, step
counters) and every module's train/eval flag are restored, and dropout is off while
measuring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..axes import as_per_axis, axis_names, round_up
from ..engine.predict import (
    ArrayLike,
    image_layout,
    place_model,
    predict_blockwise,
    read_region,
)
from ..errors import BlockShapeError, ShapeMismatchError
from ..nets.state import Activation, activation_function, measuring_mode

__all__ = [
    "TileMismatch",
    "TrainEvalDisparity",
    "binarize",
    "can_split",
    "dice",
    "dice_per_channel",
    "mask_agreement",
    "mean_of",
    "tile_mismatch",
    "train_eval_disparity",
]


def binarize(prediction: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Masks of the voxels whose probability exceeds ``threshold``."""
    return np.asarray(prediction) > threshold


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1 when both are empty.

    Raises
    ------
    ShapeMismatchError
        If the masks differ in shape.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ShapeMismatchError(f"Dice of masks with different shapes {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_per_channel(
    prediction: np.ndarray, target: np.ndarray, *, skip_empty_target: bool = False
) -> list[float | None]:
    """Dice per channel of ``(C, ...)`` masks.

    With ``skip_empty_target`` (Dice against ground truth) a channel that is empty in
    ``target`` gives ``None`` instead of a score.
    """
    if prediction.shape != target.shape:
        raise ShapeMismatchError(
            f"prediction masks {prediction.shape} and target masks {target.shape} differ in shape"
        )
    scores: list[float | None] = []
    for p, t in zip(prediction, target, strict=True):
        if skip_empty_target and not np.any(t):
            scores.append(None)
        else:
            scores.append(dice(p, t))
    return scores


def mean_of(values: Sequence[float | None] | None) -> float | None:
    """Mean of the scores that are not ``None`` (Dice of empty label channels); ``None``
    if there are none."""
    vals = [v for v in values or [] if v is not None]
    return float(np.mean(vals)) if vals else None


def mask_agreement(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> list[float]:
    """Dice per channel between the masks of two predictions (1 where both are empty).

    ``1 - mask_agreement`` is the paper's per-channel tile mismatch and train/eval
    disparity.
    """
    scores = dice_per_channel(binarize(a, threshold), binarize(b, threshold))
    return [float(s) for s in scores if s is not None]  # never None: no empty-target skip


@dataclass
class TileMismatch:
    """Result of :func:`tile_mismatch`.

    Attributes
    ----------
    indicator
        Largest absolute difference of the two sub-tiles' predictions over all channels,
        windows and valid-overlap voxels.
    per_channel
        Mean over windows of 1 − Dice of the binarized predictions, per channel.
    tolerance
        Below it the indicator reads "no" (seamless).
    windows
        Per window: its origin, the largest difference and 1 − Dice per channel.
    """

    indicator: float
    per_channel: list[float]
    tolerance: float
    windows: list[dict[str, Any]] = field(default_factory=list)
    window_shape: tuple[int, ...] = ()
    subtile_length: int = 0
    split_axis: int = -1

    @property
    def seamless(self) -> bool:
        """Whether the indicator is below the tolerance."""
        return self.indicator <= self.tolerance

    def label(self, digits: int = 2) -> str:
        """``"no"`` when seamless, else the indicator, as in the paper's tables."""
        return "no" if self.seamless else f"{self.indicator:.{digits}g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "indicator": self.indicator,
            "seamless": self.seamless,
            "label": self.label(),
            "tolerance": self.tolerance,
            "per_channel": self.per_channel,
            "window_shape": list(self.window_shape),
            "subtile_length": self.subtile_length,
            "split_axis": self.split_axis,
            "n_windows": len(self.windows),
        }


def _window_origins(
    shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]
) -> list[tuple[int, ...]]:
    axes = []
    for n, w, s in zip(shape, window, stride, strict=True):
        last = n - w
        starts = list(range(0, last + 1, s))
        if starts[-1] != last:
            starts.append(last)  # cover the far border too
        axes.append(starts)
    grids = np.meshgrid(*axes, indexing="ij")
    return [tuple(int(g.flat[i]) for g in grids) for i in range(grids[0].size)]


def _default_overlap(w: int, a: int) -> int:
    return max(a, w // 4)


def _split_geometry(w: int, h: int, a: int, overlap: int | None = None) -> tuple[int, int, int]:
    """How :func:`tile_mismatch` splits a window of length ``w`` (halo ``h``, alignment
    ``a``) into two overlapping sub-tiles: their length, and the start and stop, in the
    window, of the overlap where both sub-tiles' predictions are valid (empty when
    ``stop <= start``)."""
    v = overlap if overlap is not None else _default_overlap(w, a)
    length = round_up((w + v + 1) // 2 + h, a)
    return length, w - length + h, length - h


def can_split(w: int, h: int, a: int, overlap: int | None = None) -> bool:
    """Whether :func:`tile_mismatch` can split a window of length ``w`` along its split
    axis (halo ``h``, alignment ``a``): ``w`` is a multiple of ``a`` and the two
    sub-tiles keep a valid overlap once a halo is cut from their borders."""
    length, valid_lo, valid_hi = _split_geometry(w, h, a, overlap)
    return w % a == 0 and length < w and valid_hi > valid_lo


def _check_window(
    win: tuple[int, ...],
    halo: tuple[int, ...],
    align: tuple[int, ...],
    spatial: tuple[int, ...],
    axis: int,
    overlap: int | None,
) -> None:
    """Raise :class:`BlockShapeError` unless ``win`` fits the image and can be split."""
    names = axis_names(len(spatial))
    for name, w, n in zip(names, win, spatial, strict=True):
        if w > n:
            raise BlockShapeError(
                f"tile-mismatch window {win} does not fit in the image of shape {spatial} "
                f"along axis {name} ({w} > {n}); use a smaller window"
            )
    w_ax, h_ax, a_ax = win[axis], halo[axis], align[axis]
    if w_ax % a_ax:
        raise BlockShapeError(
            f"tile-mismatch window {w_ax} along axis {names[axis]} is not a multiple of the alignment {a_ax}"
        )
    others_ok = all(w > 2 * h for i, (w, h) in enumerate(zip(win, halo, strict=True)) if i != axis)
    if not can_split(w_ax, h_ax, a_ax, overlap) or not others_ok:
        v = overlap if overlap is not None else _default_overlap(w_ax, a_ax)
        length = _split_geometry(w_ax, h_ax, a_ax, v)[0]
        raise BlockShapeError(
            f"tile-mismatch window {win} is too small for halo {halo}: the two sub-tiles of "
            f"length {length} along axis {names[axis]} leave no valid overlap; use a window of at "
            f"least {round_up(4 * h_ax + 2 * a_ax + v, a_ax)} along {names[axis]}"
        )


def tile_mismatch(
    model: torch.nn.Module,
    image: ArrayLike,
    *,
    window: int | Sequence[int],
    halo: int | Sequence[int],
    alignment: int | Sequence[int] = 1,
    stride: int | Sequence[int] | None = None,
    overlap: int | None = None,
    split_axis: int = -1,
    ndim: int | None = None,
    activation: Activation | str = "sigmoid",
    threshold: float = 0.5,
    tolerance: float = 1e-5,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = False,
) -> TileMismatch:
    """Tile mismatch of a model on an image (eval mode).

    Windows of shape ``window`` are placed on a grid with ``stride`` over the image.
    Each is split along ``split_axis`` into sub-tiles A = ``[0, a)`` and
    B = ``[W − a, W)``, predicted independently (each tile normalized by
    ``input_transform`` on its own, so tile-wise input normalization counts), and
    compared on the valid overlap ``[W − a + h, a − h)`` (and one halo in from the
    sub-tiles' other borders).

    Parameters
    ----------
    window
        Window shape; it must fit in the image.
    halo, alignment
        Halo excluded at sub-tile borders; the sub-tile length ``a`` is a multiple of
        the alignment so that both sub-tiles sit on the network's down-sampling grid.
    stride
        Grid stride of the windows (default: the window, i.e. no overlap).
    overlap
        Length of the valid overlap along the split axis (default about a quarter
        of the window).
    activation, threshold
        How raw outputs become probabilities and masks.
    tolerance
        Largest difference still reported as "no" mismatch.
    max_windows
        Use at most this many windows, evenly spread.

    Raises
    ------
    BlockShapeError
        If the window does not fit in the image or is too small for the halo.
    """
    nd, channels, spatial = image_layout(image, ndim, window)
    win = as_per_axis(window, nd, "window")
    halo_t = as_per_axis(halo, nd, "halo")
    align = as_per_axis(alignment, nd, "alignment")
    stride_t = as_per_axis(stride if stride is not None else win, nd, "stride")
    axis = split_axis % nd
    _check_window(win, halo_t, align, spatial, axis, overlap)
    w_ax = win[axis]
    length, valid_lo, valid_hi = _split_geometry(w_ax, halo_t[axis], align[axis], overlap)
    act = activation_function(activation)
    origins = _window_origins(spatial, win, stride_t)
    if max_windows is not None and len(origins) > max_windows:
        pick = np.linspace(0, len(origins) - 1, max_windows).round().astype(int)
        origins = [origins[i] for i in pick]

    def read(origin: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
        sl = [slice(o, o + w) for o, w in zip(origin, win, strict=True)]
        sl[axis] = slice(origin[axis] + lo, origin[axis] + hi)
        return read_region(image, tuple(sl), channels, input_transform)

    compare = [slice(h, w - h) for w, h in zip(win, halo_t, strict=True)]
    compare[axis] = slice(valid_lo, valid_hi)
    results: list[dict[str, Any]] = []
    dev, dtype = place_model(model, device)
    with measuring_mode(model, train=False), torch.inference_mode():
        for origin in tqdm(
            origins, desc="tile mismatch", unit="window", disable=not progress, leave=False
        ):
            a = read(origin, 0, length)
            b = read(origin, w_ax - length, w_ax)
            x = torch.from_numpy(np.stack([a, b])).to(dev, dtype=dtype)
            y = model(x)
            if act is not None:
                y = act(y)
            y = y.float().cpu().numpy()
            if tuple(y.shape[2:]) != tuple(x.shape[2:]):
                raise ShapeMismatchError(
                    f"the model returned shape {tuple(y.shape)} for sub-tiles of shape {tuple(x.shape)}"
                )
            ka = [slice(None), *compare]
            kb = [slice(None), *compare]
            kb[1 + axis] = slice(valid_lo - (w_ax - length), valid_hi - (w_ax - length))
            pa, pb = y[0][tuple(ka)], y[1][tuple(kb)]
            diff = float(np.abs(pa.astype(np.float64) - pb).max()) if pa.size else 0.0
            loss = [1.0 - d for d in mask_agreement(pa, pb, threshold)]
            results.append({"origin": list(origin), "max_difference": diff, "one_minus_dice": loss})
    indicator = max((r["max_difference"] for r in results), default=0.0)
    n_ch = len(results[0]["one_minus_dice"]) if results else 0
    per_channel = [float(np.mean([r["one_minus_dice"][c] for r in results])) for c in range(n_ch)]
    return TileMismatch(
        indicator=indicator,
        per_channel=per_channel,
        tolerance=tolerance,
        windows=results,
        window_shape=win,
        subtile_length=length,
        split_axis=axis,
    )


@dataclass
class TrainEvalDisparity:
    """Result of :func:`train_eval_disparity`: 1 − Dice(train, eval) per channel.

    ``per_channel`` is ``None`` when the disparity cannot be measured (a model traced
    with ``torch.jit.trace``, whose normalization ignores train/eval mode); ``mean``
    is then ``None`` too.
    """

    per_channel: list[float] | None
    train_prediction: np.ndarray | None = None
    eval_prediction: np.ndarray | None = None

    @property
    def measurable(self) -> bool:
        """Whether the disparity was measured."""
        return self.per_channel is not None

    @property
    def mean(self) -> float | None:
        """Mean over channels (``None`` when not measurable)."""
        if self.per_channel is None:
            return None
        return float(np.mean(self.per_channel)) if self.per_channel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``None`` where not measurable)."""
        return {"per_channel": self.per_channel, "mean": self.mean}


def train_eval_disparity(
    model: torch.nn.Module,
    image: ArrayLike,
    *,
    block: int | Sequence[int],
    halo: int | Sequence[int],
    alignment: int | Sequence[int] = 1,
    ndim: int | None = None,
    batch_size: int = 1,
    activation: Activation | str = "sigmoid",
    threshold: float = 0.5,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    device: str | torch.device | None = None,
    keep_predictions: bool = False,
    eval_prediction: np.ndarray | None = None,
    progress: bool = False,
) -> TrainEvalDisparity:
    """Train/eval disparity: predict the same tiles in train and in eval mode.

    In train mode, normalization layers such as BatchNorm use the statistics of the
    current batch (``batch_size`` windows), as during training; in eval mode their
    running statistics. Dropout is off in both. The model is left exactly as it was.

    ``eval_prediction``, the eval-mode block-wise prediction (with dropout off, the
    same blocks and activation) when the caller already has it, saves one pass.
    """
    act = activation_function(activation)
    preds: list[np.ndarray] = []
    for train in (True, False):
        if not train and eval_prediction is not None:
            if tuple(eval_prediction.shape) != tuple(preds[0].shape):
                raise ShapeMismatchError(
                    f"eval_prediction has shape {tuple(eval_prediction.shape)} but the "
                    f"train-mode prediction has shape {tuple(preds[0].shape)}"
                )
            preds.append(np.asarray(eval_prediction))
            continue
        with measuring_mode(model, train=train):
            preds.append(
                np.asarray(
                    predict_blockwise(
                        model,
                        image,
                        block,
                        halo,
                        alignment,
                        ndim=ndim,
                        batch_size=batch_size,
                        device=device,
                        input_transform=input_transform,
                        output_transform=act,
                        progress=progress,
                        auto=True,
                    )
                )
            )
    train_pred, eval_pred = preds
    per_channel = [1.0 - d for d in mask_agreement(train_pred, eval_pred, threshold)]
    return TrainEvalDisparity(
        per_channel=per_channel,
        train_prediction=train_pred if keep_predictions else None,
        eval_prediction=eval_pred if keep_predictions else None,
    )
