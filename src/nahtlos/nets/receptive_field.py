"""Receptive fields of any model: TRF, ERF, alignment, tile dependence and the halo.

The halo is exact only when it covers the theoretical receptive field (TRF) and block
origins sit on the network's down-sampling grid (DESIGN.md §2). This module measures
both for any ``torch.nn.Module`` or TorchScript model, by probing it, not by reading
its configuration.

How the TRF is made exact and independent of the weights
--------------------------------------------------------
The TRF is read off the support (the non-zero entries) of the gradient of output
voxels with respect to the input, computed on a *probe*: a float64 copy of the model
whose parameters are random positive numbers (weights scaled by ``1/fan_in``), whose
running means are 0 and running variances 1, fed with a small positive input. Then
every linear map has positive coefficients, so contributions of different paths never
cancel, and activations stay in the near-zero range where no activation saturates.
Two value-dependent zeros remain, and they are removed in the backward pass itself by
a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (which, unlike module
surgery, also reaches ops inside TorchScript and functional code):

- max pooling sends its gradient only to the arg-max; its backward is replaced by the
  backward of a sum over the pooling window (a transposed convolution with a kernel of
  ones), so every voxel of every window counts;
- ReLU, ReLU6/Hardtanh, Hardsigmoid and Hardswish have zero derivative on part of
  their domain (a dead ReLU); their backward passes the gradient through unchanged.

The support is then the set of input voxels connected to the output voxel in the
computation graph, which is DESIGN.md's definition of the TRF. float64 keeps the
tails of the gradient (products of ~1/fan_in over dozens of layers) above underflow.

The TRF of a down-sampling network depends on the output position modulo the
alignment; the reported extent is the maximum over one alignment cell. Each axis is
measured on a *thin* probe, long along that axis and a few alignment cells wide along
the others, which is exact for networks whose layers depend on boxes of voxels
(convolutions of any dilation, pooling, up-sampling, strided layers) and costs a tiny
fraction of a full 3D probe; where a full probe is affordable it checks the result.

Tile dependence, alignment and the ERF
---------------------------------------
A model is *tile-dependent* when the TRF covers the whole input at two probe sizes:
it grows with the tile. The layers to blame are found by probing every layer on its
own, on the inputs it sees inside the network (and on an enlarged copy): a layer is
global when perturbing its input at the first position changes its output at the last
one. The culprits reported are the innermost such layers.

The alignment is the smallest shift of the input that shifts the output exactly
along; it is found by shifting the probe's input by each divisor of the observed
down-sampling factor and comparing the outputs away from the border.

The ERF is the mean absolute gradient of the centre output voxel (all channels) with
respect to the input, of the real model in eval mode, over random inputs; its radius
at a mass ``q`` is, per axis, the smallest ``r`` such that the voxels within ``r`` of
the centre along that axis hold a fraction ``q`` of the total.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from ..axes import as_per_axis, axis_names, round_up
from ..errors import NahtlosError, NahtlosWarning, ShapeMismatchError

__all__ = [
    "MASSES",
    "Culprit",
    "ReceptiveField",
    "ReceptiveFieldError",
    "plot_receptive_field",
    "receptive_field",
    "receptive_field_figure",
    "recommend_halo",
]


#: ERF masses reported by default.
class _HasModule(Protocol):
    """A loaded model file (:class:`~nahtlos.nets.checkpoint.LoadedModel`)."""

    module: torch.nn.Module


MASSES = (0.9, 0.99, 0.999)

_aten = torch.ops.aten


class ReceptiveFieldError(NahtlosError, RuntimeError):
    """The receptive field of a model could not be measured."""


@dataclass(frozen=True)
class Culprit:
    """A layer that makes every output depend on its whole input (the tile).

    Attributes
    ----------
    name
        Qualified module name inside the model (``"model.0.adn.N"``), or ``"(model)"``
        when the mixing happens in the model's own ``forward``.
    type
        The layer's class name (``"InstanceNorm3d"``, ``"SABlock"``, ...).
    """

    name: str
    type: str

    def __str__(self) -> str:
        return f"{self.name} ({self.type})"


@dataclass
class ReceptiveField:
    """The receptive field of a model, as measured by :func:`receptive_field`.

    Attributes
    ----------
    ndim
        Number of spatial axes.
    in_channels
        Input channels the model was probed with.
    trf_before, trf_after
        Per axis, how many voxels before and after an output voxel its TRF reaches,
        the maximum over one alignment cell; ``None`` for tile-dependent models, whose
        TRF is the whole tile.
    alignment
        Per axis, the smallest input shift under which the output shifts exactly
        along (verified by shifting); for tile-dependent or non shift-equivariant
        models, the down-sampling factor.
    downsampling
        Per axis, the total down-sampling factor observed in the feature maps.
    shift_equivariant
        Whether shifting the input by the alignment shifts the output exactly;
        ``False`` for models with absolute positional information (e.g. learned
        position embeddings), ``None`` where not measurable (tile-dependent models).
    tile_dependent
        Whether the TRF covers the whole input, whatever its size.
    culprits
        The innermost layers that mix the whole tile (empty for tile-independent
        models).
    erf
        Mean absolute gradient of the centre output voxel w.r.t. the input, summed
        over input channels, shape ``erf_shape``.
    erf_center
        Index of the centre output voxel in ``erf``.
    verified
        Whether a full (not thin) probe confirmed the per-axis TRF.
    local_trf_before, local_trf_after
        Tile-dependent models only: the TRF with the statistics of per-tile
        normalization (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in training
        mode) held constant, i.e. the part of the dependence a halo can capture
        (the paper's halo for its InstanceNorm U-Net); ``None`` if the model stays
        global even then (attention, global pooling).
    erf_local
        Tile-dependent models only: the ERF with the per-tile statistics held
        constant. The gradient through the statistics spreads over the whole tile,
        so the plain ERF's mass radius grows with the tile; this one does not.
    """

    ndim: int
    in_channels: int
    trf_before: tuple[int, ...] | None
    trf_after: tuple[int, ...] | None
    alignment: tuple[int, ...]
    downsampling: tuple[int, ...]
    shift_equivariant: bool | None
    tile_dependent: bool
    culprits: tuple[Culprit, ...]
    erf: np.ndarray = field(repr=False)
    erf_center: tuple[int, ...]
    verified: bool = False
    local_trf_before: tuple[int, ...] | None = None
    local_trf_after: tuple[int, ...] | None = None
    erf_local: np.ndarray | None = field(default=None, repr=False)

    @property
    def axes(self) -> tuple[str, ...]:
        """Axis names, ``("Z", "Y", "X")`` or ``("Y", "X")``."""
        return axis_names(self.ndim)

    @property
    def erf_shape(self) -> tuple[int, ...]:
        """Shape of the input the ERF was measured on."""
        return tuple(int(s) for s in self.erf.shape)

    @property
    def trf_radius(self) -> tuple[int, ...] | None:
        """Per axis, the larger of ``trf_before`` and ``trf_after``; ``None`` if tile-dependent."""
        if self.trf_before is None or self.trf_after is None:
            return None
        return tuple(max(b, a) for b, a in zip(self.trf_before, self.trf_after, strict=True))

    @property
    def local_trf_radius(self) -> tuple[int, ...] | None:
        """Per axis, the larger of ``local_trf_before`` and ``local_trf_after``."""
        if self.local_trf_before is None or self.local_trf_after is None:
            return None
        return tuple(
            max(b, a) for b, a in zip(self.local_trf_before, self.local_trf_after, strict=True)
        )

    def erf_radius(self, mass: float = 0.99, *, full: bool = False) -> tuple[int, ...]:
        """Per axis, the smallest radius around the centre that holds ``mass`` of the ERF.

        For tile-dependent models this is the radius of ``erf_local`` (the part of
        the ERF a halo can capture) unless ``full``.

        Raises
        ------
        ValueError
            If ``mass`` is not in (0, 1].
        """
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass {mass} must lie in (0, 1], e.g. 0.99")
        erf = self.erf if full or self.erf_local is None else self.erf_local
        return _erf_radius(erf, self.erf_center, mass)

    @property
    def erf_radii(self) -> dict[float, tuple[int, ...]]:
        """ERF radius per axis at each mass of :data:`MASSES`."""
        return {m: self.erf_radius(m) for m in MASSES}

    @property
    def exact(self) -> bool:
        """Whether a finite halo makes block-wise prediction exact for this model."""
        return not self.tile_dependent and self.shift_equivariant is True

    def halo(self, mass: float = 0.99) -> tuple[int, ...]:
        """The halo :func:`recommend_halo` gives, without its warning."""
        radius = self.trf_radius if self.exact and self.trf_radius is not None else None
        if radius is None:
            radius = self.erf_radius(mass)
        return tuple(round_up(r, a) for r, a in zip(radius, self.alignment, strict=True))

    def reason(self) -> str:
        """Why exact stitching is impossible (empty for exact models)."""
        if self.tile_dependent:
            if not self.culprits:
                return "its TRF is the whole tile (no single layer found responsible)"
            shown = ", ".join(str(c) for c in self.culprits[:3])
            more = len(self.culprits) - 3
            if more > 0:
                kinds = ", ".join(sorted({c.type for c in self.culprits}))
                shown += f" and {more} more ({kinds})"
            return f"its TRF is the whole tile, through {shown}"
        if self.shift_equivariant is False:
            return (
                "its output is not shift-equivariant (it depends on the position inside the "
                "tile, e.g. through position embeddings)"
            )
        return ""

    def to_dict(self, mass: float = 0.99) -> dict[str, Any]:
        """A JSON-ready summary (the ERF map itself is left out)."""
        return {
            "ndim": self.ndim,
            "axes": list(self.axes),
            "in_channels": self.in_channels,
            "trf_radius": _list(self.trf_radius),
            "trf_before": _list(self.trf_before),
            "trf_after": _list(self.trf_after),
            "local_trf_radius": _list(self.local_trf_radius),
            "alignment": list(self.alignment),
            "downsampling": list(self.downsampling),
            "shift_equivariant": self.shift_equivariant,
            "tile_dependent": self.tile_dependent,
            "culprits": [{"name": c.name, "type": c.type} for c in self.culprits],
            "erf_mass": mass,
            "erf_radius": list(self.erf_radius(mass)),
            "erf_radii": {str(m): list(r) for m, r in self.erf_radii.items()},
            "erf_radius_full": list(self.erf_radius(mass, full=True)),
            "erf_shape": list(self.erf_shape),
            "halo": list(self.halo(mass)),
            "exact": self.exact,
            "verified": self.verified,
        }

    def summary(self, mass: float = 0.99) -> str:
        """A short human-readable report, one item per line."""
        axes = ",".join(self.axes)

        def fmt(v: Sequence[int] | None) -> str:
            return "whole tile" if v is None else ",".join(str(int(x)) for x in v)

        lines = [f"axes                {axes}"]
        if self.trf_before is not None and self.trf_after is not None:
            lines.append(f"TRF radius          {fmt(self.trf_radius)}")
            lines.append(f"TRF before / after  {fmt(self.trf_before)} / {fmt(self.trf_after)}")
        else:
            lines.append("TRF radius          whole tile")
            local = self.local_trf_radius
            lines.append(
                "local TRF radius    "
                + (
                    fmt(local) + "  (tile statistics held constant)"
                    if local
                    else "none (still global)"
                )
            )
        lines.append(f"alignment           {fmt(self.alignment)}")
        eq = {True: "yes", False: "NO", None: "not measurable"}[self.shift_equivariant]
        lines.append(f"shift-equivariant   {eq}")
        td = "YES" if self.tile_dependent else "no"
        lines.append(f"tile-dependent      {td}")
        if self.culprits:
            lines.append("culprit layers      " + "; ".join(str(c) for c in self.culprits))
        for m, r in self.erf_radii.items():
            lines.append(f"ERF radius {m * 100:g}%".ljust(20) + fmt(r))
        if self.erf_local is not None:
            lines.append(
                "                    (tile statistics held constant; with them: "
                + fmt(self.erf_radius(mass, full=True))
                + f" at {mass * 100:g}%)"
            )
        rule = "TRF" if self.exact else f"ERF {mass * 100:g}%"
        lines.append(
            f"recommended halo    {fmt(self.halo(mass))}  ({rule}, rounded up to alignment)"
        )
        if not self.exact:
            lines.append(f"exact stitching     impossible: {self.reason()}")
        return "\n".join(lines)


def recommend_halo(rf: ReceptiveField, mass: float = 0.99, *, warn: bool = True) -> tuple[int, ...]:
    """The halo for block-wise prediction with the model measured by ``rf``.

    For a tile-independent, shift-equivariant model: the TRF radius rounded up to the
    alignment, which makes block-wise prediction exactly equal to the whole-image
    prediction. Otherwise no halo is exact; the ERF radius at ``mass`` (rounded up to
    the alignment) is returned with a :class:`~nahtlos.errors.NahtlosWarning` that
    names the layers to blame.

    Parameters
    ----------
    rf
        The result of :func:`receptive_field`.
    mass
        ERF mass for models without an exact halo.
    warn
        Emit the warning for models without an exact halo.
    """
    halo = rf.halo(mass)
    if warn and not rf.exact:
        warnings.warn(
            f"exact stitching is impossible for this model: {rf.reason()}. The halo "
            f"{halo} covers {mass * 100:g}% of the effective receptive field (ERF); "
            "block-wise predictions will differ slightly between tile sizes",
            NahtlosWarning,
            stacklevel=2,
        )
    return halo


def _list(v: Sequence[int] | None) -> list[int] | None:
    return None if v is None else [int(x) for x in v]


def _erf_radius(erf: np.ndarray, center: Sequence[int], mass: float) -> tuple[int, ...]:
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


# --------------------------------------------------------------------------------------
# The probe model and its dispatch mode
# --------------------------------------------------------------------------------------


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(module, buffer)
            buffer.seek(0)
            return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(module)


def _positive_probe(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """A float64 copy with random positive parameters and neutral running statistics."""
    probe = _copy_module(module)
    probe = probe.to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            if not p.is_floating_point():
                continue
            values = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
            if p.dim() >= 2:
                # Average-preserving weights keep activations of deep models near the input's.
                values /= max(p[0].numel(), 1)
            elif not name.rsplit(".", 1)[-1].endswith("weight"):
                # Small biases keep activations in the near-zero range of every activation.
                values *= 1e-3
            p.copy_(values.to(p.device))
            p.requires_grad_(False)
        for name, b in probe.named_buffers():
            if not b.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "mean" in leaf:
                b.zero_()
            elif "var" in leaf or "std" in leaf:
                b.fill_(1.0)
    probe.eval()
    return probe


def _expand(value: Any, n: int) -> list[int]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        return []
    return [int(v) for v in values] * n if len(values) == 1 else [int(v) for v in values]


def _dense_max_pool_backward(
    n: int,
    grad_output: torch.Tensor,
    self_: torch.Tensor,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """The backward of a *sum* over each pooling window: every window voxel gets gradient."""
    k = _expand(kernel_size, n)
    s = _expand(stride, n) or k
    p = _expand(padding, n)
    d = _expand(dilation, n)
    spatial = tuple(self_.shape[-n:])
    g = grad_output.reshape(-1, 1, *grad_output.shape[-n:])
    w = torch.ones((1, 1, *k), dtype=g.dtype, device=g.device)
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    full = conv_t(g, w, stride=s, dilation=d)
    # Index j of `full` is index j of the padded input, i.e. input index j - padding.
    out = full.new_zeros((full.shape[0], 1, *spatial))
    src, dst = [], []
    for i in range(n):
        hi = min(p[i] + spatial[i], full.shape[2 + i])
        src.append(slice(p[i], hi))
        dst.append(slice(0, max(hi - p[i], 0)))
    target = (slice(None), slice(None), *dst)
    source = (slice(None), slice(None), *src)
    out[target] = full[source]
    return out.reshape(self_.shape)


def _pass_through(func: Any, grad_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return grad_output.clone()


def _adaptive_avg_backward(n: int) -> Callable[..., torch.Tensor]:
    op = _aten._adaptive_avg_pool2d_backward if n == 2 else _aten._adaptive_avg_pool3d_backward

    def backward(
        func: Any, grad_output: torch.Tensor, self_: torch.Tensor, indices: Any
    ) -> torch.Tensor:
        result: torch.Tensor = op(grad_output, self_)
        return result

    return backward


def _max_pool_backward(n: int) -> Callable[..., torch.Tensor]:
    def backward(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _dense_max_pool_backward(n, *args, **kwargs)

    return backward


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_except_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def _affine_norm_grads(
    grad_out: torch.Tensor,
    scale: torch.Tensor,
    normalized: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``normalized * weight + bias`` with the statistics held constant:
    input, weight and bias (per channel), as ``output_mask`` asks."""
    return (
        grad_out * scale if output_mask[0] else None,
        _reduce_except_channels(grad_out * normalized) if output_mask[1] else None,
        _reduce_except_channels(grad_out) if output_mask[2] else None,
    )


def _frozen_batch_norm_backward(
    func: Any,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: Sequence[bool],
) -> Any:
    """BatchNorm/InstanceNorm backward with the batch (tile) statistics held constant."""
    if not train or save_mean is None or save_invstd is None:
        return func(
            grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
            train, eps, output_mask,
        )  # fmt: skip
    shape = _channel_shape(input)
    invstd = save_invstd.reshape(shape)
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    normalized = (input - save_mean.reshape(shape)) * invstd
    return _affine_norm_grads(grad_out, scale, normalized, output_mask)


def _frozen_group_norm_backward(
    func: Any,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    n: int,
    c: int,
    hxw: int,
    group: int,
    output_mask: Sequence[bool],
) -> Any:
    """GroupNorm backward with the per-sample group statistics held constant."""
    shape = [n, c] + [1] * (input.dim() - 2)
    per_channel = c // group
    rstd_c = rstd.reshape(n, group).repeat_interleave(per_channel, dim=1).reshape(shape)
    mean_c = mean.reshape(n, group).repeat_interleave(per_channel, dim=1).reshape(shape)
    scale = rstd_c if weight is None else rstd_c * weight.reshape(_channel_shape(input))
    normalized = (input - mean_c) * rstd_c
    return _affine_norm_grads(grad_out, scale, normalized, output_mask)


def _frozen_layer_norm_backward(
    func: Any,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    output_mask: Sequence[bool],
) -> Any:
    """LayerNorm backward with the per-sample statistics held constant."""
    lead = list(range(input.dim() - len(normalized_shape)))
    scale = rstd if weight is None else rstd * weight
    normalized = (input - mean) * rstd
    return (
        grad_out * scale if output_mask[0] else None,
        (grad_out * normalized).sum(dim=lead) if output_mask[1] and weight is not None else None,
        grad_out.sum(dim=lead) if output_mask[2] and bias is not None else None,
    )


def _frozen_batch_norm(
    func: Any,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Any:
    """Training-mode (per-batch or per-tile) normalization with constant statistics 0 and 1."""
    if not training:
        return func(input, weight, bias, running_mean, running_var, training, momentum, eps)
    shape = _channel_shape(input)
    out = input.clone()
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    c = input.shape[1]
    return out, input.new_zeros(c), input.new_ones(c)


def _frozen_group_norm(
    func: Any,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    c: int,
    hxw: int,
    group: int,
    eps: float,
) -> Any:
    shape = _channel_shape(input)
    out = input.clone()
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out, input.new_zeros((n, group)), input.new_ones((n, group))


def _frozen_layer_norm(
    func: Any,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> Any:
    out = input.clone()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    stats = (*input.shape[: input.dim() - len(normalized_shape)], *([1] * len(normalized_shape)))
    return out, input.new_zeros(stats), input.new_ones(stats)


# Backward ops whose zeros depend on values (arg-max, dead activations) -> structural.
_DENSE_BACKWARD: dict[Any, Callable[..., Any]] = {
    _aten.max_pool2d_with_indices_backward: _max_pool_backward(2),
    _aten.max_pool3d_with_indices_backward: _max_pool_backward(3),
    _aten.adaptive_max_pool2d_backward: _adaptive_avg_backward(2),
    _aten.adaptive_max_pool3d_backward: _adaptive_avg_backward(3),
    _aten.threshold_backward: _pass_through,
    _aten.hardtanh_backward: _pass_through,
    _aten.hardsigmoid_backward: _pass_through,
    _aten.hardswish_backward: _pass_through,
}

# Normalization with per-tile statistics: the statistics become constants.
_FROZEN_FORWARD: dict[Any, Callable[..., Any]] = {
    _aten.native_batch_norm: _frozen_batch_norm,
    _aten.native_group_norm: _frozen_group_norm,
    _aten.native_layer_norm: _frozen_layer_norm,
}
_FROZEN_BACKWARD: dict[Any, Callable[..., Any]] = {
    _aten.native_batch_norm_backward: _frozen_batch_norm_backward,
    _aten.native_group_norm_backward: _frozen_group_norm_backward,
    _aten.native_layer_norm_backward: _frozen_layer_norm_backward,
}


class _ProbeMode(TorchDispatchMode):
    """Rewrites ops for the probes (see the module docstring) and records feature shapes.

    ``dense``: structural backward of max pooling and activations. ``freeze_forward``
    / ``freeze_backward``: normalization statistics computed from the tile itself
    (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in training mode) are replaced by
    constants in the forward pass / treated as constants in the backward pass, which
    leaves the part of the dependence that a halo can capture.
    """

    def __init__(self, ndim: int, dense: bool = True) -> None:
        super().__init__()
        self.ndim = ndim
        self.dense = dense
        self.freeze_forward = False
        self.freeze_backward = False
        self.track = False
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        replacement = None
        if self.dense:
            replacement = _DENSE_BACKWARD.get(packet)
        if replacement is None and self.freeze_backward:
            replacement = _FROZEN_BACKWARD.get(packet)
        if replacement is None and self.freeze_forward:
            replacement = _FROZEN_FORWARD.get(packet)
        out = (
            replacement(func, *args, **kwargs) if replacement is not None else func(*args, **kwargs)
        )
        if self.track:
            # requires_grad marks tensors computed from the probe input (parameters don't);
            # outputs count too, for results no later op consumes.
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            derived = [a for a in inputs if a.requires_grad]
            if derived:
                outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                for t in derived + outputs:
                    if t.dim() >= 3:
                        self.shapes.append(tuple(int(s) for s in t.shape))
        return out


def _first_tensor(out: Any) -> torch.Tensor | None:
    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = _first_tensor(model(x))
    if y is None:
        raise ShapeMismatchError("the model returned no floating-point tensor")
    if y.dim() != x.dim() or tuple(y.shape[2:]) != tuple(x.shape[2:]) or y.shape[0] != x.shape[0]:
        raise ShapeMismatchError(
            f"the model returned shape {tuple(y.shape)} for the input of shape "
            f"{tuple(x.shape)}; its output must keep the input's spatial shape "
            f"{tuple(x.shape[2:])} (use padded convolutions)"
        )
    return y


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


# --------------------------------------------------------------------------------------
# Per-layer probing for tile dependence
# --------------------------------------------------------------------------------------


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


def _mixes_globally(
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
        out = _first_tensor(fn(*a, **k))
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
    """One size of :func:`_mixes_globally`; ``None`` if the layer rejects this size."""
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


def _innermost(names: Sequence[str]) -> list[str]:
    chosen = []
    for n in names:
        if n == "":
            if len(names) == 1:
                chosen.append(n)
            continue
        if not any(o != n and o.startswith(n + ".") for o in names):
            chosen.append(n)
    return chosen


def _type_name(m: torch.nn.Module) -> str:
    return str(getattr(m, "original_name", None) or type(m).__name__)


# --------------------------------------------------------------------------------------
# The prober
# --------------------------------------------------------------------------------------


class _Prober:
    """Runs the probes of :func:`receptive_field` on one model."""

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
        self.probe = _positive_probe(model, device, seed)
        self.mode = _ProbeMode(ndim)
        self._accepted: dict[tuple[int, ...], str | None] = {}
        self._culprits: tuple[Culprit, ...] | None = None
        self._leaves: dict[str, bool] | None = None
        self._width: tuple[int, ...] | None = None
        self._layer_inputs: (
            list[tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]] | None
        ) = None
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

    def _input(self, shape: Sequence[int], requires_grad: bool = False) -> torch.Tensor:
        # Small positive values: positive paths everywhere, no activation saturates.
        x = (
            torch.rand((1, self.in_channels, *shape), generator=self.gen, dtype=torch.float64) + 0.5
        ) * 0.01
        return x.to(self.device).requires_grad_(requires_grad)

    def accepts(self, shape: tuple[int, ...]) -> str | None:
        """``None`` if the model maps ``shape`` to ``shape``, else the reason it fails."""
        if shape not in self._accepted:
            try:
                with torch.no_grad():
                    _forward(self.probe, self._input(shape))
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
        runs = []
        for shape in shapes:
            self.mode.shapes = []
            self.mode.track = True
            try:
                with torch.enable_grad(), self.mode:
                    _forward(self.probe, self._input(shape, requires_grad=True))
            finally:
                self.mode.track = False
            runs.append([t for t in self.mode.shapes if len(t) == self.ndim + 2 and t[0] == 1])
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
        return tuple((s // 2 // p) * p for s, p in zip(shape, self.downsampling, strict=True))

    def supports(
        self, shape: tuple[int, ...], selections: Sequence[tuple[slice, ...]]
    ) -> list[np.ndarray]:
        """Input voxels in the TRF of each selection of output voxels (boolean maps)."""
        x = self._input(shape, requires_grad=True)
        out = []
        with torch.enable_grad(), self.mode:
            y = _forward(self.probe, x)
            for sel in selections:
                mask = torch.zeros_like(y)
                key = (slice(None), slice(None), *sel)
                mask[key] = 1.0
                (g,) = torch.autograd.grad(y, x, mask, retain_graph=True)
                out.append((g != 0).any(dim=1)[0].cpu().numpy())
        self.bar.update(1)
        return out

    def thin_shape(self, axis: int, length: int) -> tuple[int, ...]:
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
        p = self.downsampling[axis]
        return round_up(max(8 * p, 64, self.base[axis]), p)

    # -- culprits -----------------------------------------------------------------------

    def _layers(self) -> list[tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]]:
        """Every layer with an input it takes inside the network (probe weights, base shape)."""
        if self._layer_inputs is None:
            self.bar.set_description("receptive field: probing layers")
            if isinstance(self.probe, torch.jit.ScriptModule):
                self._layer_inputs = self._script_layer_inputs()
            else:
                self._layer_inputs = self._module_layer_inputs()
        return self._layer_inputs

    def _module_layer_inputs(
        self,
    ) -> list[tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]]:
        captured: dict[str, tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]] = {}
        handles = []

        def clone(v: Any) -> Any:
            return v.detach().clone() if isinstance(v, torch.Tensor) else v

        def hook(name: str) -> Callable[..., None]:
            def fn(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if name not in captured:
                    leaves, spec = tree_flatten((args, kwargs))
                    a, k = tree_unflatten([clone(v) for v in leaves], spec)
                    captured[name] = (module, a, k)

            return fn

        for name, module in self.probe.named_modules():
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
        try:
            with torch.no_grad():
                _forward(self.probe, self._input(self.base))
        finally:
            for h in handles:
                h.remove()
        return [(n, m, a, k) for n, (m, a, k) in captured.items()]

    def _script_layer_inputs(
        self,
    ) -> list[tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]]:
        # TorchScript modules take no hooks: feed each sub-module the feature-map
        # shapes seen inside the network until one fits.
        self.mode.shapes = []
        self.mode.track = True
        try:
            with torch.enable_grad(), self.mode:
                _forward(self.probe, self._input(self.base, requires_grad=True))
        finally:
            self.mode.track = False
        candidates = list(dict.fromkeys(self.mode.shapes))
        found: list[tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]] = []
        with torch.no_grad(), warnings.catch_warnings():
            # Sub-modules fed shapes meant for others may warn (e.g. num_features).
            warnings.simplefilter("ignore")
            for name, module in self.probe.named_modules():
                for shape in candidates:
                    t = torch.rand(shape, generator=self.gen, dtype=torch.float64)
                    t = (t * 0.01 + 0.005).to(self.device)
                    try:
                        out = _first_tensor(module(t.clone()))
                    except Exception:
                        continue
                    if out is not None:
                        found.append((name, module, (t,), {}))
                        break
        return found

    def _leaf_verdicts(self) -> dict[str, bool]:
        if self._leaves is None:
            self._leaves = {}
            with torch.no_grad():
                for name, module, a, k in self._layers():
                    if next(module.children(), None) is None:
                        self._leaves[name] = _mixes_globally(module, a, k, self.ndim)
        return self._leaves

    def leaf_culprits(self) -> bool:
        """Whether some layer without sub-layers mixes its whole input (cheap, reliable)."""
        return any(self._leaf_verdicts().values())

    def culprits(self) -> tuple[Culprit, ...]:
        """The innermost layers that mix their whole input.

        Leaves are probed first; a block of layers is probed only if none of its
        sub-layers is global (otherwise it cannot be innermost), on enlarged inputs
        too, since a block of local layers can reach across a small input while a
        global one reaches across any size.
        """
        if self._culprits is not None:
            return self._culprits
        layers = {name: (m, a, k) for name, m, a, k in self._layers()}
        verdict = dict(self._leaf_verdicts())
        # Deepest blocks first, so that their verdicts are known before their parents'.
        blocks = sorted(
            (n for n in layers if n not in verdict), key=lambda n: -n.count(".") - (n != "")
        )
        with torch.no_grad():
            for n in blocks:
                inner = [o for o in verdict if n == "" or o.startswith(n + ".")]
                if any(verdict[o] for o in inner):
                    verdict[n] = True
                    continue
                m, a, k = layers[n]
                verdict[n] = _mixes_globally(
                    m, a, k, self.ndim, sizes=(16, 32, 64), max_elements=2**20
                )
        chosen = _innermost([n for n, v in verdict.items() if v])
        self._culprits = tuple(Culprit(n or "(model)", _type_name(layers[n][0])) for n in chosen)
        return self._culprits

    # -- TRF per axis -----------------------------------------------------------------

    def axis_trf(self, axis: int, known_global: bool = False) -> tuple[int, int] | None:
        """(before, after) along ``axis``, max over the alignment cell; ``None`` if global.

        The probe grows until the extent is the same at two sizes without touching
        the border. It is global when it covers the whole probe at two sizes and some
        layer mixes its whole input (or ``known_global``: the model was already found
        tile-dependent and this is the statistics-frozen pass).
        """
        name = axis_names(self.ndim)[axis]
        what = "local TRF" if known_global else "TRF"
        self.bar.set_description(f"receptive field: {what} along {name}")
        p = self.downsampling[axis]
        length = self.base[axis] if self.fixed else self.start_length(axis)
        previous: tuple[int, int] | None = None
        previous_whole = False
        while True:
            shape = self.thin_shape(axis, length)
            error = self.accepts(shape)
            if error is not None:
                if previous is None and not self.fixed:
                    # The model only takes its base shape (e.g. a position embedding).
                    self.fixed = True
                    length = self.base[axis]
                    continue
                raise ReceptiveFieldError(
                    f"the model rejects the probe shape {shape} needed along axis {name}: {error}"
                )
            cell = self.cell_start(shape)
            union = tuple(slice(c, c + q) for c, q in zip(cell, self.downsampling, strict=True))
            (sup,) = self.supports(shape, [union])
            lo, hi = _extent(sup, axis)
            whole = bool(sup.all())
            ext = (cell[axis] - lo, hi - (cell[axis] + p - 1))
            touching = lo == 0 or hi == shape[axis] - 1
            if not touching and (ext == previous or self.fixed):
                break
            if self.fixed:
                # One size only: the whole tile is global only if some layer makes it so.
                if known_global or self.culprits():
                    return None
                raise ReceptiveFieldError(
                    f"the TRF along axis {name} reaches the border of the probe shape "
                    f"{shape}; give a larger shape"
                )
            # Whole at two sizes: the TRF grows with the tile.
            # (The statistics-frozen pass has no such shortcut: it may be local but large.)
            if whole and previous_whole and not known_global and self.leaf_culprits():
                return None
            if math.prod(self.thin_shape(axis, 2 * length)) > self.max_voxels:
                if whole or known_global or self.leaf_culprits():
                    return None
                raise ReceptiveFieldError(
                    f"the TRF along axis {name} reaches beyond the largest probe "
                    f"({shape[axis]} voxels, shape {shape}); raise max_voxels"
                )
            previous, previous_whole = ext, whole
            length *= 2
        # Exact extents per output offset inside the cell (one backward pass each).
        selections = []
        for t in range(p):
            sel = list(union)
            sel[axis] = slice(cell[axis] + t, cell[axis] + t + 1)
            selections.append(tuple(sel))
        before = after = 0
        for t, sup in enumerate(self.supports(shape, selections)):
            lo, hi = _extent(sup, axis)
            before = max(before, cell[axis] + t - lo)
            after = max(after, hi - (cell[axis] + t))
        return before, after

    def check_full(self, before: tuple[int, ...], after: tuple[int, ...]) -> bool | None:
        """Compare the thin-probe TRF with a full probe: True, False, or None if too large."""
        shape = self.full_shape(before, after)
        if math.prod(shape) > self.max_voxels or self.accepts(shape) is not None:
            return None
        self.bar.set_description("receptive field: full check")
        cell = self.cell_start(shape)
        union = tuple(slice(c, c + q) for c, q in zip(cell, self.downsampling, strict=True))
        (sup,) = self.supports(shape, [union])
        for d in range(self.ndim):
            lo, hi = _extent(sup, d)
            p = self.downsampling[d]
            # The union over the cell reaches exactly as far as the farthest slab does.
            if cell[d] - lo > before[d] or hi - (cell[d] + p - 1) > after[d]:
                return False
        return True

    def full_shape(self, before: Sequence[int], after: Sequence[int]) -> tuple[int, ...]:
        if self.fixed:
            return self.base
        # The cell at the centre with its TRF inside and a margin of one cell.
        return tuple(
            round_up(max(2 * max(b, a) + 3 * p + 2, 4 * p), p)
            for b, a, p in zip(before, after, self.downsampling, strict=True)
        )

    # -- alignment ----------------------------------------------------------------------

    def alignment(self, axis: int, before: int, after: int) -> int | None:
        """Smallest shift along ``axis`` that shifts the output exactly, or ``None``."""
        name = axis_names(self.ndim)[axis]
        self.bar.set_description(f"receptive field: alignment along {name}")
        p = self.downsampling[axis]
        if self.fixed:
            shape = self.base
        else:
            length = round_up(max(before + after + 2 * p + 2, 4 * p, 32), p)
            shape = self.thin_shape(axis, length)
        n = shape[axis]
        big = list(shape)
        big[axis] += p
        source = self._input(big)
        with torch.no_grad(), self.mode:
            key0 = [slice(None)] * (self.ndim + 2)
            key0[2 + axis] = slice(0, n)
            y0 = _forward(self.probe, source[tuple(key0)])
            scale = float(y0.abs().max()) + 1e-300
            for s in (q for q in range(1, p + 1) if p % q == 0):
                key = list(key0)
                key[2 + axis] = slice(s, s + n)
                ys = _forward(self.probe, source[tuple(key)])
                lo, hi = before, n - 1 - after - s
                if hi < lo:
                    break
                a = [slice(None)] * (self.ndim + 2)
                b = list(a)
                a[2 + axis] = slice(lo + s, hi + s + 1)
                b[2 + axis] = slice(lo, hi + 1)
                diff = float((y0[tuple(a)] - ys[tuple(b)]).abs().max())
                self.bar.update(1)
                if diff <= 1e-9 * scale:
                    return s
        return None


def _extent(support: np.ndarray, axis: int) -> tuple[int, int]:
    others = tuple(a for a in range(support.ndim) if a != axis)
    along = support.any(axis=others) if others else support
    idx = np.nonzero(along)[0]
    if idx.size == 0:
        raise ReceptiveFieldError(
            "the probe's output does not depend on its input at all (is the model constant?)"
        )
    return int(idx[0]), int(idx[-1])


def _erf(
    model: torch.nn.Module,
    ndim: int,
    in_channels: int,
    shape: tuple[int, ...],
    device: torch.device,
    samples: int,
    seed: int,
    frozen: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """Mean |gradient| of the centre output voxel over random inputs.

    With ``frozen``, also the map with the per-tile statistics held constant (a second
    backward pass through the same forward pass).
    """
    mode = _ProbeMode(ndim, dense=False)
    mode.freeze_backward = True
    dtype = torch.float32
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            dtype = t.dtype
            break
    center = tuple(s // 2 for s in shape)
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(shape, dtype=torch.float64)
    acc_frozen = torch.zeros(shape, dtype=torch.float64)
    key: tuple[Any, ...] = (0, slice(None), *center)
    with _eval_mode(model), torch.enable_grad():
        for _ in range(samples):
            x = torch.randn((1, in_channels, *shape), generator=gen).to(device, dtype)
            x.requires_grad_(True)
            out = _forward(model, x)[key].sum()
            # inputs=[x] only: the model's own .grad fields stay untouched.
            (g,) = torch.autograd.grad(out, [x], retain_graph=frozen)
            acc += g.detach().abs().sum(dim=1)[0].to("cpu", torch.float64)
            if frozen:
                with mode:
                    (g,) = torch.autograd.grad(out, [x])
                acc_frozen += g.detach().abs().sum(dim=1)[0].to("cpu", torch.float64)
    plain = (acc / samples).numpy()
    return plain, (acc_frozen / samples).numpy() if frozen else None, center


def receptive_field(
    model: torch.nn.Module | _HasModule,
    ndim: int,
    in_channels: int = 1,
    *,
    shape: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    erf_samples: int = 2,
    erf_shape: int | Sequence[int] | None = None,
    max_voxels: int = 2**18,
    seed: int = 0,
    progress: bool = False,
) -> ReceptiveField:
    """Measure the receptive field of a model: TRF, alignment, tile dependence and ERF.

    See the module docstring for how each quantity is measured. The model itself is
    not changed: the TRF, alignment and tile dependence are probed on a copy, the ERF
    on the model in eval mode (its train/eval flags are restored afterwards).

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` (including a TorchScript module) mapping
        ``(N, in_channels, *spatial)`` to ``(N, C_out, *spatial)``, or the result of
        :func:`nahtlos.nets.checkpoint.load_model`.
    ndim
        Number of spatial axes (2 or 3).
    in_channels
        Input channels.
    shape
        Probe input shape, for models that accept a single input size (e.g. UNETR's
        ``img_size``). By default nahtlos picks probe sizes itself and grows them
        until the TRF fits.
    device
        Where to run the probes; default the model's device.
    erf_samples
        Random inputs the ERF is averaged over.
    erf_shape
        Input shape for the ERF; default large enough to hold the whole TRF (for
        tile-dependent models 128 per axis in 2D, 64 in 3D, or ``shape``).
    max_voxels
        Largest probe (in voxels) for the float64 TRF probes; bounds memory.
    seed
        Seed of the random probe weights and inputs.
    progress
        Show a progress bar.

    Returns
    -------
    ReceptiveField

    Raises
    ------
    ShapeMismatchError
        If the model's output does not keep the input's spatial shape.
    ReceptiveFieldError
        If the model rejects every probe shape, or its TRF exceeds ``max_voxels``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
    >>> rf = receptive_field(net, ndim=2)
    >>> rf.trf_radius, rf.alignment, rf.tile_dependent
    ((3, 3), (1, 1), False)
    """
    module = model if isinstance(model, torch.nn.Module) else model.module
    if ndim < 1:
        raise ValueError(f"ndim must be at least 1, got {ndim}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if device is None:
        dev = next(
            (t.device for t in list(module.parameters()) + list(module.buffers())),
            torch.device("cpu"),
        )
    else:
        dev = torch.device(device)
    probe_shape = None if shape is None else as_per_axis(shape, ndim, "shape")
    bar = tqdm(desc="receptive field", unit="probe", disable=not progress, leave=False)
    try:
        prober = _Prober(module, ndim, in_channels, probe_shape, dev, max_voxels, seed, bar)
        extents: list[tuple[int, int]] = []
        tile_dependent = False
        for d in range(ndim):
            ext = prober.axis_trf(d)
            if ext is None:
                tile_dependent = True
                break
            extents.append(ext)
        verified = False
        before = after = local_before = local_after = None
        culprits: tuple[Culprit, ...] = ()
        if tile_dependent:
            culprits = prober.culprits()
            # What a halo can still capture: the TRF with the tile statistics frozen.
            prober.mode.freeze_forward = prober.mode.freeze_backward = True
            local = [prober.axis_trf(d, known_global=True) for d in range(ndim)]
            if all(e is not None for e in local):
                local_before = tuple(e[0] for e in local if e is not None)
                local_after = tuple(e[1] for e in local if e is not None)
        else:
            before = tuple(e[0] for e in extents)
            after = tuple(e[1] for e in extents)
            check = prober.check_full(before, after)
            if check is False:
                raise ReceptiveFieldError(
                    "the per-axis TRF probes disagree with the full probe: the model's "
                    "layers do not act on boxes of voxels; please report this model"
                )
            verified = check is True
        reach_before = before if before is not None else local_before
        reach_after = after if after is not None else local_after
        equivariant: bool | None = None
        alignment = prober.downsampling
        if reach_before is not None and reach_after is not None:
            aligned = [prober.alignment(d, reach_before[d], reach_after[d]) for d in range(ndim)]
            equivariant = all(a is not None for a in aligned)
            alignment = tuple(
                a if a is not None else p for a, p in zip(aligned, prober.downsampling, strict=True)
            )
        prober.mode.freeze_forward = prober.mode.freeze_backward = False
        bar.set_description("receptive field: ERF")
        if erf_shape is not None:
            e_shape = as_per_axis(erf_shape, ndim, "erf_shape")
        elif prober.fixed:
            e_shape = prober.base
        elif reach_before is not None and reach_after is not None:
            # The centre voxel with its whole TRF: the ERF's mass is all inside.
            e_shape = tuple(
                round_up(2 * max(b, a) + 2, p)
                for b, a, p in zip(reach_before, reach_after, prober.downsampling, strict=True)
            )
        else:
            default = 128 if ndim <= 2 else 64
            e_shape = tuple(round_up(max(default, 4 * p), p) for p in prober.downsampling)
        erf_dev = next((t.device for t in list(module.parameters()) + list(module.buffers())), dev)
        erf, erf_local, center = _erf(
            module, ndim, in_channels, e_shape, erf_dev, erf_samples, seed, frozen=tile_dependent
        )
        bar.update(1)
    finally:
        bar.close()
    rf = ReceptiveField(
        ndim=ndim,
        in_channels=in_channels,
        trf_before=before,
        trf_after=after,
        alignment=tuple(int(a) for a in alignment),
        downsampling=prober.downsampling,
        shift_equivariant=equivariant,
        tile_dependent=tile_dependent,
        culprits=culprits,
        erf=erf.astype(np.float32),
        erf_center=center,
        verified=verified,
        local_trf_before=local_before,
        local_trf_after=local_after,
        erf_local=None if erf_local is None else erf_local.astype(np.float32),
    )
    if rf.shift_equivariant:
        if rf.trf_before is not None and rf.trf_after is not None:
            _check_inside(rf, rf.erf, rf.trf_before, rf.trf_after, "TRF")
        elif rf.erf_local is not None and rf.local_trf_before and rf.local_trf_after:
            _check_inside(rf, rf.erf_local, rf.local_trf_before, rf.local_trf_after, "local TRF")
    return rf


def _check_inside(
    rf: ReceptiveField,
    erf: np.ndarray,
    before: Sequence[int],
    after: Sequence[int],
    what: str,
) -> None:
    """The real model's gradient must vanish outside the TRF; anything else is a bug."""
    support = erf > 0
    if not support.any():
        return
    for d in range(rf.ndim):
        lo, hi = _extent(support, d)
        c = rf.erf_center[d]
        if c - lo > before[d] or hi - c > after[d]:
            raise ReceptiveFieldError(
                f"the model's gradient reaches {c - lo} voxels before / {hi - c} after the "
                f"centre along axis {rf.axes[d]}, beyond the measured {what} "
                f"({before[d]} / {after[d]}); please report this model"
            )


# --------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------


def _box(
    ax: Any,
    center: Sequence[int],
    ay: int,
    ax_: int,
    before: Sequence[int],
    after: Sequence[int],
    **style: Any,
) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle(
            (center[ax_] - before[ax_] - 0.5, center[ay] - before[ay] - 0.5),
            before[ax_] + after[ax_] + 1,
            before[ay] + after[ay] + 1,
            fill=False,
            **style,
        )
    )


def plot_receptive_field(
    rf: ReceptiveField,
    path: str | Path,
    *,
    mass: float = 0.99,
    title: str | None = None,
) -> Path:
    """Save :func:`receptive_field_figure` to ``path``.

    Returns
    -------
    Path
        The written image (any format matplotlib knows from the suffix).
    """
    path = Path(path)
    receptive_field_figure(rf, mass=mass, title=title).savefig(path, dpi=120)
    return path


def receptive_field_figure(
    rf: ReceptiveField, *, mass: float = 0.99, title: str | None = None
) -> Any:
    """Draw the ERF gradient map (log scale) with the TRF box and ERF contours.

    Like the paper's Fig. 4: the mean absolute gradient of the centre output voxel
    w.r.t. the input on a log colour scale; the TRF as a box (the whole tile, in red,
    for tile-dependent models, with the local TRF dashed); contours holding 90, 99
    and 99.9 % of the gradient mass (of the statistics-frozen ERF for tile-dependent
    models: the part a halo can capture), drawn on a slightly smoothed map so that
    they read as regions; and the recommended halo. 3D fields show the central
    slices through the centre voxel.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not attached to pyplot, so nothing to close).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from scipy.ndimage import gaussian_filter

    if rf.ndim not in (2, 3):
        raise ValueError(f"plotting supports 2D and 3D receptive fields, not {rf.ndim}D")
    erf = rf.erf.astype(np.float64)
    halo_erf = (rf.erf_local if rf.erf_local is not None else rf.erf).astype(np.float64)
    smooth = gaussian_filter(halo_erf, 1.0)
    levels = erf_levels(smooth)
    c = rf.erf_center
    names = rf.axes

    def cut(a: np.ndarray, drop: int) -> np.ndarray:
        return a if rf.ndim == 2 else np.take(a, c[drop], axis=drop)

    # (row axis, column axis, dropped axis) of each panel
    views = [(0, 1, -1)] if rf.ndim == 2 else [(1, 2, 0), (0, 2, 1)]
    positive = erf[erf > 0]
    vmax = float(erf.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else 1e-12, vmax * 1e-12)
    fig = Figure(figsize=(5.0 * len(views) + 1.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    halo = rf.halo(mass)
    contour_colors = ("#18ffff", "#448aff", "#e040fb")
    image = None
    for k, (ay, ax_, drop) in enumerate(views):
        ax = fig.add_subplot(1, len(views), k + 1)
        image = ax.imshow(
            np.clip(cut(erf, drop), vmin, None),
            norm=LogNorm(vmin=vmin, vmax=vmax),
            cmap="magma",
            interpolation="nearest",
        )
        plane = cut(smooth, drop)
        lv = sorted(zip(levels, contour_colors, strict=True))
        if positive.size and len({v for v, _ in lv}) == len(lv):
            ax.contour(
                plane, levels=[v for v, _ in lv], colors=[col for _, col in lv], linewidths=1.2
            )

        if rf.trf_before is not None and rf.trf_after is not None:
            _box(ax, c, ay, ax_, rf.trf_before, rf.trf_after, edgecolor="#00e676", linewidth=2.2)
        else:
            h, w = plane.shape
            ax.add_patch(
                Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="#ff1744", linewidth=5)
            )
            if rf.local_trf_before is not None and rf.local_trf_after is not None:
                _box(
                    ax,
                    c,
                    ay,
                    ax_,
                    rf.local_trf_before,
                    rf.local_trf_after,
                    edgecolor="#00e676",
                    linewidth=1.6,
                    linestyle=":",
                )
        _box(ax, c, ay, ax_, halo, halo, edgecolor="#ffd600", linewidth=1.4, linestyle="--")
        ax.plot([c[ax_]], [c[ay]], marker="+", color="#00e5ff", markersize=10)
        ax.set_xlabel(f"{names[ax_]} (voxels)")
        ax.set_ylabel(f"{names[ay]} (voxels)")
        if rf.ndim == 3:
            ax.set_title(f"central slice {names[drop]} = {c[drop]}", fontsize=9)

    def csv(v: Sequence[int]) -> str:
        return ",".join(str(int(x)) for x in v)

    handles = []
    if rf.trf_radius is not None:
        handles.append(
            Line2D([], [], color="#00e676", lw=2.2, label=f"TRF, radius {csv(rf.trf_radius)}")
        )
    else:
        handles.append(Line2D([], [], color="#ff1744", lw=4, label="TRF = whole tile"))
        if rf.local_trf_radius is not None:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="#00e676",
                    lw=1.6,
                    ls=":",
                    label=f"TRF with tile statistics frozen, radius {csv(rf.local_trf_radius)}",
                )
            )
    handles.append(
        Line2D([], [], color="#ffd600", lw=1.4, ls="--", label=f"recommended halo {csv(halo)}")
    )
    which = "ERF" if rf.erf_local is None else "ERF (statistics frozen)"
    for m, col in zip(MASSES, contour_colors, strict=True):
        handles.append(
            Line2D(
                [],
                [],
                color=col,
                lw=1.2,
                label=f"{which} {m * 100:g}%, radius {csv(rf.erf_radius(m))}",
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="|∂ centre output / ∂ input|")
    if title is None:
        if rf.tile_dependent:
            kinds = ", ".join(sorted({x.type for x in rf.culprits})) or "unknown layers"
            state = f"tile-dependent ({kinds})"
        else:
            state = "tile-independent"
        title = f"Receptive field: {state}, alignment {csv(rf.alignment)}"
    fig.suptitle(title, fontsize=10)
    return fig
