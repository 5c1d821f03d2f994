"""The studies beyond the tables, run on the U-Net cells.

* the **tile-size sweep** (the paper's Fig. 6): eval-mode Dice against the inference
  window, and for the whole image at once;
* **whole-image statistics** (issue 9): the InstanceNorm U-Nets with their norms frozen
  to exact statistics of the whole image (:mod:`nahtlos.engine.global_stats`),
  predicted block-wise with their local receptive field as halo;
* **stitched predictions** (Fig. 2): one image predicted with two tilings, whose
  difference shows the seams where there are any.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...axes import round_up
from .evaluation import dice_scores, image_mismatch, median_dice, pooled_mismatch, predict
from .inputs import Geometry, output_classes
from .presets import ExperimentError, Preset

__all__ = ["global_stats_study", "stitched_arrays", "tile_size_sweep"]


def tile_size_sweep(
    model: Any,
    vols: Sequence[Any],
    targets: Sequence[np.ndarray],
    dataset: str,
    geo: Geometry,
    windows: Sequence[int],
    activation: Any,
) -> list[dict[str, Any]]:
    """Eval-mode Dice per class for each inference window, and for the whole image."""
    names = output_classes(dataset)
    rows = []
    sizes: list[int | None] = [w for w in windows if w - 2 * max(geo.halo) >= max(geo.alignment)]
    for w in [*sizes, None]:
        block = (
            None
            if w is None
            else tuple(round_up(w - 2 * h, a) for h, a in zip(geo.halo, geo.alignment, strict=True))
        )
        per_image = [
            dice_scores(predict(model, vol, block, geo.halo, geo.alignment, activation), gt)
            for vol, gt in zip(vols, targets, strict=True)
        ]
        rows.append(
            {"window": "whole" if w is None else int(w), "dice": median_dice(per_image, names)}
        )
    return rows


def global_stats_study(
    model: Any,
    vols: Sequence[Any],
    targets: Sequence[np.ndarray],
    dataset: str,
    geo: Geometry,
    preset: Preset,
    activation: Any,
    activation_name: str,
    tilewise: Mapping[str, Any],
) -> dict[str, Any]:
    """Issue 9: predict with the norms frozen to exact whole-image statistics.

    The halo of the frozen network is its local TRF (the receptive field with the
    norm statistics held constant), rounded up to the alignment. ``tilewise`` is the
    cell's own evaluation, the comparison.
    """
    from ...engine import compute_global_stats, freeze_norms
    from ...nets.receptive_field import receptive_field

    t0 = time.perf_counter()
    rf = receptive_field(model, preset.ndim, 1, erf_samples=1)
    local = rf.local_trf_radius
    if local is None:
        raise ExperimentError(f"the {dataset} InstanceNorm model has no local receptive field")
    halo = tuple(round_up(r, a) for r, a in zip(local, geo.alignment, strict=True))
    block = Geometry(halo, geo.alignment, geo.window).block
    per_image: list[list[float | None]] = []
    tms = []
    for vol, gt in zip(vols, targets, strict=True):
        stats = compute_global_stats(
            model,
            vol.image,
            block=block,
            halo=halo,
            alignment=geo.alignment,
            ndim=vol.ndim,
            input_transform=vol.normalization,
            progress=False,
        )
        frozen = freeze_norms(model, stats).eval()
        pred = predict(frozen, vol, block, halo, geo.alignment, activation)
        per_image.append(dice_scores(pred, gt))
        # the same windows as the tile-wise network's, cut with the frozen network's halo
        tms.append(image_mismatch(frozen, vol, geo, preset.mismatch_stride, activation_name, halo))
    names = output_classes(dataset)
    return {
        "halo": list(halo),
        "dice_tilewise": dict(tilewise["dice_eval"]),
        "mismatch_tilewise": dict(tilewise["mismatch"]),
        "dice_global": median_dice(per_image, names),
        "mismatch_global": pooled_mismatch(tms, names),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def stitched_arrays(
    model: Any, vol: Any, geo: Geometry, activation: Any, crop: int = 256
) -> dict[str, np.ndarray]:
    """Arrays of the stitched-prediction figure for one image.

    Two tilings of the same image: the block grid from the origin, and the grid
    shifted by half a block (aligned). Where a network is seamless they agree exactly
    (away from the shifted image's new border, one halo wide); where it is not, their
    difference shows the tiles. Both are normalized as the volume, whose
    normalization was fitted on the whole image.
    """
    image = np.asarray(vol.image[...], dtype=np.float32)
    shift = tuple(round_up(b // 2, a) for b, a in zip(geo.block, geo.alignment, strict=True))
    first = predict(model, vol, geo.block, geo.halo, geo.alignment, activation, image)
    shifted_in = np.ascontiguousarray(image[tuple(slice(s, None) for s in shift)])
    second = predict(model, vol, geo.block, geo.halo, geo.alignment, activation, shifted_in)
    diff = np.full(first.shape[1:], np.nan, np.float32)
    inner = tuple(slice(s + h, None) for s, h in zip(shift, geo.halo, strict=True))
    inner2 = tuple(slice(h, None) for h in geo.halo)
    key1, key2 = (slice(None), *inner), (slice(None), *inner2)
    diff[inner] = np.abs(first[key1] - second[key2]).max(0)
    if vol.ndim == 3:  # the middle slice
        mid = first.shape[1] // 2
        image, first, diff = image[mid], first[:, mid], diff[mid]
    view = tuple(slice(0, min(crop, n)) for n in image.shape)
    key = (slice(None), *view)
    return {
        "image": image[view].astype(np.float32),
        "prediction": first[key].astype(np.float16),
        "difference": diff[view].astype(np.float16),
        "block": np.array(geo.block[-2:]),
        "shift": np.array(shift[-2:]),
        "halo": np.array(geo.halo[-2:]),
    }
