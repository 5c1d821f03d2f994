"""The alignment: the smallest input shift that shifts the output exactly along.

Block origins and halos must be multiples of it, or pooling grids shift between tiles.
It is found by shifting the probe's input by each divisor of the observed
down-sampling factor and comparing the outputs away from the border (outside the
TRF's reach); a model with absolute positional information has none.
"""

from __future__ import annotations

import torch

from ...axes import axis_names, round_up
from .probe_model import checked_forward
from .prober import Prober

__all__ = ["alignment"]


def _alignment_shape(prober: Prober, axis: int, before: int, after: int) -> tuple[int, ...]:
    """A probe long enough along ``axis`` to compare outputs beyond the TRF's reach."""
    if prober.fixed:
        return prober.base
    p = prober.downsampling[axis]
    length = round_up(max(before + after + 2 * p + 2, 4 * p, 32), p)
    return prober.thin_shape(axis, length)


def alignment(prober: Prober, axis: int, before: int, after: int) -> int | None:
    """Smallest shift along ``axis`` that shifts the output exactly, or ``None``."""
    name = axis_names(prober.ndim)[axis]
    prober.bar.set_description(f"receptive field: alignment along {name}")
    p = prober.downsampling[axis]
    shape = _alignment_shape(prober, axis, before, after)
    n = shape[axis]
    big = list(shape)
    big[axis] += p
    source = prober.input(big)
    with torch.no_grad(), prober.mode:
        key0 = [slice(None)] * (prober.ndim + 2)
        key0[2 + axis] = slice(0, n)
        y0 = checked_forward(prober.probe, source[tuple(key0)])
        scale = float(y0.abs().max()) + 1e-300
        for s in (q for q in range(1, p + 1) if p % q == 0):
            key = list(key0)
            key[2 + axis] = slice(s, s + n)
            ys = checked_forward(prober.probe, source[tuple(key)])
            lo, hi = before, n - 1 - after - s
            if hi < lo:
                break
            a = [slice(None)] * (prober.ndim + 2)
            b = list(a)
            a[2 + axis] = slice(lo + s, hi + s + 1)
            b[2 + axis] = slice(lo, hi + 1)
            diff = float((y0[tuple(a)] - ys[tuple(b)]).abs().max())
            prober.bar.update(1)
            if diff <= 1e-9 * scale:
                return s
    return None
