"""Loading and saving models: TorchScript files and the project's own checkpoints.

**TorchScript.** A TorchScript file may carry a ``nahtlos.json`` extra file
(``torch.jit.save(..., _extra_files={"nahtlos.json": ...})``) with prediction settings
such as ``ndim``, ``in_channels``, ``halo``, ``alignment`` and ``activation``; they are
returned as metadata and used by the command line when the user leaves them out.

**Project checkpoints** (written by ``nahtlos train``) are single files saved with
:func:`torch.save` and read back with ``torch.load(weights_only=True)`` (no code is
unpickled): a dictionary of tensors and plain Python values,

=================  ==========================================================
``format``         ``"nahtlos.checkpoint"``
``version``        format version (1)
``nahtlos``        the nahtlos version that wrote it
``config``         the full training configuration (:class:`~nahtlos.training.config.TrainingConfig`
                   as JSON-able dict); the network is rebuilt from ``config["model"]``
``model``          the network's ``state_dict``
``optimizer``      the optimizer's ``state_dict`` (``None`` in converted and exported
                   checkpoints)
``schedule``       the BatchRenorm schedule's ``state_dict`` (or ``None``)
``step``           optimizer steps done
``rng``            random states: ``torch`` (ByteTensor), ``cuda`` (list of ByteTensors),
                   ``numpy`` (legacy global state as plain values), ``python``
``sampler``        the patch sampler's state (its numpy generator; ``None`` in exported
                   checkpoints)
``prediction``     what prediction needs, also returned by :func:`load_model` as
                   metadata: ``arch``, ``norm``, ``ndim``, ``in_channels``,
                   ``out_channels``, ``classes``, ``labels`` (``instances``: ground
                   truth is converted by :func:`nahtlos.training.data.instances_to_semantic`
                   with ``boundary_mode``; ``semantic``: class indices),
                   ``activation`` (``sigmoid`` or
                   ``softmax``), ``halo`` and ``alignment`` (per axis), ``block``
                   (a suggested inner block), ``window`` (UNETR: its fixed input
                   window, else ``None``), ``input_normalization``
                   (:meth:`~nahtlos.io.intensity.InputNormalization.to_dict`, fitted
                   again on every image predicted) and ``tile_dependent``
=================  ==========================================================
"""

from __future__ import annotations

import copy
import json
import os
import random
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import FormatError, InputNotFoundError, NormError
from .convert import convert_norms
from .models import ModelConfig, model_from_config, norm_options
from .norms import RenormSchedule, check_norm_name

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "capture_rng_state",
    "convert_checkpoint",
    "convert_model_file",
    "export_checkpoint",
    "is_checkpoint",
    "load_model",
    "measured_geometry",
    "read_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_torchscript",
]

