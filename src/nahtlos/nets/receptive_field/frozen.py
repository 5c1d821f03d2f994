"""Per-tile normalization with its statistics held constant, forward and backward.

InstanceNorm, GroupNorm, LayerNorm and BatchNorm in training mode normalize with
statistics of the tile itself, which makes every output depend on the whole tile.
Holding those statistics constant leaves the part of the dependence a halo can
capture (the local TRF and ERF of tile-dependent models). :data:`FROZEN_FORWARD`
replaces the statistics by 0 and 1 in the forward pass (the TRF probe);
:data:`FROZEN_BACKWARD` treats the statistics computed in the forward pass as
constants in the backward pass (the ERF of the real model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["FROZEN_BACKWARD", "FROZEN_FORWARD"]

_aten = torch.ops.aten


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_except_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def _affine(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shape: Sequence[int] | None,
) -> torch.Tensor:
    """``x * weight + bias``, either optional, reshaped to ``shape`` if given."""
    out = x.clone()
    if weight is not None:
        out = out * (weight if shape is None else weight.reshape(shape))
    if bias is not None:
        out = out + (bias if shape is None else bias.reshape(shape))
    return out


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


# -- forward: the statistics become 0 and 1 ------------------------------------------


def _frozen_batch_norm(
    func: Any,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *rest: Any,
) -> Any:
    """Training-mode (per-batch or per-tile) normalization with constant statistics 0 and 1.

    ``rest`` is ``running_mean, running_var, training, momentum, eps``.
    """
    _, _, training, _, _ = rest
    if not training:  # running statistics: constant already
        return func(input, weight, bias, *rest)
    c = input.shape[1]
    return (
        _affine(input, weight, bias, _channel_shape(input)),
        input.new_zeros(c),
        input.new_ones(c),
    )


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
    stats = (n, group)
    out = _affine(input, weight, bias, _channel_shape(input))
    return out, input.new_zeros(stats), input.new_ones(stats)


def _frozen_layer_norm(
    func: Any,
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> Any:
    stats = (*input.shape[: input.dim() - len(normalized_shape)], *([1] * len(normalized_shape)))
    return _affine(input, weight, bias, None), input.new_zeros(stats), input.new_ones(stats)


# -- backward: the statistics of the forward pass are constants --------------------


def _frozen_batch_norm_backward(
    func: Any,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    *rest: Any,
) -> Any:
    """BatchNorm/InstanceNorm backward with the batch (tile) statistics held constant.

    ``rest`` is ``running_mean, running_var, save_mean, save_invstd, train, eps,
    output_mask``.
    """
    _, _, save_mean, save_invstd, train, _, output_mask = rest
    if not train or save_mean is None or save_invstd is None:
        return func(grad_out, input, weight, *rest)
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


# Normalization with per-tile statistics: the statistics become constants.
FROZEN_FORWARD: dict[Any, Callable[..., Any]] = {
    _aten.native_batch_norm: _frozen_batch_norm,
    _aten.native_group_norm: _frozen_group_norm,
    _aten.native_layer_norm: _frozen_layer_norm,
}
FROZEN_BACKWARD: dict[Any, Callable[..., Any]] = {
    _aten.native_batch_norm_backward: _frozen_batch_norm_backward,
    _aten.native_group_norm_backward: _frozen_group_norm_backward,
    _aten.native_layer_norm_backward: _frozen_layer_norm_backward,
}
