"""What a diagnosis works on: the model, the image region, labels and tile geometry.

Everything here is resolved before a forward pass runs, from the arguments of
:func:`~nahtlos.analysis.diagnose.diagnose`, the model's metadata and (for halo and
alignment) its measured receptive field, and every bad combination is reported with
the offending value: the :class:`Subject` (model, image, region, labels, activation,
input normalization), the block grid of the diagnosed tile, and the windows of the
tile-mismatch measurement.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..axes import as_per_axis, axis_names, round_up
from ..engine.geometry import BlockGrid
from ..engine.predict import ArrayLike, split_channels
from ..errors import BlockShapeError, NahtlosWarning, ShapeMismatchError
from ..io import InputNormalization, open_image
from ..nets.checkpoint import LoadedModel, load_model
from ..nets.receptive_field import ReceptiveField
from ..nets.state import activation_function
from .layers import type_name
from .metrics import can_split

__all__ = [
    "Subject",
    "as_loaded",
    "mismatch_geometry",
    "resolve_channel_names",
    "resolve_ndim",
    "resolve_subject",
    "tile_grid",
]


@dataclass
class Subject:
    """The model and the image region a diagnosis measures.

    Attributes
    ----------
    loaded
        The model with its metadata.
    image, labels
        The whole image and its labels (array-likes, read region by region).
    image_source, labels_source
        Their names in the report.
    label_kind
        ``"instances"`` or ``"semantic"``.
    ndim, channels, in_channels
        Spatial dimensions, whether the image has a channel axis, and how many
        input channels it has.
    activation, norm
        How outputs become probabilities, and the input normalization (``None``:
        none).
    region
        The region diagnosed, a contiguous slice per spatial axis.
    """

    loaded: LoadedModel
    image: ArrayLike
    labels: ArrayLike | None
    image_source: str
    labels_source: str | None
    label_kind: str
    ndim: int
    channels: bool
    in_channels: int
    activation: str
    norm: InputNormalization | None
    region: tuple[slice, ...]

    @property
    def meta(self) -> Mapping[str, Any]:
        """The model's metadata."""
        return self.loaded.metadata

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the region."""
        return tuple(s.stop - s.start for s in self.region)

    def input_transform(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The input normalization, fitted to the whole image where it is global."""
        norm = self.norm
        if norm is not None and norm.mode == "global" and norm.values is None:
            norm.fit(self.image, channel_axis=0 if self.channels else None)
        return norm if norm is not None and norm.mode != "none" else None

    def read_region(self) -> np.ndarray:
        """The region as ``(C, *shape)`` float32, before input normalization."""
        key = (slice(None), *self.region) if self.channels else self.region
        arr = np.asarray(self.image[key], dtype=np.float32)
        return arr if self.channels else arr[None]

    def label_masks(self, n_out: int) -> np.ndarray | None:
        """``(n_out, *shape)`` boolean masks of the labels in the region, if any."""
        if self.labels is None:
            return None
        nd = self.ndim
        key = (slice(None), *self.region) if len(self.labels.shape) == nd + 1 else self.region
        lab = np.asarray(self.labels[key])
        if self.label_kind == "instances":
            # what the model was trained on: boundaries / foreground / background
            from ..io import instances_to_semantic

            mode = self.meta.get("boundary_mode", "thick")
            lab = instances_to_semantic(lab.astype(np.int64), mode)
        return _label_masks(lab, n_out, self.shape)

    def model_info(self, n_out: int, names: list[str]) -> dict[str, Any]:
        """The report's ``model`` section."""
        return {
            "source": os.fspath(self.loaded.path),
            "kind": self.loaded.kind,
            "ndim": self.ndim,
            "in_channels": self.in_channels,
            "out_channels": n_out,
            "channel_names": names,
            "activation": self.activation,
            "input_normalization": None if self.norm is None else self.norm.to_dict(),
        }

    def image_info(self) -> dict[str, Any]:
        """The report's ``image`` section."""
        return {
            "source": self.image_source,
            "shape": [int(s) for s in self.image.shape],
            "region": [[s.start, s.stop] for s in self.region],
            "labels": self.labels_source,
        }


