"""Swap the normalization layers of any PyTorch model (:func:`convert_norms`).

BatchNorm ↔ BatchRenorm conversion keeps affine parameters and running statistics, so
eval outputs are unchanged; InstanceNorm/GroupNorm → BatchRenorm gives a starting point
for fine-tuning a seamless network.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import NahtlosWarning, NormError
from .norms import _BATCH, _INSTANCE, _RUNNING_KINDS, _BatchRenorm, check_norm_name, make_norm

__all__ = ["convert_norms"]


def _source_kind(module: nn.Module) -> tuple[str, int | None] | None:
    """``(kind, ndim)`` of a convertible norm layer (ndim None: any), else None."""
    if isinstance(module, _BatchRenorm):
        return "batchrenorm", module._ndim
    for ndim, cls in _BATCH.items():
        if type(module) is cls:
            return "batch", ndim
    if isinstance(module, nn.SyncBatchNorm):
        return "batch", None
    for ndim, cls in _INSTANCE.items():
        if type(module) is cls:
            running = bool(module.track_running_stats)
            return ("instance_running" if running else "instance"), ndim
    if type(module) is nn.GroupNorm:
        return "group", None
    return None


def _conv_ndim(model: nn.Module) -> int | None:
    dims = {len(m.kernel_size) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    return dims.pop() if len(dims) == 1 else None


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _convert_layer(
    module: nn.Module, kind: str, ndim: int | None, to: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, bool]:
    """The ``to`` layer replacing ``module``, and whether its running stats are fresh."""
    if to == "identity":
        return nn.Identity(), False
    if ndim is None:
        raise NormError(
            f"cannot tell whether the {type(module).__name__} layers are 1D, 2D or 3D "
            f"(the model's convolutions do not say); pass ndim=1, 2 or 3"
        )
    num_features = int(getattr(module, "num_features", getattr(module, "num_channels", 0)))
    opts: dict[str, Any] = {"eps": module.eps, "affine": bool(module.affine)}
    if isinstance(module, _BatchRenorm) and to == "batchrenorm":
        opts.update(momentum=module.momentum, r_max=module.r_max, d_max=module.d_max)
    if to == "group" and kind == "group":
        opts["num_groups"] = module.num_groups
    opts.update(kwargs)
    new = make_norm(to, num_features, ndim, **opts)
    # Floating-point tensors only: num_batches_tracked is int64.
    ref = next(
        (t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None
    )
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(module.training)
    if isinstance(module, _BatchRenorm) and isinstance(new, _BatchRenorm):
        new.freeze_statistics = module.freeze_statistics
    fresh = False
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = _tensor(module, name), _tensor(new, name)
            if src is not None and dst is not None:
                dst.copy_(src)
        dst_mean, dst_var = _tensor(new, "running_mean"), _tensor(new, "running_var")
        src_mean, src_var = _tensor(module, "running_mean"), _tensor(module, "running_var")
        if dst_mean is not None and dst_var is not None:
            if src_mean is not None and src_var is not None:
                dst_mean.copy_(src_mean)
                dst_var.copy_(src_var)
                src_n, dst_n = (_tensor(m, "num_batches_tracked") for m in (module, new))
                if src_n is not None and dst_n is not None:
                    dst_n.copy_(src_n)
            else:
                fresh = True
    return new, fresh


def convert_norms(
    model: nn.Module, to: str, *, ndim: int | None = None, **kwargs: Any
) -> nn.Module:
    """Swap every BatchNorm, InstanceNorm, GroupNorm and BatchRenorm layer for kind ``to``.

    Works on any ``nn.Module`` tree (MONAI ``UNet``/``UNETR``/``BasicUNet``,
    ``nn.Sequential``, nnU-Net-style networks), in place; returns ``model`` (or the new
    layer when ``model`` itself is a norm layer). Each new layer keeps the old one's
    channels, ``eps`` and ``affine`` (unless given in ``kwargs``), its affine parameters,
    device, dtype and train/eval mode, and, where both have them, the running statistics
    (BatchNorm, InstanceNorm with running stats, BatchRenorm). BatchNorm ↔ BatchRenorm
    conversion therefore leaves eval outputs bit-for-bit unchanged. Layers shared by
    several parents stay shared; layers already of kind ``to`` are kept unless ``kwargs``
    ask for changes.

    Parameters
    ----------
    model
        A Python model. TorchScript modules cannot be converted (their graphs are
        compiled): convert the Python model, then script or trace it.
    to
        A name of :data:`NORM_NAMES`. ``identity`` drops the affine parameters too.
    ndim
        Spatial dimensions for GroupNorm/SyncBatchNorm sources, which do not know them;
        by default taken from the model's convolutions.
    **kwargs
        Options of the new layers (``momentum``, ``r_max``, ``d_max``, ``affine``, ...),
        as for :func:`make_norm`. The momentum defaults to the new kind's own (0.01 for
        BatchRenorm, 0.1 for BatchNorm).

    Warns
    -----
    NahtlosWarning
        When layers that use running statistics in eval mode (``batch``,
        ``instance_running``, ``batchrenorm``) replace layers that had none: their
        statistics start at mean 0, variance 1, so train (a BatchNorm warm-up) before
        predicting in eval mode.
    """
    check_norm_name(to)
    if isinstance(model, torch.jit.ScriptModule):
        raise NormError(
            "cannot convert the norm layers of a TorchScript module: its graph is compiled. "
            "Build the Python model, load the weights (scripted.state_dict() loads into it), "
            "call convert_norms on it, and script or trace the result again"
        )
    if ndim is not None and ndim not in (1, 2, 3):
        raise NormError(f"ndim must be 1, 2 or 3, got {ndim}")
    default_ndim = ndim if ndim is not None else _conv_ndim(model)
    done: dict[int, nn.Module] = {}
    fresh = 0

    def converted(module: nn.Module) -> nn.Module | None:
        nonlocal fresh
        if id(module) in done:
            return done[id(module)]
        found = _source_kind(module)
        if found is None:
            return None
        kind, layer_ndim = found
        if kind == to and not kwargs:
            new: nn.Module = module
        else:
            new, is_fresh = _convert_layer(
                module, kind, layer_ndim or default_ndim, to, dict(kwargs)
            )
            fresh += is_fresh
        done[id(module)] = new
        return new

    root = converted(model)
    if root is not None:
        model = root
    else:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                new = converted(child)
                if new is not None and new is not child:
                    setattr(parent, child_name, new)
    if fresh and to in _RUNNING_KINDS:
        warnings.warn(
            f"{fresh} {to} layer(s) replaced layers without running statistics and start at "
            f"mean 0, variance 1: train (a BatchNorm warm-up) before predicting in eval mode",
            NahtlosWarning,
            stacklevel=2,
        )
    return model
