"""Block-wise prediction of any ``torch.nn.Module`` over an array-like image.

The image may be a numpy array or anything sliceable like one (zarr array, h5py
dataset, dask array, memory-mapped TIFF): only the windows in flight are ever read.
Windows are read by a thread pool ahead of the network, batched, run under
:func:`torch.inference_mode`, and the cropped blocks are written by another thread
pool into the output, so that reading and writing overlap the forward passes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..axes import as_per_axis, axis_names
from ..errors import ShapeMismatchError
from .geometry import Block, BlockGrid

__all__ = [
    "ArrayLike",
    "PredictionStats",
    "predict_blockwise",
    "predict_whole",
    "resolve_device",
    "split_channels",
]


class ArrayLike(Protocol):
    """What nahtlos needs of an input or output array: a shape and numpy slicing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


OutputFactory = Callable[[tuple[int, ...]], Any]


@dataclass
class PredictionStats:
    """Timings of one :func:`predict_blockwise` call, in seconds.

    ``forward`` is the time spent in the model (including moving data to and from
    the device); ``waiting`` is time the network sat idle waiting for input windows
    or for output writes to drain; ``total`` is the wall time of the call.
    """

    blocks: int = 0
    windows_in_flight_max: int = 0
    forward: float = 0.0
    waiting: float = 0.0
    total: float = 0.0

    @property
    def overhead_fraction(self) -> float:
        """Fraction of the wall time spent outside the forward passes."""
        return 0.0 if self.total == 0 else 1.0 - self.forward / self.total


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``None``/``"auto"`` into CUDA when available, else CPU; check CUDA exists."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    return dev


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def split_channels(image: ArrayLike, ndim: int) -> bool:
    """Whether ``image`` has a leading channel axis, for an ``ndim``-D spatial model.

    Raises
    ------
    ShapeMismatchError
        If the image has neither ``ndim`` nor ``ndim + 1`` axes.
    """
    shape = tuple(image.shape)
    if len(shape) == ndim:
        return False
    if len(shape) == ndim + 1:
        return True
    names = ",".join(axis_names(ndim))
    raise ShapeMismatchError(
        f"image of shape {shape} has {len(shape)} axes, but the block has {ndim} spatial axes "
        f"({names}); expected ({names}) or (C,{names})"
    )


def _infer_ndim(image: ArrayLike) -> int:
    # Ambiguous for (C, Y, X): callers with channel images pass ndim or a per-axis block.
    return len(image.shape) if len(image.shape) <= 3 else len(image.shape) - 1


def resolve_ndim(image: ArrayLike, block: int | Sequence[int], ndim: int | None) -> int:
    """The spatial dimensionality: given, else the length of a per-axis block, else
    guessed from the image."""
    if ndim is not None:
        return ndim
    return _infer_ndim(image) if isinstance(block, int) else len(tuple(block))