def as_loaded(model: torch.nn.Module | LoadedModel | str | os.PathLike[str]) -> LoadedModel:
    """A model, a loaded model or a model file as a :class:`LoadedModel`."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | os.PathLike):
        return load_model(model)
    if isinstance(model, torch.nn.Module):
        kind = "torchscript" if isinstance(model, torch.jit.ScriptModule) else "module"
        return LoadedModel(module=model, path=Path(type_name(model)), kind=kind, metadata={})
    raise TypeError(
        f"model must be a torch.nn.Module, a LoadedModel or a path, not {type(model).__name__}"
    )


def _opened(
    value: ArrayLike | str | os.PathLike[str] | None, source: str | None
) -> tuple[ArrayLike | None, str | None]:
    """An array-like (a path is opened lazily) and its name (default: the path)."""
    if isinstance(value, str | os.PathLike):
        return open_image(value), source or os.fspath(value)
    return value, source


def resolve_subject(
    model: torch.nn.Module | LoadedModel | str | os.PathLike[str],
    image: ArrayLike | str | os.PathLike[str],
    labels: ArrayLike | str | os.PathLike[str] | None,
    *,
    ndim: int | None,
    activation: str | None,
    input_normalization: InputNormalization | str | None,
    region: Sequence[slice] | None,
    max_voxels: int,
    label_kind: str,
    image_source: str | None,
    labels_source: str | None,
) -> Subject:
    """The :class:`Subject` of :func:`~nahtlos.analysis.diagnose.diagnose`'s arguments.

    Raises
    ------
    ShapeMismatchError
        If image, region and model do not fit together.
    ValueError
        For an unknown label kind or activation.
    """
    loaded = as_loaded(model)
    meta = loaded.metadata
    img, image_source = _opened(image, image_source)
    assert img is not None
    lab, labels_source = _opened(labels, labels_source)
    kind_of_labels = meta.get("labels", "semantic") if label_kind == "auto" else label_kind
    if kind_of_labels not in ("instances", "semantic"):
        raise ValueError(f"label_kind {label_kind!r} is not one of 'auto', 'instances', 'semantic'")
    nd = resolve_ndim(ndim, meta, img)
    channels = split_channels(img, nd)
    in_channels = int(img.shape[0]) if channels else 1
    if meta.get("in_channels") not in (None, in_channels):
        raise ShapeMismatchError(
            f"the model expects {meta['in_channels']} input channels but the image of shape "
            f"{tuple(img.shape)} has {in_channels}"
        )
    act_name = str(activation or meta.get("activation") or "sigmoid")
    activation_function(act_name)  # an unknown name fails here, before any work
    return Subject(
        loaded=loaded,
        image=img,
        labels=lab,
        image_source=image_source or f"array of shape {tuple(img.shape)}",
        labels_source=None if lab is None else (labels_source or "array"),
        label_kind=kind_of_labels,
        ndim=nd,
        channels=channels,
        in_channels=in_channels,
        activation=act_name,
        norm=_resolve_input_norm(input_normalization, meta),
        region=_resolve_region(region, tuple(int(s) for s in img.shape[-nd:]), max_voxels),
    )


def resolve_ndim(ndim: int | None, meta: Mapping[str, Any], image: ArrayLike) -> int:
    """Spatial dimensions: the argument, else the model's metadata, else from the image."""
    if ndim is None:
        ndim = meta.get("ndim")
    if ndim is None:
        n = len(image.shape)
        ndim = n if n <= 3 else n - 1
    if ndim not in (2, 3):
        raise ShapeMismatchError(
            f"diagnose works on 2D and 3D images; got ndim={ndim} for image shape "
            f"{tuple(image.shape)}"
        )
    return int(ndim)


def _resolve_input_norm(
    value: InputNormalization | str | None, meta: Mapping[str, Any]
) -> InputNormalization | None:
    if isinstance(value, InputNormalization):
        return value
    if isinstance(value, str):
        return InputNormalization.from_dict({"mode": value})
    spec = meta.get("input_normalization")
    if spec is None:
        return None
    norm = InputNormalization.from_dict({"mode": spec} if isinstance(spec, str) else spec)
    # the model's percentiles were those of its training images: refit on this one
    norm.values = None
    return norm


