"""Structural backward passes: gradients that reach every voxel a layer depends on.

Two backward passes send zeros that depend on values, not on the computation graph:
max pooling sends its gradient only to the arg-max, and ReLU, ReLU6/Hardtanh,
Hardsigmoid and Hardswish have zero derivative on part of their domain (a dead ReLU).
For the TRF probe they are replaced: max pooling's by the backward of a *sum* over
the pooling window (a transposed convolution with a kernel of ones), the
activations' by passing the gradient through unchanged. :data:`DENSE_BACKWARD` maps
each aten op to its replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DENSE_BACKWARD"]

_aten = torch.ops.aten


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


# Backward ops whose zeros depend on values (arg-max, dead activations) -> structural.
DENSE_BACKWARD: dict[Any, Callable[..., Any]] = {
    _aten.max_pool2d_with_indices_backward: _max_pool_backward(2),
    _aten.max_pool3d_with_indices_backward: _max_pool_backward(3),
    _aten.adaptive_max_pool2d_backward: _adaptive_avg_backward(2),
    _aten.adaptive_max_pool3d_backward: _adaptive_avg_backward(3),
    _aten.threshold_backward: _pass_through,
    _aten.hardtanh_backward: _pass_through,
    _aten.hardsigmoid_backward: _pass_through,
    _aten.hardswish_backward: _pass_through,
}
