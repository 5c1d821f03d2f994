"""What a model's normalization layers are, read from the module tree.

:func:`normalization_layers` groups them by type with where their statistics come
from; :func:`mode_frozen` tells whether ``torch.jit.trace`` froze their train/eval
mode. Both work for TorchScript modules too. Whether the layers make predictions
depend on the tile is measured, not read here (:mod:`nahtlos.nets.receptive_field`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "BATCH",
    "GLOBAL",
    "TILEWISE",
    "describe_layers",
    "mode_frozen",
    "normalization_layers",
    "type_name",
]

TILEWISE = "statistics of each tile (tile-wise)"
BATCH = "batch statistics in train mode, running statistics in eval mode"
GLOBAL = "running statistics in train and eval mode (global)"


def type_name(m: torch.nn.Module) -> str:
    """The class name of a module, also for TorchScript submodules."""
    # TorchScript submodules are RecursiveScriptModule; the class survives as original_name
    return str(getattr(m, "original_name", type(m).__name__))


def _statistics(kind: str, has_running: bool) -> str | None:
    """Where a layer of class ``kind`` takes its statistics from (``None``: no norm layer)."""
    low = kind.lower()
    if "renorm" in low:
        return GLOBAL
    if "batchnorm" in low:
        return BATCH
    if "instancenorm" in low:
        return BATCH if has_running else TILEWISE
    return {
        "groupnorm": TILEWISE,
        "layernorm": "statistics of each sample over its normalized shape",
        "localresponsenorm": "local (neighbouring channels)",
    }.get(low)


def normalization_layers(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The model's normalization layers by type, with where their statistics come from.

    Works for TorchScript modules too. Only the kind of statistics is read from the
    layer types; whether they make the model tile-dependent is measured by
    :mod:`nahtlos.nets.receptive_field`.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        kind = type_name(m)
        has_running = any(b == "running_mean" for b, _ in m.named_buffers(recurse=False))
        stats = _statistics(kind, has_running)
        if stats is None:
            continue
        g = groups.setdefault(kind, {"type": kind, "count": 0, "statistics": stats, "names": []})
        g["count"] += 1
        g["names"].append(name or "(model)")
    return list(groups.values())


def describe_layers(layers: Sequence[Mapping[str, Any]]) -> str:
    """``"4 InstanceNorm2d layers, 1 GroupNorm layer"`` for groups of :func:`normalization_layers`."""
    parts = [f"{g['count']} {g['type']} layer{'s' if g['count'] != 1 else ''}" for g in layers]
    return ", ".join(parts)


def mode_frozen(model: torch.nn.Module) -> bool:
    """Whether the model's BatchNorm layers ignore ``train()``/``eval()``.

    ``torch.jit.trace`` records the mode a model was traced in as a constant of every
    ``batch_norm`` call, so a traced TorchScript file normalizes the same way in train
    and in eval mode and its train/eval disparity cannot be measured (a scripted one,
    ``torch.jit.script``, reads the flag at run time).
    """
    if not isinstance(model, torch.jit.ScriptModule):
        return False
    try:
        graph = model.inlined_graph
    except (RuntimeError, AttributeError):  # pragma: no cover - exotic script modules
        return False

    def frozen(block: Any) -> bool:
        for node in block.nodes():
            if node.kind() == "aten::batch_norm":
                training = list(node.inputs())[5]
                if training.node().kind() == "prim::Constant":
                    return True
            if any(frozen(b) for b in node.blocks()):
                return True
        return False

    return frozen(graph)