def _read_window(
    image: ArrayLike,
    blk: Block,
    spatial_shape: tuple[int, ...],
    channels: bool,
    transform: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    source, target = blk.read_slices(spatial_shape)
    key = (slice(None), *source) if channels else source
    region = np.asarray(image[key], dtype=np.float32)
    if not channels:
        region = region[None]
    if transform is not None:
        region = np.asarray(transform(region), dtype=np.float32)
    window = np.zeros((region.shape[0], *blk.window_shape), dtype=np.float32)
    key = (slice(None), *target)
    window[key] = region
    return window


def _read_batch(
    image: ArrayLike,
    blocks: Sequence[Block],
    spatial_shape: tuple[int, ...],
    channels: bool,
    transform: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    return np.stack([_read_window(image, b, spatial_shape, channels, transform) for b in blocks])


def _write_block(out: Any, blk: Block, prediction: np.ndarray) -> None:
    target = (slice(None), *blk.inner)
    source = (slice(None), *blk.crop)
    out[target] = prediction[source]


def predict_blockwise(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: ArrayLike,
    block: int | Sequence[int],
    halo: int | Sequence[int] = 0,
    alignment: int | Sequence[int] = 1,
    *,
    ndim: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    out: Any | OutputFactory | None = None,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    blocks: Iterable[Block] | None = None,
    on_block_done: Callable[[Block], None] | None = None,
    prefetch: int = 2,
    io_threads: int = 2,
    auto: bool = False,
    progress: bool = True,
    stats: PredictionStats | None = None,
) -> Any:
    """Predict ``image`` block by block and stitch the cropped blocks.

    The result equals :func:`predict_whole` (the model applied once to the
    zero-padded image) whenever the halo covers the model's receptive field, blocks
    and halo are multiples of its alignment, and the model's normalization does not
    depend on the tile (no InstanceNorm, BatchNorm in eval mode).

    Parameters
    ----------
    model
        Any module (or TorchScript module) mapping ``(N, C_in, *window)`` to
        ``(N, C_out, *window)``. It is used in its current train/eval mode; call
        ``model.eval()`` first for inference. If ``device`` is given, the model is
        moved there.
    image
        ``(*spatial)`` or ``(C_in, *spatial)`` array-like.
    block, halo, alignment
        See :class:`~nahtlos.engine.geometry.BlockGrid`.
    ndim
        Number of spatial axes; by default the length of ``block`` (or 2 for a 2D
        image, 3 for a 3D one when ``block`` is a single int).
    batch_size
        Windows per forward pass.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`, or ``None`` for
        the model's current device.
    out
        Where to write: ``None`` (a new float32 numpy array), an array-like of shape
        ``(C_out, *spatial)``, or a callable ``factory(shape)`` returning one, called
        once the number of output channels is known.
    input_transform
        Applied to every window's in-image region ``(C_in, *region)`` before zero
        padding (e.g. input normalization).
    output_transform
        Applied to the network output tensor (e.g. ``torch.sigmoid``).
    blocks
        Predict only these blocks (e.g. the ones a resumed run still lacks).
    on_block_done
        Called with each block after its prediction has been written.
    prefetch
        Batches read ahead of the network; together with the writes in flight this
        bounds memory to about ``(2 * prefetch + 1) * batch_size`` windows.
    io_threads
        Threads reading and threads writing.
    auto
        Round block and halo up to the alignment instead of raising.
    progress
        Show a progress bar of blocks done.
    stats
        If given, filled with timings.

    Returns
    -------
    The output array (``out`` itself, or the one created).

    Raises
    ------
    BlockShapeError
        If block, halo or alignment are invalid.
    ShapeMismatchError
        If the image's axes do not fit the block, or the model's output does not have
        the window's spatial shape.
    """
    t_start = time.perf_counter()
    ndim = resolve_ndim(image, block, ndim)
    channels = split_channels(image, ndim)
    spatial_shape = tuple(int(s) for s in image.shape[-ndim:])
    grid = BlockGrid(spatial_shape, block, halo, alignment, auto=auto)
    todo = list(grid) if blocks is None else list(blocks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    if isinstance(model, torch.nn.Module):
        if device is not None:
            model.to(resolve_device(device))
        dev, dtype = model_device_dtype(model)
    else:
        dev, dtype = resolve_device(device), torch.float32

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    stats = stats if stats is not None else PredictionStats()
    result: Any = None if out is None or callable(out) else out
    reader = ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="nahtlos-read")
    writer = ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="nahtlos-write")
    reads: deque[Future[np.ndarray]] = deque()
    writes: deque[tuple[Block, Future[None]]] = deque()
    bar = tqdm(total=len(todo), unit="block", desc="predict", disable=not progress, leave=False)
    next_read = 0

    def submit_read() -> None:
        nonlocal next_read
        if next_read < len(batches):
            reads.append(
                reader.submit(
                    _read_batch, image, batches[next_read], spatial_shape, channels, input_transform
                )
            )
            next_read += 1

    try:
        for _ in range(max(prefetch, 1)):
            submit_read()
        for batch in batches:
            t0 = time.perf_counter()
            windows = reads.popleft().result()
            submit_read()
            t1 = time.perf_counter()
            x = torch.from_numpy(windows).to(dev, dtype=dtype)
            with torch.inference_mode():
                y = model(x)
                if output_transform is not None:
                    y = output_transform(y)
            if not isinstance(y, torch.Tensor):
                raise TypeError(
                    f"the model returned {type(y).__name__}; block-wise prediction needs a "
                    "single tensor of shape (N, C, *window)"
                )
            if tuple(y.shape[2:]) != tuple(x.shape[2:]) or y.shape[0] != x.shape[0]:
                raise ShapeMismatchError(
                    f"the model returned shape {tuple(y.shape)} for the input window of shape "
                    f"{tuple(x.shape)}; its output must keep the window's spatial shape "
                    f"{tuple(x.shape[2:])} (use padded convolutions), or the window "
                    f"{grid.window_shape} does not suit the network's down-sampling"
                )
            pred = y.detach().to("cpu", torch.float32).numpy()
            t2 = time.perf_counter()
            stats.forward += t2 - t1
            if result is None:
                shape = (int(pred.shape[1]), *spatial_shape)
                result = np.zeros(shape, np.float32) if out is None else out(shape)
            if tuple(result.shape) != (pred.shape[1], *spatial_shape):
                raise ShapeMismatchError(
                    f"the output array has shape {tuple(result.shape)} but the model predicts "
                    f"{pred.shape[1]} channels for an image of spatial shape {spatial_shape}; "
                    f"expected {(pred.shape[1], *spatial_shape)}"
                )
            for blk, p in zip(batch, pred, strict=True):
                writes.append((blk, writer.submit(_write_block, result, blk, p)))
            # Bound memory: never more than `prefetch` batches of writes pending.
            while len(writes) > max(prefetch, 1) * len(batch):
                _finish_write(writes, on_block_done, bar)
            stats.windows_in_flight_max = max(
                stats.windows_in_flight_max, len(writes) + len(reads) * batch_size
            )
            stats.waiting += (t1 - t0) + (time.perf_counter() - t2)
        while writes:
            _finish_write(writes, on_block_done, bar)
    except BaseException:
        for f in list(reads) + [w for _, w in writes]:
            f.cancel()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        bar.close()
    stats.blocks += len(todo)
    stats.total += time.perf_counter() - t_start
    if result is None:  # nothing to predict (e.g. every block already done)
        result = out
    return result


def _finish_write(
    writes: deque[tuple[Block, Future[None]]],
    on_block_done: Callable[[Block], None] | None,
    bar: Any,
) -> None:
    blk, fut = writes.popleft()
    fut.result()
    if on_block_done is not None:
        on_block_done(blk)
    bar.update(1)


def predict_whole(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: ArrayLike,
    halo: int | Sequence[int] = 0,
    alignment: int | Sequence[int] = 1,
    *,
    ndim: int | None = None,
    device: str | torch.device | None = None,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """The canonical reference: the model applied once to the whole zero-padded image.

    The image is padded by the halo on every side (and at the far end up to a
    multiple of the alignment), predicted in one forward pass, and cropped back.
    Loads the whole image; meant for images that fit in memory (tests, diagnostics).

    Returns
    -------
    numpy.ndarray
        ``(C_out, *spatial)`` float32.
    """
    if ndim is None:
        ndim = _infer_ndim(image)
    channels = split_channels(image, ndim)
    spatial_shape = tuple(int(s) for s in image.shape[-ndim:])
    align = as_per_axis(alignment, ndim, "alignment")
    whole = tuple(-(-n // max(a, 1)) * max(a, 1) for n, a in zip(spatial_shape, align, strict=True))
    grid = BlockGrid(spatial_shape, whole, halo, align)
    arr = np.asarray(image[...], dtype=np.float32)
    if not channels:
        arr = arr[None]
    if input_transform is not None:
        arr = np.asarray(input_transform(arr), dtype=np.float32)
    pad = [(0, 0)] + [
        (h, p - n - h) for n, h, p in zip(spatial_shape, grid.halo, grid.padded_shape, strict=True)
    ]
    padded = np.pad(arr, pad)
    if isinstance(model, torch.nn.Module):
        if device is not None:
            model.to(resolve_device(device))
        dev, dtype = model_device_dtype(model)
    else:
        dev, dtype = resolve_device(device), torch.float32
    with torch.inference_mode():
        y = model(torch.from_numpy(padded[None]).to(dev, dtype=dtype))
        if output_transform is not None:
            y = output_transform(y)
    if tuple(y.shape[2:]) != padded.shape[1:]:
        raise ShapeMismatchError(
            f"the model returned shape {tuple(y.shape)} for the padded image of shape "
            f"{(1, *padded.shape)}; its output must keep the input's spatial shape"
        )
    crop = tuple(slice(h, h + n) for h, n in zip(grid.halo, spatial_shape, strict=True))
    key = (slice(None), *crop)
    return np.ascontiguousarray(y[0].to("cpu", torch.float32).numpy()[key])
