"""Opening images lazily, with their axes and physical pixel size, in the formats of the field.

Readers return array-likes that load only what is sliced: ``.npy`` (memory-mapped),
TIFF (memory-mapped when uncompressed, else zarr-backed through tifffile), zarr v2/v3
arrays and groups, OME-Zarr 0.4/0.5 (any resolution level), and HDF5 datasets
(``file.h5:dataset``). :func:`open_source` also returns the image's axes and
physical pixel size, read from the file's metadata (OME-Zarr multiscales, OME-TIFF or
ImageJ TIFF tags, HDF5 ``element_size_um``/``axistags``, zarr ``dimension_names``).
Each file is opened once: a TIFF's header is parsed by one ``tifffile.TiffFile``, whose
handle also serves the memory map or the chunk-wise reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InputNotFoundError
from .formats import (
    HDF5_SUFFIXES,
    INPUT_FORMATS,
    SPATIAL_AXES,
    guess_axes,
    path_suffix,
    split_key,
    unit_name,
)
from .source import ImageSource
from .store import check_complete

__all__ = ["open_image", "open_source"]


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
    suffix = path_suffix(p)
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
    if suffix in HDF5_SUFFIXES:
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
    names = tuple(a.lower() for a in axes) if axes is not None and known else guess_axes(nd)
    scale = scale or {}
    units = units or {}
    return ImageSource(
        array=array,
        axes=names,
        scale=tuple(float(scale.get(a, 1.0)) for a in names),
        units=tuple(unit_name(units.get(a)) for a in names),
        translation=(0.0,) * nd,
        axes_known=known,
        path=path,
        key=key,
    )


def _open_tiff(path: Path) -> ImageSource:
    import tifffile

    # One TiffFile per input: its parsed header gives the metadata, and its open handle
    # serves the memory map or the chunk-wise reads (no second open, no second parse).
    tif = tifffile.TiffFile(path)
    try:
        axes, scale, units = _tiff_metadata(tif)
        array = _tiff_array(tif)
    except BaseException:
        tif.close()
        raise
    if axes is not None and len(axes) != len(array.shape):
        axes = None  # tifffile squeezed differently from the array; do not guess
    return _plain_source(array, path, None, tuple(axes) if axes else None, scale, units)


def _tiff_array(tif: Any) -> Any:
    """The first series of an open TIFF: memory-mapped if it can be, else read chunk-wise.

    The memory map is what ``tifffile.memmap`` returns, made from the open handle; the
    handle is closed then. Compressed or tiled TIFFs cannot be memory-mapped: they are
    read through tifffile's zarr store, which keeps the handle open for its reads.
    """
    import zarr

    series = tif.series[0].levels[0]
    if series.dataoffset is not None:
        dtype = np.dtype(tif.byteorder + series.dtype.char)
        try:
            array = np.memmap(tif.filehandle, dtype, "r", series.dataoffset, series.shape, "C")
        except ValueError:  # e.g. a truncated file: let the chunk-wise reader judge it
            pass
        else:
            tif.close()  # the map keeps its own reference to the file
            return array
    return zarr.open_array(tif.aszarr(), mode="r")


def _tiff_metadata(
    tif: Any,
) -> tuple[str | None, dict[str, float], dict[str, str | None]]:
    """Axes, pixel size and units from OME-TIFF, ImageJ or tifffile's own metadata."""
    import tifffile

    axes: str | None = None
    scale: dict[str, float] = {}
    units: dict[str, str | None] = {}
    letters = tif.series[0].axes.lower()
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
    return axes, scale, units


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
    check_complete(path, node)
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
    units = tuple(unit_name(a.get("unit")) if isinstance(a, dict) else None for a in raw_axes)
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
        spatial = [a for a in (axes or guess_axes(len(dataset.shape))) if a in SPATIAL_AXES]
        for a, v in zip(spatial[-len(sizes) :], sizes, strict=False):
            scale[a] = v
            units[a] = "micrometer"
    if "scale" in attrs and axes is not None:
        scale.update(zip(axes, (float(v) for v in attrs["scale"]), strict=False))
    if "units" in attrs and axes is not None:
        units.update(zip(axes, (str(u) or None for u in attrs["units"]), strict=False))
    return _plain_source(dataset, path, key, axes, scale, units)
