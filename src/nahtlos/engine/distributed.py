"""Block-wise prediction of image files, in this process or on a Dask cluster, resumably.

:func:`predict_file` runs one block plan (a :class:`~nahtlos.engine.geometry.BlockGrid`) from
an input file to an output file:

- in this process, through :func:`~nahtlos.engine.predict.predict_blockwise` (a bounded
  number of windows in flight, so memory does not grow with the volume);
- on Dask (``scheduler="local"`` starts a ``distributed.LocalCluster``, an address
  such as ``"tcp://host:8786"`` joins a running one): one task per batch of blocks,
  each reading its windows with their halo, predicting and writing its chunk-aligned
  blocks. The model is loaded once per worker process (from its TorchScript file, or
  scattered once when given as a module), never pickled per task.

Both paths run the very same per-batch code, in the same batches, so their outputs
are identical. ``.zarr`` outputs (:class:`~nahtlos.io.files.PredictionStore`) record each
block after its data is written; an interrupted run continues with ``resume=True``
and ends bit-identical to an uninterrupted one. Failed tasks are retried a bounded
number of times, then reported with their block.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BlockFailedError, FormatError, NahtlosWarning, SettingsError
from ..io import (
    ChunkCache,
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
from ..nets.state import activation_function
from .geometry import Block, BlockGrid
from .predict import PredictionStats, predict_blockwise, resolve_device

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


@dataclass(frozen=True)
class _Job:
    """Everything a task needs, small and picklable (no arrays, no model)."""

    input_path: str
    input_key: str | None
    level: int
    ndim: int
    input_stamp: tuple[int, int]
    shape: tuple[int, ...]
    block: tuple[int, ...]
    halo: tuple[int, ...]
    alignment: tuple[int, ...]
    batch_size: int
    device: str
    activation: str
    normalization: InputNormalization | None
    output: str
    run_id: str
    torch_threads: int | None


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
        :class:`~nahtlos.io.files.ImageSource` opened from a file.
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
        :meth:`~nahtlos.io.files.PredictionStore.create`.
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
    t0 = time.perf_counter()
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
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 3 * batch_size:
        raise SettingsError(
            f"max_windows={max_windows} is below 3 batches of {batch_size} (one read ahead, one "
            f"predicted, one being written); use at least {3 * batch_size}"
        )

    loaded = model if isinstance(model, LoadedModel) else None
    module: torch.nn.Module
    if isinstance(model, str | os.PathLike):
        loaded = load_model(model, map_location="cpu")
    if loaded is not None:
        module = loaded.module
        model_id = {"file": str(loaded.path.resolve()), "sha256": _file_digest(loaded.path)}
    else:
        assert isinstance(model, torch.nn.Module)
        module = model
        model_id = {"module": type(model).__qualname__, "sha256": _module_digest(model)}

    if isinstance(image, ImageSource):
        source = image
    else:
        path, key = split_key(image, input_key)
        source = open_source(path, key, level=level)
    if source.path is None:
        raise FormatError("predict_file needs an image opened from a file (workers reopen it)")
    if ndim is None:
        ndim = _infer_ndim(block, loaded, source)
    view = source.for_model(ndim)
    spatial_shape = view.shape[-ndim:]
    grid = BlockGrid(spatial_shape, block, halo, alignment, auto=auto)
    read_view = _window_reader(source, ndim, grid.window_shape)
    channels_in = view.shape[0] if view.axes[0] == "c" else 1
    dev = resolve_device(device)

    plan: dict[str, Any] = {
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
        "batch_size": batch_size,
        "activation": activation,
        "output_dtype": output_dtype,
        "segmentation": segmentation,
        "threshold": float(threshold),
        "normalization": None if normalization is None else normalization.to_dict(),
    }

    store: PredictionStore | None = None
    if zarr_out and resume and out_path.exists():
        store = PredictionStore.open(out_path)
        _check_plan(out_path, store.plan, plan)
        plan = store.plan  # keeps the cached percentiles
        if store.complete:
            total = len(grid)
            return PredictionReport(
                out_path, total, total, 0, time.perf_counter() - t0, "already complete"
            )
    phases: dict[str, float] = {}
    tick = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - tick
        tick = now

    if normalization is not None:
        normalization = InputNormalization.from_dict(plan["normalization"] or {})
        if normalization.mode == "global" and normalization.values is None:
            channel_axis = 0 if view.axes[0] == "c" else None
            # one streaming pass, read in pieces of about the input's chunks
            normalization.fit(
                view.array,
                channel_axis=channel_axis,
                chunks=_read_chunks(view, channel_axis),
                progress=progress,
            )
            plan["normalization"] = normalization.to_dict()
    phase("percentiles")

    blocks_all = list(grid)
    batches = [blocks_all[i : i + batch_size] for i in range(0, len(blocks_all), batch_size)]
    done = store.done() if store is not None else np.zeros(grid.grid_shape, bool)
    # Whole batches are redone, so every window is predicted in the same batch as in an
    # uninterrupted run (batch composition changes the floating-point results).
    todo = [b for b in batches if not all(done[blk.index] for blk in b)]
    skipped = len(blocks_all) - sum(len(b) for b in todo)

    spatial_axes = view.axes[-ndim:]
    scale, units = view.axis_info(spatial_axes)
    translation = tuple(view.translation[-ndim:])

    def create_store(shape: tuple[int, ...]) -> PredictionStore:
        names = list(channel_names) if channel_names else None
        if names is not None and len(names) != shape[0]:
            warnings.warn(
                f"{len(names)} channel names ({', '.join(names)}) for a model with {shape[0]} "
                "output channels: the channels are called c0, c1, ... instead",
                NahtlosWarning,
                stacklevel=3,
            )
            names = None
        return PredictionStore.create(
            out_path,
            shape=shape,
            block=grid.block,
            dtype=output_dtype,
            axes=spatial_axes,
            scale=scale,
            units=units,
            translation=translation,
            channel_names=names,
            segmentation=segmentation,
            threshold=threshold,
            pyramid_levels=pyramid_levels,
            plan={**plan, "run_id": uuid.uuid4().hex},
            overwrite=True,
        )

    stats = PredictionStats()
    out_transform = activation_function(activation)
    if scheduler is None:
        prefetch = 2 if max_windows is None else max(1, (max_windows // batch_size - 1) // 2)

        def run_in_process(out: Any, **extra: Any) -> None:
            predict_blockwise(
                module,
                read_view.array,
                grid.block,
                grid.halo,
                grid.alignment,
                ndim=ndim,
                batch_size=batch_size,
                device=dev,
                out=out,
                input_transform=normalization,
                output_transform=out_transform,
                prefetch=prefetch,
                progress=progress,
                stats=stats,
                **extra,
            )

        if not zarr_out:
            pending = PendingOutput(
                out_path,
                chunks=grid.block,
                dtype=output_dtype,
                overwrite=overwrite,
                axes=spatial_axes,
                scale=scale,
                units=units,
            )
            try:
                run_in_process(pending)
                pending.commit()
            except BaseException:
                pending.discard()
                raise
            phase("predict")
            return PredictionReport(
                out_path,
                len(blocks_all),
                0,
                len(blocks_all),
                time.perf_counter() - t0,
                "in-process",
                phases,
                stats,
            )
        made: list[PredictionStore] = [store] if store is not None else []

        def factory(shape: tuple[int, ...]) -> PredictionStore:
            made.append(create_store(shape))
            return made[0]

        run_in_process(
            store if store is not None else factory,
            blocks=[blk for batch in todo for blk in batch],
            on_block_done=lambda blk: made[0].mark_done(blk),
        )
        if not made:  # an empty plan cannot happen for a non-empty image
            raise RuntimeError("no block was predicted")
        phase("predict")
        made[0].finalize(scheduler="threads")
        phase("finalize")
        return PredictionReport(
            out_path,
            len(blocks_all),
            skipped,
            len(blocks_all) - skipped,
            time.perf_counter() - t0,
            "in-process",
            phases,
            stats,
        )

    client, close, torch_threads = _connect(scheduler, workers)
    try:
        job = _Job(
            input_path=str(source.path.resolve()),
            input_key=source.key,
            level=source.level,
            ndim=ndim,
            input_stamp=_stamp(source.path),
            shape=spatial_shape,
            block=grid.block,
            halo=grid.halo,
            alignment=grid.alignment,
            batch_size=batch_size,
            device=str(device or "auto"),
            activation=activation,
            normalization=normalization,
            output=str(out_path.resolve()),
            run_id="",
            torch_threads=torch_threads,
        )
        model_ref: Any
        if loaded is not None:
            model_ref = ("file", str(loaded.path.resolve()), model_id["sha256"])
        else:
            # shipped once to every worker and kept there, not pickled per task
            model_ref = client.scatter(module, broadcast=True, hash=False)
        channels_out = _warm_workers(client, job, model_ref, channels_in, grid.window_shape)
        if store is None:
            store = create_store((channels_out, *spatial_shape))
        job = replace(job, run_id=str(store.plan.get("run_id", "")))
        phase("startup")
        in_flight = (
            max(1, max_windows // batch_size) if max_windows else _worker_threads(client) * 2
        )
        _run_tasks(
            client, job, model_ref, todo, in_flight, retries, progress, skipped, len(blocks_all)
        )
        phase("predict")
        store.finalize(scheduler=client)
        phase("finalize")
        address = str(client.scheduler.address) if client.scheduler else "dask"
    finally:
        close()
    return PredictionReport(
        out_path,
        len(blocks_all),
        skipped,
        len(blocks_all) - skipped,
        time.perf_counter() - t0,
        address,
        phases,
    )


def _window_reader(source: ImageSource, ndim: int, window: tuple[int, ...]) -> ImageSource:
    """The model's view of ``source``, reading through a cache of decoded chunks.

    The cache holds the chunks of one window plus two columns of chunks along the
    last axis: consecutive windows (blocks go in grid order, the last axis fastest)
    then decode only the chunks they do not share with the window before, even with
    two windows read at once. It is bounded by 256 MiB; files without regular chunks
    are read directly.
    """
    chunks = getattr(source.array, "chunks", None)
    view = source.for_model(ndim)
    if not (isinstance(chunks, tuple) and len(chunks) == len(source.shape)):
        return view
    spatial = dict(zip(("z", "y", "x")[-ndim:], window, strict=True))
    extent = []
    for axis, n in zip(source.axes, source.shape, strict=True):
        if axis in spatial and axis in view.axes:
            extent.append(spatial[axis])
        elif view.axes[0] == "c" and axis in ("c", "s") and n == view.shape[0]:
            extent.append(n)
        else:
            extent.append(1)
    if not source.axes_known:  # the view guessed the axes: spatial ones are the last
        extent = [*source.shape[: len(source.shape) - ndim], *window]
    per_window = ChunkCache.chunks_per_window(extent, chunks)
    column = per_window // (-(-extent[-1] // int(chunks[-1])) + 1)
    chunk_bytes = math.prod(int(c) for c in chunks) * source.dtype.itemsize
    capacity = min(per_window + 2 * column, (256 << 20) // max(chunk_bytes, 1))
    if capacity < per_window:  # too little room to share anything: read directly
        return view
    return replace(source, array=ChunkCache(source.array, capacity)).for_model(ndim)


def _infer_ndim(block: int | Sequence[int], loaded: LoadedModel | None, source: ImageSource) -> int:
    if not isinstance(block, int):
        return len(tuple(block))
    if loaded is not None and loaded.metadata.get("ndim"):
        return int(loaded.metadata["ndim"])
    if source.axes_known and len(source.spatial_axes) in (2, 3):
        # a single z plane is still a 2D image
        z = source.axes.index("z") if "z" in source.axes else None
        return 2 if z is not None and source.shape[z] == 1 else len(source.spatial_axes)
    n = len(source.shape)
    return n if n <= 3 else n - 1


def _read_chunks(view: ImageSource, channel_axis: int | None) -> tuple[int, ...]:
    """Read shape for the percentile pass: the file's chunks, grown to ~2M values.

    Bigger reads only cost memory: the histogram update holds several 8-byte copies.
    """
    shape = view.shape
    chunks = getattr(view.array, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(shape):
        base = [int(c) for c in chunks]
    else:
        base = [1] * len(shape)
    if channel_axis is not None:
        base[channel_axis] = 1
    for axis in range(len(shape) - 1, -1, -1):
        if axis == channel_axis:
            continue
        other = math.prod(base) // base[axis]
        base[axis] = max(base[axis], min(shape[axis], max(1, (1 << 21) // other)))
    return tuple(base)


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


# --------------------------------------------------------------------------- Dask


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _connect(scheduler: Any, workers: int | None) -> tuple[Any, Callable[[], None], int | None]:
    """A client for ``scheduler``, a function closing what we opened, and torch threads."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, lambda: None, None
    if scheduler == "local":
        n = workers or 1
        if n < 1:
            raise SettingsError(f"workers must be at least 1, got {n}")
        threads = max(1, _cores() // n)
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: never clash with another cluster
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return client, close, threads
    if isinstance(scheduler, str) and "://" in scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise SettingsError(
                f"cannot reach the Dask scheduler at {scheduler!r}: {exc}; start it (e.g. with "
                "dask-jobqueue or `dask scheduler`) or use --scheduler local"
            ) from exc
        return client, client.close, None
    raise SettingsError(
        f"scheduler {scheduler!r} is not 'local' or an address such as tcp://host:8786"
    )


def _worker_threads(client: Any) -> int:
    info = client.scheduler_info()
    return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))


