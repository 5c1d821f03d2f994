"""Whether one layer mixes its whole input: the test behind the culprit layers.

A layer is *global* when perturbing its input at the first position changes its
output at the last one. It is tested on the inputs it sees inside the network and on
copies enlarged by repeating voxels, since a local layer on a tiny feature map (a 3x3
convolution on 2x2 voxels) reaches across it, but not across 16 voxels; global means
global at every size the layer accepts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .probe_model import first_tensor

__all__ = ["mixes_globally"]


def _spatial_axes(t: torch.Tensor, ndim: int) -> tuple[int, ...]:
    """Axes of a feature tensor that index positions (not batch, channels or features)."""
    if t.dim() == ndim + 2:
        return tuple(range(2, ndim + 2))
    if t.dim() == 3:  # tokens: (N, L, D)
        return (1,)
    if t.dim() == 4 and ndim == 3:  # attention heads: (N, heads, L, d)
        return (2,)
    return ()


def _corner(t: torch.Tensor, axes: tuple[int, ...], last: bool) -> tuple[Any, ...]:
    key: list[Any] = [slice(None)] * t.dim()
    for a in axes:
        key[a] = -1 if last else 0
    return tuple(key)


def _enlarge(t: torch.Tensor, axes: tuple[int, ...], factor: int) -> torch.Tensor:
    for a in axes:
        t = t.repeat_interleave(factor, dim=a)
    return t


def mixes_globally(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ndim: int,
    sizes: Sequence[int] = (16,),
    max_elements: int = 2**22,
) -> bool:
    """Whether ``fn``'s output at its last position depends on its input at the first one.

    Tested on the given inputs and on copies enlarged (by repeating voxels) to at
    least each of ``sizes`` positions per axis, where ``fn`` accepts them; global
    means global at every size tried. A local layer on a tiny feature map (a 3x3
    convolution on 2x2 voxels) reaches across it, but not across 16 voxels.
    """
    leaves, spec = tree_flatten((args, kwargs))
    spatial = [
        (i, _spatial_axes(t, ndim))
        for i, t in enumerate(leaves)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    spatial = [(i, ax) for i, ax in spatial if ax][:4]
    if not spatial:
        return False
    smallest = max(min(leaves[i].shape[a] for i, ax in spatial for a in ax), 1)
    largest = max(leaves[i].numel() for i, _ in spatial)
    factors = [1]
    for size in sorted(sizes):
        f = math.ceil(size / smallest)
        grow = max(f ** len(ax) for _, ax in spatial)
        if f > factors[-1] and largest * grow <= max_elements:
            factors.append(f)

    def run(values: list[Any]) -> torch.Tensor | None:
        # Fresh copies: a layer may work in place (ReLU(inplace=True)).
        values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
        a, k = tree_unflatten(values, spec)
        out = first_tensor(fn(*a, **k))
        if out is None or not _spatial_axes(out, ndim):
            return None
        return out

    verdicts = []
    with warnings.catch_warnings():
        # Layers fed enlarged or foreign inputs may warn; only their outputs matter.
        warnings.simplefilter("ignore")
        for factor in factors:
            verdict = _global_at(run, leaves, spatial, factor, ndim)
            if verdict is None:
                if factor == 1:
                    return False
                break  # the layer only accepts its own size: judge on the sizes it took
            verdicts.append(verdict)
    return all(verdicts)


def _global_at(
    run: Callable[[list[Any]], torch.Tensor | None],
    leaves: list[Any],
    spatial: list[tuple[int, tuple[int, ...]]],
    factor: int,
    ndim: int,
) -> bool | None:
    """One size of :func:`mixes_globally`; ``None`` if the layer rejects this size."""
    values = list(leaves)
    for i, ax in spatial:
        values[i] = _enlarge(leaves[i], ax, factor) if factor > 1 else leaves[i]
    try:
        base = run(values)
    except Exception:
        return None
    if base is None:
        return False
    far = _corner(base, _spatial_axes(base, ndim), last=True)
    scale = float(base.abs().max()) + 1.0
    for i, ax in spatial:
        perturbed = list(values)
        t = values[i].clone()
        t[_corner(t, ax, last=False)] += float(t.abs().max()) + 1.0
        perturbed[i] = t
        try:
            out = run(perturbed)
        except Exception:
            continue
        if (
            out is not None
            and out.shape == base.shape
            and float((out[far] - base[far]).abs().max()) > 1e-12 * scale
        ):
            return True
    return False
