"""Synthetic datasets on disk: block-wise writing to OME-Zarr or TIFF, lazy reopening.

:func:`write_synthetic` streams the blocks of :func:`~.datasets.fill` into arrays on
disk, so images far larger than memory can be written. Outputs are staged under
temporary names and moved into place only when complete: an interrupted write leaves
nothing behind. OME-Zarr 0.5 outputs carry a pyramid and their ground truth as label
images (``labels/instances``, and ``labels/semantic`` for organoids); TIFF outputs are
one file per array. :func:`open_synthetic` reads either back lazily.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...engine import BlockGrid
from ...errors import FormatError, InputNotFoundError
from ...io import open_image, remove_output
from .datasets import default_block, fill, make_generator
from .generator import Generator
from .sample import SynthError, SynthSample, class_names, per_axis

__all__ = ["SynthWritten", "open_synthetic", "write_synthetic"]


@dataclass
class SynthWritten:
    """What :func:`write_synthetic` wrote."""

    format: str
    paths: dict[str, Path]  # "image", "labels" (and "semantic") -> where
    shape: tuple[int, ...]
    dtype: str
    objects: int
    levels: int = 1

    def describe(self) -> str:
        """A few lines for a person."""
        lines = []
        for key, path in self.paths.items():
            what = {
                "image": f"image {self.dtype} {self.shape}",
                "labels": f"instance labels uint32, {self.objects} objects",
                "semantic": "semantic classes uint8",
            }[key]
            lines.append(f"  {path}  ({what})")
        return "\n".join(lines)


def _format_of(out: Path, format: str | None) -> str:
    suffix = out.suffix.lower()
    by_suffix = {".zarr": "ome-zarr", ".tif": "tif", ".tiff": "tif"}.get(suffix)
    if format is None:
        if by_suffix is None:
            raise FormatError(
                f"cannot tell the format of {str(out)!r}: end it in .zarr (OME-Zarr) or "
                ".tif/.tiff, or pass format"
            )
        return by_suffix
    fmt = format.lower().replace("_", "-")
    fmt = {"omezarr": "ome-zarr", "zarr": "ome-zarr", "tiff": "tif"}.get(fmt, fmt)
    if fmt not in ("ome-zarr", "tif"):
        raise FormatError(f"unknown format {format!r}; choose ome-zarr or tif")
    if by_suffix is not None and by_suffix != fmt:
        raise FormatError(f"output {str(out)!r} has a {suffix} suffix but format is {fmt!r}")
    return fmt


def write_synthetic(
    name: str,
    out: str | os.PathLike[str],
    shape: Sequence[int],
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    format: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthWritten:
    """Generate a synthetic image block by block straight to disk.

    Memory stays bounded by the block size, whatever the image size. Outputs are
    written under temporary names and moved into place when complete.

    Parameters
    ----------
    name, shape, seed, anisotropy
        As for :func:`~.datasets.synthesize` (the arrays written are identical to its
        arrays).
    out
        ``NAME.zarr`` for OME-Zarr (image with ``labels/instances``, and
        ``labels/semantic`` for organoids), or ``NAME.tif`` for TIFF (``NAME.tif``,
        ``NAME_labels.tif``, ``NAME_semantic.tif``).
    format
        ``"ome-zarr"`` or ``"tif"``; default from the suffix of ``out``.
    chunks
        OME-Zarr chunk shape (multiples of 64 in 2D, 32 in 3D); default 256x256 or 64x128x128.
    overwrite
        Replace existing outputs.
    progress
        Show a progress bar.
    """
    out = Path(out)
    fmt = _format_of(out, format)
    gen = make_generator(name, shape, seed, anisotropy)
    if not out.parent.exists():
        raise InputNotFoundError(f"the folder of output {str(out)!r} does not exist")
    align = gen.block_alignment()
    chunk: tuple[int, ...]
    if chunks is None:
        chunk = (256, 256) if gen.ndim == 2 else (64, 128, 128)
    else:
        chunk = per_axis(list(chunks), gen.ndim, "chunks")
    chunk = tuple(min(c, s) if s < c else c for c, s in zip(chunk, gen.shape, strict=True))
    for c, s in zip(chunk, gen.shape, strict=True):
        if c % align and c != s:
            raise SynthError(f"chunks {chunk} must be multiples of {align} voxels per axis")
    grid = BlockGrid(gen.shape, default_block(gen.shape, chunk, gen.margin))
    if fmt == "ome-zarr":
        return _write_ome_zarr(gen, out, chunk, grid, overwrite, progress)
    return _write_tiff(gen, out, grid, overwrite, progress)


@contextmanager
def _staged(final: dict[str, Path], overwrite: bool) -> Iterator[dict[str, Path]]:
    """Temporary paths for the outputs ``final``, moved into place if the block succeeds.

    On any exception, interruptions included, the temporary outputs are removed.
    """
    for path in final.values():
        if path.exists() and not overwrite:
            raise FormatError(f"output {str(path)!r} exists; remove it or pass overwrite")
    tmp = {k: p.with_name(f".{p.name}.partial") for k, p in final.items()}
    for path in tmp.values():
        remove_output(path)
    try:
        yield tmp
    except BaseException:
        for path in tmp.values():
            remove_output(path)
        raise
    for key, path in final.items():
        remove_output(path)
        os.replace(tmp[key], path)


def _keys(gen: Generator) -> list[str]:
    """The arrays written: organoids' ground truth is semantic, the others' instances."""
    return ["image", "labels"] + (["semantic"] if gen.name == "organoids" else [])


def _dtype(gen: Generator, key: str) -> np.dtype[Any]:
    """Data type of array ``key``."""
    return np.dtype({"image": gen.dtype, "labels": np.uint32, "semantic": np.uint8}[key])


def _levels(shape: tuple[int, ...]) -> int:
    """Pyramid levels: halve Y and X while the smaller stays at least 256 pixels."""
    n, yx = 1, min(shape[-2:])
    while yx // 2 >= 256 and n < 5:
        yx //= 2
        n += 1
    return n


def _write_ome_zarr(
    gen: Generator,
    out: Path,
    chunk: tuple[int, ...],
    grid: BlockGrid,
    overwrite: bool,
    progress: bool,
) -> SynthWritten:
    import zarr

    levels = _levels(gen.shape)
    with _staged({"image": out}, overwrite) as tmp:
        root = zarr.open_group(str(tmp["image"]), mode="w", zarr_format=3)
        labels_group = root.create_group("labels")
        groups = {"image": root, "labels": labels_group.create_group("instances")}
        if "semantic" in _keys(gen):
            groups["semantic"] = labels_group.create_group("semantic")
        pyramids = {
            key: _create_pyramid(group, gen, chunk, levels, _dtype(gen, key))
            for key, group in groups.items()
        }
        objects = fill(gen, grid, {k: v[0] for k, v in pyramids.items()}, progress)
        for key, pyramid in pyramids.items():
            _downsample(pyramid, mean=key == "image")
        _write_ome_metadata(gen, groups, labels_group, levels)
    paths = {"image": out, "labels": out / "labels" / "instances"}
    if "semantic" in groups:
        paths["semantic"] = out / "labels" / "semantic"
    return SynthWritten("ome-zarr", paths, gen.shape, np.dtype(gen.dtype).name, objects, levels)


def _create_pyramid(
    group: Any, gen: Generator, chunk: tuple[int, ...], levels: int, dtype: np.dtype[Any]
) -> list[Any]:
    """Empty arrays ``0, 1, ...`` of a pyramid that halves Y and X from level to level."""
    dims = ["z", "y", "x"][-gen.ndim :]
    shapes = [gen.shape[:-2] + tuple(max(1, s >> k) for s in gen.shape[-2:]) for k in range(levels)]
    return [
        group.create_array(
            str(k),
            shape=s,
            chunks=tuple(min(c, v) for c, v in zip(chunk, s, strict=True)),
            dtype=dtype,
            fill_value=0,
            dimension_names=dims,
        )
        for k, s in enumerate(shapes)
    ]


def _downsample(pyramid: list[Any], mean: bool) -> None:
    """Fill the lower levels from level 0: the mean of 2x2 in Y, X (rounded) for an
    image, every other pixel for labels."""
    import dask.array as da

    for below, target in itertools.pairwise(pyramid):
        src = da.from_zarr(below)
        if mean:
            axes = {src.ndim - 2: 2, src.ndim - 1: 2}
            low = da.coarsen(np.mean, src.astype(np.float32), axes, trim_excess=True)
            low = da.round(low).astype(below.dtype)
        else:
            low = src[(Ellipsis, slice(None, None, 2), slice(None, None, 2))]
        # one task per output chunk: no two tasks may write the same chunk
        low = low[tuple(slice(0, s) for s in target.shape)].rechunk(target.chunks)
        da.store(low, target, lock=False)


def _write_ome_metadata(
    gen: Generator, groups: dict[str, Any], labels_group: Any, levels: int
) -> None:
    """Multiscales of every array, label metadata, and what generated the dataset."""
    from ome_zarr.format import FormatV05

    with warnings.catch_warnings():
        # ome_zarr.writer builds a deprecated Scaler as a default argument at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    fmt = FormatV05()
    axes = [{"name": n, "type": "space"} for n in ("z", "y", "x")[-gen.ndim :]]
    lead = [float(v) for v in gen.scale[:-2]]
    for key, group in groups.items():
        datasets = [
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*lead, float(2**k), float(2**k)]}
                ],
            }
            for k in range(levels)
        ]
        name = key if key != "image" else gen.name
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=name)
    # "source" points the label images back at their image, as readers expect
    source = {"image": "../../"}
    write_label_metadata(labels_group, "instances", fmt=fmt, source=source)
    names = class_names(gen.name)
    if "semantic" in groups:
        properties = [{"label-value": i, "class": n} for i, n in enumerate(names)]
        write_label_metadata(
            labels_group, "semantic", fmt=fmt, properties=properties, source=source
        )
    groups["image"].attrs["nahtlos"] = {
        "dataset": gen.name,
        "seed": gen.seed,
        "anisotropy": gen.anisotropy,
        "class_names": list(names),
    }


def _write_tiff(
    gen: Generator, out: Path, grid: BlockGrid, overwrite: bool, progress: bool
) -> SynthWritten:
    import tifffile

    stem, suffix = out.with_suffix(""), out.suffix
    final = {
        key: out if key == "image" else stem.with_name(f"{stem.name}_{key}{suffix}")
        for key in _keys(gen)
    }
    with _staged(final, overwrite) as tmp:
        arrays: dict[str, Any] = {}
        try:
            for key, path in tmp.items():
                dtype = _dtype(gen, key)
                arrays[key] = tifffile.memmap(
                    path,
                    shape=gen.shape,
                    dtype=dtype,
                    bigtiff=math.prod(gen.shape) * dtype.itemsize > 2**31,
                    metadata={
                        "axes": "ZYX"[-gen.ndim :],
                        "dataset": gen.name,
                        "seed": gen.seed,
                        "anisotropy": gen.anisotropy,
                        "content": key,
                    },
                )
            objects = fill(gen, grid, arrays, progress)
            for arr in arrays.values():
                arr.flush()
        finally:
            arrays.clear()  # closes the memory maps, also before a failed output is removed
    return SynthWritten("tif", final, gen.shape, np.dtype(gen.dtype).name, objects)


def open_synthetic(path: str | os.PathLike[str]) -> SynthSample:
    """Open a dataset written by :func:`write_synthetic`, lazily.

    ``path`` is the ``.zarr`` folder or the image ``.tif``. The arrays of the returned
    sample are zarr arrays or memory maps: slicing reads only what is sliced.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"synthetic dataset {str(p)!r} does not exist")
    if p.suffix.lower() == ".zarr":
        import zarr

        root: Any = zarr.open_group(str(p), mode="r")
        meta: dict[str, Any] = dict(root.attrs).get("nahtlos") or {}
        if not meta:
            raise FormatError(
                f"{str(p)!r} was not written by write_synthetic (no 'nahtlos' attributes)"
            )
        image = open_image(p)
        labels = open_image(f"{p}:labels/instances/0")
        semantic = open_image(f"{p}:labels/semantic/0") if "semantic" in root["labels"] else None
    elif p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(p) as tif:
            meta = dict((tif.shaped_metadata or [{}])[0])
        if "dataset" not in meta:
            raise FormatError(
                f"{str(p)!r} was not written by write_synthetic (no dataset metadata)"
            )
        stem = p.with_suffix("")
        image = open_image(p)
        labels = open_image(stem.with_name(f"{stem.name}_labels{p.suffix}"))
        sem_path = stem.with_name(f"{stem.name}_semantic{p.suffix}")
        semantic = open_image(sem_path) if sem_path.exists() else None
    else:
        raise FormatError(f"cannot open {str(p)!r}: expected a .zarr folder or a .tif file")
    return SynthSample(
        str(meta["dataset"]), int(meta["seed"]), float(meta["anisotropy"]), image, labels, semantic
    )
