"""Predicting an image file block by block into an output file, resumably.

:func:`predict_file` plans a run: it checks the settings, opens the input once, lays
the block plan (a :class:`~nahtlos.engine.geometry.BlockGrid`) over it, fits global
input percentiles once (cached in the output), and writes the blocks, in this process
or on a Dask cluster (:mod:`nahtlos.engine.cluster`; both predict the same batches
through the same code, so their outputs are identical). ``.zarr`` outputs
(:class:`~nahtlos.io.store.PredictionStore`) record each block after its data is
written and describe the run (its plan), so that an interrupted run continues with
``resume=True`` and ends bit-identical to an uninterrupted one; ``.npy`` and ``.tif``
outputs (:class:`~nahtlos.io.writers.PendingOutput`) appear only when complete.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch

from ..errors import FormatError, NahtlosWarning, SettingsError
from ..io import (
    ImageSource,
    InputNormalization,
    OutputDtype,
    PendingOutput,
    PredictionStore,
    Segmentation,
    check_output_path,
    open_source,
    split_key,
)
from ..nets.checkpoint import LoadedModel, load_model
from .cluster import Job, predict_job, predict_on_dask
from .geometry import Block, BlockGrid
from .inputs import channel_axis, channels_in, infer_ndim, percentile_chunks, window_reader
from .predict import PredictionStats, resolve_device

__all__ = ["ACTIVATIONS", "PredictionReport", "predict_file"]

Activation = Literal["none", "sigmoid", "softmax"]
ACTIVATIONS = ("none", "sigmoid", "softmax")
ModelLike = str | os.PathLike[str] | LoadedModel | torch.nn.Module


@dataclass
class PredictionReport:
    """What :func:`predict_file` did.

    Attributes
    ----------
    output
        The written output.
    blocks
        Blocks in the plan.
    skipped
        Blocks found complete in a resumed output and not predicted again.
    predicted
        Blocks predicted by this run.
    seconds
        Wall time of the run, percentiles and pyramid included.
    scheduler
        ``"in-process"`` or the Dask scheduler's address.
    phases
        Seconds spent on ``"percentiles"`` (the global input percentiles),
        ``"startup"`` (starting or joining a cluster, shipping the model),
        ``"predict"`` (reading, predicting and writing the blocks) and
        ``"finalize"`` (pyramid and metadata).
    stats
        Timings of the in-process prediction (empty for Dask runs).
    """

    output: Path
    blocks: int
    skipped: int
    predicted: int
    seconds: float
    scheduler: str
    phases: dict[str, float] = field(default_factory=dict)
    stats: PredictionStats = field(default_factory=PredictionStats)

    def summary(self) -> str:
        """One line for the user: what was written, and how many blocks it took."""
        done = f", {self.skipped} of {self.blocks} blocks already done" if self.skipped else ""
        return f"wrote {self.output} ({self.predicted} blocks predicted{done})"


def predict_file(
    model: ModelLike,
    image: str | os.PathLike[str] | ImageSource,
    output: str | os.PathLike[str],
    block: int | Sequence[int],
    halo: int | Sequence[int] = 0,
    alignment: int | Sequence[int] = 1,
    *,
    input_key: str | None = None,
    level: int = 0,
    ndim: int | None = None,
    auto: bool = False,
    batch_size: int = 1,
    device: str | None = None,
    activation: Activation = "none",
    normalization: InputNormalization | None = None,
    output_dtype: OutputDtype = "float32",
    segmentation: Segmentation | None = None,
    threshold: float = 0.5,
    channel_names: Sequence[str] | None = None,
    pyramid_levels: int | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    max_windows: int | None = None,
    retries: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionReport:
    """Predict an image file block by block into an output file.

    Parameters
    ----------
    model
        A TorchScript file, a :class:`~nahtlos.nets.checkpoint.LoadedModel`, or a module
        (in eval mode) mapping ``(N, C_in, *window)`` to ``(N, C_out, *window)``.
    image
        Input path (``.tif``, ``.npy``, ``.h5:dataset``, ``.zarr``, OME-Zarr), or an
        :class:`~nahtlos.io.source.ImageSource` opened from a file.
    output
        ``.zarr`` (OME-Zarr 0.5, resumable, needed for Dask, labels and pyramid), or
        ``.npy``/``.tif`` (written to a temporary name and moved into place).
    block, halo, alignment, auto
        The block plan, see :class:`~nahtlos.engine.geometry.BlockGrid`.
    input_key, level
        Dataset inside the input, and the resolution level of an OME-Zarr input.
    ndim
        Spatial axes of the model (default: from ``block``, the model's metadata or
        the input's axes).
    batch_size
        Windows per forward pass (and per Dask task).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``None``/``"auto"``; on Dask, each
        worker resolves it for itself (one GPU per worker).
    activation
        Applied to the network output: ``"none"``, ``"sigmoid"`` or ``"softmax"``.
    normalization
        Input normalization; global percentiles are computed once, out of core,
        and cached in the output's metadata, so that a resumed run reuses them.
    output_dtype
        ``"float32"``, ``"float16"`` or ``"uint8"`` (probabilities × 255; needs an
        activation).
    segmentation, threshold, channel_names
        Optional label images in the OME-Zarr ``labels/`` group; see
        :meth:`~nahtlos.io.store.PredictionStore.create`.
    pyramid_levels
        Extra resolution levels of the OME-Zarr output (default: until it fits a block).
    scheduler
        ``None`` (this process), ``"local"`` (a new ``LocalCluster`` of ``workers``
        processes), a scheduler address, or a ``distributed.Client``.
    workers
        Worker processes of a local cluster (default 1); each gets an equal share
        of this machine's cores for torch.
    max_windows
        Upper bound on the windows in flight (read, predicted or being written).
    retries
        How often Dask retries a failed task before the run stops and reports it.
    resume
        Continue an interrupted ``.zarr`` output, skipping blocks already written.
    overwrite
        Replace an existing output.
    progress
        Show progress bars.

    Raises
    ------
    SettingsError, FormatError, BlockShapeError, InputNotFoundError
        For invalid settings or inputs, before anything is written.
    BlockFailedError
        If a Dask task failed on every try.
    """
    clock = _Clock()
    out_path = _checked_output(
        output, activation, output_dtype, segmentation, scheduler, workers, resume, overwrite
    )
    _check_batches(batch_size, max_windows)
    loaded, module, model_id = _resolve_model(model)
    source = image if isinstance(image, ImageSource) else _open(image, input_key, level)
    if source.path is None:
        raise FormatError("predict_file needs an image opened from a file (workers reopen it)")
    ndim = ndim if ndim is not None else infer_ndim(block, loaded, source)
    view = source.for_model(ndim)
    grid = BlockGrid(view.shape[-ndim:], block, halo, alignment, auto=auto)
    resolve_device(device)  # an unavailable device fails before anything is written
    plan = _plan(
        source,
        view,
        model_id,
        grid,
        batch_size=batch_size,
        activation=activation,
        output_dtype=output_dtype,
        segmentation=segmentation,
        threshold=float(threshold),
        normalization=None if normalization is None else normalization.to_dict(),
    )
    store = _resumed_store(out_path, plan) if resume else None
    if store is not None:
        plan = store.plan  # keeps the cached percentiles
        if store.complete:
            total = len(grid)
            return PredictionReport(out_path, total, total, 0, clock.elapsed(), "already complete")
    clock.start_phases()
    normalization = _fitted(normalization, plan, view, progress)
    clock.phase("percentiles")
    device_name = str(device or "auto")
    job = _job(source, grid, out_path, normalization, batch_size, device_name, activation)
    target = _Output(
        out_path,
        grid.block,
        output_dtype,
        segmentation,
        threshold,
        channel_names,
        pyramid_levels,
        overwrite,
        _spatial_axes(view, ndim),
        tuple(view.translation[-ndim:]),
        plan,
    )
    batches, skipped = _todo(grid, batch_size, store)
    run = _Run(job, target, clock, len(grid), skipped)
    if scheduler is None:
        reader = window_reader(source, ndim, grid.window_shape)
        return run.in_process(module, reader.array, store, batches, max_windows, progress)
    model_ref = module if loaded is None else (str(loaded.path.resolve()), model_id["sha256"])
    return run.on_dask(
        scheduler,
        workers,
        model_ref,
        channels_in(view),
        batches,
        store,
        max_windows,
        retries,
        progress,
    )


def _checked_output(
    output: str | os.PathLike[str],
    activation: str,
    output_dtype: str,
    segmentation: Segmentation | None,
    scheduler: Any,
    workers: int | None,
    resume: bool,
    overwrite: bool,
) -> Path:
    """The output path, once the settings are known to fit it and each other."""
    if resume and overwrite:
        raise SettingsError("--resume continues an output and --overwrite replaces it: choose one")
    out_path = check_output_path(output, overwrite, resume)
    zarr_out = out_path.suffix.lower() == ".zarr"
    if activation not in ACTIVATIONS:
        raise SettingsError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if output_dtype == "uint8" and activation == "none":
        raise SettingsError(
            "uint8 output stores probabilities in [0, 1] scaled by 255, but the activation is "
            "'none'; choose --activation sigmoid or softmax, or --output-dtype float16/float32"
        )
    if segmentation is not None and not PredictionStore.is_ome(out_path):
        raise SettingsError(
            f"segmentation is written as OME-Zarr labels: name the output "
            f"{out_path.stem.removesuffix('.ome')}.ome.zarr instead of {out_path.name}"
        )
    if scheduler is not None and not zarr_out:
        raise SettingsError(
            f"Dask workers write chunks of a .zarr output; {str(out_path)!r} is "
            f"{out_path.suffix}: write to a .zarr output"
        )
    if workers is not None and scheduler not in ("local",):
        raise SettingsError("--workers starts a local cluster: use it with --scheduler local")
    return out_path


def _check_batches(batch_size: int, max_windows: int | None) -> None:
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 3 * batch_size:
        raise SettingsError(
            f"max_windows={max_windows} is below 3 batches of {batch_size} (one read ahead, one "
            f"predicted, one being written); use at least {3 * batch_size}"
        )


def _resolve_model(
    model: ModelLike,
) -> tuple[LoadedModel | None, torch.nn.Module, dict[str, str]]:
    """The loaded model file (if any), the module, and what identifies it in the plan."""
    loaded = model if isinstance(model, LoadedModel) else None
    if isinstance(model, str | os.PathLike):
        loaded = load_model(model, map_location="cpu")
    if loaded is not None:
        identity = {"file": str(loaded.path.resolve()), "sha256": _file_digest(loaded.path)}
        return loaded, loaded.module, identity
    assert isinstance(model, torch.nn.Module)
    return None, model, {"module": type(model).__qualname__, "sha256": _module_digest(model)}


def _open(image: str | os.PathLike[str], key: str | None, level: int) -> ImageSource:
    path, key = split_key(image, key)
    return open_source(path, key, level=level)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_mtime_ns), int(st.st_size)


def _job(
    source: ImageSource,
    grid: BlockGrid,
    out_path: Path,
    normalization: InputNormalization | None,
    batch_size: int,
    device: str,
    activation: str,
) -> Job:
    """What predicting the blocks needs, for this process and for every Dask task."""
    assert source.path is not None
    return Job(
        input_path=str(source.path.resolve()),
        input_key=source.key,
        level=source.level,
        ndim=grid.ndim,
        input_stamp=_stamp(source.path),
        shape=grid.shape,
        block=grid.block,
        halo=grid.halo,
        alignment=grid.alignment,
        batch_size=batch_size,
        device=device,
        activation=activation,
        normalization=normalization,
        output=str(out_path.resolve()),
    )


def _plan(
    source: ImageSource,
    view: ImageSource,
    model_id: dict[str, str],
    grid: BlockGrid,
    **settings: Any,
) -> dict[str, Any]:
    """What a run is, in JSON: stored in a ``.zarr`` output and compared on resume."""
    assert source.path is not None
    return {
        "input": {
            "path": str(source.path.resolve()),
            "key": source.key,
            "level": source.level,
            "shape": list(view.shape),
            "dtype": str(view.dtype),
        },
        "model": model_id,
        "block": list(grid.block),
        "halo": list(grid.halo),
        "alignment": list(grid.alignment),
        **settings,
    }


def _resumed_store(out_path: Path, plan: dict[str, Any]) -> PredictionStore | None:
    """The interrupted ``.zarr`` output to continue, checked against this run's plan."""
    if out_path.suffix.lower() != ".zarr" or not out_path.exists():
        return None
    store = PredictionStore.open(out_path)
    _check_plan(out_path, store.plan, plan)
    return store


def _check_plan(path: Path, stored: dict[str, Any], plan: dict[str, Any]) -> None:
    for key, value in plan.items():
        old = stored.get(key)
        if key == "normalization" and old is not None and value is not None:
            # the cached percentiles are reused; the settings must agree
            old = {k: v for k, v in old.items() if k != "values" or value.get("values")}
            value = {k: v for k, v in value.items() if k != "values" or value.get("values")}
        if old != value:
            raise SettingsError(
                f"cannot resume {str(path)!r}: it was started with {key}={old!r} but this run "
                f"has {key}={value!r}; resume with the same settings or pass --overwrite"
            )


def _fitted(
    normalization: InputNormalization | None,
    plan: dict[str, Any],
    view: ImageSource,
    progress: bool,
) -> InputNormalization | None:
    """The input normalization of the plan, its global percentiles fitted (and cached).

    The percentiles come from the plan when a resumed output has them; otherwise one
    streaming pass over the input computes them, read in pieces of about its chunks.
    """
    if normalization is None:
        return None
    normalization = InputNormalization.from_dict(plan["normalization"] or {})
    if normalization.mode == "global" and normalization.values is None:
        axis = channel_axis(view)
        normalization.fit(
            view.array, channel_axis=axis, chunks=percentile_chunks(view, axis), progress=progress
        )
        plan["normalization"] = normalization.to_dict()
    return normalization


def _todo(
    grid: BlockGrid, batch_size: int, store: PredictionStore | None
) -> tuple[list[list[Block]], int]:
    """The batches still to predict, and the number of blocks a resumed output has."""
    blocks = list(grid)
    batches = [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]
    done = store.done() if store is not None else np.zeros(grid.grid_shape, bool)
    # Whole batches are redone, so every window is predicted in the same batch as in an
    # uninterrupted run (batch composition changes the floating-point results).
    todo = [b for b in batches if not all(done[blk.index] for blk in b)]
    return todo, len(blocks) - sum(len(b) for b in todo)


class _SpatialAxes(TypedDict):
    axes: tuple[str, ...]
    scale: tuple[float, ...]
    units: tuple[str | None, ...]


def _spatial_axes(view: ImageSource, ndim: int) -> _SpatialAxes:
    """Names, pixel sizes and units of the input's spatial axes, for the output."""
    axes = view.axes[-ndim:]
    scale, units = view.axis_info(axes)
    return {"axes": axes, "scale": scale, "units": units}


@dataclass
class _Output:
    """Where and how the prediction is written."""

    path: Path
    block: tuple[int, ...]
    dtype: OutputDtype
    segmentation: Segmentation | None
    threshold: float
    channel_names: Sequence[str] | None
    pyramid_levels: int | None
    overwrite: bool
    spatial: _SpatialAxes
    translation: tuple[float, ...]
    plan: dict[str, Any]

    def store(self, shape: tuple[int, ...]) -> PredictionStore:
        """A new store for a model with ``shape[0]`` output channels."""
        names = list(self.channel_names) if self.channel_names else None
        if names is not None and len(names) != shape[0]:
            warnings.warn(
                f"{len(names)} channel names ({', '.join(names)}) for a model with {shape[0]} "
                "output channels: the channels are called c0, c1, ... instead",
                NahtlosWarning,
                stacklevel=3,
            )
            names = None
        return PredictionStore.create(
            self.path,
            shape=shape,
            block=self.block,
            dtype=self.dtype,
            translation=self.translation,
            channel_names=names,
            segmentation=self.segmentation,
            threshold=self.threshold,
            pyramid_levels=self.pyramid_levels,
            plan={**self.plan, "run_id": uuid.uuid4().hex},
            overwrite=True,
            **self.spatial,
        )

    def pending(self) -> PendingOutput:
        """A ``.npy`` or ``.tif`` output, moved into place when complete."""
        return PendingOutput(
            self.path, chunks=self.block, dtype=self.dtype, overwrite=self.overwrite, **self.spatial
        )


class _Clock:
    """Wall time of a run, and of its phases."""

    def __init__(self) -> None:
        self.start = self.tick = time.perf_counter()
        self.phases: dict[str, float] = {}

    def start_phases(self) -> None:
        """Start timing the first phase (planning does not count as one)."""
        self.tick = time.perf_counter()

    def phase(self, name: str) -> None:
        """Count the time since the last phase ended towards ``name``."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.tick
        self.tick = now

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start


@dataclass
class _Run:
    """The blocks of a planned run, predicted in this process, and its report."""

    job: Job
    output: _Output
    clock: _Clock
    blocks: int
    skipped: int
    stats: PredictionStats = field(default_factory=PredictionStats)

    def report(self, scheduler: str) -> PredictionReport:
        """What the run did; ``scheduler`` says where it ran."""
        return PredictionReport(
            self.output.path,
            self.blocks,
            self.skipped,
            self.blocks - self.skipped,
            self.clock.elapsed(),
            scheduler,
            self.clock.phases,
            self.stats,
        )

    def in_process(
        self,
        module: torch.nn.Module,
        image: Any,
        store: PredictionStore | None,
        batches: list[list[Block]],
        max_windows: int | None,
        progress: bool,
    ) -> PredictionReport:
        """Predict ``batches`` from ``image`` (the model's view of the input) here.

        A ``.zarr`` output (``store`` when resumed) is created once the model's output
        channels are known and finalized at the end; another output is written under
        a temporary name and moved into place when complete.
        """
        job = self.job
        prefetch = 2 if max_windows is None else max(1, (max_windows // job.batch_size - 1) // 2)
        device = resolve_device(job.device)

        def run(out: Any, **options: Any) -> None:
            options.update(prefetch=prefetch, progress=progress, stats=self.stats)
            predict_job(job, module, image, device, out, **options)

        if self.output.path.suffix.lower() != ".zarr":
            pending = self.output.pending()
            try:
                run(pending)
                pending.commit()
            except BaseException:
                pending.discard()
                raise
            self.clock.phase("predict")
            return self.report("in-process")
        made: list[PredictionStore] = [store] if store is not None else []

        def factory(shape: tuple[int, ...]) -> PredictionStore:
            made.append(self.output.store(shape))
            return made[0]

        run(
            store if store is not None else factory,
            blocks=[blk for batch in batches for blk in batch],
            on_block_done=lambda blk: made[0].mark_done(blk),
        )
        if not made:  # an empty plan cannot happen for a non-empty image
            raise RuntimeError("no block was predicted")
        self.clock.phase("predict")
        made[0].finalize(scheduler="threads")
        self.clock.phase("finalize")
        return self.report("in-process")

    def on_dask(
        self,
        scheduler: Any,
        workers: int | None,
        model: torch.nn.Module | tuple[str, str],
        channels_in: int,
        batches: list[list[Block]],
        store: PredictionStore | None,
        max_windows: int | None,
        retries: int,
        progress: bool,
    ) -> PredictionReport:
        """Predict ``batches`` on Dask (see :func:`~nahtlos.engine.cluster.predict_on_dask`)."""

        def open_store(channels: int) -> PredictionStore:
            if store is not None:
                return store
            return self.output.store((channels, *self.job.shape))

        address = predict_on_dask(
            scheduler,
            workers,
            self.job,
            model,
            channels_in,
            batches,
            open_store,
            max_windows=max_windows,
            retries=retries,
            progress=progress,
            done=(self.skipped, self.blocks),
            phase=self.clock.phase,
        )
        return self.report(address)  # without timings: those are of in-process runs