def _run_tasks(
    client: Any,
    job: _Job,
    model_ref: Any,
    batches: list[list[Block]],
    in_flight: int,
    retries: int,
    progress: bool,
    skipped: int,
    total: int,
) -> None:
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    queue = iter(batches)
    running: dict[str, tuple[Any, list[Block]]] = {}
    completed = as_completed()

    def submit_next() -> None:
        batch = next(queue, None)
        if batch is None:
            return
        first = "-".join(str(i) for i in batch[0].index)
        future = client.submit(
            _predict_task,
            job,
            model_ref,
            [b.index for b in batch],
            key=f"nahtlos-block-{first}-{token}",
            retries=retries,
            pure=False,
        )
        running[future.key] = (future, batch)
        completed.add(future)

    bar = tqdm(
        total=total,
        initial=skipped,
        unit="block",
        desc="predict",
        disable=not progress,
        leave=False,
    )
    try:
        for _ in range(in_flight):
            submit_next()
        for future in completed:
            _, batch = running.pop(future.key)
            if future.status != "finished":
                exc = future.exception()
                blk = batch[0]
                where = ", ".join(f"{s.start}:{s.stop}" for s in blk.inner)
                raise BlockFailedError(
                    f"block {blk.index} (voxels {where}"
                    f"{f' and {len(batch) - 1} more in its batch' if len(batch) > 1 else ''}) "
                    f"failed after {retries} retries: {type(exc).__name__}: {exc}; the output "
                    "keeps every finished block: fix the cause and run again with --resume",
                    block=blk.index,
                ) from exc
            bar.update(len(batch))
            submit_next()
    except BaseException:
        client.cancel([f for f, _ in running.values()])
        raise
    finally:
        bar.close()


