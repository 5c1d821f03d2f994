"""Loading models for prediction: TorchScript files, with optional nahtlos metadata.

A TorchScript file may carry a ``nahtlos.json`` extra file (``torch.jit.save(...,
_extra_files={"nahtlos.json": ...})``) with prediction settings such as ``ndim``,
``in_channels``, ``halo``, ``alignment`` and ``activation``; they are returned as
metadata and used by the command line when the user leaves them out.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError, InputNotFoundError

__all__ = ["LoadedModel", "load_model", "save_torchscript"]

METADATA_FILE = "nahtlos.json"


@dataclass
class LoadedModel:
    """A model ready for prediction and what is known about it."""

    module: torch.nn.Module
    path: Path
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a TorchScript model (with its nahtlos metadata, if any), in eval mode.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    FormatError
        If the file is not a model nahtlos can load.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"model {str(p)!r} does not exist")
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains the portable format users have.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=map_location, _extra_files=extra)
    except Exception as exc:
        raise FormatError(
            f"cannot load model {str(p)!r}: not a TorchScript file saved with torch.jit.save "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    raw = extra[METADATA_FILE]
    metadata = json.loads(raw) if raw else {}
    module.eval()
    return LoadedModel(module=module, path=p, kind="torchscript", metadata=metadata)


def save_torchscript(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Script (or, given ``example``, trace) ``model`` and save it with nahtlos metadata."""
    was_training = model.training
    model.eval()
    extra = {METADATA_FILE: json.dumps(metadata or {})}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = (
                torch.jit.trace(model, example) if example is not None else torch.jit.script(model)
            )
            torch.jit.save(scripted, str(path), _extra_files=extra)
    finally:
        model.train(was_training)
    return Path(path)
