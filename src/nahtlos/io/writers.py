"""Writing images and prediction outputs that are not resumable.

:func:`save_image` writes an image with its axes and pixel size in any format
:func:`~nahtlos.io.readers.open_source` reads. :class:`PendingOutput` (``.npy``,
``.tif``) is written under a temporary name and moved into place when complete, so
an interrupted run leaves no output behind; :func:`check_output_path` refuses an
output path that would overwrite (or fail to resume) an existing one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import FormatError, InputNotFoundError
from .formats import (
    HDF5_SUFFIXES,
    OUTPUT_FORMATS,
    SPATIAL_AXES,
    axes_dicts,
    convert_values,
    guess_axes,
    ome_writer,
    output_compressors,
    path_suffix,
    remove_output,
    split_key,
)
from .store import PredictionStore

__all__ = ["PendingOutput", "check_output_path", "save_image"]

# OME-TIFF spells units as abbreviations
_TIFF_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm"}


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
    names = tuple(a.lower() for a in axes) if axes is not None else guess_axes(nd)
    if len(names) != nd:
        raise FormatError(f"axes {''.join(names)!r} do not match the data's shape {data.shape}")
    meta = _Axes(
        names,
        tuple(float(s) for s in scale) if scale is not None else (1.0,) * nd,
        tuple(units) if units is not None else (None,) * nd,
    )
    suffix = path_suffix(p)
    if suffix == ".npy":
        np.save(p, np.asarray(data))
    elif suffix in (".tif", ".tiff"):
        _save_tiff(p, data, meta)
    elif suffix in HDF5_SUFFIXES:
        _save_hdf5(p, key or "data", data, meta, chunks)
    elif suffix == ".zarr":
        if ome is None:
            _save_plain_zarr(p, data, meta, zarr_format, chunks)
        else:
            _save_ome_zarr(p, data, meta, ome, chunks, pyramid_levels)
    else:
        raise FormatError(
            f"cannot write {str(p)!r}: unknown extension {suffix or '(none)'!r}; "
            f"supported: .npy, .tif, .h5, .zarr"
        )
    return p


@dataclass(frozen=True)
class _Axes:
    """Name, pixel size and unit of every axis of an image to write."""

    names: tuple[str, ...]
    scale: tuple[float, ...]
    units: tuple[str | None, ...]


def _save_tiff(path: Path, data: Any, meta: _Axes) -> None:
    """An OME-TIFF with the pixel size of the spatial axes."""
    import tifffile

    tags: dict[str, Any] = {"axes": "".join(meta.names).upper()}
    for a, s, u in zip(meta.names, meta.scale, meta.units, strict=True):
        if a in SPATIAL_AXES:
            tags[f"PhysicalSize{a.upper()}"] = s
            if u:
                tags[f"PhysicalSize{a.upper()}Unit"] = _TIFF_UNITS.get(u, u)
    tifffile.imwrite(path, np.asarray(data), ome=True, metadata=tags)


def _save_hdf5(path: Path, name: str, data: Any, meta: _Axes, chunks: Sequence[int] | None) -> None:
    """Dataset ``name`` with ``axes``, ``scale``, ``units`` and Fiji's ``element_size_um``."""
    import h5py

    with h5py.File(path, "a") as f:
        if name in f:
            del f[name]
        ds = f.create_dataset(name, data=np.asarray(data), chunks=tuple(chunks) if chunks else None)
        ds.attrs["axes"] = "".join(meta.names)
        ds.attrs["scale"] = np.asarray(meta.scale)
        ds.attrs["units"] = [u or "" for u in meta.units]
        spatial = [s for a, s in zip(meta.names, meta.scale, strict=True) if a in SPATIAL_AXES]
        if all(u in (None, "micrometer") for u in meta.units):
            ds.attrs["element_size_um"] = np.asarray(spatial)


def _save_plain_zarr(
    path: Path, data: Any, meta: _Axes, zarr_format: int, chunks: Sequence[int] | None
) -> None:
    """A zarr array with ``dimension_names`` (v3) or ``_ARRAY_DIMENSIONS`` (v2)."""
    import zarr

    attrs: dict[str, Any] = {"scale": list(meta.scale), "units": list(meta.units)}
    kwargs: dict[str, Any] = {}
    if zarr_format == 3:
        kwargs["dimension_names"] = list(meta.names)
    else:
        attrs["_ARRAY_DIMENSIONS"] = list(meta.names)
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


def _save_ome_zarr(
    path: Path,
    data: Any,
    meta: _Axes,
    version: str,
    chunks: Sequence[int] | None,
    pyramid_levels: int,
) -> None:
    """An OME-Zarr image through ``ome_zarr``, with levels halving y and x."""
    from ome_zarr.format import FormatV04, FormatV05

    write_image = ome_writer().write_image
    fmt = FormatV04() if version == "0.4" else FormatV05()
    axes = axes_dicts(meta.names, meta.units)
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
            scale=dict(zip(dims, meta.scale, strict=True)),
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
    if path_suffix(p) not in OUTPUT_FORMATS:
        raise FormatError(
            f"cannot write {str(p)!r}: unknown extension {path_suffix(p) or '(none)'!r}; "
            f"supported: {', '.join(OUTPUT_FORMATS)}"
        )
    if resume and path_suffix(p) != ".zarr":
        raise FormatError(
            f"cannot resume {str(p)!r}: only .zarr outputs record which blocks are done; "
            "write to a .zarr output to be able to resume"
        )
    if p.exists() and not (overwrite or resume):
        if path_suffix(p) == ".zarr" and PredictionStore.is_store(p):
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
        suffix = path_suffix(self.path)
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
                compressors=output_compressors(),
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
        self.array[key] = convert_values(value, self.dtype)

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]