_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


def _set_torch_threads(n: int | None) -> None:
    if n and not _THREADS_SET:
        torch.set_num_threads(n)
        _THREADS_SET.append(n)


@functools.lru_cache(maxsize=4)
def _model_from_file(path: str, digest: str, device: str) -> torch.nn.Module:
    return load_model(path, map_location=device).module


def _worker_model(model_ref: Any, device: torch.device) -> torch.nn.Module:
    if isinstance(model_ref, tuple) and model_ref and model_ref[0] == "file":
        with _LOCK:  # loaded once per worker process, even with several threads
            return _model_from_file(model_ref[1], model_ref[2], str(device))
    module: torch.nn.Module = model_ref
    return module


@functools.lru_cache(maxsize=8)
def _image(
    path: str,
    key: str | None,
    level: int,
    ndim: int,
    stamp: tuple[int, int],
    window: tuple[int, ...],
) -> Any:
    return _window_reader(open_source(path, key, level=level), ndim, window).array


@functools.lru_cache(maxsize=8)
def _store(path: str, run_id: str) -> PredictionStore:
    return PredictionStore.open(path)


def _image_key(job: _Job) -> tuple[Any, ...]:
    window = tuple(b + 2 * h for b, h in zip(job.block, job.halo, strict=True))
    return job.input_path, job.input_key, job.level, job.ndim, job.input_stamp, window


