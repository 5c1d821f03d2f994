"""Lazily loaded images: an array-like with its axes and pixel size, and its views.

:class:`ImageSource` is what the readers return; :meth:`ImageSource.for_model` lays an
image out for a model (``([C,] [Z,] Y, X)``) without loading it, and
:class:`ChunkCache` keeps decoded chunks for reading overlapping windows.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BlockShapeError
from .formats import CHANNEL_AXES, SPATIAL_AXES

__all__ = ["ChunkCache", "ImageSource"]


@dataclass(frozen=True)
class ImageSource:
    """A lazily loaded image with its axes and physical pixel size.

    Attributes
    ----------
    array
        Array-like with ``shape``, ``dtype`` and numpy slicing; nothing is loaded
        until it is sliced.
    axes
        One lower-case name per axis of ``array``: ``t``, ``c`` (channel), ``s``
        (samples, e.g. RGB), ``z``, ``y``, ``x``, or another letter for axes a file
        did not name.
    scale
        Physical size of a pixel along each axis (1.0 where unknown or not spatial).
    units
        Unit of each axis (UDUNITS-2 names such as ``"micrometer"``) or ``None``.
    translation
        Physical position of the first pixel along each axis.
    axes_known
        Whether the file named its axes; if not, :meth:`for_model` decides between
        a channel axis and a spatial one from the model's dimensionality.
    path, key, level, levels
        Where the image came from: file, dataset inside it, resolution level of a
        multiscale image and the number of levels it has.
    """

    array: Any
    axes: tuple[str, ...]
    scale: tuple[float, ...]
    units: tuple[str | None, ...]
    translation: tuple[float, ...]
    axes_known: bool = True
    path: Path | None = None
    key: str | None = None
    level: int = 0
    levels: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the array."""
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """Data type of the array."""
        return np.dtype(self.array.dtype)

    @property
    def name(self) -> str:
        """The image as a user would name it (``file.h5:dataset``)."""
        text = str(self.path) if self.path is not None else "<array>"
        return f"{text}:{self.key}" if self.key else text

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        """The names of the spatial axes, in array order."""
        return tuple(a for a in self.axes if a in SPATIAL_AXES)

    def axis_info(self, axes: Sequence[str]) -> tuple[tuple[float, ...], tuple[str | None, ...]]:
        """Scale and unit of the named axes."""
        index = [self.axes.index(a) for a in axes]
        return tuple(self.scale[i] for i in index), tuple(self.units[i] for i in index)

    def for_model(self, ndim: int) -> ImageSource:
        """A view of the image laid out for an ``ndim``-D model: ``([C,] [Z,] Y, X)``.

        Singleton axes that are neither channels nor spatial (time points, a single
        z plane for a 2D model) are dropped; a channel (or samples) axis is moved in
        front of the spatial axes, which keep the order ``z, y, x``.

        Raises
        ------
        BlockShapeError
            If the image does not have ``ndim`` spatial axes (with an optional
            channel axis), or an axis that cannot be dropped has more than one entry.
        """
        shape = self.shape
        spatial_names = ("z", "y", "x")[-ndim:] if ndim <= 3 else None
        if spatial_names is None:
            raise BlockShapeError(f"models with {ndim} spatial axes are not supported")
        axes = self.axes
        if not self.axes_known:
            if len(shape) == ndim:
                axes = spatial_names
            elif len(shape) == ndim + 1:
                axes = ("c", *spatial_names)
            else:
                raise BlockShapeError(
                    f"image {self.name!r} has shape {shape}, which does not fit a {ndim}D block; "
                    f"expected {ndim} spatial axes with an optional leading channel axis"
                )
        missing = [a for a in spatial_names if a not in axes]
        if missing:
            raise BlockShapeError(
                f"image {self.name!r} has axes {''.join(axes)} of shape {shape}, which does not "
                f"fit a {ndim}D block: it has no {', '.join(missing)} axis"
            )
        channel = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
        big_channels = [i for i in channel if shape[i] > 1]
        if len(big_channels) > 1:
            raise BlockShapeError(
                f"image {self.name!r} has two channel axes ({''.join(axes)}, shape {shape}); "
                "convert it to a single channel axis first"
            )
        keep_channel = big_channels[0] if big_channels else (channel[0] if channel else None)
        order = ([keep_channel] if keep_channel is not None else []) + [
            axes.index(a) for a in spatial_names
        ]
        fixed: dict[int, int] = {}
        for i, (a, n) in enumerate(zip(axes, shape, strict=True)):
            if i in order:
                continue
            if n != 1:
                what = "z planes" if a == "z" else "entries"
                raise BlockShapeError(
                    f"image {self.name!r} has {n} {what} along axis {a!r} ({''.join(axes)}, "
                    f"shape {shape}); a {ndim}D model predicts {''.join(spatial_names)} images "
                    "with an optional channel axis: select one first"
                )
            fixed[i] = 0
        view: Any = self.array
        if order != list(range(len(shape))) or fixed:
            view = _AxesView(self.array, tuple(order), fixed)
        new_axes = tuple("c" if i == keep_channel else axes[i] for i in order)
        return replace(
            self,
            array=view,
            axes=new_axes,
            scale=tuple(self.scale[i] for i in order),
            units=tuple(self.units[i] for i in order),
            translation=tuple(self.translation[i] for i in order),
            axes_known=True,
        )


