"""Population statistics of BatchNorm and BatchRenorm layers, after training.

During training, the running mean and variance of a BatchNorm or BatchRenorm layer are
exponential moving averages (momentum 0.01) of batch statistics taken while the weights
still moved: at the last step they describe the network of a few hundred steps ago, and
with batch size 1 the statistics of single patches. Eval-mode prediction (and therefore
every seamless tiled prediction) uses them. Recalibration replaces them by statistics of
the *final* network over a set of training patches, computed exactly (no moving average):

``pooled`` (default)
    Layer by layer in eval mode, in module order (``named_modules``, which is the order of
    the calls for MONAI's U-Net and UNETR and for sequential networks): each layer gets
    the mean and (biased) variance of all voxels of all patches at its input, as one
    population (within- *and* between-patch variance), and the deeper layers see inputs
    normalized with the already recalibrated shallower ones, as they will at prediction
    time. With ``patches="all"`` (non-overlapping tiles covering the images) these are
    the statistics of the whole training data.
``layerwise``
    The same, but each layer gets the mean over the patches of its input's per-patch
    channel means and variances (within-patch variance only).
``precise``
    The classic "precise BN": train-mode forwards over batches of patches, averaging each
    layer's batch means and variances. The layers normalize as in training: BatchNorm
    with the batch statistics, BatchRenorm with its running statistics held fixed.

Which networks gain (docs/training.md): BatchNorm networks, whose moving averages lag
behind the final weights, gain eval-mode Dice; ``nahtlos train`` recalibrates them by
default (``train.recalibrate: auto``). BatchRenorm networks normalize with their running
statistics already in training, so those statistics belong to the network: with
today's recipe recalibrating them lost Dice on every dataset measured, and ``auto``
leaves them alone. Networks trained with the paper's recipe (Dice loss, oversampled
foreground) can still gain (``nahtlos recalibrate``).

Only running statistics change (``running_mean``, ``running_var``; a BatchRenorm layer
stores σ² - eps as ``running_var`` with σ² the biased variance plus eps, so the stored
value is the biased variance for both kinds). Parameters, ``num_batches_tracked``, the
train/eval flags and BatchRenorm's r_max/d_max are left as they were.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.predict import ArrayLike, split_channels
from ..errors import NahtlosError
from ..io import InputNormalization, open_image
from ..nets.checkpoint import load_model, read_checkpoint, save_checkpoint
from ..nets.norms import RenormSchedule, batchrenorm_layers
from ..nets.state import measuring_mode, preserved_state
from .data import Volume, open_volume
from .validation import validate

__all__ = [
    "DEFAULT_RECALIBRATION",
    "RECALIBRATION_METHODS",
    "LayerStatistics",
    "Patches",
    "Recalibration",
    "RecalibrationError",
    "image_patches",
    "population_statistics",
    "recalibrate_checkpoint",
    "recalibrate_model",
    "recalibrates_by_default",
    "running_stat_layers",
    "volume_tiles",
]

RECALIBRATION_METHODS: tuple[str, ...] = ("layerwise", "pooled", "precise")
"""The ways of computing population statistics (see the module docstring)."""

# The method of `nahtlos train` and `nahtlos recalibrate`; docs/training.md has the
# comparison that chose it.
DEFAULT_RECALIBRATION = "pooled"


class RecalibrationError(NahtlosError, ValueError):
    """A model without running statistics, an unknown method, or unusable patches."""


@dataclass
class LayerStatistics:
    """The recalibrated statistics of one layer, and what it held before."""

    name: str
    mean: np.ndarray
    var: np.ndarray
    old_mean: np.ndarray
    old_var: np.ndarray

    def shift(self) -> float:
        """Largest change of the mean in units of the old standard deviation."""
        std = np.sqrt(self.old_var + 1e-5)
        return float(np.max(np.abs(self.mean - self.old_mean) / std))


@dataclass
class Recalibration:
    """What :func:`recalibrate_model` did (stored in checkpoints as ``recalibration``)."""

    method: str
    patches: int
    layers: list[LayerStatistics] = field(default_factory=list)
    before: dict[str, list[float]] | None = None
    after: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-channel arrays)."""
        return {
            "method": self.method,
            "patches": self.patches,
            "layers": len(self.layers),
            "largest_mean_shift": max((s.shift() for s in self.layers), default=0.0),
            "before": self.before,
            "after": self.after,
        }


