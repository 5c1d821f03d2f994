"""A model's output activation by name, and measuring a model without changing it.

Measuring train/eval disparity or validating in train mode runs a network in train
mode, which updates BatchNorm's running statistics and step counters:
:func:`preserved_state` and :func:`measuring_mode` restore every parameter, buffer and
train/eval flag afterwards, and switch dropout off while measuring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

__all__ = ["Activation", "activation_function", "measuring_mode", "preserved_state"]


Activation = Literal["sigmoid", "softmax", "none"]


_DROPOUT = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
)


def activation_function(
    name: Activation | str | None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The output activation by name: ``sigmoid`` (per channel), ``softmax`` (over channels) or ``none``.

    ``identity`` is accepted for ``none``. The functions returned can be pickled (sent to
    Dask workers).
    """
    if name is None or name in ("none", "identity"):
        return None
    if name == "sigmoid":
        return torch.sigmoid
    if name == "softmax":
        return _softmax_channels
    raise ValueError(f"activation {name!r} is not one of 'sigmoid', 'softmax', 'none'")


def _softmax_channels(y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(y, dim=1)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Restore the model's parameters, buffers and train/eval flags on exit.

    Buffers such as BatchNorm's running statistics and step counters change when a
    model runs in train mode; measuring must not leave a trace.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for k, v in saved.items():
                current[k].data.copy_(v)  # in place: keeps tensor identity and device
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def measuring_mode(model: torch.nn.Module, train: bool) -> Iterator[torch.nn.Module]:
    """Put ``model`` in train or eval mode with dropout off; restore everything on exit."""
    with preserved_state(model):
        model.train(train)
        for m in model.modules():
            if _is_dropout(m):
                m.train(False)
        yield model


def _is_dropout(m: torch.nn.Module) -> bool:
    # TorchScript submodules are all RecursiveScriptModule; their class name survives
    # as `original_name`, so scripted dropout is found (and switched off) too.
    name = str(getattr(m, "original_name", type(m).__name__))
    return isinstance(m, _DROPOUT) or "dropout" in name.lower()