def _resolve_region(
    region: Sequence[slice] | None,
    spatial: tuple[int, ...],
    max_voxels: int,
) -> tuple[slice, ...]:
    if region is not None:
        return _checked_region(tuple(region), spatial)
    total = math.prod(spatial)
    if total <= max_voxels:
        return tuple(slice(0, n) for n in spatial)
    # a central crop with the image's proportions, as large as the budget allows
    scale = (max_voxels / total) ** (1 / len(spatial))
    shape = [max(1, int(n * scale)) for n in spatial]
    warnings.warn(
        f"the image of shape {spatial} is larger than max_voxels={max_voxels}; diagnosing its "
        f"central region of shape {tuple(shape)} (pass region= or --region to choose another)",
        NahtlosWarning,
        stacklevel=4,  # the caller of diagnose()
    )
    return tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(spatial, shape, strict=True))


def _checked_region(sl: tuple[slice, ...], spatial: tuple[int, ...]) -> tuple[slice, ...]:
    """The region's slices with explicit bounds; contiguous and non-empty, or an error."""
    if len(sl) != len(spatial):
        raise ShapeMismatchError(
            f"region has {len(sl)} slices but the image has {len(spatial)} spatial axes "
            f"(shape {spatial})"
        )
    out = []
    for name, s, n in zip(axis_names(len(spatial)), sl, spatial, strict=True):
        start, stop, step = s.indices(n)
        if step != 1 or stop <= start:
            raise ShapeMismatchError(
                f"region {s} along axis {name} is empty or strided for the image of "
                f"shape {spatial}; give a contiguous, non-empty slice"
            )
        out.append(slice(start, stop))
    return tuple(out)


def _label_masks(labels: np.ndarray, n_out: int, spatial: tuple[int, ...]) -> np.ndarray:
    """``(C, *spatial)`` boolean masks from per-channel masks or an integer class image."""
    if tuple(labels.shape) == (n_out, *spatial):
        return labels >= 0.5
    if tuple(labels.shape) == spatial:
        if n_out == 1:
            return (labels > 0)[None]
        classes = np.rint(labels).astype(np.int64)
        return np.stack([classes == c for c in range(n_out)])
    raise ShapeMismatchError(
        f"labels of shape {tuple(labels.shape)} fit neither the image's spatial shape {spatial} "
        f"(a class per pixel) nor ({n_out}, *{spatial}) (one mask per output channel)"
    )


def resolve_channel_names(
    given: Sequence[str] | None, meta: Mapping[str, Any], n: int
) -> list[str]:
    """Names of the ``n`` output channels: given, from the metadata, or ``channel c``."""
    # project checkpoints call them "classes"
    names = list(given) if given is not None else meta.get("channel_names", meta.get("classes"))
    if names is None:
        return [f"channel {c}" for c in range(n)]
    if len(names) != n:
        raise ShapeMismatchError(
            f"{len(names)} channel names {list(names)} given for a model with {n} output channels"
        )
    return [str(x) for x in names]


# --------------------------------------------------------------------------- geometry


def _halo_and_alignment(
    halo: int | Sequence[int] | None,
    alignment: int | Sequence[int] | None,
    meta: Mapping[str, Any],
    rf: ReceptiveField | None,
    ndim: int,
    erf_mass: float,
) -> tuple[tuple[int, ...], str, tuple[int, ...]]:
    """Halo (and where it came from) and alignment: argument, model metadata, or measured."""
    if alignment is not None:
        align = as_per_axis(alignment, ndim, "alignment")
    elif meta.get("alignment") is not None:
        align = as_per_axis(meta["alignment"], ndim, "alignment")
    elif rf is not None:
        align = tuple(int(a) for a in rf.alignment)
    else:
        raise BlockShapeError(
            "the network's alignment (total down-sampling factor) is unknown: pass "
            "alignment= (--alignment), e.g. 4 for two stride-2 levels"
        )
    if halo is not None:
        return as_per_axis(halo, ndim, "halo"), "argument", align
    if meta.get("halo") is not None:
        return as_per_axis(meta["halo"], ndim, "halo"), "model metadata", align
    if rf is not None:
        return tuple(int(h) for h in rf.halo(erf_mass)), "receptive field", align
    raise BlockShapeError(
        "the halo is unknown: pass halo= (--halo), at least the network's receptive-field "
        "radius, or let diagnose measure the receptive field"
    )