def recalibrates_by_default(model: nn.Module) -> bool:
    """Whether ``train.recalibrate: auto`` recalibrates ``model``: BatchNorm networks yes
    (their moving averages lag behind the final weights), BatchRenorm networks no (they
    were trained normalizing with their running statistics, which therefore belong to the
    network; recalibrating them cost Dice in every measurement of docs/training.md)."""
    return bool(running_stat_layers(model)) and not batchrenorm_layers(model)


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm (any dimension, with running statistics) and BatchRenorm layers of
    ``model``, with their names, in the order of ``model.named_modules()``."""
    renorm = {id(m) for m in batchrenorm_layers(model)}
    out = []
    for name, m in model.named_modules():
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        if is_bn or id(m) in renorm:
            out.append((name, m))
    return out


class Patches(Sequence[np.ndarray]):
    """Patches read on demand: recalibration passes over them once per layer, and tiles
    covering large training volumes need not fit in memory at once."""

    def __init__(self, read: Any, where: Sequence[Any]) -> None:
        self._read = read
        self._where = list(where)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._read(w) for w in self._where[index]]
        return self._read(self._where[index])


def image_patches(
    images: Sequence[ArrayLike],
    ndim: int,
    patch: Sequence[int],
    count: int | str,
    *,
    seed: int = 0,
    input_transform: Any = None,
) -> Patches:
    """Patches of images (``(C, *patch)`` float32, after ``input_transform``).

    ``count`` patches are drawn uniformly at random over the images (each image with a
    probability proportional to its size), or with ``count="all"`` the images are tiled
    with non-overlapping patches (the last ones along an axis moved inward to fit).

    Raises
    ------
    RecalibrationError
        If the patch does not fit in an image, or ``count`` is not positive.
    """
    patch = tuple(int(p) for p in patch)
    spatial = [tuple(int(s) for s in img.shape[-ndim:]) for img in images]
    for img, shape in zip(images, spatial, strict=True):
        if len(patch) != ndim or any(p > s for p, s in zip(patch, shape, strict=True)):
            raise RecalibrationError(
                f"patch {patch} does not fit in an image of spatial shape {shape} "
                f"(image shape {tuple(img.shape)}); use a smaller patch"
            )
    if count == "all":
        origins = [(i, o) for i, shape in enumerate(spatial) for o in _tile_origins(shape, patch)]
    else:
        if not isinstance(count, int) or count < 1:
            raise RecalibrationError(f"patches={count!r}: give a positive number or 'all'")
        rng = np.random.default_rng(seed)
        weights = np.array([math.prod(s) for s in spatial], np.float64)
        picks = rng.choice(len(images), size=count, p=weights / weights.sum())
        origins = [
            (
                int(i),
                tuple(
                    int(rng.integers(0, s - p + 1)) for s, p in zip(spatial[i], patch, strict=True)
                ),
            )
            for i in picks
        ]
    return Patches(lambda w: _read_patch(images[w[0]], w[1], patch, ndim, input_transform), origins)


def volume_tiles(volumes: Sequence[Volume], patch: Sequence[int]) -> Patches:
    """Input-normalized ``(C, *patch)`` tiles covering the regions of training volumes
    (non-overlapping; the last ones along an axis moved inward to fit), read on demand."""
    where = []
    for vol in volumes:
        starts = [r.start for r in vol.region]
        for origin in _tile_origins(vol.region_shape, patch):
            region = tuple(
                slice(s + o, s + o + p) for s, o, p in zip(starts, origin, patch, strict=True)
            )
            where.append((vol, region))
    return Patches(lambda w: w[0].read_image(w[1]), where)


def _tile_origins(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, ...]]:
    axes = [
        sorted({min(k * p, s - p) for k in range(-(-s // p))})
        for s, p in zip(shape, patch, strict=True)
    ]
    grids = np.meshgrid(*axes, indexing="ij")
    return [tuple(int(g.flat[k]) for g in grids) for k in range(grids[0].size)]


def _read_patch(
    image: ArrayLike, origin: Sequence[int], patch: Sequence[int], ndim: int, transform: Any
) -> np.ndarray:
    region = tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
    channels = split_channels(image, ndim)
    key = (slice(None), *region) if channels else region
    values = np.asarray(image[key], dtype=np.float32)
    if not channels:
        values = values[None]  # input normalization works on (C, *spatial)
    if transform is not None:
        values = np.asarray(transform(values), dtype=np.float32)
    return values


class _Stop(Exception):
    """Ends a forward pass once the layer being measured has seen its input."""


class _Moments:
    """Per-channel statistics of a layer's inputs, accumulated in float64."""

    def __init__(self) -> None:
        self.patch_means: list[np.ndarray] = []
        self.patch_vars: list[np.ndarray] = []
        self.total: np.ndarray | None = None
        self.square: np.ndarray | None = None
        self.count = 0

    def add(self, x: torch.Tensor, per_sample: bool) -> None:
        x64 = x.detach().to(torch.float64)
        axes = tuple(range(2, x64.dim()))
        if per_sample:  # eval mode: every sample of the batch is its own patch
            var, mean = torch.var_mean(x64, dim=axes, correction=0)
            self.patch_means += list(mean.cpu().numpy())
            self.patch_vars += list(var.cpu().numpy())
        else:  # train mode: the batch's statistics, as the layer normalizes with them
            var, mean = torch.var_mean(x64, dim=(0, *axes), correction=0)
            self.patch_means.append(mean.cpu().numpy())
            self.patch_vars.append(var.cpu().numpy())
        flat = x64.transpose(0, 1).reshape(x64.shape[1], -1)
        total, square = flat.sum(1).cpu().numpy(), (flat * flat).sum(1).cpu().numpy()
        self.total = total if self.total is None else self.total + total
        self.square = square if self.square is None else self.square + square
        self.count += flat.shape[1]

    def result(self, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
        if pooled:
            assert self.total is not None and self.square is not None
            mean = self.total / self.count
            return mean, np.maximum(self.square / self.count - mean * mean, 0.0)
        return np.mean(self.patch_means, axis=0), np.mean(self.patch_vars, axis=0)


def _batches(patches: Sequence[np.ndarray], size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(patches), size):
        yield np.stack(list(patches[start : start + size]))


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _measure_layer(
    model: nn.Module, layer: nn.Module, patches: Sequence[np.ndarray], batch_size: int
) -> _Moments:
    """The eval-mode input statistics of one layer over all patches."""
    moments = _Moments()
    device, dtype = _device_dtype(model)

    def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
        moments.add(args[0], per_sample=True)
        raise _Stop

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in _batches(patches, batch_size):
                with contextlib.suppress(_Stop):
                    model(torch.from_numpy(batch).to(device=device, dtype=dtype))
    finally:
        handle.remove()
    if moments.count == 0:
        raise RecalibrationError(
            f"layer {type(layer).__name__} was not called by the model's forward pass"
        )
    return moments


def _measure_train_mode(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    patches: Sequence[np.ndarray],
    batch_size: int,
) -> dict[str, _Moments]:
    """Every layer's input statistics in train-mode forwards (the model is restored)."""
    moments = {name: _Moments() for name, _ in layers}
    device, dtype = _device_dtype(model)
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: moments[name].add(args[0], per_sample=False)
        )
        for name, layer in layers
    ]
    # BatchRenorm's r and d depend on its running statistics: keep them fixed while
    # measuring, so that every batch sees the same layers (BatchNorm's are restored anyway)
    renorm = batchrenorm_layers(model)
    frozen = [m.freeze_statistics for m in renorm]
    try:
        for m in renorm:
            m.freeze_statistics = True
        with measuring_mode(model, train=True), torch.no_grad():
            for batch in _batches(patches, batch_size):
                model(torch.from_numpy(batch).to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, was in zip(renorm, frozen, strict=True):
            m.freeze_statistics = was
    return moments


def _set_statistics(layer: nn.Module, mean: np.ndarray, var: np.ndarray) -> None:
    buffers: Any = layer
    with torch.no_grad():
        buffers.running_mean.copy_(torch.from_numpy(mean))
        buffers.running_var.copy_(torch.from_numpy(var))


def population_statistics(
    model: nn.Module,
    patches: Sequence[np.ndarray],
    method: str = DEFAULT_RECALIBRATION,
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> list[LayerStatistics]:
    """Recompute and set the running statistics of every BatchNorm/BatchRenorm layer.

    Parameters
    ----------
    model
        Any PyTorch model (a Python module: TorchScript modules take no hooks).
    patches
        ``(C, *patch)`` input patches, already normalized like the model's input
        (:func:`image_patches`).
    method
        ``layerwise``, ``pooled`` or ``precise`` (module docstring).
    batch_size
        Patches per forward pass. In eval mode (``layerwise``, ``pooled``) it changes
        only the speed; for ``precise`` it is the batch whose statistics the layers use,
        as in training.

    Returns
    -------
    list of LayerStatistics
        One per layer, in module order.

    Raises
    ------
    RecalibrationError
        For an unknown method, no patches, or a model without such layers.
    """
    if method not in RECALIBRATION_METHODS:
        raise RecalibrationError(
            f"recalibration method {method!r} is not one of {', '.join(RECALIBRATION_METHODS)}"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise RecalibrationError(
            "cannot recalibrate a TorchScript model (its layers take no hooks): recalibrate "
            "the nahtlos checkpoint or the Python model, then export it again"
        )
    layers = running_stat_layers(model)
    if not layers:
        raise RecalibrationError(
            "the model has no BatchNorm or BatchRenorm layers: there are no running "
            "statistics to recalibrate"
        )
    if not patches:
        raise RecalibrationError("no patches to compute statistics from")
    old = {name: (_numpy(m, "running_mean"), _numpy(m, "running_var")) for name, m in layers}
    results: list[LayerStatistics] = []
    with preserved_state(model) as kept:
        # preserved_state restores everything on exit: the new statistics are collected
        # here and set afterwards
        kept.eval()
        if method == "precise":
            found = _measure_train_mode(kept, layers, patches, batch_size)
            stats = {name: found[name].result(pooled=False) for name, _ in layers}
        else:
            stats = {}
            bar = tqdm(layers, desc="recalibrate", unit="layer", disable=not progress)
            for name, layer in bar:
                moments = _measure_layer(kept, layer, patches, batch_size)
                stats[name] = moments.result(pooled=method == "pooled")
                _set_statistics(layer, *stats[name])  # deeper layers see the new ones
    for name, layer in layers:
        mean, var = stats[name]
        _set_statistics(layer, mean, var)
        results.append(LayerStatistics(name, mean, var, *old[name]))
    return results


def _numpy(layer: nn.Module, name: str) -> np.ndarray:
    value = getattr(layer, name)
    assert isinstance(value, torch.Tensor)
    return value.detach().cpu().numpy().astype(np.float64)


def recalibrate_model(
    model: nn.Module,
    patches: Sequence[np.ndarray],
    method: str = DEFAULT_RECALIBRATION,
    *,
    batch_size: int = 1,
    progress: bool = False,
) -> Recalibration:
    """:func:`population_statistics`, summarized as a :class:`Recalibration`."""
    layers = population_statistics(model, patches, method, batch_size=batch_size, progress=progress)
    return Recalibration(method=method, patches=len(patches), layers=layers)


def recalibrate_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    patches: int | str = "all",
    method: str = DEFAULT_RECALIBRATION,
    labels: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Recalibration:
    """Recalibrate a nahtlos checkpoint on images and write the result to ``dst``.

    The network is rebuilt from the checkpoint; patches of its training patch size
    (tiles covering the images with ``patches="all"``, else random ones) are taken from
    ``images`` (normalized with the checkpoint's input normalization, fitted
    on each image) and :func:`population_statistics` replaces the running statistics.
    With ``labels`` (one per image), block-wise Dice in eval and train mode and the
    train/eval disparity are measured on the images before and after. The new file is a
    prediction checkpoint (no optimizer state, like ``nahtlos export``) whose metadata
    records the recalibration.

    Raises
    ------
    RecalibrationError
        For a TorchScript file, an existing ``dst`` without ``overwrite``, a
        model without BatchNorm/BatchRenorm layers, or labels that do not pair with
        the images.
    """
    out = Path(dst)
    if out.exists() and not overwrite:
        raise RecalibrationError(f"output {str(out)!r} exists; remove it or pass --overwrite")
    if Path(src).resolve() == out.resolve():
        raise RecalibrationError(f"write the recalibrated model to another file than {str(src)!r}")
    if labels and len(labels) != len(images):
        raise RecalibrationError(
            f"{len(labels)} label images for {len(images)} images: give one per image, or none"
        )
    if method not in RECALIBRATION_METHODS:
        raise RecalibrationError(
            f"recalibration method {method!r} is not one of {', '.join(RECALIBRATION_METHODS)}"
        )
    loaded = load_model(src)
    if loaded.kind != "checkpoint":
        raise RecalibrationError(
            f"{str(src)!r} is a TorchScript file: recalibrate the nahtlos checkpoint it was "
            "exported from (TorchScript layers take no hooks)"
        )
    if not running_stat_layers(loaded.module):
        raise RecalibrationError(
            f"{str(src)!r} has no BatchNorm or BatchRenorm layers: there are no running "
            "statistics to recalibrate"
        )
    state = read_checkpoint(src)
    meta = dict(state["prediction"])
    ndim = int(meta["ndim"])
    patch = tuple(meta.get("window") or state["config"]["data"]["patch"])
    arrays = [open_image(p) for p in images]
    if patches != "all" and (not isinstance(patches, int) or patches < 1):
        raise RecalibrationError(f"patches={patches!r}: give a number >= 1 or 'all'")
    drawn: list[np.ndarray] = []
    for i, array in enumerate(arrays):
        # random patches split over the images: the first ones take the remainder
        share: int | str = patches
        if isinstance(patches, int):
            share = patches // len(arrays) + (i < patches % len(arrays))
            if share == 0:
                continue
        transform = loaded.input_transform(array, ndim, progress=progress)
        drawn += list(
            image_patches([array], ndim, patch, share, seed=seed + i, input_transform=transform)
        )
    volumes = [
        _volume(p, lab, ndim, meta, progress) for p, lab in zip(images, labels, strict=False)
    ]
    before = _validation(loaded.module, volumes, meta)
    done = recalibrate_model(loaded.module, drawn, method, batch_size=4, progress=progress)
    done.before, done.after = before, _validation(loaded.module, volumes, meta)
    schedule = None
    if state.get("schedule") is not None:
        schedule = RenormSchedule(0, 0)
        schedule.load_state_dict(state["schedule"])
    save_checkpoint(
        out,
        config=state["config"],
        model=loaded.module,
        prediction={**meta, "recalibration": done.to_dict()},
        schedule=schedule,
        step=int(state.get("step", 0)),
        rng=state["rng"],
    )
    return done


def _volume(
    image: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    ndim: int,
    meta: dict[str, Any],
    progress: bool,
) -> Volume:
    norm = InputNormalization.from_dict({**meta["input_normalization"], "values": None})
    return open_volume(str(image), str(labels), ndim, input_norm=norm, progress=progress)


def _validation(
    model: nn.Module, volumes: Sequence[Volume], meta: dict[str, Any]
) -> dict[str, list[float]] | None:
    if not volumes:
        return None
    scores = validate(
        model,
        volumes,
        block=meta["block"],
        halo=meta["halo"],
        alignment=meta["alignment"],
        activation=meta.get("activation", "sigmoid"),
        labels=meta.get("labels", "instances"),
        num_classes=meta.get("out_channels") if meta.get("labels") == "semantic" else None,
        boundary_mode=meta.get("boundary_mode", "thick"),
    )
    return {k: [float(v) for v in values] for k, values in scores.items()}
