"""Preparing the prediction of an image file with a model file, as ``nahtlos predict`` does.

What a request leaves out is filled in: the halo, alignment and spatial axes from the
model's metadata, whatever is still missing measured from the model
(:func:`~nahtlos.engine.autoblock.auto_geometry`), the output activation and the input
normalization from the metadata (the normalization fitted again on this image), and,
for InstanceNorm/GroupNorm models run with ``norm_stats="global"`` or ``"sampled"``,
the whole-image norm statistics frozen into the model (computed block-wise once and
cached beside the output). :meth:`PreparedPrediction.predict_file` then runs
:func:`~nahtlos.engine.distributed.predict_file`. Progress messages go to ``log``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from ..errors import SettingsError
from ..io import ImageSource, InputNormalization
from ..nets.checkpoint import LoadedModel
from .autoblock import AutoGeometry, auto_geometry, parse_memory
from .distributed import PredictionReport, predict_file
from .global_stats import (
    GlobalNormStats,
    GlobalStatsError,
    freeze_norms,
    global_stats_model,
    parse_norm_stats,
    placeholder_stats,
    tile_norm_layers,
)
from .inputs import channel_axis, channels_in
from .predict import resolve_device

__all__ = ["Geometry", "PreparedPrediction", "prepare_prediction"]

Ints = int | tuple[int, ...]


class Geometry(TypedDict):
    """A block plan, as the keyword arguments of the functions that take one."""

    block: Ints
    halo: Ints
    alignment: Ints
    ndim: int


def _quiet(message: str) -> None:
    del message


@dataclass
class PreparedPrediction:
    """A model's prediction of one image, its settings resolved.

    Attributes
    ----------
    model
        The loaded model, or a copy with whole-image norm statistics frozen in.
    ndim, block, halo, alignment, auto
        The block plan (``auto``: values were measured, round them up to the alignment).
    activation
        ``"none"``, ``"sigmoid"`` or ``"softmax"``.
    normalization
        The input normalization (unfitted global percentiles are fitted by
        :func:`~nahtlos.engine.distributed.predict_file`).
    channel_names
        Names of the output channels from the model's metadata.
    """

    model: LoadedModel | torch.nn.Module
    ndim: int
    block: Ints
    halo: Ints
    alignment: Ints
    auto: bool
    activation: Any
    normalization: InputNormalization | None
    channel_names: Sequence[str] | None

    @property
    def geometry(self) -> Geometry:
        """The block plan as keyword arguments (``block``, ``halo``, ``alignment``, ``ndim``)."""
        return {
            "block": self.block,
            "halo": self.halo,
            "alignment": self.alignment,
            "ndim": self.ndim,
        }

    def predict_file(
        self, source: ImageSource, output: str | os.PathLike[str], **options: Any
    ) -> PredictionReport:
        """Run :func:`~nahtlos.engine.distributed.predict_file` with these settings.

        ``options`` are its other keyword arguments (``batch_size``, ``device``,
        ``output_dtype``, ``scheduler``, ``resume``, ...).
        """
        return predict_file(
            self.model,
            source,
            output,
            **self.geometry,
            auto=self.auto,
            activation=self.activation,
            normalization=self.normalization,
            channel_names=self.channel_names,
            **options,
        )


def prepare_prediction(
    loaded: LoadedModel,
    source: ImageSource,
    output: Path,
    *,
    block: Ints | None = None,
    halo: Ints | None = None,
    alignment: Ints | None = None,
    ndim: int | None = None,
    activation: str = "auto",
    norm_stats: str = "tile",
    norm_stats_file: Path | None = None,
    max_memory: str | None = None,
    batch_size: int = 1,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = _quiet,
) -> PreparedPrediction:
    """Fill in what a prediction request leaves out (``None``), from the model and image.

    Parameters
    ----------
    loaded
        The model file.
    source
        The input image.
    output
        The output path; the statistics of ``norm_stats`` are cached beside it
        (``OUTPUT.norm-stats.npz``) unless ``norm_stats_file`` says where.
    block, halo, alignment, ndim
        The block plan; what is ``None`` comes from the metadata or is measured
        (the block from ``max_memory``, e.g. ``"8G"``).
    activation
        ``"auto"`` (the model's metadata), ``"none"``, ``"sigmoid"`` or ``"softmax"``.
    norm_stats
        ``"tile"``, ``"global"`` or ``"sampled[:FRACTION]"``: the statistics of
        InstanceNorm/GroupNorm layers (see :func:`~nahtlos.engine.global_stats.parse_norm_stats`).
    batch_size, device, progress
        As for :func:`~nahtlos.engine.distributed.predict_file`; used by the measurements.
    log
        Called with each message for the user (the measured geometry, the statistics).

    Raises
    ------
    GlobalStatsError
        For ``norm_stats`` other than ``"tile"`` with a TorchScript model, or a bad value.
    SettingsError
        If ``max_memory`` is not a memory size.
    BlockShapeError
        If the image's axes do not fit the model.
    """
    meta = loaded.metadata
    frozen, fraction = _frozen_norms(loaded, norm_stats, log)
    if halo is None and not frozen:
        # (with frozen norms the model's own halo, meant for tile statistics, does not apply)
        halo = meta.get("halo")
    if alignment is None:
        alignment = meta.get("alignment")
    ndim = _spatial_ndim(ndim, block, meta, source)
    view = source.for_model(ndim)  # checks the image's axes fit the model before anything else
    if block is None and meta.get("window"):
        # a fixed-window model (a UNETR checkpoint): its block is the window minus the halo
        block = meta.get("block")
    auto = False
    if block is None or halo is None or alignment is None:
        # Left out or "auto": measured from the model (receptive field, memory).
        auto = True
        geometry = _measured_geometry(
            loaded,
            view,
            ndim,
            (block, halo, alignment),
            frozen,
            max_memory,
            batch_size,
            device,
            progress,
        )
        log(geometry.describe())
        block, halo, alignment = geometry.block, geometry.halo, geometry.alignment
    act: Any = (meta.get("activation") or "none") if activation == "auto" else activation
    norm = meta.get("input_normalization")
    # a checkpoint's input normalization is fitted again on this image
    normalization = None if not norm else InputNormalization.from_dict({**norm, "values": None})
    prepared = PreparedPrediction(
        loaded,
        ndim,
        block,
        halo,
        alignment,
        auto,
        "none" if act == "identity" else act,
        normalization,
        # project checkpoints call them "classes"
        meta.get("channel_names", meta.get("classes")),
    )
    if frozen:
        cache = norm_stats_file or output.with_name(output.name + ".norm-stats.npz")
        prepared.model = _with_global_stats(
            prepared, loaded, source, view, fraction, cache, batch_size, device, progress, log
        )
    return prepared


def _frozen_norms(
    loaded: LoadedModel, norm_stats: str, log: Callable[[str], None]
) -> tuple[bool, float]:
    """Whether the model's tile-wise norms get whole-image statistics, and from what fraction."""
    mode, fraction = parse_norm_stats(norm_stats)
    if mode != "tile" and loaded.kind == "torchscript":
        raise GlobalStatsError(
            f"--norm-stats {norm_stats} needs a model whose layers can be measured one by one: "
            f"{str(loaded.path)!r} is TorchScript; use a nahtlos checkpoint, or the Python model "
            "with nahtlos.engine.global_stats.compute_global_stats"
        )
    frozen = mode != "tile" and bool(tile_norm_layers(loaded.module))
    if mode != "tile" and not frozen:
        log(
            f"nahtlos: --norm-stats {norm_stats}: the model has no InstanceNorm/GroupNorm layer "
            "with tile statistics; predicting as usual"
        )
    return frozen, fraction


def _spatial_ndim(
    ndim: int | None, block: Ints | None, meta: dict[str, Any], source: ImageSource
) -> int:
    """The model's spatial axes: given, from a per-axis block, the metadata, or the image."""
    if ndim is None:
        ndim = len(block) if isinstance(block, tuple) else meta.get("ndim")
    if ndim is None:
        spatial = len(source.spatial_axes) if source.axes_known else 0
        ndim = spatial if spatial in (2, 3) else min(len(source.shape), 3)
    return int(ndim)


def _measured_geometry(
    loaded: LoadedModel,
    view: ImageSource,
    ndim: int,
    given: tuple[Ints | None, Ints | None, Ints | None],
    frozen: bool,
    max_memory: str | None,
    batch_size: int,
    device: str,
    progress: bool,
) -> AutoGeometry:
    """Block, halo and alignment, those not ``given`` measured from the model."""
    try:
        budget = None if max_memory is None else parse_memory(max_memory)
    except ValueError as exc:
        raise SettingsError(f"--max-memory: {exc}") from None
    # with frozen norms the halo is the receptive field of the frozen network
    probe = (
        freeze_norms(loaded.module, placeholder_stats(loaded.module)) if frozen else loaded.module
    )
    block, halo, alignment = given
    return auto_geometry(
        probe.to(resolve_device(device)),
        ndim,
        channels_in(view),
        view.shape[-ndim:],
        block=block,
        halo=halo,
        alignment=alignment,
        max_memory=budget,
        batch_size=batch_size,
        progress=progress,
    )


def _with_global_stats(
    prepared: PreparedPrediction,
    loaded: LoadedModel,
    source: ImageSource,
    view: ImageSource,
    fraction: float,
    cache: Path,
    batch_size: int,
    device: str,
    progress: bool,
    log: Callable[[str], None],
) -> torch.nn.Module:
    """The model with whole-image statistics of its tile-wise norms frozen in.

    The statistics depend on the normalized input, so the input normalization is
    fitted first; they are reused from ``cache`` when it holds those of this model,
    image and geometry.
    """
    normalization = prepared.normalization
    if normalization is not None:
        normalization.fit(view.array, channel_axis=channel_axis(view), progress=progress)
    stat = source.path.stat() if source.path is not None else None
    model, stats, reused = global_stats_model(
        loaded.module,
        view.array,
        **prepared.geometry,
        fraction=fraction,
        cache=cache,
        image_id={
            "path": str(source.path.resolve()) if source.path else None,
            "key": source.key,
            "level": source.level,
            "mtime_ns": stat.st_mtime_ns if stat else None,
            "size": stat.st_size if stat else None,
        },
        input_transform=normalization,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    log(_statistics_message(stats, reused, cache))
    return model


def _statistics_message(stats: GlobalNormStats, reused: bool, cache: Path) -> str:
    how = (
        f"reused from {cache}"
        if reused
        else f"computed ({stats.blocks_used} of {stats.blocks_total} blocks per layer), "
        f"saved to {cache}"
    )
    err = (
        ""
        if stats.max_stderr is None or stats.blocks_used == stats.blocks_total
        else f"; estimated standard error of the means ≤ {stats.max_stderr:.2g} σ"
    )
    return f"whole-image statistics of {len(stats.layers)} norm layers {how}{err}"
