"""The input file of a file-level prediction: how it is read for a block plan.

The model's view of the file read through a cache of decoded chunks sized to the
windows (:func:`window_reader`), the read shape of the streaming percentile pass
(:func:`percentile_chunks`), and the spatial axes of the model when nothing names
them (:func:`infer_ndim`). Used in this process and on every Dask worker alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from ..io import ChunkCache, ImageSource
from ..nets.checkpoint import LoadedModel

__all__ = ["channel_axis", "channels_in", "infer_ndim", "percentile_chunks", "window_reader"]


def window_reader(source: ImageSource, ndim: int, window: tuple[int, ...]) -> ImageSource:
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


def infer_ndim(block: int | Sequence[int], loaded: LoadedModel | None, source: ImageSource) -> int:
    """The model's spatial axes: from a per-axis block, the model's metadata or the image."""
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


def percentile_chunks(view: ImageSource, channel_axis: int | None) -> tuple[int, ...]:
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


def channel_axis(view: ImageSource) -> int | None:
    """The channel axis of the model's view of an image: 0, or ``None`` if it has none."""
    return 0 if view.axes[0] == "c" else None


def channels_in(view: ImageSource) -> int:
    """Input channels of the model's view of an image (1 without a channel axis)."""
    return view.shape[0] if channel_axis(view) == 0 else 1