def _warm_workers(
    client: Any, job: _Job, model_ref: Any, channels_in: int, window: tuple[int, ...]
) -> int:
    """Load the model, open the input and run one window of zeros on every worker.

    Returns the model's output channels. A worker that cannot warm up is left alone
    (its tasks will fail and be retried elsewhere); if none can, the run stops here,
    before the output is created.
    """
    workers = list(client.scheduler_info().get("workers", {}))
    futures = [
        client.submit(
            _warm_task,
            job,
            model_ref,
            channels_in,
            workers=[w],
            allow_other_workers=False,
            pure=False,
        )
        for w in workers
    ]
    first: BaseException | None = None
    channels: int | None = None
    for future in futures:
        try:
            channels = int(future.result())
        except Exception as exc:
            first = first or exc
    if channels is None:
        raise BlockFailedError(
            f"the model failed on a {window} window of zeros on every Dask worker: "
            f"{type(first).__name__}: {first}"
        ) from first
    return channels


def _warm_task(job: _Job, model_ref: Any, channels_in: int) -> int:
    """Prepare a worker: threads, model, input; returns the model's output channels.

    The forward pass on zeros also makes the first real window as fast as the rest
    (kernel selection, TorchScript profiling, CUDA context).
    """
    _set_torch_threads(job.torch_threads)
    dev = resolve_device(job.device)
    module = _worker_model(model_ref, dev)
    with _LOCK:
        _image(*_image_key(job))
    window = tuple(b + 2 * h for b, h in zip(job.block, job.halo, strict=True))
    x = torch.zeros((job.batch_size, channels_in, *window))
    if isinstance(module, torch.nn.Module):
        module.to(dev)
    with torch.inference_mode():
        y = module(x.to(dev))
    return int(y.shape[1])


def _predict_task(job: _Job, model_ref: Any, indices: list[tuple[int, ...]]) -> int:
    """Predict one batch of blocks and write them (run on a worker)."""
    _set_torch_threads(job.torch_threads)
    dev = resolve_device(job.device)
    module = _worker_model(model_ref, dev)
    with _LOCK:
        image = _image(*_image_key(job))
        store = _store(job.output, job.run_id)
    grid = BlockGrid(job.shape, job.block, job.halo, job.alignment)
    blocks = [grid[i] for i in indices]
    predict_blockwise(
        module,
        image,
        grid.block,
        grid.halo,
        grid.alignment,
        ndim=job.ndim,
        batch_size=job.batch_size,
        device=dev,
        out=store,
        input_transform=job.normalization,
        output_transform=activation_function(job.activation),
        blocks=blocks,
        on_block_done=store.mark_done,
        prefetch=1,
        io_threads=1,
        progress=False,
    )
    return len(blocks)