def _default_tile(spatial: tuple[int, ...], alignment: tuple[int, ...]) -> tuple[int, ...]:
    # about the tile sizes of the paper (3D) and of 2D tools, with at least two tiles per
    # axis where the image allows, so that the seam map has seams to show
    target = 64 if len(spatial) == 3 else 256
    return tuple(
        max(a, (min(target, max(n // 2, 1)) // a) * a)
        for n, a in zip(spatial, alignment, strict=True)
    )


def tile_grid(
    subject: Subject,
    rf: ReceptiveField | None,
    *,
    tile: int | Sequence[int] | None,
    halo: int | Sequence[int] | None,
    alignment: int | Sequence[int] | None,
    erf_mass: float,
) -> tuple[BlockGrid, str]:
    """The block grid of the diagnosed tile over the region, and where its halo came from.

    Halo and alignment: the arguments, else the model's metadata, else the receptive
    field; the tile: the argument, else the block the model was made for, else about
    64 (3D) or 256 (2D) voxels per axis with at least two tiles per axis.
    """
    nd, meta, shape = subject.ndim, subject.meta, subject.shape
    halo_t, halo_source, align_t = _halo_and_alignment(halo, alignment, meta, rf, nd, erf_mass)
    if tile is None and meta.get("block") is not None:
        tile = meta["block"]  # the block the model was made to predict with
    tile_t = as_per_axis(tile, nd, "tile") if tile is not None else _default_tile(shape, align_t)
    grid = BlockGrid(shape, tile_t, halo_t, align_t, auto=halo_source != "argument")
    return grid, halo_source


def _mismatch_window(
    spatial: tuple[int, ...],
    window: tuple[int, ...],
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
) -> tuple[tuple[int, ...], int]:
    """A tile-mismatch window that fits the image, and the axis to split it along.

    The window is split along the image's longest axis; it grows from ``window`` until
    both sub-tiles keep a valid overlap after a halo is cut from each of their borders.

    Raises
    ------
    BlockShapeError
        If the image is too small for that with this halo.
    """
    names = axis_names(len(spatial))
    axis = max(range(len(spatial)), key=lambda i: (spatial[i], i))
    fit = []
    for i, (w, n, h, a) in enumerate(zip(window, spatial, halo, alignment, strict=True)):
        room = (n // a) * a
        w = min(max(w, round_up(2 * h + 1, a)), room)
        if i == axis:
            while w < room and not can_split(w, h, a):
                w += a
            ok = can_split(w, h, a)
            need = next((x for x in range(a, 64 * (h + a), a) if can_split(x, h, a)), 4 * h)
        else:
            ok = w > 2 * h
            need = 2 * h + 1
        if not ok:
            raise BlockShapeError(
                f"the image region of shape {spatial} is too small to measure tile mismatch with "
                f"halo {halo}: it needs at least {need} voxels along axis {names[i]} (two "
                "overlapping tiles that keep a valid overlap once a halo is cut from their "
                "borders); diagnose a larger region or give a smaller halo"
            )
        fit.append(w)
    return tuple(fit), axis


def mismatch_geometry(
    grid: BlockGrid,
    window: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Window, stride and split axis of the tile-mismatch measurement on ``grid``.

    By default the window is the grid's input window (grown where needed, see
    :func:`_mismatch_window`) and the stride half of it, on the alignment.
    """
    nd, halo, align = len(grid.shape), grid.halo, grid.alignment
    if window is not None:
        win = as_per_axis(window, nd, "mismatch_window")
        split = max(range(nd), key=lambda i: (win[i], i))
    else:
        win, split = _mismatch_window(grid.shape, grid.window_shape, halo, align)
    if stride is not None:
        step = as_per_axis(stride, nd, "mismatch_stride")
    else:
        step = tuple(max(a, (w // 2) // a * a) for w, a in zip(win, align, strict=True))
    return win, step, split
