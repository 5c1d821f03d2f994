"""Public test helpers: check that a model can be stitched seamlessly.

Use them in your own test suite::

    from nahtlos.testing import assert_blockwise_equal
    assert_blockwise_equal(model.eval(), image, blocks=[(32, 32), (48, 40)], halo=16, alignment=4)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .axes import axis_names
from .engine.geometry import BlockGrid
from .engine.predict import ArrayLike, predict_blockwise, predict_whole

__all__ = ["assert_blockwise_equal", "largest_difference"]


def largest_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Largest absolute difference of two equally shaped arrays and where it is.

    NaNs count as infinitely different unless they are at the same place in both.
    """
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
    if diff.size == 0:
        return 0.0, ()
    flat = int(np.argmax(diff))
    where = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    return float(diff[where]), where


def assert_blockwise_equal(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: ArrayLike,
    blocks: Sequence[int | Sequence[int]],
    halo: int | Sequence[int],
    alignment: int | Sequence[int] = 1,
    *,
    ndim: int | None = None,
    atol: float = 1e-5,
    batch_size: int = 2,
    device: str | torch.device | None = None,
    reference: np.ndarray | None = None,
    **predict_kwargs: Any,
) -> float:
    """Assert block-wise prediction equals the whole-image reference for every block shape.

    The reference is :func:`~nahtlos.engine.predict.predict_whole` (the model applied once
    to the image zero-padded by the halo, then cropped). Every output voxel is
    compared, borders included.

    Parameters
    ----------
    model, image, halo, alignment, ndim, batch_size, device
        As for :func:`~nahtlos.engine.predict.predict_blockwise`.
    blocks
        Block shapes to try; include some that do not divide the image.
    atol
        Largest absolute difference allowed.
    reference
        A precomputed reference, to skip the whole-image pass.
    predict_kwargs
        Passed on to both predictions (e.g. ``input_transform``).

    Returns
    -------
    float
        The largest difference seen over all block shapes.

    Raises
    ------
    AssertionError
        Naming, for every failing block shape, the largest difference, the channel and
        voxel where it occurs, and the block that holds that voxel.
    """
    if ndim is None:
        first = blocks[0]
        ndim = len(tuple(first)) if not isinstance(first, int) else None
    ref = reference
    if ref is None:
        ref = predict_whole(
            model,
            image,
            halo,
            alignment,
            ndim=ndim,
            device=device,
            **{
                k: v
                for k, v in predict_kwargs.items()
                if k in ("input_transform", "output_transform")
            },
        )
    nd = ref.ndim - 1
    names = axis_names(nd)
    worst = 0.0
    failures = []
    for block in blocks:
        got = predict_blockwise(
            model,
            image,
            block,
            halo,
            alignment,
            ndim=nd,
            batch_size=batch_size,
            device=device,
            progress=False,
            **predict_kwargs,
        )
        value, where = largest_difference(np.asarray(got), ref)
        worst = max(worst, value)
        if value > atol:
            # the grid predict_blockwise used, rounded the same way when auto=True
            auto = bool(predict_kwargs.get("auto", False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # predict_blockwise already warned
                grid = BlockGrid(ref.shape[1:], block, halo, alignment, auto=auto)
            voxel = where[1:]
            blk = tuple(v // b for v, b in zip(voxel, grid.block, strict=True))
            coords = ", ".join(f"{n}={v}" for n, v in zip(names, voxel, strict=True))
            failures.append(
                f"block {grid.block} (halo {grid.halo}, alignment {grid.alignment}): largest "
                f"|block-wise - whole| = {value:.3g} > {atol:g} at channel {where[0]}, {coords} "
                f"(block {blk} of grid {grid.grid_shape}); block-wise {float(np.asarray(got)[where]):.6g}"
                f" vs whole-image {float(ref[where]):.6g}"
            )
    if failures:
        raise AssertionError(
            "block-wise prediction differs from the whole-image reference:\n  "
            + "\n  ".join(failures)
        )
    return worst
