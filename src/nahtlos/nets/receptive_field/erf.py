"""The effective receptive field (ERF): its gradient map on the real model, and its radii.

The ERF is the mean absolute gradient of the centre output voxel (all channels) with
respect to the input, of the real model in eval mode, over random inputs; its radius
at a mass ``q`` is, per axis, the smallest ``r`` such that the voxels within ``r`` of
the centre along that axis hold a fraction ``q`` of the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .probe_model import ProbeMode, checked_forward, eval_mode

__all__ = ["MASSES", "ErfMaps", "erf_levels", "erf_mass_radius", "measure_erf"]

#: ERF masses reported by default.
MASSES = (0.9, 0.99, 0.999)


@dataclass(frozen=True)
class ErfMaps:
    """What :func:`measure_erf` found.

    Attributes
    ----------
    plain
        Mean absolute gradient of the centre output voxel, summed over input channels.
    frozen
        The same with the per-tile statistics held constant, if asked for.
    center
        Index of the centre output voxel.
    out_channels
        Output channels of the model, seen in the forward passes the maps need
        (``None`` without samples).
    """

    plain: np.ndarray
    frozen: np.ndarray | None
    center: tuple[int, ...]
    out_channels: int | None


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def measure_erf(
    model: torch.nn.Module,
    ndim: int,
    in_channels: int,
    shape: tuple[int, ...],
    device: torch.device,
    samples: int,
    seed: int,
    frozen: bool = False,
) -> ErfMaps:
    """Mean |gradient| of the centre output voxel over random inputs.

    With ``frozen``, also the map with the per-tile statistics held constant (a second
    backward pass through the same forward pass).
    """
    mode = ProbeMode(ndim, dense=False)
    mode.freeze_backward = True
    dtype = _model_dtype(model)
    center = tuple(s // 2 for s in shape)
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(shape, dtype=torch.float64)
    acc_frozen = torch.zeros(shape, dtype=torch.float64)
    key: tuple[Any, ...] = (0, slice(None), *center)
    out_channels = None
    with eval_mode(model), torch.enable_grad():
        for _ in range(samples):
            x = torch.randn((1, in_channels, *shape), generator=gen).to(device, dtype)
            x.requires_grad_(True)
            y = checked_forward(model, x)
            out_channels = int(y.shape[1])
            out = y[key].sum()
            # inputs=[x] only: the model's own .grad fields stay untouched.
            (g,) = torch.autograd.grad(out, [x], retain_graph=frozen)
            acc += g.detach().abs().sum(dim=1)[0].to("cpu", torch.float64)
            if frozen:
                with mode:
                    (g,) = torch.autograd.grad(out, [x])
                acc_frozen += g.detach().abs().sum(dim=1)[0].to("cpu", torch.float64)
    plain = (acc / samples).numpy()
    return ErfMaps(plain, (acc_frozen / samples).numpy() if frozen else None, center, out_channels)


def erf_mass_radius(erf: np.ndarray, center: Sequence[int], mass: float) -> tuple[int, ...]:
    """Per axis, the smallest radius around ``center`` whose slab holds ``mass`` of ``erf``."""
    total = float(erf.sum())
    radii = []
    for d, c in enumerate(center):
        others = tuple(a for a in range(erf.ndim) if a != d)
        profile = erf.sum(axis=others) if others else erf
        if total <= 0:
            radii.append(0)
            continue
        n = profile.shape[0]
        reach = max(c, n - 1 - c)
        cum = np.array(
            [profile[max(c - r, 0) : c + r + 1].sum() for r in range(reach + 1)], dtype=np.float64
        )
        # Tolerate round-off so that mass=1 finds the last non-zero voxel.
        hit = np.nonzero(cum >= mass * total * (1 - 1e-9))[0]
        radii.append(int(hit[0]) if hit.size else reach)
    return tuple(radii)


def erf_levels(erf: np.ndarray, masses: Sequence[float] = MASSES) -> list[float]:
    """Gradient magnitudes whose super-level sets hold each of ``masses`` of the ERF."""
    values = np.sort(erf.ravel())[::-1].astype(np.float64)
    cum = np.cumsum(values)
    total = cum[-1] if cum.size else 0.0
    levels = []
    for m in masses:
        i = int(np.searchsorted(cum, m * total))
        levels.append(float(values[min(i, values.size - 1)]) if values.size else 0.0)
    return levels
