"""The resumable prediction output: a zarr store written block by block.

:class:`PredictionStore` (``.zarr``) is an OME-Zarr 0.5 image (``.ome.zarr``) or a
plain zarr array, written in place, one chunk per prediction block, with a durable
record of the finished blocks so that an interrupted run can be resumed. It is marked
complete only after every block, the multiscale pyramid and the OME metadata are
written; until then readers (:func:`~nahtlos.io.readers.open_image`, napari,
``ome_zarr``) do not take it for an image.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import BlockShapeError, FormatError, IncompleteOutputError, ShapeMismatchError
from .formats import (
    OUTPUT_DTYPES,
    OutputDtype,
    Segmentation,
    axes_dicts,
    convert_values,
    label_dtype,
    ome_writer,
    output_compressors,
    remove_output,
)
from .multiscale import (
    level_datasets,
    mean_pool,
    nearest,
    pyramid_factors,
    write_channel_metadata,
    write_label_metadata,
    write_pyramid,
)

__all__ = ["PredictionStore", "check_complete"]


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
        shape = tuple(int(s) for s in shape)
        nd = len(shape) - 1
        block = tuple(int(b) for b in block)
        if len(block) != nd:
            raise BlockShapeError(f"block {block} does not match the spatial shape {shape[1:]}")
        if dtype not in OUTPUT_DTYPES:
            raise FormatError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        names = list(channel_names) if channel_names else [f"c{i}" for i in range(shape[0])]
        if len(names) != shape[0]:
            raise ShapeMismatchError(
                f"{len(names)} channel names ({', '.join(names)}) for {shape[0]} output channels"
            )
        p = Path(path)
        labels = _label_specs(segmentation, names, p, cls.is_ome(p))
        if p.exists():
            if not overwrite:
                raise FormatError(f"output {str(p)!r} exists; remove it or pass --overwrite")
            remove_output(p)
        remove_output(cls.blocks_path(p))
        scale_t = tuple(float(x) for x in (scale or (1.0,) * nd))
        factors = (
            pyramid_factors(shape[1:], scale_t, block, pyramid_levels) if cls.is_ome(p) else []
        )
        info = {
            "status": "running",
            "shape": list(shape),
            "block": list(block),
            "grid_shape": [math.ceil(n / b) for n, b in zip(shape[1:], block, strict=True)],
            "dtype": dtype,
            "value_scale": 1 / 255 if dtype == "uint8" else 1.0,
            "axes": list(axes) if axes is not None else list(("z", "y", "x")[-nd:]),
            "scale": list(scale_t),
            "units": list(units or (None,) * nd),
            "translation": [float(t) for t in (translation or (0.0,) * nd)],
            "channel_names": names,
            "labels": [[spec.name, spec.channel] for spec in labels],
            "threshold": float(threshold),
            "pyramid": [list(f) for f in factors],
            # level 1 can be pooled from each block alone if no pooling box straddles blocks
            "level1_in_blocks": bool(factors)
            and all(b % f == 0 for b, f in zip(block, factors[0], strict=True)),
            "plan": plan or {},
        }
        node = _create_ome(p, info) if cls.is_ome(p) else _create_plain(p, info)
        # written last: a store without it is not taken for a nahtlos output
        node.attrs["nahtlos"] = info
        return cls(p, node)

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
        data[0][key] = convert_values(value, self.dtype)
        step = self.pyramid[0] if self.level1_in_blocks else None
        if step is not None:
            pooled = mean_pool(value, step)
            small = tuple(
                slice(k.start // f, k.start // f + n)
                for k, f, n in zip(spatial, step, pooled.shape[1:], strict=True)
            )
            small_key = (slice(None), *small)
            data[1][small_key] = convert_values(pooled, self.dtype)
        for spec in self.labels:
            arrays = label_arrays[spec.name]
            if spec.channel is None:
                seg = np.argmax(value, axis=0).astype(arrays[0].dtype)
            else:
                seg = (value[spec.channel] > self.threshold).astype(np.uint8)
            arrays[0][spatial] = seg
            if step is not None:
                arrays[1][small] = nearest(seg, step)

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
        levels = self._write_ome_levels(scheduler, name or self.path.name)
        self.info = {**self.info, "status": "complete", "levels": levels}
        self.node.attrs["nahtlos"] = self.info
        # the record of finished blocks has served its purpose
        with contextlib.suppress(KeyError):
            del self.node[self.DONE]
        return self.path

    def _write_ome_levels(self, scheduler: Any, name: str) -> int:
        """Pool the levels not written with the blocks, then write the OME metadata.

        Returns the number of levels.
        """
        from ome_zarr.format import FormatV05

        fmt = FormatV05()
        group = self.node
        axes, units = tuple(self.info["axes"]), tuple(self.info["units"])
        start = 2 if self.level1_in_blocks else 1

        def datasets(lead: list[float]) -> list[dict[str, Any]]:
            scale, translation = tuple(self.info["scale"]), tuple(self.info["translation"])
            return level_datasets(self.pyramid, scale, translation, lead)

        write_pyramid(group, self.pyramid, start, "mean", scheduler)
        ome_writer().write_multiscales_metadata(
            group,
            datasets([1.0]),
            fmt=fmt,
            axes=axes_dicts(("c", *axes), (None, *units)),
            name=name,
        )
        write_channel_metadata(group, self.info["channel_names"], self.dtype, fmt)
        if self.labels:
            labels_group = group["labels"]
            ome_writer().add_metadata(labels_group, {"version": fmt.version, "labels": []}, fmt=fmt)
            for spec in self.labels:
                write_pyramid(labels_group[spec.name], self.pyramid, start, "nearest", scheduler)
                named = self.info["channel_names"] if spec.channel is None else None
                write_label_metadata(labels_group, spec.name, datasets([]), axes, units, named, fmt)
        return len(self.pyramid) + 1


def _label_specs(
    segmentation: Segmentation | None, names: list[str], path: Path, ome: bool
) -> list[_LabelSpec]:
    """The label images a segmentation asks for: one per channel, or one argmax image."""
    labels: list[_LabelSpec] = []
    if segmentation == "threshold":
        labels = [_LabelSpec(n, i) for i, n in enumerate(names)]
    elif segmentation == "argmax":
        labels = [_LabelSpec("argmax", None)]
    elif segmentation is not None:
        raise FormatError(f"segmentation {segmentation!r} is not 'threshold' or 'argmax'")
    if labels and not ome:
        raise FormatError(
            f"segmentation labels need an OME-Zarr output; name it "
            f"{path.name.removesuffix('.zarr')}.ome.zarr instead of {path.name}"
        )
    return labels


def _create_plain(path: Path, info: dict[str, Any]) -> Any:
    """A plain zarr v3 array, with its record of finished blocks beside it."""
    import zarr

    shape, chunk, grid_shape = _chunking(info)
    array = zarr.create_array(
        store=str(path),
        shape=shape,
        chunks=(shape[0], *chunk),
        dtype=np.dtype(info["dtype"]),
        fill_value=0,
        compressors=output_compressors(),
        zarr_format=3,
        dimension_names=["c", *info["axes"]],
        attributes={"scale": [1.0, *info["scale"]], "units": [None, *info["units"]]},
    )
    zarr.create_array(
        store=str(PredictionStore.blocks_path(path)),
        shape=grid_shape,
        chunks=(1,) * len(grid_shape),
        dtype=np.uint8,
        fill_value=0,
        zarr_format=3,
    )
    return array


def _create_ome(path: Path, info: dict[str, Any]) -> Any:
    """An OME-Zarr group: level 0 (and 1, when written with the blocks), labels, record."""
    import zarr

    shape, chunk, grid_shape = _chunking(info)
    spatial, block, axes = shape[1:], tuple(info["block"]), list(info["axes"])
    first = tuple(info["pyramid"][0]) if info["pyramid"] else block
    small = tuple(math.ceil(n / f) for n, f in zip(spatial, first, strict=True))
    half = tuple(min(b // f, m) for b, f, m in zip(block, first, small, strict=True))
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arrays: list[tuple[Any, str, tuple[int, ...], tuple[int, ...], Any, list[str]]] = [
        (group, "s0", shape, (shape[0], *chunk), info["dtype"], ["c", *axes])
    ]
    if info["level1_in_blocks"]:
        arrays.append(
            (group, "s1", (shape[0], *small), (shape[0], *half), info["dtype"], ["c", *axes])
        )
    for name, channel in info["labels"]:
        label_group = group.require_group("labels").require_group(name)
        kind = np.uint8 if channel is not None else label_dtype(shape[0])
        arrays.append((label_group, "s0", spatial, chunk, kind, axes))
        if info["level1_in_blocks"]:
            arrays.append((label_group, "s1", small, half, kind, axes))
    for parent, name, shp, chunks, dtype, dims in arrays:
        parent.create_array(
            name,
            shape=shp,
            chunks=chunks,
            dtype=np.dtype(dtype),
            fill_value=0,
            compressors=output_compressors(),
            dimension_names=dims,
        )
    group.create_array(
        PredictionStore.DONE,
        shape=grid_shape,
        chunks=(1,) * len(grid_shape),
        dtype=np.uint8,
        fill_value=0,
    )
    return group


def _chunking(info: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shape, spatial chunk and block grid of a store: one chunk per block.

    A block larger than the image is one chunk of the image.
    """
    shape = tuple(info["shape"])
    chunk = tuple(min(b, n) for b, n in zip(info["block"], shape[1:], strict=True))
    return shape, chunk, tuple(info["grid_shape"])


def check_complete(path: Path, node: Any) -> None:
    """Refuse to read a prediction output whose run has not finished.

    Raises
    ------
    IncompleteOutputError
        If ``node`` (the zarr root at ``path``) is a nahtlos output that is not complete.
    """
    info = dict(node.attrs).get("nahtlos")
    if isinstance(info, dict) and info.get("status") not in (None, "complete"):
        store = PredictionStore(path, node)
        done, total = store.progress()
        raise IncompleteOutputError(
            f"{str(path)!r} is an incomplete prediction ({done} of {total} blocks written, "
            "run interrupted); finish it with `nahtlos predict ... --resume` or delete it"
        )