METADATA_FILE = "nahtlos.json"
CHECKPOINT_FORMAT = "nahtlos.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for prediction and what is known about it.

    ``kind`` is ``"torchscript"`` or ``"checkpoint"`` (a project checkpoint).
    """

    module: torch.nn.Module
    path: Path
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def input_transform(
        self, image: Any, ndim: int, progress: bool = False
    ) -> Callable[[np.ndarray], np.ndarray] | None:
        """The model's input normalization, fitted on ``image`` (global percentiles
        are computed once, out of core), or ``None`` if the metadata names none."""
        spec = self.metadata.get("input_normalization")
        if not spec:
            return None
        from ..io import InputNormalization

        norm = InputNormalization.from_dict({**spec, "values": None})
        if norm.mode == "global":
            channels = len(image.shape) == ndim + 1
            norm.fit(image, channel_axis=0 if channels else None, progress=progress)
        return norm

    def output_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The activation named by the metadata (``sigmoid``/``softmax``), else ``None``."""
        from .state import activation_function

        name = self.metadata.get("activation")
        try:
            return activation_function(name)
        except ValueError:
            raise FormatError(
                f"model {str(self.path)!r} names the activation {name!r}; "
                "nahtlos knows sigmoid, softmax and none"
            ) from None


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether a file is a :func:`torch.save` archive (a project checkpoint) rather than
    a TorchScript one (which holds ``code/`` and ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in names)
    return not scripted and any(n.endswith("data.pkl") for n in names)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a project checkpoint safely (``weights_only``) and check its format.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    FormatError
        If it is not a nahtlos checkpoint, or of a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FormatError(
            f"cannot read checkpoint {str(p)!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(
            f"{str(p)!r} is a torch file but not a nahtlos checkpoint (no format "
            f"{CHECKPOINT_FORMAT!r}); for a plain model use TorchScript (torch.jit.save)"
        )
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise FormatError(
            f"checkpoint {str(p)!r} has format version {state['version']}; this nahtlos "
            f"reads up to {CHECKPOINT_VERSION}: upgrade nahtlos"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy (global) and Python random states, as safe-to-load values.

    The legacy global numpy state is included because third-party code (MONAI,
    scikit-image) may draw from it.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    legacy = (kind, np.asarray(keys, np.uint32), pos, has_gauss, cached)
    np.random.set_state(legacy)  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any],
    model: torch.nn.Module,
    prediction: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    schedule: Any = None,
    step: int = 0,
    sampler: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a project checkpoint atomically (a temporary file moved into place).

    Parameters
    ----------
    config
        The training configuration as a JSON-able dict.
    model
        The network (its ``state_dict`` is saved).
    prediction
        Prediction metadata (see the module docstring).
    optimizer, schedule, step, sampler, rng
        Training state for resuming; ``rng`` defaults to the current random states.
    """
    from .._version import __version__

    p = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "nahtlos": __version__,
        "config": config,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "schedule": None if schedule is None else schedule.state_dict(),
        "step": int(step),
        "rng": capture_rng_state() if rng is None else rng,
        "sampler": sampler,
        "prediction": prediction,
    }
    tmp = p.with_name(f".{p.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, p)
    return p


def _model_config(state: dict[str, Any], path: Path) -> ModelConfig:
    """The network's configuration inside a checkpoint (its ``config.model`` section)."""
    from pydantic import ValidationError

    try:
        return ModelConfig.model_validate((state.get("config") or {}).get("model") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "model"
        raise FormatError(
            f"checkpoint {str(path)!r}: invalid network configuration model.{where}: "
            f"{first['msg'].removeprefix('Value error, ')}"
        ) from None


def _load_project_checkpoint(p: Path, map_location: str | torch.device) -> LoadedModel:
    state = read_checkpoint(p)
    model_cfg = _model_config(state, p)
    meta = dict(state.get("prediction") or {})
    # a UNETR's window is fixed: the training patch
    window = meta.get("window") or state["config"].get("data", {}).get("patch")
    module = model_from_config(model_cfg, int(meta["out_channels"]), window)
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise FormatError(
            f"checkpoint {str(p)!r}: the weights do not fit the network its configuration "
            f"describes ({str(exc).splitlines()[0]})"
        ) from exc
    if state.get("schedule") is not None:
        # r_max/d_max are plain attributes of BatchRenorm layers, not in the state dict:
        # without this a loaded BatchRenorm network would run as BatchNorm in train mode
        schedule = RenormSchedule(0, 0)
        schedule.load_state_dict(state["schedule"])
        if schedule.last_step >= 0:
            schedule.apply(module, schedule.last_step)
    module.to(map_location).eval()
    meta.setdefault("step", int(state.get("step", 0)))
    return LoadedModel(module=module, path=p, kind="checkpoint", metadata=meta)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a TorchScript model or a project checkpoint, in eval mode.

    A project checkpoint's network is rebuilt from its configuration; its
    ``prediction`` entry is returned as metadata (kind ``"checkpoint"``).

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
    if is_checkpoint(p):
        return _load_project_checkpoint(p, map_location)
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains the portable format users have.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=map_location, _extra_files=extra)
    except Exception as exc:
        raise FormatError(
            f"cannot load model {str(p)!r}: not a TorchScript file saved with torch.jit.save, "
            f"nor a nahtlos checkpoint "
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


def convert_checkpoint(
    src: str | os.PathLike[str] | LoadedModel,
    dst: str | os.PathLike[str],
    to: str,
    **kwargs: Any,
) -> Path:
    """Convert the norm layers of a project checkpoint and write a new checkpoint.

    The network is rebuilt, converted with :func:`nahtlos.nets.convert.convert_norms` (affine
    parameters and, where both kinds have them, running statistics are kept) and saved
    with ``model.norm`` set to ``to`` and updated prediction metadata. The new file is a
    starting point for fine-tuning: its step is 0 and it has no optimizer or schedule
    state, so ``nahtlos train --resume NEW.pt --set train.steps=N`` fine-tunes for N
    steps with a fresh BatchRenorm schedule. It is used by ``nahtlos convert``.

    Parameters
    ----------
    src
        A checkpoint path, or one loaded with :func:`load_model`.
    dst
        Where to write the converted checkpoint.
    to
        Target norm name (:data:`nahtlos.nets.norms.NORM_NAMES`).
    **kwargs
        Options of the new layers; the momentum defaults to the configuration's.
    """
    loaded = src if isinstance(src, LoadedModel) else load_model(src)
    if loaded.kind != "checkpoint":
        raise FormatError(f"{str(loaded.path)!r} is not a nahtlos checkpoint")
    state = read_checkpoint(loaded.path)
    model_cfg = _model_config(state, loaded.path)
    kwargs = {**norm_options(to, model_cfg.momentum, model_cfg.groups), **kwargs}
    module = convert_norms(loaded.module, to, ndim=model_cfg.ndim, **kwargs)
    config = copy.deepcopy(state["config"])
    config["model"]["norm"] = to
    meta = {**state["prediction"], "norm": to}
    if model_cfg.arch == "unet":  # a UNETR's halo and tile dependence are its attention's
        geometry = measured_geometry(module, model_cfg.ndim, model_cfg.in_channels)
        tilewise_input = (meta.get("input_normalization") or {}).get("mode") == "tilewise"
        geometry["tile_dependent"] = bool(geometry["tile_dependent"] or tilewise_input)
        meta.update(geometry)
    return save_checkpoint(
        dst,
        config=config,
        model=module,
        prediction=meta,
        step=0,
        sampler=state.get("sampler"),
        rng=state["rng"],
    )


def measured_geometry(module: torch.nn.Module, ndim: int, in_channels: int) -> dict[str, Any]:
    """The halo, alignment and tile dependence of a network, measured on it.

    The halo is :func:`~nahtlos.nets.receptive_field.recommend_halo`'s: the theoretical
    receptive-field radius rounded up to the alignment (10 -> 12 for the paper's U-Net),
    or for tile-dependent norms the radius holding 99% of the effective receptive field.
    Measuring does not move the caller's random state.
    """
    from .receptive_field import receptive_field, recommend_halo

    with torch.random.fork_rng(devices=[]):
        rf = receptive_field(module, ndim, in_channels)
    return {
        "halo": list(recommend_halo(rf, warn=False)),
        "alignment": list(rf.alignment),
        "tile_dependent": bool(rf.tile_dependent),
    }


def export_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a prediction-only copy of a project checkpoint: no optimizer state.

    Adam keeps two moments per parameter, so a training checkpoint is about three
    times the size of its weights. The copy keeps everything prediction and
    fine-tuning need: configuration, weights (running statistics included),
    prediction metadata, step, BatchRenorm schedule and random states. It drops the
    optimizer and the patch sampler: ``nahtlos train --resume COPY`` fine-tunes with a
    fresh Adam and a freshly seeded sampler.

    Parameters
    ----------
    src
        A checkpoint written by ``nahtlos train`` (or :func:`convert_checkpoint`).
    dst
        Where to write the copy (atomically).
    overwrite
        Replace an existing ``dst``.

    Raises
    ------
    InputNotFoundError, FormatError
        If ``src`` is missing or not a nahtlos checkpoint, or ``dst`` exists.
    """
    out = Path(dst)
    if out.exists() and not overwrite:
        raise FormatError(f"output {str(out)!r} exists; remove it or pass overwrite")
    state = read_checkpoint(src)
    if out.resolve() == Path(src).resolve():
        raise FormatError(f"export {str(src)!r} to another file, not onto itself")
    state = {**state, "optimizer": None, "sampler": None}
    tmp = out.with_name(f".{out.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out


def _scripted_norm_counts(module: nn.Module) -> dict[str, int]:
    names = {"BatchNorm", "InstanceNorm", "GroupNorm", "BatchRenorm", "SyncBatchNorm"}
    counts: dict[str, int] = {}
    for m in module.modules():
        name = str(getattr(m, "original_name", type(m).__name__))
        if name.rstrip("123d") in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _torchscript_error(loaded: Any, to: str) -> NormError:
    counts = _scripted_norm_counts(loaded.module)
    found = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no norm layers"
    hint = ""
    if to == "batch" and any(k.startswith("BatchRenorm") for k in counts):
        hint = (
            " For prediction no conversion is needed: in eval mode a BatchRenorm layer "
            "computes exactly what the converted BatchNorm layer would."
        )
    return NormError(
        f"cannot convert {str(loaded.path)!r} to {to!r}: it is a TorchScript file "
        f"({found}), a compiled graph whose layers cannot be swapped. Build the network in "
        f"Python, load the file's weights into it (torch.jit.load(path).state_dict(); "
        f"BatchNorm and BatchRenorm layers share their state-dict keys), call "
        f"nahtlos.convert_norms(model, {to!r}) and save that model.{hint}"
    )


def convert_model_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Convert the norm layers of the model file ``src`` to kind ``to`` and write ``dst``.

    The file is loaded with :func:`nahtlos.nets.checkpoint.load_model`; a nahtlos checkpoint
    is converted by :func:`nahtlos.nets.checkpoint.convert_checkpoint`. TorchScript files
    cannot be converted (see :func:`convert_norms`); the error says what to do instead.

    Raises
    ------
    NormError
        For an unknown ``to``, an existing ``dst`` without ``overwrite``, or a
        TorchScript file.
    InputNotFoundError
        If ``src`` or the folder of ``dst`` does not exist.
    """
    check_norm_name(to)
    out = Path(dst)
    if out.exists() and not overwrite:
        raise NormError(f"output {str(out)!r} exists; remove it or pass --overwrite")
    if not out.parent.exists():
        raise InputNotFoundError(f"the folder of output {str(out)!r} does not exist")
    loaded = load_model(src)
    if loaded.kind == "torchscript":
        raise _torchscript_error(loaded, to)
    return convert_checkpoint(loaded, out, to, **kwargs)
