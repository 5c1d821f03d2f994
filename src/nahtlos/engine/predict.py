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
from .geometry import Block, BlockGrid, window_slices

__all__ = [
    "ArrayLike",
    "PredictionStats",
    "image_layout",
    "place_model",
    "predict_blockwise",
    "predict_grid",
    "predict_whole",
    "read_region",
    "read_window",
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


def image_layout(
    image: ArrayLike, ndim: int | None, block: int | Sequence[int] = 1
) -> tuple[int, bool, tuple[int, ...]]:
    """How ``image`` meets a model: its spatial axes (see :func:`resolve_ndim`), whether
    it has a leading channel axis (see :func:`split_channels`), and its spatial shape."""
    nd = resolve_ndim(image, block, ndim)
    channels = split_channels(image, nd)
    return nd, channels, tuple(int(s) for s in image.shape[-nd:])


def place_model(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    device: str | torch.device | None,
) -> tuple[torch.device, torch.dtype]:
    """Move a module to ``device`` (if given); where and in which data type it runs.

    A plain callable runs on ``device`` (default: CUDA when available) in float32.
    """
    if isinstance(model, torch.nn.Module):
        if device is not None:
            model.to(resolve_device(device))
        return model_device_dtype(model)
    return resolve_device(device), torch.float32


def read_region(
    image: ArrayLike,
    key: tuple[slice, ...],
    channels: bool,
    transform: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """The spatial region ``key`` of ``image`` as float32 ``(C, *region)``, transformed.

    ``channels`` says whether the image has a leading channel axis; without one the
    region gets a channel axis of length 1.
    """
    region = np.asarray(image[(slice(None), *key) if channels else key], dtype=np.float32)
    if not channels:
        region = region[None]
    if transform is not None:
        region = np.asarray(transform(region), dtype=np.float32)
    return region


def read_window(
    image: ArrayLike,
    start: Sequence[int],
    shape: Sequence[int],
    channels: bool,
    transform: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """A window of the zero-padded image: float32 ``(C, *shape)`` from ``start`` on.

    ``start`` is in image coordinates, negative where the window reaches into the
    padding before the image. Only the part inside the image is read and transformed
    (:func:`read_region`), so the padding stays zero whatever the input transform, as
    in :func:`predict_whole`.
    """
    spatial = tuple(int(n) for n in image.shape[len(image.shape) - len(shape) :])
    source, target = window_slices(start, shape, spatial)
    if any(s.stop <= s.start for s in source):  # the window lies wholly in the padding
        return np.zeros((int(image.shape[0]) if channels else 1, *shape), np.float32)
    region = read_region(image, source, channels, transform)
    window = np.zeros((region.shape[0], *shape), dtype=np.float32)
    key = (slice(None), *target)
    window[key] = region
    return window


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
    ndim, channels, spatial_shape = image_layout(image, ndim, block)
    grid = BlockGrid(spatial_shape, block, halo, alignment, auto=auto)
    todo = list(grid) if blocks is None else list(blocks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev, dtype = place_model(model, device)
    stats = stats if stats is not None else PredictionStats()
    output = _Output(out, spatial_shape)

    def read(batch: list[Block]) -> np.ndarray:
        return np.stack(
            [
                read_window(image, b.window_start, b.window_shape, channels, input_transform)
                for b in batch
            ]
        )

    def forward(windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(windows).to(dev, dtype=dtype)
        return _forward(model, x, output_transform, grid.window_shape)

    def done(blk: Block) -> None:
        if on_block_done is not None:
            on_block_done(blk)
        bar.update(1)

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with tqdm(
        total=len(todo), unit="block", desc="predict", disable=not progress, leave=False
    ) as bar:
        _run_batches(batches, batch_size, read, forward, output, done, prefetch, io_threads, stats)
    stats.blocks += len(todo)
    stats.total += time.perf_counter() - t_start
    # nothing predicted (e.g. every block already done): out as given
    return out if output.array is None else output.array


def predict_grid(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: ArrayLike,
    grid: BlockGrid,
    **options: Any,
) -> Any:
    """:func:`predict_blockwise` over the blocks of ``grid`` (its block, halo and alignment).

    ``options`` are the keyword arguments of :func:`predict_blockwise` other than
    ``ndim`` and ``auto``: the settings of a prediction, apart from its geometry.

    Raises
    ------
    ShapeMismatchError
        If the image's spatial shape is not the grid's.
    """
    spatial = tuple(int(s) for s in image.shape[-grid.ndim :])
    if spatial != grid.shape:
        raise ShapeMismatchError(
            f"image of shape {tuple(image.shape)} does not fit the block grid over {grid.shape}"
        )
    return predict_blockwise(
        model, image, grid.block, grid.halo, grid.alignment, ndim=grid.ndim, **options
    )


class _Output:
    """Where the cropped blocks go: ``out``, or the array made once the channels are known."""

    def __init__(self, out: Any | OutputFactory | None, spatial_shape: tuple[int, ...]) -> None:
        self.out = out
        self.spatial_shape = spatial_shape
        self.array: Any = None if out is None or callable(out) else out

    def ready(self, channels: int) -> Any:
        """The output array for a model with ``channels`` output channels.

        Raises
        ------
        ShapeMismatchError
            If a given output array does not have that shape.
        """
        expected = (channels, *self.spatial_shape)
        if self.array is None:
            self.array = np.zeros(expected, np.float32) if self.out is None else self.out(expected)
        if tuple(self.array.shape) != expected:
            raise ShapeMismatchError(
                f"the output array has shape {tuple(self.array.shape)} but the model predicts "
                f"{channels} channels for an image of spatial shape {self.spatial_shape}; "
                f"expected {expected}"
            )
        return self.array


def _forward(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output_transform: Callable[[torch.Tensor], torch.Tensor] | None,
    window_shape: tuple[int, ...],
) -> np.ndarray:
    """The (transformed) network output of a batch of windows, checked, as float32 numpy."""
    y = _apply(model, x, output_transform)
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
            f"{window_shape} does not suit the network's down-sampling"
        )
    return y.detach().to("cpu", torch.float32).numpy()


def _apply(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output_transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Any:
    with torch.inference_mode():
        y = model(x)
        if output_transform is not None:
            y = output_transform(y)
    return y


def _run_batches(
    batches: list[list[Block]],
    batch_size: int,
    read: Callable[[list[Block]], np.ndarray],
    forward: Callable[[np.ndarray], np.ndarray],
    output: _Output,
    done: Callable[[Block], None],
    prefetch: int,
    io_threads: int,
    stats: PredictionStats,
) -> None:
    """Read ahead, predict and write the batches, with reading and writing in threads.

    At most ``prefetch`` batches are read ahead and ``prefetch`` batches of writes are
    pending, which bounds memory; every future is cancelled on failure.
    """
    depth = max(prefetch, 1)
    reader = ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="nahtlos-read")
    writer = ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="nahtlos-write")
    reads: deque[Future[np.ndarray]] = deque(reader.submit(read, b) for b in batches[:depth])
    writes: deque[tuple[Block, Future[None]]] = deque()
    try:
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            windows = reads.popleft().result()
            if i + depth < len(batches):
                reads.append(reader.submit(read, batches[i + depth]))
            t1 = time.perf_counter()
            pred = forward(windows)
            t2 = time.perf_counter()
            stats.forward += t2 - t1
            result = output.ready(int(pred.shape[1]))
            for blk, p in zip(batch, pred, strict=True):
                writes.append((blk, writer.submit(_write_block, result, blk, p)))
            # Bound memory: never more than `prefetch` batches of writes pending.
            while len(writes) > depth * len(batch):
                _finish_write(writes, done)
            stats.windows_in_flight_max = max(
                stats.windows_in_flight_max, len(writes) + len(reads) * batch_size
            )
            stats.waiting += (t1 - t0) + (time.perf_counter() - t2)
        while writes:
            _finish_write(writes, done)
    except BaseException:
        for f in list(reads) + [w for _, w in writes]:
            f.cancel()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


def _finish_write(writes: deque[tuple[Block, Future[None]]], done: Callable[[Block], None]) -> None:
    blk, fut = writes.popleft()
    fut.result()
    done(blk)


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
    ndim, channels, spatial_shape = image_layout(image, ndim)
    align = as_per_axis(alignment, ndim, "alignment")
    whole = tuple(-(-n // max(a, 1)) * max(a, 1) for n, a in zip(spatial_shape, align, strict=True))
    grid = BlockGrid(spatial_shape, whole, halo, align)
    before = tuple(-h for h in grid.halo)
    padded = read_window(image, before, grid.padded_shape, channels, input_transform)
    dev, dtype = place_model(model, device)
    y = _apply(model, torch.from_numpy(padded[None]).to(dev, dtype=dtype), output_transform)
    if tuple(y.shape[2:]) != padded.shape[1:]:
        raise ShapeMismatchError(
            f"the model returned shape {tuple(y.shape)} for the padded image of shape "
            f"{(1, *padded.shape)}; its output must keep the input's spatial shape"
        )
    crop = tuple(slice(h, h + n) for h, n in zip(grid.halo, spatial_shape, strict=True))
    key = (slice(None), *crop)
    return np.ascontiguousarray(y[0].to("cpu", torch.float32).numpy()[key])
