"""Reading images lazily and writing predictions, for the formats of the field.

Readers return array-likes that load only what is sliced: ``.npy`` (memory-mapped),
TIFF (memory-mapped when uncompressed, else zarr-backed through tifffile), zarr v2/v3
arrays and groups, OME-Zarr (level 0 unless asked), and HDF5 datasets
(``file.h5:dataset``).

Writers create the output under a temporary name beside the target and move it into
place only when it is complete, so that an interrupted run never leaves an output
that looks finished.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, InputNotFoundError

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "PendingOutput",
    "open_image",
    "split_key",
]

INPUT_FORMATS = (".npy", ".tif", ".tiff", ".zarr", ".h5", ".hdf5", ".hdf")
OUTPUT_FORMATS = (".npy", ".tif", ".tiff", ".zarr")


def split_key(path: str | os.PathLike[str], key: str | None = None) -> tuple[Path, str | None]:
    """Split ``file.h5:dataset`` or ``image.zarr:group/array`` into path and key."""
    text = os.fspath(path)
    if key is None and ":" in text:
        head, _, tail = text.rpartition(":")
        # Keep Windows drive letters ("C:\\...") intact.
        if (
            head
            and not (len(head) == 1 and head.isalpha())
            and Path(head).suffix.lower()
            in (
                ".h5",
                ".hdf5",
                ".hdf",
                ".zarr",
            )
        ):
            return Path(head), tail
    return Path(text), key


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def open_image(path: str | os.PathLike[str], key: str | None = None) -> Any:
    """Open an image lazily.

    Parameters
    ----------
    path
        A ``.npy``, ``.tif``/``.tiff``, ``.zarr`` or ``.h5``/``.hdf5`` path;
        ``file.h5:dataset`` and ``image.zarr:key`` name a dataset inside.
    key
        Dataset inside an HDF5 file or zarr group (overrides one in ``path``).

    Returns
    -------
    An array-like supporting ``.shape``, ``.dtype`` and numpy slicing.

    Raises
    ------
    InputNotFoundError
        If the file, or the dataset inside it, does not exist.
    FormatError
        If the extension is not supported or the key is missing or ambiguous.
    """
    p, key = split_key(path, key)
    if not p.exists():
        raise InputNotFoundError(f"input {str(p)!r} does not exist")
    suffix = _suffix(p)
    if suffix == ".npy":
        return np.load(p, mmap_mode="r")
    if suffix in (".tif", ".tiff"):
        return _open_tiff(p)
    if suffix == ".zarr":
        return _open_zarr(p, key)
    if suffix in (".h5", ".hdf5", ".hdf"):
        return _open_hdf5(p, key)
    raise FormatError(
        f"cannot read {str(p)!r}: unknown extension {suffix or '(none)'!r}; "
        f"supported: {', '.join(INPUT_FORMATS)}"
    )


def _open_tiff(path: Path) -> Any:
    import tifffile
    import zarr

    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        # Compressed or tiled TIFFs cannot be memory-mapped; read them chunk-wise.
        store = tifffile.imread(path, aszarr=True)
        return zarr.open_array(store, mode="r")


def _open_zarr(path: Path, key: str | None) -> Any:
    import zarr

    node: Any
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for non-zarr folders
        raise FormatError(f"{str(path)!r} is not a readable zarr store: {exc}") from exc
    if key:
        try:
            node = node[key]
        except KeyError as exc:
            raise InputNotFoundError(f"no array {key!r} in zarr store {str(path)!r}") from exc
    if isinstance(node, zarr.Array):
        return node
    attrs: dict[str, Any] = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return node[arrays[0]]
    raise FormatError(
        f"zarr group {str(path)!r} holds {len(arrays)} arrays ({', '.join(sorted(arrays)) or 'none'}); "
        f"name one as {path}:KEY or with --input-key"
    )


def _open_hdf5(path: Path, key: str | None) -> Any:
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
    return f[key]


def check_output_path(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Check an output path has a writable format and does not exist (unless ``overwrite``)."""
    p = Path(path)
    if _suffix(p) not in OUTPUT_FORMATS:
        raise FormatError(
            f"cannot write {str(p)!r}: unknown extension {_suffix(p) or '(none)'!r}; "
            f"supported: {', '.join(OUTPUT_FORMATS)}"
        )
    if p.exists() and not overwrite:
        raise FormatError(f"output {str(p)!r} exists; remove it or pass --overwrite")
    if not p.parent.exists():
        raise InputNotFoundError(f"the folder of output {str(p)!r} does not exist")
    return p


class PendingOutput:
    """An output array written under a temporary name and moved into place on commit.

    Call the object with a shape to create the array (it is a valid ``out`` factory
    for :func:`~nahtlos.predict.predict_blockwise`); call :meth:`commit` when every
    block is written, or :meth:`discard` on failure.

    Parameters
    ----------
    path
        Final path: ``.zarr``, ``.npy`` or ``.tif``/``.tiff``.
    chunks
        Spatial chunk shape for zarr (use the block shape so no two blocks share a chunk).
    dtype
        Data type of the output.
    overwrite
        Replace an existing output on commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunks: Sequence[int] | None = None,
        dtype: Any = np.float32,
        overwrite: bool = False,
    ) -> None:
        self.path = check_output_path(path, overwrite)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.array: Any = None

    def __call__(self, shape: tuple[int, ...]) -> Any:
        _remove(self.tmp)
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
                zarr_format=3,
            )
        elif suffix == ".npy":
            self.array = np.lib.format.open_memmap(
                self.tmp, mode="w+", dtype=self.dtype, shape=shape
            )
        else:
            import tifffile

            axes = "CYX" if len(shape) == 3 else "CZYX"
            self.array = tifffile.memmap(
                self.tmp, shape=shape, dtype=self.dtype, metadata={"axes": axes}
            )
        return self.array

    def commit(self) -> Path:
        """Flush and move the finished output to its final path."""
        if self.array is None:
            raise RuntimeError("nothing was written")
        if hasattr(self.array, "flush"):
            self.array.flush()
        self.array = None
        if self.path.exists():
            _remove(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary output."""
        self.array = None
        _remove(self.tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