class _AxesView:
    """A lazily transposed/squeezed view of an array-like, for basic slicing."""

    def __init__(self, base: Any, order: tuple[int, ...], fixed: dict[int, int]) -> None:
        self.base = base
        self.order = order
        self.fixed = fixed
        self.shape = tuple(int(base.shape[i]) for i in order)
        self.dtype = np.dtype(base.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _full_key(key, self.ndim)
        base_key: list[Any] = [slice(None)] * len(self.base.shape)
        for i, v in self.fixed.items():
            base_key[i] = v
        for view_axis, base_axis in enumerate(self.order):
            base_key[base_axis] = key[view_axis]
        result = np.asarray(self.base[tuple(base_key)])
        # axes of `result`, in base order: those not indexed by an integer
        kept = [b for b in range(len(self.base.shape)) if not isinstance(base_key[b], int)]
        want = [b for b in self.order if not isinstance(base_key[b], int)]
        return np.transpose(result, [kept.index(b) for b in want])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class ChunkCache:
    """A read-through cache of decoded chunks, for reading overlapping windows.

    Windows with a halo overlap their neighbours, and a chunked file decodes whole
    chunks: reading the windows of a block plan one by one decodes each chunk up to
    3**ndim times. This wrapper keeps the ``capacity`` chunks read last (least
    recently used go first), so that consecutive windows along the last axis decode
    only the chunks they do not share. Thread-safe; memory is bounded by
    ``capacity`` chunks.

    Parameters
    ----------
    array
        An array-like with a regular ``chunks`` tuple (zarr, h5py, tifffile's zarr).
    capacity
        Chunks to keep.
    """

    def __init__(self, array: Any, capacity: int) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.capacity = max(1, int(capacity))
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def chunks_per_window(window: Sequence[int], chunks: Sequence[int]) -> int:
        """The most chunks a window of shape ``window`` can touch."""
        return math.prod(-(-w // c) + 1 for w, c in zip(window, chunks, strict=True))

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
        key = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )
        data = np.asarray(self.array[key])
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _full_key(key, self.ndim)
        bounds: list[tuple[int, int]] = []
        squeeze: list[int] = []
        for axis, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, int | np.integer):
                i = int(k) + n if k < 0 else int(k)
                bounds.append((i, i + 1))
                squeeze.append(axis)
            elif isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(n)
                bounds.append((start, max(start, stop)))
            else:  # fancy or strided indexing: not worth caching
                return np.asarray(self.array[key])
        out = np.empty([b - a for a, b in bounds], self.dtype)
        ranges = [
            range(a // c, (b - 1) // c + 1) if b > a else range(0)
            for (a, b), c in zip(bounds, self.chunks, strict=True)
        ]
        for index in itertools.product(*ranges):
            chunk = self._chunk(index)
            src, dst = [], []
            for i, c, (a, b) in zip(index, self.chunks, bounds, strict=True):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out.squeeze(axis=tuple(squeeze)) if squeeze else out


def _full_key(key: Any, ndim: int) -> tuple[Any, ...]:
    """A basic-indexing key with one entry per axis (``...`` and missing axes filled in)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    return key + (slice(None),) * (ndim - len(key))
