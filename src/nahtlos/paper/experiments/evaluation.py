"""Evaluation of a trained cell on validation images: Dice, disparity, tile mismatch.

The numbers of the paper's tables for one network on one dataset: eval-mode and
train-mode Dice per class (median over the validation images), train/eval disparity
(:func:`nahtlos.training.validation.validate`) and tile mismatch pooled over the windows of
all images (:func:`nahtlos.analysis.metrics.tile_mismatch`). The helpers here also
serve the studies (:mod:`.studies`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .inputs import Geometry, ImageFiles, output_classes
from .presets import Preset

__all__ = [
    "dice_scores",
    "evaluate_on",
    "image_mismatch",
    "median_dice",
    "pooled_mismatch",
    "predict",
    "targets",
    "volumes",
]


def volumes(images: Sequence[ImageFiles], ndim: int, input_norm: str) -> list[Any]:
    """The images opened as training volumes, with ``input_norm`` input normalization."""
    from ...io import InputNormalization
    from ...training.data import open_volume

    return [
        open_volume(f.image, f.labels, ndim, input_norm=InputNormalization(mode=input_norm))  # type: ignore[arg-type]
        for f in images
    ]


def targets(vol: Any, dataset: str) -> np.ndarray:
    """The one-hot ground truth of a volume, per output class (boolean)."""
    from ...training.data import semantic_target

    organoids = dataset == "organoids"
    return semantic_target(
        vol, vol.region, "semantic" if organoids else "instances", 3 if organoids else None
    ).astype(bool)


def _median(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.median(v)) if v else None


def dice_scores(pred: np.ndarray, gt: np.ndarray) -> list[float | None]:
    """Dice per class of binarized probabilities (``None`` where the truth is empty)."""
    from ...analysis.metrics import binarize, dice_per_channel

    return dice_per_channel(binarize(pred), gt, skip_empty_target=True)


def median_dice(
    per_image: Sequence[Sequence[float | None]], names: Sequence[str]
) -> dict[str, float | None]:
    """Per class, the median of the images' Dice scores (``None`` if no image has one)."""
    return {n: _median(s[i] for s in per_image if s[i] is not None) for i, n in enumerate(names)}


def predict(
    model: Any,
    vol: Any,
    block: tuple[int, ...] | None,
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
    activation: Any,
    image: Any = None,
) -> np.ndarray:
    """Probabilities for a volume's image (or ``image`` in its place), normalized as the
    volume is: block-wise with ``block``, or the whole image at once for ``None``."""
    from ...engine import predict_blockwise, predict_whole

    image = vol.image if image is None else image
    common: dict[str, Any] = {
        "ndim": vol.ndim,
        "input_transform": vol.normalization,
        "output_transform": activation,
    }
    if block is None:
        return predict_whole(model, image, halo, alignment, **common)
    return np.asarray(
        predict_blockwise(model, image, block, halo, alignment, progress=False, **common)
    )


def image_mismatch(
    model: Any,
    vol: Any,
    geo: Geometry,
    stride: int,
    activation: str,
    halo: tuple[int, ...] | None = None,
) -> Any:
    """Tile mismatch of one volume, sub-tiles of the inference window (``geo``), with
    the halo of ``geo`` unless ``halo`` is given."""
    from ...analysis.metrics import tile_mismatch

    window, overlap = geo.mismatch_window()
    return tile_mismatch(
        model,
        vol.image,
        window=window,
        halo=geo.halo if halo is None else halo,
        alignment=geo.alignment,
        stride=stride,
        overlap=overlap,
        ndim=vol.ndim,
        activation=activation,
        input_transform=vol.normalization,
    )


def pooled_mismatch(tms: Sequence[Any], names: Sequence[str]) -> dict[str, Any]:
    """Tile mismatch of several images as one: the largest indicator, and the mean
    ``1 - Dice`` per class over the windows of all images."""
    indicator = max((float(tm.indicator) for tm in tms), default=0.0)
    tolerance = float(tms[-1].tolerance) if tms else 1e-5
    windows = [w["one_minus_dice"] for tm in tms for w in tm.windows]
    per_channel = np.mean(np.array(windows, dtype=np.float64), axis=0) if windows else []
    return {
        "indicator": indicator,
        "seamless": bool(indicator <= tolerance),
        "tolerance": tolerance,
        "per_class": {n: float(v) for n, v in zip(names, per_channel, strict=True)},
        "windows": len(windows),
    }


def evaluate_on(
    model: Any,
    meta: Mapping[str, Any],
    vols: Sequence[Any],
    dataset: str,
    geo: Geometry,
    preset: Preset,
) -> dict[str, Any]:
    """Eval/train-mode Dice per class, disparity and tile mismatch on validation images."""
    from ...training.validation import validate

    organoids = dataset == "organoids"
    names = output_classes(dataset)
    scores = validate(
        model,
        vols,
        block=geo.block,
        halo=geo.halo,
        alignment=geo.alignment,
        activation=meta["activation"],
        labels="semantic" if organoids else "instances",
        num_classes=3 if organoids else None,
        batch_size=1,  # train mode normalizes each tile alone, as in training (batch 1)
    )

    def named(values: np.ndarray) -> dict[str, float | None]:
        return {
            n: (None if math.isnan(float(v)) else float(v))
            for n, v in zip(names, values, strict=True)
        }

    return {
        "classes": list(names),
        "dice_eval": named(scores["dice_eval"]),
        "dice_train": named(scores["dice_train"]),
        "disparity": named(scores["disparity"]),
        "mismatch": _mismatch(model, vols, geo, preset.mismatch_stride, names, meta["activation"]),
    }


def _mismatch(
    model: Any,
    vols: Sequence[Any],
    geo: Geometry,
    stride: int,
    names: Sequence[str],
    activation: str,
) -> dict[str, Any]:
    """Tile mismatch over all validation images (windows pooled)."""
    tms = [image_mismatch(model, vol, geo, stride, activation) for vol in vols]
    return {**pooled_mismatch(tms, names), "window": list(geo.mismatch_window()[0])}
