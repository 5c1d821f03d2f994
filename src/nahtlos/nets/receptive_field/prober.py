"""The prober: one model's probe copy, the shapes it accepts, and gradient supports on it.

:class:`Prober` owns what every probe of :func:`~nahtlos.nets.receptive_field.receptive_field`
shares: the positive float64 copy (:mod:`.probe_model`) under its dispatch mode, the
probe inputs, which input shapes the model maps to themselves, the base probe shape,
the observed down-sampling factor, the shapes of thin probes, and the support (the
input voxels with a non-zero gradient) of a selection of output voxels. The TRF
(:mod:`.trf`), the alignment (:mod:`.alignment`) and the culprit layers
(:mod:`.culprits`) are measured with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...axes import round_up
from ...errors import ShapeMismatchError
from .probe_model import ProbeMode, checked_forward, positive_probe
from .result import ReceptiveFieldError

__all__ = ["Prober"]


class Prober:
    """Runs the probes of :func:`~nahtlos.nets.receptive_field.receptive_field` on one model.

    Attributes
    ----------
    base
        The probe shape the model is known to accept (``shape`` if given).
    fixed
        Whether the model takes only ``base`` (given, or found out along the way).
    downsampling
        The total down-sampling factor per axis, from the feature maps' shapes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ndim: int,
        in_channels: int,
        shape: tuple[int, ...] | None,
        device: torch.device,
        max_voxels: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.model = model
        self.ndim = ndim
        self.in_channels = in_channels
        self.device = device
        self.max_voxels = max_voxels
        self.seed = seed
        self.bar = bar
        self.gen = torch.Generator().manual_seed(seed)
        self.probe = positive_probe(model, device, seed)
        self.mode = ProbeMode(ndim)
        self._accepted: dict[tuple[int, ...], str | None] = {}
        self._width: tuple[int, ...] | None = None
        self.fixed = shape is not None
        self.base = shape if shape is not None else self._find_base()
        if shape is not None:
            error = self.accepts(shape)
            if error is not None:
                raise ReceptiveFieldError(
                    f"the model rejects the probe shape {shape}: {error}"
                ) from None
        self.downsampling = self._observe_downsampling()

    # -- inputs and shapes ---------------------------------------------------------

    def input(self, shape: Sequence[int], requires_grad: bool = False) -> torch.Tensor:
        """A probe input: small positive values, so every path is positive and nothing saturates."""
        x = (
            torch.rand((1, self.in_channels, *shape), generator=self.gen, dtype=torch.float64) + 0.5
        ) * 0.01
        return x.to(self.device).requires_grad_(requires_grad)

    def accepts(self, shape: tuple[int, ...]) -> str | None:
        """``None`` if the model maps ``shape`` to ``shape``, else the reason it fails."""
        if shape not in self._accepted:
            try:
                with torch.no_grad():
                    checked_forward(self.probe, self.input(shape))
                self._accepted[shape] = None
            except ShapeMismatchError as exc:
                self._accepted[shape] = str(exc)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self._accepted[shape] = f"{type(exc).__name__}: {first}"
        return self._accepted[shape]

    def _find_base(self) -> tuple[int, ...]:
        sizes = (32, 64, 16, 48, 96, 128) if self.ndim <= 2 else (16, 32, 48, 64, 96)
        errors = []
        for s in sizes:
            shape = (s,) * self.ndim
            error = self.accepts(shape)
            if error is None:
                return shape
            errors.append(f"{shape}: {error}")
        for error in errors:
            if "returned shape" in error:
                # The model changes the spatial shape: it cannot be tiled at all.
                raise ShapeMismatchError(error.split(": ", 1)[1])
        raise ReceptiveFieldError(
            "the model accepts none of the probe shapes tried ("
            + "; ".join(errors[:3])
            + "); give the input shape it expects (shape=..., --shape)"
        )

    def feature_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes of the tensors (of 3 or more axes) computed from a probe input of ``shape``."""
        self.mode.shapes = []
        self.mode.track = True
        try:
            with torch.enable_grad(), self.mode:
                checked_forward(self.probe, self.input(shape, requires_grad=True))
        finally:
            self.mode.track = False
        return self.mode.shapes

    def _observe_downsampling(self) -> tuple[int, ...]:
        """The total down-sampling factor per axis, from the feature maps' shapes.

        With two input sizes, only axes of feature maps that double with the input
        count (attention heads or global pooling do not); with one size, feature maps
        whose every axis divides the input.
        """
        shapes = [self.base]
        doubled = tuple(2 * s for s in self.base)
        if (
            not self.fixed
            and math.prod(doubled) <= self.max_voxels
            and self.accepts(doubled) is None
        ):
            shapes.append(doubled)
        runs = [
            [t for t in self.feature_shapes(shape) if len(t) == self.ndim + 2 and t[0] == 1]
            for shape in shapes
        ]
        factors = [1] * self.ndim
        if len(runs) == 2 and len(runs[0]) == len(runs[1]):
            for a, b in zip(runs[0], runs[1], strict=True):
                for d in range(self.ndim):
                    size = a[2 + d]
                    if b[2 + d] == 2 * size and self.base[d] % size == 0:
                        factors[d] = max(factors[d], self.base[d] // size)
        else:
            for a in runs[0]:
                sizes = a[2:]
                if all(n >= 2 and s % n == 0 for n, s in zip(sizes, self.base, strict=True)):
                    for d in range(self.ndim):
                        factors[d] = max(factors[d], self.base[d] // sizes[d])
        return tuple(factors)

    # -- supports ---------------------------------------------------------------------

    def cell_start(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Origin of the alignment cell at the centre of a probe of ``shape``."""
        return tuple((s // 2 // p) * p for s, p in zip(shape, self.downsampling, strict=True))

    def central_cell(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[slice, ...]]:
        """Origin of the central alignment cell and the selection of its output voxels."""
        cell = self.cell_start(shape)
        union = tuple(slice(c, c + q) for c, q in zip(cell, self.downsampling, strict=True))
        return cell, union

    def supports(
        self, shape: tuple[int, ...], selections: Sequence[tuple[slice, ...]]
    ) -> list[np.ndarray]:
        """Input voxels in the TRF of each selection of output voxels (boolean maps)."""
        x = self.input(shape, requires_grad=True)
        out = []
        with torch.enable_grad(), self.mode:
            y = checked_forward(self.probe, x)
            for sel in selections:
                mask = torch.zeros_like(y)
                key = (slice(None), slice(None), *sel)
                mask[key] = 1.0
                (g,) = torch.autograd.grad(y, x, mask, retain_graph=True)
                out.append((g != 0).any(dim=1)[0].cpu().numpy())
        self.bar.update(1)
        return out

    def thin_shape(self, axis: int, length: int) -> tuple[int, ...]:
        """A probe long (``length``) along ``axis`` and narrow along the others."""
        if self.fixed:
            return self.base
        width = list(self._thin_width())
        width[axis] = length
        return tuple(width)

    def _thin_width(self) -> tuple[int, ...]:
        """Width of the short axes of a thin probe: one alignment cell if the model takes it."""
        if self._width is None:
            self._width = tuple(round_up(max(2 * p, 16), p) for p in self.downsampling)
            for factor in (1, 2):
                width = tuple(factor * p for p in self.downsampling)
                long = list(width)
                long[0] = self.start_length(0)
                if self.accepts(tuple(long)) is None:
                    self._width = width
                    break
        return self._width

    def start_length(self, axis: int) -> int:
        """The first length of a thin probe along ``axis``."""
        p = self.downsampling[axis]
        return round_up(max(8 * p, 64, self.base[axis]), p)
