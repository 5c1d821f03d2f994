"""The probe model: a positive float64 copy of a model, and the dispatch mode it runs under.

The TRF is read off the support (the non-zero entries) of the gradient of output
voxels with respect to the input, computed on a *probe*: a float64 copy of the model
whose parameters are random positive numbers (weights scaled by ``1/fan_in``), whose
running means are 0 and running variances 1, fed with a small positive input. Then
every linear map has positive coefficients, so contributions of different paths never
cancel, and activations stay in the near-zero range where no activation saturates.
float64 keeps the tails of the gradient (products of ~1/fan_in over dozens of layers)
above underflow. The value-dependent zeros that remain are removed by
:class:`ProbeMode` (see :mod:`.structural` and :mod:`.frozen`).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ...errors import ShapeMismatchError
from ..dispatch import ObservingMode
from .frozen import FROZEN_BACKWARD, FROZEN_FORWARD
from .structural import DENSE_BACKWARD

__all__ = ["ProbeMode", "checked_forward", "eval_mode", "first_tensor", "positive_probe"]


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(module, buffer)
            buffer.seek(0)
            return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(module)


def positive_probe(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
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


class ProbeMode(ObservingMode):
    """Rewrites ops for the probes and records feature shapes.

    ``dense``: structural backward of max pooling and activations. ``freeze_forward``
    / ``freeze_backward``: normalization statistics computed from the tile itself
    (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in training mode) are replaced by
    constants in the forward pass / treated as constants in the backward pass, which
    leaves the part of the dependence that a halo can capture. ``track``: the shapes
    of tensors computed from the probe input are appended to ``shapes``.
    """

    def __init__(self, ndim: int, dense: bool = True) -> None:
        super().__init__()
        self.ndim = ndim
        self.dense = dense
        self.freeze_forward = False
        self.freeze_backward = False
        self.track = False
        self.shapes: list[tuple[int, ...]] = []

    def rewrite(self, func: Any) -> Callable[..., Any] | None:
        packet = func.overloadpacket
        replacement = None
        if self.dense:
            replacement = DENSE_BACKWARD.get(packet)
        if replacement is None and self.freeze_backward:
            replacement = FROZEN_BACKWARD.get(packet)
        if replacement is None and self.freeze_forward:
            replacement = FROZEN_FORWARD.get(packet)
        return replacement

    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not self.track:
            return
        # requires_grad marks tensors computed from the probe input (parameters don't);
        # outputs count too, for results no later op consumes.
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        derived = [a for a in inputs if a.requires_grad]
        if derived:
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            for t in derived + outputs:
                if t.dim() >= 3:
                    self.shapes.append(tuple(int(s) for s in t.shape))


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a model's output (a tensor, tuple, dict, ...)."""
    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


def checked_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output for ``x``, which must keep the batch and spatial shape.

    Raises
    ------
    ShapeMismatchError
        If the model returns no floating-point tensor or changes the shape.
    """
    y = first_tensor(model(x))
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
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode; every sub-module's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
