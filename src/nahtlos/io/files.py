"""Reading images lazily and writing predictions, for the formats of the field.

Readers return array-likes that load only what is sliced: ``.npy`` (memory-mapped),
TIFF (memory-mapped when uncompressed, else zarr-backed through tifffile), zarr v2/v3
arrays and groups, OME-Zarr 0.4/0.5 (any resolution level), and HDF5 datasets
(``file.h5:dataset``). :func:`open_source` also returns the image's axes and
physical pixel size, read from the file's metadata (OME-Zarr multiscales, OME-TIFF or
ImageJ TIFF tags, HDF5 ``element_size_um``/``axistags``, zarr ``dimension_names``).

Predictions are written in two ways:

- :class:`PredictionStore` (``.zarr``): an OME-Zarr 0.5 image written in place,
  one chunk per prediction block, with a durable record of the finished blocks so
  that an interrupted run can be resumed. It is marked complete only after every
  block, the multiscale pyramid and the OME metadata are written; until then readers
  (:func:`open_image`, napari, ``ome_zarr``) do not take it for an image.
- :class:`PendingOutput` (``.npy``, ``.tif``): written under a temporary name and
  moved into place when complete, so an interrupted run leaves no output behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import (
    BlockShapeError,
    FormatError,
    IncompleteOutputError,
    InputNotFoundError,
    ShapeMismatchError,
)

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_DTYPES",
    "OUTPUT_FORMATS",
    "ChunkCache",
    "ImageSource",
    "PendingOutput",
    "PredictionStore",
    "check_output_path",
    "open_image",
    "open_source",
    "save_image",
    "split_key",
]

INPUT_FORMATS = (".npy", ".tif", ".tiff", ".zarr", ".h5", ".hdf5", ".hdf")
OUTPUT_FORMATS = (".npy", ".tif", ".tiff", ".zarr")
OUTPUT_DTYPES = ("float32", "float16", "uint8")
OutputDtype = Literal["float32", "float16", "uint8"]
Segmentation = Literal["threshold", "argmax"]

_HDF5 = (".h5", ".hdf5", ".hdf")
_SPATIAL = ("z", "y", "x")
_CHANNEL = ("c", "s")
_OME_VERSION = "0.5"
# OME-NGFF wants UDUNITS-2 names; files in the wild carry abbreviations.
_UNITS = {
    "µm": "micrometer",
    "um": "micrometer",
    "\\u00b5m": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "nm": "nanometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "pixel": None,
    "pixels": None,
    "": None,
}


def split_key(path: str | os.PathLike[str], key: str | None = None) -> tuple[Path, str | None]:
    """Split ``file.h5:dataset`` or ``image.zarr:group/array`` into path and key."""
    text = os.fspath(path)
    if key is None and ":" in text:
        head, _, tail = text.rpartition(":")
        # Keep Windows drive letters ("C:\\...") intact.
        if (
            head
            and not (len(head) == 1 and head.isalpha())
            and Path(head).suffix.lower() in (*_HDF5, ".zarr")
        ):
            return Path(head), tail
    return Path(text), key


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _unit(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return _UNITS.get(text.lower(), text)


def _guess_axes(ndim: int) -> tuple[str, ...]:
    return {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x"), 4: ("c", "z", "y", "x")}.get(
        ndim,
        ("t", "c", "z", "y", "x")[-ndim:] if ndim <= 5 else tuple(f"d{i}" for i in range(ndim)),
    )


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
        return tuple(a for a in self.axes if a in _SPATIAL)

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
        channel = [i for i, a in enumerate(axes) if a in _CHANNEL]
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
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:i] + fill + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
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
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
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


# --------------------------------------------------------------------------- readers


def open_image(path: str | os.PathLike[str], key: str | None = None, *, level: int = 0) -> Any:
    """Open an image lazily.

    Parameters
    ----------
    path
        A ``.npy``, ``.tif``/``.tiff``, ``.zarr`` or ``.h5``/``.hdf5`` path;
        ``file.h5:dataset`` and ``image.zarr:key`` name a dataset inside.
    key
        Dataset inside an HDF5 file or zarr group (overrides one in ``path``).
    level
        Resolution level of a multiscale (OME-Zarr) image; 0 is the full resolution.

    Returns
    -------
    An array-like supporting ``.shape``, ``.dtype`` and numpy slicing, with the
    file's axes (see :func:`open_source` for their names and pixel sizes).

    Raises
    ------
    InputNotFoundError
        If the file, or the dataset inside it, does not exist.
    FormatError
        If the extension is not supported or the key is missing or ambiguous.
    IncompleteOutputError
        If the path is a prediction output whose run did not finish.
    """
    return open_source(path, key, level=level).array


def open_source(
    path: str | os.PathLike[str], key: str | None = None, *, level: int = 0
) -> ImageSource:
    """Open an image lazily, with its axes and physical pixel size.

    Parameters are those of :func:`open_image`.

    Returns
    -------
    ImageSource
    """
    p, key = split_key(path, key)
    if not p.exists():
        raise InputNotFoundError(f"input {str(p)!r} does not exist")
    if level < 0:
        raise FormatError(f"resolution level {level} of {str(p)!r} must not be negative")
    suffix = _suffix(p)
    if suffix == ".zarr":
        return _open_zarr(p, key, level)
    if level != 0:
        raise FormatError(
            f"{str(p)!r} has a single resolution level; only OME-Zarr images have level {level}"
        )
    if suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        return _plain_source(arr, p, None)
    if suffix in (".tif", ".tiff"):
        return _open_tiff(p)
    if suffix in _HDF5:
        return _open_hdf5(p, key)
    raise FormatError(
        f"cannot read {str(p)!r}: unknown extension {suffix or '(none)'!r}; "
        f"supported: {', '.join(INPUT_FORMATS)}"
    )


def _plain_source(
    array: Any,
    path: Path,
    key: str | None,
    axes: Sequence[str] | None = None,
    scale: dict[str, float] | None = None,
    units: dict[str, str | None] | None = None,
) -> ImageSource:
    nd = len(array.shape)
    known = axes is not None and len(axes) == nd
    names = tuple(a.lower() for a in axes) if axes is not None and known else _guess_axes(nd)
    scale = scale or {}
    units = units or {}
    return ImageSource(
        array=array,
        axes=names,
        scale=tuple(float(scale.get(a, 1.0)) for a in names),
        units=tuple(_unit(units.get(a)) for a in names),
        translation=(0.0,) * nd,
        axes_known=known,
        path=path,
        key=key,
    )


def _open_tiff(path: Path) -> ImageSource:
    import tifffile
    import zarr

    array: Any
    try:
        array = tifffile.memmap(path, mode="r")
    except ValueError:
        # Compressed or tiled TIFFs cannot be memory-mapped; read them chunk-wise.
        store = tifffile.imread(path, aszarr=True)
        array = zarr.open_array(store, mode="r")
    axes: str | None = None
    scale: dict[str, float] = {}
    units: dict[str, str | None] = {}
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        letters = series.axes.lower()
        if tif.is_ome and tif.ome_metadata:
            axes = letters
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            for a in "zyx":
                size = pixels.get(f"PhysicalSize{a.upper()}")
                if size is not None:
                    scale[a] = float(size)
                    units[a] = pixels.get(f"PhysicalSize{a.upper()}Unit", "µm")
        elif tif.is_imagej:
            axes = letters
            meta = tif.imagej_metadata or {}
            unit = meta.get("unit")
            for a, tag in (("x", "XResolution"), ("y", "YResolution")):
                res = tif.pages[0].tags.get(tag)
                if res is not None and res.value[0]:
                    num, den = res.value
                    scale[a] = float(den) / float(num)
                    units[a] = unit
            if "spacing" in meta:
                scale["z"] = float(meta["spacing"])
                units["z"] = unit
        elif (
            tif.is_shaped and tif.shaped_metadata and "axes" in tif.shaped_metadata[0]
        ) or letters in ("yx", "yxs"):
            axes = letters
    if axes is not None and len(axes) != len(array.shape):
        axes = None  # tifffile squeezed differently from the array; do not guess
    return _plain_source(array, path, None, tuple(axes) if axes else None, scale, units)


def _zarr_attrs(node: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = dict(node.attrs)
    if "ome" in attrs:  # OME-Zarr 0.5 keeps its metadata under "ome"
        return {**attrs, **attrs["ome"]}
    return attrs


def _open_zarr(path: Path, key: str | None, level: int) -> ImageSource:
    import zarr

    node: Any
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for non-zarr folders
        raise FormatError(f"{str(path)!r} is not a readable zarr store: {exc}") from exc
    _check_complete(path, node)
    if key:
        try:
            node = node[key]
        except KeyError as exc:
            raise InputNotFoundError(f"no array {key!r} in zarr store {str(path)!r}") from exc
    if isinstance(node, zarr.Array):
        if level:
            raise FormatError(
                f"{str(path)!r}{':' + key if key else ''} is a single zarr array; only "
                f"OME-Zarr images have level {level}"
            )
        attrs: dict[str, Any] = dict(node.attrs)
        names = getattr(node.metadata, "dimension_names", None) or attrs.get("_ARRAY_DIMENSIONS")
        axes = tuple(str(n) for n in names) if names and all(names) else None
        scale = dict(zip(axes or (), attrs.get("scale", ()), strict=False))
        units = dict(zip(axes or (), attrs.get("units", ()), strict=False))
        return _plain_source(node, path, key, axes, scale, units)
    multiscales = _zarr_attrs(node).get("multiscales")
    if multiscales:
        return _open_multiscale(path, key, node, multiscales[0], level)
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1 and not level:
        return _open_zarr(path, f"{key}/{arrays[0]}" if key else arrays[0], 0)
    raise FormatError(
        f"zarr group {str(path)!r} holds {len(arrays)} arrays ({', '.join(sorted(arrays)) or 'none'}) "
        f"and no OME-Zarr multiscales metadata; name one as {path}:KEY or with --input-key"
    )


def _open_multiscale(
    path: Path, key: str | None, group: Any, multiscale: dict[str, Any], level: int
) -> ImageSource:
    datasets = multiscale["datasets"]
    if level >= len(datasets):
        raise FormatError(
            f"OME-Zarr image {str(path)!r} has {len(datasets)} resolution levels "
            f"(0 to {len(datasets) - 1}); level {level} does not exist"
        )
    array = group[datasets[level]["path"]]
    nd = len(array.shape)
    raw_axes = multiscale.get("axes") or list("tczyx")[-nd:]
    names = tuple(str(a["name"] if isinstance(a, dict) else a).lower() for a in raw_axes)
    units = tuple(_unit(a.get("unit")) if isinstance(a, dict) else None for a in raw_axes)
    scale = np.ones(nd)
    translation = np.zeros(nd)
    # dataset transforms first, then the multiscale-wide ones (OME-NGFF 0.4/0.5)
    for transforms in (
        datasets[level].get("coordinateTransformations", []),
        multiscale.get("coordinateTransformations", []),
    ):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                scale = scale * np.asarray(t["scale"], float)
                translation = translation * np.asarray(t["scale"], float)
            elif t.get("type") == "translation" and "translation" in t:
                translation = translation + np.asarray(t["translation"], float)
    return ImageSource(
        array=array,
        axes=names,
        scale=tuple(float(s) for s in scale),
        units=units,
        translation=tuple(float(t) for t in translation),
        axes_known=True,
        path=path,
        key=key,
        level=level,
        levels=len(datasets),
    )


def _open_hdf5(path: Path, key: str | None) -> ImageSource:
    import h5py

    f = h5py.File(path, "r")
    if key is None:
        names: list[str] = []
        f.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        if len(names) != 1:
            f.close()
            raise FormatError(
                f"HDF5 file {str(path)!r} holds {len(names)} datasets "
                f"({', '.join(names[:8]) or 'none'}); name one as {path}:DATASET or with --input-key"
            )
        key = names[0]
    if key not in f or not isinstance(f[key], h5py.Dataset):
        f.close()
        raise InputNotFoundError(f"no dataset {key!r} in HDF5 file {str(path)!r}")
    dataset = f[key]
    attrs = dataset.attrs
    axes: tuple[str, ...] | None = None
    scale: dict[str, float] = {}
    units: dict[str, str | None] = {}
    if "axes" in attrs:
        axes = tuple(str(attrs["axes"]).lower())
    if "axistags" in attrs:  # ilastik / vigra
        tags = json.loads(attrs["axistags"]).get("axes", [])
        axes = axes or tuple(str(t["key"]).lower() for t in tags)
        for t in tags:
            if t.get("resolution"):
                scale[str(t["key"]).lower()] = float(t["resolution"])
    if "element_size_um" in attrs:  # Fiji / ilastik: spatial axes in array order
        sizes = [float(v) for v in np.atleast_1d(attrs["element_size_um"])]
        spatial = [a for a in (axes or _guess_axes(len(dataset.shape))) if a in _SPATIAL]
        for a, v in zip(spatial[-len(sizes) :], sizes, strict=False):
            scale[a] = v
            units[a] = "micrometer"
    if "scale" in attrs and axes is not None:
        scale.update(zip(axes, (float(v) for v in attrs["scale"]), strict=False))
    if "units" in attrs and axes is not None:
        units.update(zip(axes, (str(u) or None for u in attrs["units"]), strict=False))
    return _plain_source(dataset, path, key, axes, scale, units)


# --------------------------------------------------------------------------- writers


def save_image(
    path: str | os.PathLike[str],
    data: Any,
    *,
    axes: Sequence[str] | str | None = None,
    scale: Sequence[float] | None = None,
    units: Sequence[str | None] | None = None,
    key: str | None = None,
    ome: Literal["0.4", "0.5"] | None = "0.5",
    zarr_format: Literal[2, 3] = 3,
    chunks: Sequence[int] | None = None,
    pyramid_levels: int = 0,
) -> Path:
    """Write an image with its axes and pixel size, readable by :func:`open_source`.

    Parameters
    ----------
    path
        ``.npy`` (data only), ``.tif`` (OME-TIFF), ``.h5`` (dataset ``key``, attributes
        ``axes``, ``scale``, ``units`` and Fiji's ``element_size_um``) or ``.zarr``.
    data
        The image (numpy or dask array).
    axes
        Axis names, e.g. ``"czyx"``; guessed from the number of axes if omitted.
    scale, units
        Pixel size and unit per axis (1.0 and ``None`` by default).
    key
        Dataset inside an HDF5 file (default ``"data"``).
    ome
        For ``.zarr``: the OME-Zarr version to write (``"0.4"``: zarr v2, ``"0.5"``:
        zarr v3), or ``None`` for a plain zarr array (``zarr_format`` 2 or 3, axes as
        ``dimension_names``/``_ARRAY_DIMENSIONS``, ``scale`` and ``units`` attributes).
    chunks
        Chunk shape for zarr and HDF5.
    pyramid_levels
        Extra resolution levels of an OME-Zarr image (each halves y and x).
    """
    p, key = split_key(path, key)
    nd = len(data.shape)
    names = tuple(a.lower() for a in axes) if axes is not None else _guess_axes(nd)
    if len(names) != nd:
        raise FormatError(f"axes {''.join(names)!r} do not match the data's shape {data.shape}")
    scale_t = tuple(float(s) for s in scale) if scale is not None else (1.0,) * nd
    units_t = tuple(units) if units is not None else (None,) * nd
    suffix = _suffix(p)
    if suffix == ".npy":
        np.save(p, np.asarray(data))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        meta: dict[str, Any] = {"axes": "".join(names).upper()}
        for a, s, u in zip(names, scale_t, units_t, strict=True):
            if a in _SPATIAL:
                meta[f"PhysicalSize{a.upper()}"] = s
                if u:
                    meta[f"PhysicalSize{a.upper()}Unit"] = {
                        "micrometer": "µm",
                        "nanometer": "nm",
                        "millimeter": "mm",
                    }.get(u, u)
        tifffile.imwrite(p, np.asarray(data), ome=True, metadata=meta)
    elif suffix in _HDF5:
        import h5py

        with h5py.File(p, "a") as f:
            name = key or "data"
            if name in f:
                del f[name]
            ds = f.create_dataset(
                name, data=np.asarray(data), chunks=tuple(chunks) if chunks else None
            )
            ds.attrs["axes"] = "".join(names)
            ds.attrs["scale"] = np.asarray(scale_t)
            ds.attrs["units"] = [u or "" for u in units_t]
            spatial = [s for a, s in zip(names, scale_t, strict=True) if a in _SPATIAL]
            if all(u in (None, "micrometer") for u in units_t):
                ds.attrs["element_size_um"] = np.asarray(spatial)
    elif suffix == ".zarr":
        if ome is None:
            _save_plain_zarr(p, data, names, scale_t, units_t, zarr_format, chunks)
        else:
            _save_ome_zarr(p, data, names, scale_t, units_t, ome, chunks, pyramid_levels)
    else:
        raise FormatError(
            f"cannot write {str(p)!r}: unknown extension {suffix or '(none)'!r}; "
            f"supported: .npy, .tif, .h5, .zarr"
        )
    return p


def _save_plain_zarr(
    path: Path,
    data: Any,
    names: tuple[str, ...],
    scale: tuple[float, ...],
    units: tuple[str | None, ...],
    zarr_format: int,
    chunks: Sequence[int] | None,
) -> None:
    import zarr

    attrs: dict[str, Any] = {"scale": list(scale), "units": list(units)}
    kwargs: dict[str, Any] = {}
    if zarr_format == 3:
        kwargs["dimension_names"] = list(names)
    else:
        attrs["_ARRAY_DIMENSIONS"] = list(names)
    arr = zarr.create_array(
        store=str(path),
        shape=data.shape,
        chunks=tuple(chunks) if chunks else "auto",
        dtype=data.dtype,
        zarr_format=zarr_format,  # type: ignore[arg-type]
        attributes=attrs,
        overwrite=True,
        **kwargs,
    )
    arr[...] = np.asarray(data)


def _axes_dicts(names: Sequence[str], units: Sequence[str | None]) -> list[dict[str, str]]:
    out = []
    for a, u in zip(names, units, strict=True):
        kind = "channel" if a in _CHANNEL else "time" if a == "t" else "space"
        entry = {"name": "c" if a == "s" else a, "type": kind}
        if u and kind != "channel" and _valid_unit(u):
            entry["unit"] = u
        out.append(entry)
    return out


def _ome_writer() -> Any:
    # ome_zarr.writer builds a deprecated Scaler as a default argument when imported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ome_zarr.writer

    return ome_zarr.writer


def _valid_unit(unit: str) -> bool:
    from ome_zarr.axes import KNOWN_SPATIAL_UNITS, KNOWN_TEMPORAL_UNITS

    return unit in KNOWN_SPATIAL_UNITS or unit in KNOWN_TEMPORAL_UNITS


def _save_ome_zarr(
    path: Path,
    data: Any,
    names: tuple[str, ...],
    scale: tuple[float, ...],
    units: tuple[str | None, ...],
    version: str,
    chunks: Sequence[int] | None,
    pyramid_levels: int,
) -> None:
    from ome_zarr.format import FormatV04, FormatV05

    write_image = _ome_writer().write_image
    fmt = FormatV04() if version == "0.4" else FormatV05()
    axes = _axes_dicts(names, units)
    dims = [a["name"] for a in axes]
    factors = [{"y": 2**i, "x": 2**i} for i in range(1, pyramid_levels + 1)]
    remove_output(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        write_image(
            data,
            str(path),
            scale_factors=factors,
            fmt=fmt,
            axes=axes,
            scale=dict(zip(dims, scale, strict=True)),
            axes_units={a["name"]: a["unit"] for a in axes if "unit" in a} or None,
            storage_options={"chunks": tuple(chunks)} if chunks else None,
        )


def check_output_path(
    path: str | os.PathLike[str], overwrite: bool = False, resume: bool = False
) -> Path:
    """Check an output path has a writable format and does not exist.

    An existing output is accepted with ``overwrite`` (it will be replaced) or, for
    a ``.zarr`` output, with ``resume`` (it will be continued).
    """
    p = Path(path)
    if _suffix(p) not in OUTPUT_FORMATS:
        raise FormatError(
            f"cannot write {str(p)!r}: unknown extension {_suffix(p) or '(none)'!r}; "
            f"supported: {', '.join(OUTPUT_FORMATS)}"
        )
    if resume and _suffix(p) != ".zarr":
        raise FormatError(
            f"cannot resume {str(p)!r}: only .zarr outputs record which blocks are done; "
            "write to a .zarr output to be able to resume"
        )
    if p.exists() and not (overwrite or resume):
        if _suffix(p) == ".zarr" and PredictionStore.is_store(p):
            store = PredictionStore.open(p, mode="r")
            if not store.complete:
                done, total = store.progress()
                raise FormatError(
                    f"output {str(p)!r} is an interrupted run ({done} of {total} blocks "
                    "written); pass --resume to finish it or --overwrite to start over"
                )
        raise FormatError(f"output {str(p)!r} exists; remove it or pass --overwrite")
    if not p.parent.exists():
        raise InputNotFoundError(f"the folder of output {str(p)!r} does not exist")
    return p


def _check_complete(path: Path, node: Any) -> None:
    info = dict(node.attrs).get("nahtlos")
    if isinstance(info, dict) and info.get("status") not in (None, "complete"):
        store = PredictionStore(path, node)
        done, total = store.progress()
        raise IncompleteOutputError(
            f"{str(path)!r} is an incomplete prediction ({done} of {total} blocks written, "
            "run interrupted); finish it with `nahtlos predict ... --resume` or delete it"
        )


# --------------------------------------------------------------------------- outputs


def _output_compressors() -> Any:
    """Codecs of prediction outputs: zstd at level 1.

    Predicted probabilities are noise-like and compress about 1.4-fold whatever the level:
    on float16 sigmoid outputs zstd level 1 reached the ratio of zarr's default (level 3)
    while encoding four times faster (790 against 196 MiB/s), and encoding was the largest
    CPU cost of out-of-core prediction besides the network.
    """
    from zarr.codecs import ZstdCodec

    return (ZstdCodec(level=1),)


def _convert(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    if dtype == np.uint8:
        # probabilities in [0, 1] scaled to 0..255 (documented in the output metadata)
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.asarray(values).astype(dtype, copy=False)


def _label_dtype(channels: int) -> np.dtype[Any]:
    return np.dtype(np.uint8 if channels <= 255 else np.uint16)


@dataclass
class _LabelSpec:
    name: str
    channel: int | None  # None: argmax over channels


class PredictionStore:
    """A resumable zarr prediction output, written block by block.

    A path ending in ``.ome.zarr`` holds an OME-Zarr 0.5 image (one zarr v3 group)::

        out.ome.zarr/
          s0, s1, ...           (C, [Z,] Y, X) predictions, chunks = prediction blocks
          labels/<name>/s0, ... optional segmentation ([Z,] Y, X), same chunks
          nahtlos_done          one uint8 per block, written after the block's data

    Any other ``.zarr`` path holds a plain zarr v3 array (``dimension_names``, and
    ``scale``/``units`` attributes), with its record of finished blocks beside it in
    ``.out.zarr.blocks`` until the run completes.

    The attribute ``nahtlos.status`` is ``"running"`` until every block is written
    and :meth:`finalize` has built the pyramid and the OME metadata; readers of this
    package refuse an output that is not ``"complete"``, and other OME-Zarr readers do
    not see an image because the ``ome`` metadata is written last.

    Create one with :meth:`create`, reopen it (to resume, or on a Dask worker) with
    :meth:`open`. As an array-like (``shape``, ``__setitem__``) it is a valid ``out``
    of :func:`~nahtlos.engine.predict.predict_blockwise`; :meth:`mark_done` is the matching
    ``on_block_done``.
    """

    DONE = "nahtlos_done"

    def __init__(self, path: Path, node: Any) -> None:
        import zarr

        self.path = Path(path)
        # an OME-Zarr group, or a plain array
        self.node = node
        self.ome = isinstance(node, zarr.Group)
        info = dict(node.attrs).get("nahtlos", {})
        self.info: dict[str, Any] = info
        self.block: tuple[int, ...] = tuple(info.get("block", ()))
        self.grid_shape: tuple[int, ...] = tuple(info.get("grid_shape", ()))
        self.dtype = np.dtype(info.get("dtype", "float32"))
        self.threshold = float(info.get("threshold", 0.5))
        self.labels = [_LabelSpec(n, c) for n, c in info.get("labels", [])]
        self.pyramid = [tuple(f) for f in info.get("pyramid", [])]
        self.level1_in_blocks = bool(info.get("level1_in_blocks", False))
        self._data: Any = None
        self._label_arrays: dict[str, Any] = {}
        self._done: Any = None

    # ----------------------------------------------------------------- creation

    @staticmethod
    def is_ome(path: str | os.PathLike[str]) -> bool:
        """Whether an output path asks for OME-Zarr (it ends in ``.ome.zarr``)."""
        return Path(path).name.lower().endswith(".ome.zarr")

    @staticmethod
    def blocks_path(path: str | os.PathLike[str]) -> Path:
        """Where a plain array output records its finished blocks."""
        p = Path(path)
        return p.with_name(f".{p.name}.blocks")

    @staticmethod
    def is_store(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a zarr output written by this class."""
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception:
            return False
        return "nahtlos" in dict(node.attrs)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        shape: Sequence[int],
        block: Sequence[int],
        dtype: OutputDtype = "float32",
        axes: Sequence[str] | None = None,
        scale: Sequence[float] | None = None,
        units: Sequence[str | None] | None = None,
        translation: Sequence[float] | None = None,
        channel_names: Sequence[str] | None = None,
        segmentation: Segmentation | None = None,
        threshold: float = 0.5,
        pyramid_levels: int | None = None,
        plan: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> PredictionStore:
        """Create an empty store (replacing an existing one with ``overwrite``).

        Parameters
        ----------
        shape
            ``(C, *spatial)`` of the prediction.
        block
            Spatial block shape of the prediction; it becomes the chunk shape.
        dtype
            ``"float32"``, ``"float16"`` or ``"uint8"`` (probabilities scaled by 255).
        axes, scale, units, translation
            Spatial axis names (default ``z, y, x``), pixel size, units and origin,
            copied from the input.
        channel_names
            Names of the output channels (default ``c0, c1, ...``).
        segmentation
            ``"threshold"``: one 0/1 label image per channel (``value > threshold``);
            ``"argmax"``: one label image holding the index of the largest channel.
        pyramid_levels
            Extra resolution levels; by default, halve until the largest spatial axis
            fits one block (at most 8 levels). Each level halves y and x, and z while
            its pixel size stays at most 1.5 times the smallest one. The first level
            is written with every block (its chunks are half blocks, one per block),
            the others by :meth:`finalize`, so nothing is read back but a
            1/8-sized level, and no task holds more than about one block.
        plan
            JSON-able description of the run, compared on resume.
        """
        import zarr

        shape = tuple(int(s) for s in shape)
        spatial = shape[1:]
        nd = len(spatial)
        block = tuple(int(b) for b in block)
        if len(block) != nd:
            raise BlockShapeError(f"block {block} does not match the spatial shape {spatial}")
        if dtype not in OUTPUT_DTYPES:
            raise FormatError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        axes = tuple(axes) if axes is not None else ("z", "y", "x")[-nd:]
        names = list(channel_names) if channel_names else [f"c{i}" for i in range(shape[0])]
        if len(names) != shape[0]:
            raise ShapeMismatchError(
                f"{len(names)} channel names ({', '.join(names)}) for {shape[0]} output channels"
            )
        labels: list[tuple[str, int | None]] = []
        if segmentation == "threshold":
            labels = [(n, i) for i, n in enumerate(names)]
        elif segmentation == "argmax":
            labels = [("argmax", None)]
        elif segmentation is not None:
            raise FormatError(f"segmentation {segmentation!r} is not 'threshold' or 'argmax'")
        p = Path(path)
        ome = cls.is_ome(p)
        if labels and not ome:
            raise FormatError(
                f"segmentation labels need an OME-Zarr output; name it "
                f"{p.name.removesuffix('.zarr')}.ome.zarr instead of {p.name}"
            )
        if p.exists():
            if not overwrite:
                raise FormatError(f"output {str(p)!r} exists; remove it or pass --overwrite")
            remove_output(p)
        remove_output(cls.blocks_path(p))
        grid_shape = tuple(math.ceil(n / b) for n, b in zip(spatial, block, strict=True))
        # one chunk per block; a block larger than the image is one chunk of the image
        chunk = tuple(min(b, n) for b, n in zip(block, spatial, strict=True))
        scale_t = tuple(float(x) for x in (scale or (1.0,) * nd))
        factors = _pyramid_factors(spatial, scale_t, block, pyramid_levels) if ome else []
        first = factors[0] if factors else None
        # level 1 can be pooled from each block alone if no pooling box straddles blocks
        in_blocks = first is not None and all(b % f == 0 for b, f in zip(block, first, strict=True))
        info = {
            "status": "running",
            "shape": list(shape),
            "block": list(block),
            "grid_shape": list(grid_shape),
            "dtype": dtype,
            "value_scale": 1 / 255 if dtype == "uint8" else 1.0,
            "axes": list(axes),
            "scale": list(scale_t),
            "units": list(units or (None,) * nd),
            "translation": [float(t) for t in (translation or (0.0,) * nd)],
            "channel_names": names,
            "labels": [list(x) for x in labels],
            "threshold": float(threshold),
            "pyramid": [list(f) for f in factors],
            "level1_in_blocks": in_blocks,
            "plan": plan or {},
        }
        if not ome:
            array = zarr.create_array(
                store=str(p),
                shape=shape,
                chunks=(shape[0], *chunk),
                dtype=np.dtype(dtype),
                fill_value=0,
                compressors=_output_compressors(),
                zarr_format=3,
                dimension_names=["c", *axes],
                attributes={"scale": [1.0, *scale_t], "units": [None, *(units or (None,) * nd)]},
            )
            zarr.create_array(
                store=str(cls.blocks_path(p)),
                shape=grid_shape,
                chunks=(1,) * nd,
                dtype=np.uint8,
                fill_value=0,
                zarr_format=3,
            )
            array.attrs["nahtlos"] = info  # type: ignore[assignment]
            return cls(p, array)
        group = zarr.open_group(str(p), mode="w", zarr_format=3)
        group.create_array(
            "s0",
            shape=shape,
            chunks=(shape[0], *chunk),
            dtype=np.dtype(dtype),
            fill_value=0,
            compressors=_output_compressors(),
            dimension_names=["c", *axes],
        )
        small = tuple(math.ceil(n / f) for n, f in zip(spatial, first or block, strict=True))
        half = tuple(min(b // f, m) for b, f, m in zip(block, first or block, small, strict=True))
        if in_blocks:
            group.create_array(
                "s1",
                shape=(shape[0], *small),
                chunks=(shape[0], *half),
                dtype=np.dtype(dtype),
                fill_value=0,
                compressors=_output_compressors(),
                dimension_names=["c", *axes],
            )
        for name, channel in labels:
            label_group = group.require_group("labels").require_group(name)
            label_dtype = np.uint8 if channel is not None else _label_dtype(shape[0])
            label_group.create_array(
                "s0",
                shape=spatial,
                chunks=chunk,
                dtype=label_dtype,
                fill_value=0,
                compressors=_output_compressors(),
                dimension_names=list(axes),
            )
            if in_blocks:
                label_group.create_array(
                    "s1",
                    shape=small,
                    chunks=half,
                    dtype=label_dtype,
                    fill_value=0,
                    compressors=_output_compressors(),
                    dimension_names=list(axes),
                )
        group.create_array(
            cls.DONE, shape=grid_shape, chunks=(1,) * nd, dtype=np.uint8, fill_value=0
        )
        # written last: a store without it is not taken for a nahtlos output
        group.attrs["nahtlos"] = info  # type: ignore[assignment]
        return cls(p, group)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r+") -> PredictionStore:
        """Open an existing store.

        Raises
        ------
        FormatError
            If ``path`` is not a prediction store written by nahtlos.
        """
        import zarr

        try:
            node = zarr.open(str(path), mode=mode)
        except Exception as exc:
            raise FormatError(
                f"{str(path)!r} is not a nahtlos prediction output ({exc}); remove it or "
                "choose another output path"
            ) from exc
        if "nahtlos" not in dict(node.attrs):
            raise FormatError(
                f"{str(path)!r} is a zarr store but not a nahtlos prediction output; "
                "remove it or choose another output path"
            )
        return cls(Path(path), node)

    # ----------------------------------------------------------------- state

    @property
    def status(self) -> str:
        """``"running"`` or ``"complete"``."""
        return str(self.info.get("status"))

    @property
    def complete(self) -> bool:
        """Whether every block, the pyramid and the metadata were written."""
        return self.status == "complete"

    @property
    def plan(self) -> dict[str, Any]:
        """The run description the store was created with."""
        return dict(self.info.get("plan", {}))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of the prediction."""
        return tuple(self.info["shape"])

    def _done_array(self) -> Any:
        import zarr

        if self._done is None:
            if self.ome:
                self._done = self.node[self.DONE]
            else:
                mode = "r" if self.node.read_only else "r+"
                self._done = zarr.open_array(str(self.blocks_path(self.path)), mode=mode)
        return self._done

    def done(self) -> np.ndarray:
        """A boolean array over the block grid: which blocks are written."""
        if self.complete:
            return np.ones(self.grid_shape, bool)
        return np.asarray(self._done_array()[...]).astype(bool)

    def progress(self) -> tuple[int, int]:
        """Blocks written and blocks in total."""
        total = math.prod(self.grid_shape)
        if self.complete:
            return total, total
        try:
            return int(self.done().sum()), total
        except Exception:  # a store damaged beyond its record of blocks
            return 0, total

    # ----------------------------------------------------------------- writing

    def _arrays(self) -> tuple[list[Any], dict[str, list[Any]]]:
        if self._data is None:
            if not self.ome:
                self._data = [self.node]
                return self._data, {}
            levels = ("s0", "s1") if self.level1_in_blocks else ("s0",)
            self._label_arrays = {
                spec.name: [self.node[f"labels/{spec.name}/{s}"] for s in levels]
                for spec in self.labels
            }
            self._data = [self.node[s] for s in levels]
        return self._data, self._label_arrays

    def __setitem__(self, key: tuple[Any, ...], value: np.ndarray) -> None:
        """Write the predictions ``value`` (float, ``(C, *region)``) of one block region."""
        data, label_arrays = self._arrays()
        value = np.asarray(value, dtype=np.float32)
        spatial: tuple[slice, ...] = tuple(key[1:])
        data[0][key] = _convert(value, self.dtype)
        step = self.pyramid[0] if self.level1_in_blocks else None
        if step is not None:
            pooled = _mean_pool(value, step)
            small = tuple(
                slice(k.start // f, k.start // f + n)
                for k, f, n in zip(spatial, step, pooled.shape[1:], strict=True)
            )
            small_key = (slice(None), *small)
            data[1][small_key] = _convert(pooled, self.dtype)
        for spec in self.labels:
            arrays = label_arrays[spec.name]
            if spec.channel is None:
                seg = np.argmax(value, axis=0).astype(arrays[0].dtype)
            else:
                seg = (value[spec.channel] > self.threshold).astype(np.uint8)
            arrays[0][spatial] = seg
            if step is not None:
                arrays[1][small] = _nearest(seg, step)

    def write_block(self, blk: Any, prediction: np.ndarray) -> None:
        """Write one block's cropped prediction, then record the block as done."""
        key = (slice(None), *blk.inner)
        self[key] = prediction
        self.mark_done(blk)

    def mark_done(self, blk: Any) -> None:
        """Record that ``blk`` (a :class:`~nahtlos.engine.geometry.Block`) is fully written."""
        self._done_array()[tuple(blk.index)] = 1

    # ----------------------------------------------------------------- finishing

    def finalize(self, *, scheduler: Any = "threads", name: str | None = None) -> Path:
        """Build the rest of the pyramid and the OME metadata; mark the store complete.

        Parameters
        ----------
        scheduler
            Dask scheduler for the pyramid (``"threads"`` or a ``distributed.Client``).
        name
            Name of the image in the metadata.

        Raises
        ------
        IncompleteOutputError
            If some blocks were not written.
        """
        from ome_zarr.format import FormatV05

        writer = _ome_writer()
        add_metadata = writer.add_metadata
        write_label_metadata = writer.write_label_metadata
        write_multiscales_metadata = writer.write_multiscales_metadata
        if self.complete:
            return self.path
        done, total = self.progress()
        if done != total:
            raise IncompleteOutputError(
                f"{str(self.path)!r}: {total - done} of {total} blocks were not written; "
                "run again with --resume"
            )
        if not self.ome:
            self.info = {**self.info, "status": "complete"}
            self.node.attrs["nahtlos"] = self.info
            remove_output(self.blocks_path(self.path))
            return self.path
        group = self.node
        spatial = tuple(self.info["shape"][1:])
        axes = tuple(self.info["axes"])
        scale = tuple(self.info["scale"])
        units = tuple(self.info["units"])
        translation = tuple(self.info["translation"])
        factors = self.pyramid
        start = 2 if self.level1_in_blocks else 1
        fmt = FormatV05()
        image_name = name or self.path.name
        channels = self.info["shape"][0]

        def transforms(cumulative: tuple[int, ...], lead: list[float]) -> list[dict[str, Any]]:
            s = [*lead, *(sc * f for sc, f in zip(scale, cumulative, strict=True))]
            # a pooled pixel's centre lies half its extent minus half a pixel further in
            t = [0.0] * len(lead) + [
                t0 + (f - 1) * sc / 2
                for t0, sc, f in zip(translation, scale, cumulative, strict=True)
            ]
            return [{"type": "scale", "scale": s}, {"type": "translation", "translation": t}]

        _write_pyramid(group, factors, start, "mean", scheduler)
        levels = [(1,) * len(spatial)]
        for step in factors:
            levels.append(tuple(c * f for c, f in zip(levels[-1], step, strict=True)))
        datasets = [
            {"path": f"s{i}", "coordinateTransformations": transforms(c, [1.0])}
            for i, c in enumerate(levels)
        ]
        axes_dicts = _axes_dicts(("c", *axes), (None, *units))
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes_dicts, name=image_name)
        window = (0, 255) if self.dtype == np.uint8 else (0.0, 1.0)
        colors = ["FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF"]
        add_metadata(
            group,
            {
                "omero": {
                    "channels": [
                        {
                            "label": n,
                            "color": colors[i % len(colors)],
                            "active": True,
                            "window": {
                                "min": window[0],
                                "max": window[1],
                                "start": window[0],
                                "end": window[1],
                            },
                        }
                        for i, n in enumerate(self.info["channel_names"])
                    ],
                    "rdefs": {"model": "color"},
                }
            },
            fmt=fmt,
        )
        if self.labels:
            labels_group = group["labels"]
            add_metadata(labels_group, {"version": fmt.version, "labels": []}, fmt=fmt)
            for spec in self.labels:
                label_group = labels_group[spec.name]
                _write_pyramid(label_group, factors, start, "nearest", scheduler)
                write_multiscales_metadata(
                    label_group,
                    [
                        {"path": f"s{i}", "coordinateTransformations": transforms(c, [])}
                        for i, c in enumerate(levels)
                    ],
                    fmt=fmt,
                    axes=_axes_dicts(axes, units),
                    name=spec.name,
                )
                values = [0, 1] if spec.channel is not None else list(range(channels))
                write_label_metadata(
                    labels_group,
                    spec.name,
                    colors=[
                        {"label-value": v, "rgba": [0, 0, 0, 0] if v == 0 else _rgba(v)}
                        for v in values
                    ],
                    properties=[
                        {"label-value": v, "channel": self.info["channel_names"][v]}
                        for v in values
                        if spec.channel is None
                    ]
                    or None,
                    fmt=fmt,
                    source={"image": "../../"},
                )
        self.info = {**self.info, "status": "complete", "levels": len(levels)}
        group.attrs["nahtlos"] = self.info
        # the record of finished blocks has served its purpose
        with contextlib.suppress(KeyError):
            del group[self.DONE]
        return self.path


def _rgba(value: int) -> list[int]:
    rng = np.random.default_rng(value)
    return [int(v) for v in rng.integers(64, 256, 3)] + [255]


def _pyramid_factors(
    shape: tuple[int, ...],
    scale: tuple[float, ...],
    block: tuple[int, ...],
    levels: int | None,
) -> list[tuple[int, ...]]:
    """Per-level down-sampling factors (relative to the previous level) for each axis."""
    factors: list[tuple[int, ...]] = []
    current = list(shape)
    pixel = list(scale)
    limit = 8 if levels is None else levels
    while len(factors) < limit:
        if levels is None and max(current) <= max(block):
            break
        smallest = (
            min(p for p, n in zip(pixel, current, strict=True) if n > 1)
            if max(current) > 1
            else 1.0
        )
        step = tuple(
            2 if n > 1 and (len(shape) < 3 or i > 0 or p <= 1.5 * smallest) else 1
            for i, (n, p) in enumerate(zip(current, pixel, strict=True))
        )
        if all(s == 1 for s in step):
            break
        factors.append(step)
        current = [math.ceil(n / s) for n, s in zip(current, step, strict=True)]
        pixel = [p * s for p, s in zip(pixel, step, strict=True)]
    return factors


def _mean_pool(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Average ``step``-sized boxes; a box cut by the border averages the pixels it has.

    Sums strided views into a float32 accumulator an eighth of the input's size, so
    that a chunk needs little memory beyond itself.
    """
    lead = x.ndim - len(step)
    spatial = x.shape[lead:]
    out_spatial = tuple(math.ceil(n / s) for n, s in zip(spatial, step, strict=True))
    total = np.zeros((*x.shape[:lead], *out_spatial), np.float32)
    count = np.zeros(out_spatial, np.float32)
    for offset in itertools.product(*(range(s) for s in step)):
        steps = [slice(o, None, s) for o, s in zip(offset, step, strict=True)]
        strided: tuple[Any, ...] = (Ellipsis, *steps)
        part = x[strided]
        region = tuple(slice(0, n) for n in part.shape[lead:])
        target: tuple[Any, ...] = (Ellipsis, *region)
        total[target] += part
        count[region] += 1
    mean = total / count
    if x.dtype.kind in "ui":
        return np.rint(mean).astype(x.dtype)
    return mean.astype(x.dtype, copy=False)


def _nearest(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    lead = x.ndim - len(step)
    return x[(slice(None),) * lead + tuple(slice(None, None, s) for s in step)]


def _write_pyramid(
    group: Any,
    factors: list[tuple[int, ...]],
    start: int,
    method: Literal["mean", "nearest"],
    scheduler: Any,
) -> None:
    """Write levels ``s{start}, ...`` from the level below, chunk by chunk.

    A level keeps the chunk shape of the level below, so each task reads the boxes
    of one output chunk (``step`` chunks per axis) and writes that chunk alone.
    """
    import dask.array as da

    for i in range(start, len(factors) + 1):
        step = factors[i - 1]
        prev = group[f"s{i - 1}"]
        lead = prev.ndim - len(step)
        chunk = prev.chunks[lead:]
        read = (*prev.shape[:lead], *(c * s for c, s in zip(chunk, step, strict=True)))
        source = da.from_zarr(prev, chunks=read)
        out_chunks = tuple(
            tuple(math.ceil(c / s) for c in axis_chunks)
            for axis_chunks, s in zip(source.chunks, (1,) * lead + step, strict=True)
        )
        func = _mean_pool if method == "mean" else _nearest
        level = source.map_blocks(func, step, chunks=out_chunks, dtype=prev.dtype)
        target = group.create_array(
            f"s{i}",
            shape=level.shape,
            chunks=prev.chunks,
            dtype=prev.dtype,
            fill_value=0,
            compressors=_output_compressors(),
            dimension_names=prev.metadata.dimension_names,
            overwrite=True,
        )
        da.store(level, target, lock=False, compute=True, scheduler=scheduler)


class PendingOutput:
    """An output array written under a temporary name and moved into place on commit.

    Call the object with a shape to create the array (it is a valid ``out`` factory
    for :func:`~nahtlos.engine.predict.predict_blockwise`); call :meth:`commit` when every
    block is written, or :meth:`discard` on failure. Used for ``.npy`` and ``.tif``
    outputs, which cannot record finished blocks (``.zarr`` outputs use
    :class:`PredictionStore`).

    Parameters
    ----------
    path
        Final path: ``.zarr``, ``.npy`` or ``.tif``/``.tiff``.
    chunks
        Spatial chunk shape for zarr (use the block shape so no two blocks share a chunk).
    dtype
        Data type of the output; ``uint8`` stores probabilities scaled by 255.
    overwrite
        Replace an existing output on commit.
    axes, scale, units
        Spatial axes, pixel size and units, written into TIFF metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunks: Sequence[int] | None = None,
        dtype: Any = np.float32,
        overwrite: bool = False,
        axes: Sequence[str] | None = None,
        scale: Sequence[float] | None = None,
        units: Sequence[str | None] | None = None,
    ) -> None:
        self.path = check_output_path(path, overwrite)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.axes = None if axes is None else tuple(axes)
        self.scale = None if scale is None else tuple(scale)
        self.units = None if units is None else tuple(units)
        self.array: Any = None

    def __call__(self, shape: tuple[int, ...]) -> Any:
        remove_output(self.tmp)
        suffix = _suffix(self.path)
        if suffix == ".zarr":
            import zarr

            spatial = self.chunks or tuple(min(s, 128) for s in shape[1:])
            chunks = (shape[0], *(min(c, s) for c, s in zip(spatial, shape[1:], strict=True)))
            self.array = zarr.create_array(
                store=str(self.tmp),
                shape=shape,
                chunks=chunks,
                dtype=self.dtype,
                fill_value=0,
                compressors=_output_compressors(),
                zarr_format=3,
            )
        elif suffix == ".npy":
            self.array = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=self.dtype, shape=shape
            )
        else:
            import tifffile

            axes = self.axes or ("z", "y", "x")[-(len(shape) - 1) :]
            meta: dict[str, Any] = {"axes": "C" + "".join(axes).upper()}
            for a, s in zip(axes, self.scale or (), strict=False):
                meta[f"PhysicalSize{a.upper()}"] = float(s)
            self.array = tifffile.memmap(
                self.tmp, shape=shape, dtype=self.dtype, ome=True, metadata=meta
            )
        return _ConvertingSink(self.array, self.dtype) if self.dtype == np.uint8 else self.array

    def commit(self) -> Path:
        """Flush and move the finished output to its final path."""
        if self.array is None:
            raise RuntimeError("nothing was written")
        if hasattr(self.array, "flush"):
            self.array.flush()
        self.array = None
        if self.path.exists():
            remove_output(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary output."""
        self.array = None
        remove_output(self.tmp)


@dataclass
class _ConvertingSink:
    """Scales float probabilities to ``uint8`` on their way into an array."""

    array: Any
    dtype: np.dtype[Any]
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(self.array.shape)

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.array[key] = _convert(value, self.dtype)

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]


def remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
