"""Predicting the batches of a block plan: in this process or on a Dask cluster.

:class:`Job` is what predicting one file's blocks needs, small and picklable (no
arrays, no model); :func:`predict_job` predicts a list of its blocks. The in-process
run and every Dask task go through it, in the same batches, so their outputs are
identical. On Dask (:func:`predict_on_dask`): ``"local"`` starts a
``distributed.LocalCluster``, an address such as ``"tcp://host:8786"`` joins a running
one; each task reads its windows with their halo, predicts and writes its
chunk-aligned blocks. The model is loaded once per worker process (from its
TorchScript file, or scattered once when given as a module), never pickled per task.
Failed tasks are retried a bounded number of times, then reported with their block.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import BlockFailedError, SettingsError
from ..io import InputNormalization, PredictionStore, open_source
from ..nets.checkpoint import load_model
from ..nets.state import activation_function
from .geometry import Block, BlockGrid
from .inputs import window_reader
from .predict import predict_grid, resolve_device

__all__ = ["Job", "predict_job", "predict_on_dask"]


@dataclass(frozen=True)
class Job:
    """Everything a task needs, small and picklable (no arrays, no model).

    ``run_id`` names the output store a worker writes into (it is reopened when a
    run starts over), ``torch_threads`` the threads torch may use in a worker.
    """

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
    run_id: str = ""
    torch_threads: int | None = None

    @property
    def grid(self) -> BlockGrid:
        """The block plan."""
        return BlockGrid(self.shape, self.block, self.halo, self.alignment)

    @property
    def window(self) -> tuple[int, ...]:
        """The shape of every input window."""
        return tuple(b + 2 * h for b, h in zip(self.block, self.halo, strict=True))


def predict_job(
    job: Job, module: torch.nn.Module, image: Any, device: torch.device, out: Any, **options: Any
) -> Any:
    """Predict blocks of ``job`` from ``image`` (the model's view of its input) into ``out``.

    ``options`` are further keyword arguments of
    :func:`~nahtlos.engine.predict.predict_blockwise` (``blocks``, ``on_block_done``,
    ``prefetch``, ...).
    """
    return predict_grid(
        module,
        image,
        job.grid,
        batch_size=job.batch_size,
        device=device,
        out=out,
        input_transform=job.normalization,
        output_transform=activation_function(job.activation),
        **options,
    )


def predict_on_dask(
    scheduler: Any,
    workers: int | None,
    job: Job,
    model: torch.nn.Module | tuple[str, str],
    channels_in: int,
    batches: list[list[Block]],
    open_store: Callable[[int], PredictionStore],
    *,
    max_windows: int | None,
    retries: int,
    progress: bool,
    done: tuple[int, int],
    phase: Callable[[str], None],
) -> str:
    """Predict ``batches`` of ``job`` on Dask; returns the scheduler's address.

    ``model`` is a module (scattered once to every worker) or the path and digest of
    a TorchScript file (each worker loads it once). ``open_store(channels)`` gives the
    output store, created once the workers have told the model's output channels.
    ``done`` is ``(skipped, total)`` blocks, for the progress bar; ``phase`` is called
    with ``"startup"``, ``"predict"`` and ``"finalize"`` as each ends.
    """
    client, close, torch_threads = _connect(scheduler, workers)
    try:
        job = replace(job, torch_threads=torch_threads)
        model_ref: Any
        if isinstance(model, tuple):
            model_ref = ("file", *model)
        else:
            # shipped once to every worker and kept there, not pickled per task
            model_ref = client.scatter(model, broadcast=True, hash=False)
        store = open_store(_warm_workers(client, job, model_ref, channels_in))
        job = replace(job, run_id=str(store.plan.get("run_id", "")))
        phase("startup")
        in_flight = (
            max(1, max_windows // job.batch_size) if max_windows else _worker_threads(client) * 2
        )
        _run_tasks(client, job, model_ref, batches, in_flight, retries, progress, done)
        phase("predict")
        store.finalize(scheduler=client)
        phase("finalize")
        return str(client.scheduler.address) if client.scheduler else "dask"
    finally:
        close()


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
    job: Job,
    model_ref: Any,
    batches: list[list[Block]],
    in_flight: int,
    retries: int,
    progress: bool,
    done: tuple[int, int],
) -> None:
    """Submit the batches, at most ``in_flight`` at a time; stop at the first that fails."""
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

    skipped, total = done
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
                raise _failed(batch, retries, exc) from exc
            bar.update(len(batch))
            submit_next()
    except BaseException:
        client.cancel([f for f, _ in running.values()])
        raise
    finally:
        bar.close()


def _failed(batch: list[Block], retries: int, exc: BaseException) -> BlockFailedError:
    """The error that stops a run: the batch's first block, where it is, and why it failed."""
    blk = batch[0]
    where = ", ".join(f"{s.start}:{s.stop}" for s in blk.inner)
    return BlockFailedError(
        f"block {blk.index} (voxels {where}"
        f"{f' and {len(batch) - 1} more in its batch' if len(batch) > 1 else ''}) "
        f"failed after {retries} retries: {type(exc).__name__}: {exc}; the output "
        "keeps every finished block: fix the cause and run again with --resume",
        block=blk.index,
    )


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
    return window_reader(open_source(path, key, level=level), ndim, window).array


@functools.lru_cache(maxsize=8)
def _store(path: str, run_id: str) -> PredictionStore:
    return PredictionStore.open(path)


def _image_key(job: Job) -> tuple[Any, ...]:
    return job.input_path, job.input_key, job.level, job.ndim, job.input_stamp, job.window


def _warm_workers(client: Any, job: Job, model_ref: Any, channels_in: int) -> int:
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
            f"the model failed on a {job.window} window of zeros on every Dask worker: "
            f"{type(first).__name__}: {first}"
        ) from first
    return channels


def _warm_task(job: Job, model_ref: Any, channels_in: int) -> int:
    """Prepare a worker: threads, model, input; returns the model's output channels.

    The forward pass on zeros also makes the first real window as fast as the rest
    (kernel selection, TorchScript profiling, CUDA context).
    """
    _set_torch_threads(job.torch_threads)
    dev = resolve_device(job.device)
    module = _worker_model(model_ref, dev)
    with _LOCK:
        _image(*_image_key(job))
    x = torch.zeros((job.batch_size, channels_in, *job.window))
    if isinstance(module, torch.nn.Module):
        module.to(dev)
    with torch.inference_mode():
        y = module(x.to(dev))
    return int(y.shape[1])


def _predict_task(job: Job, model_ref: Any, indices: list[tuple[int, ...]]) -> int:
    """Predict one batch of blocks and write them (run on a worker)."""
    _set_torch_threads(job.torch_threads)
    dev = resolve_device(job.device)
    module = _worker_model(model_ref, dev)
    with _LOCK:
        image = _image(*_image_key(job))
        store = _store(job.output, job.run_id)
    grid = job.grid
    blocks = [grid[i] for i in indices]
    predict_job(
        job,
        module,
        image,
        dev,
        store,
        blocks=blocks,
        on_block_done=store.mark_done,
        prefetch=1,
        io_threads=1,
        progress=False,
    )
    return len(blocks)
