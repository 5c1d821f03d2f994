"""``diagnose``: can a network be tiled seamlessly, and does eval mode match train mode?

One run bundles the paper's two indicators with the receptive field into a report
people can read (DESIGN.md §2 has the definitions):

1. input normalization: the model's own (from its checkpoint) or the caller's;
2. receptive field (:mod:`nahtlos.nets.receptive_field`): halo, alignment, tile dependence;
3. the whole-image prediction in one pass, the reference of "seamless";
4. the tiled prediction at the diagnosed tile size, and its seam map
   ``|tiled - whole|``;
5. tile mismatch (overlapping sub-tiles compared on their valid overlap);
6. train/eval disparity on the same tiles, and the worst tile;
7. a tile-size sweep: agreement with the whole-image prediction (and Dice against
   labels) vs the inference tile size, like the paper's Fig. 6;
8. figures, and a verdict in plain words with what to do.

The model comes back exactly as it was: parameters, buffers (running statistics,
step counters), every module's train/eval flag and its device.
"""

from __future__ import annotations

import io
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..axes import as_per_axis, axis_names, round_up
from ..engine.geometry import BlockGrid
from ..engine.global_stats import compute_global_stats, freeze_norms, tile_norm_layers
from ..engine.predict import (
    ArrayLike,
    predict_blockwise,
    predict_whole,
    resolve_device,
    split_channels,
)
from ..errors import BlockShapeError, NahtlosError, NahtlosWarning, ShapeMismatchError
from ..io import InputNormalization, open_image
from ..nets.checkpoint import LoadedModel, load_model
from ..nets.receptive_field import ReceptiveField, receptive_field_figure
from ..nets.receptive_field import receptive_field as measure_receptive_field
from ..nets.state import activation_function, measuring_mode, preserved_state
from .metrics import (
    TileMismatch,
    TrainEvalDisparity,
    _split_geometry,
    binarize,
    dice_per_channel,
    mask_agreement,
    tile_mismatch,
    train_eval_disparity,
)
from .report import (
    DisparityView,
    SeamView,
    disparity_figure,
    render_html,
    render_markdown,
    seam_figure,
    sweep_figure,
    write_report,
)

__all__ = [
    "DISPARITY_THRESHOLD",
    "DiagnosisReport",
    "SweepPoint",
    "Verdict",
    "diagnose",
    "normalization_layers",
]

#: Train/eval disparity (1 − Dice, on some channel) from which it is called substantial.
DISPARITY_THRESHOLD = 0.05

DisparityLevel = Literal["none", "small", "substantial", "not measurable"]

_STEPS = (
    "input normalization",
    "receptive field",
    "whole-image prediction",
    "tiled prediction",
    "tile mismatch",
    "train/eval disparity",
    "whole-image statistics",
    "tile-size sweep",
    "figures",
)


@dataclass
class Verdict:
    """The conclusion in plain words.

    Attributes
    ----------
    seamless
        Tile mismatch below the tolerance and the tiled prediction equal to the
        whole-image prediction.
    tile_dependent
        Whether predictions depend on the whole tile (from the receptive field, or
        from tile-wise normalization layers when it was not measured); ``None`` if
        unknown.
    disparity
        ``"none"`` (identical masks), ``"small"``, ``"substantial"`` (at least
        :data:`DISPARITY_THRESHOLD` on some channel), or ``"not measurable"`` (a traced
        TorchScript model, whose normalization ignores train/eval mode).
    headline, findings, actions
        One sentence, what was found, and what to do.
    """

    seamless: bool
    tile_dependent: bool | None
    disparity: DisparityLevel
    headline: str
    findings: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "seamless": self.seamless,
            "tile_dependent": self.tile_dependent,
            "disparity": self.disparity,
            "headline": self.headline,
            "findings": list(self.findings),
            "actions": list(self.actions),
        }


@dataclass
class SweepPoint:
    """One inference tile size of the sweep.

    ``agreement`` is, per channel, the Dice of the tiled and the whole-image masks;
    ``dice`` the Dice of the tiled prediction against the labels (``None`` without
    labels, and per channel ``None`` where the labels are empty).
    """

    size: int
    tile: tuple[int, ...]
    window: tuple[int, ...]
    blocks: int
    max_difference: float
    agreement: list[float]
    dice: list[float | None] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "size": self.size,
            "tile": list(self.tile),
            "window": list(self.window),
            "blocks": self.blocks,
            "max_difference": self.max_difference,
            "agreement": self.agreement,
            "dice": self.dice,
            "seconds": self.seconds,
        }


@dataclass
class DiagnosisReport:
    """Everything :func:`diagnose` measured, with its figures (PNG bytes).

    ``to_dict()`` gives the content of ``report.json``; :meth:`write` writes the
    JSON, Markdown and HTML reports and the figures to a folder.
    """

    verdict: Verdict
    model: dict[str, Any]
    image: dict[str, Any]
    settings: dict[str, Any]
    tile_mismatch: TileMismatch
    seam: dict[str, Any]
    train_eval_disparity: TrainEvalDisparity
    worst_tile: dict[str, Any]
    receptive_field: ReceptiveField | None
    normalization_layers: list[dict[str, Any]]
    dice: dict[str, list[float | None]] | None
    sweep: list[SweepPoint]
    timings: dict[str, float]
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)
    created: str = ""
    global_statistics: dict[str, Any] | None = None

    @property
    def seamless(self) -> bool:
        """Shortcut for ``verdict.seamless``."""
        return self.verdict.seamless

    def to_dict(self) -> dict[str, Any]:
        """The content of ``report.json`` (valid against :func:`nahtlos.analysis.report.report_schema`)."""
        from .._version import __version__

        windows = self.tile_mismatch.windows
        worst = max(windows, key=lambda w: w["max_difference"]) if windows else None
        tm = self.tile_mismatch.to_dict()
        tm["worst_window"] = {
            "origin": list(worst["origin"]) if worst else [0] * self.model["ndim"],
            "max_difference": float(worst["max_difference"]) if worst else 0.0,
        }
        ted = self.train_eval_disparity.to_dict()
        ted["measurable"] = self.verdict.disparity != "not measurable"
        ted["worst_tile"] = self.worst_tile
        data: dict[str, Any] = {
            "schema": "nahtlos-diagnosis-report/1",
            "nahtlos_version": __version__,
            "created": self.created,
            "verdict": self.verdict.to_dict(),
            "model": self.model,
            "image": self.image,
            "settings": self.settings,
            "tile_mismatch": tm,
            "seam": self.seam,
            "train_eval_disparity": ted,
            "receptive_field": _rf_dict(self.receptive_field, self.settings.get("erf_mass", 0.99)),
            "normalization_layers": self.normalization_layers,
            "tile_size_sweep": [p.to_dict() for p in self.sweep],
            "timings": self.timings,
            "figures": {name: f"figures/{name}.png" for name in self.figures},
        }
        if self.dice is not None:
            data["dice"] = self.dice
        if self.global_statistics is not None:
            data["global_statistics"] = self.global_statistics
        return _jsonable(data)

    def to_markdown(self) -> str:
        """The Markdown report (figures referenced as ``figures/NAME.png``)."""
        return render_markdown(self.to_dict(), {n: f"figures/{n}.png" for n in self.figures})

    def to_html(self) -> str:
        """The self-contained HTML report."""
        return render_html(self.to_dict(), self.figures)

    def write(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Path]:
        """Write ``report.json``, ``report.md``, ``report.html`` and ``figures/`` to ``out``.

        Returns the written paths by name: ``json``, ``markdown``, ``html`` and one per
        figure.
        """
        return write_report(self.to_dict(), self.figures, out, overwrite=overwrite)


# --------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """Plain Python types for json (numpy scalars, tuples), failing loudly on NaN."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise NahtlosError(
            f"the diagnosis produced a non-finite number ({value}); the model output contains "
            "NaN or infinity"
        )
    return value


def _rf_dict(rf: ReceptiveField | None, mass: float) -> dict[str, Any] | None:
    if rf is None:
        return None
    data: dict[str, Any] = rf.to_dict(mass)
    return data


def _type_name(m: torch.nn.Module) -> str:
    # TorchScript submodules are RecursiveScriptModule; the class survives as original_name
    return str(getattr(m, "original_name", type(m).__name__))


_TILEWISE = "statistics of each tile (tile-wise)"
_BATCH = "batch statistics in train mode, running statistics in eval mode"
_GLOBAL = "running statistics in train and eval mode (global)"


def normalization_layers(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The model's normalization layers by type, with where their statistics come from.

    Works for TorchScript modules too. Only the kind of statistics is read from the
    layer types; whether they make the model tile-dependent is measured by
    :mod:`nahtlos.nets.receptive_field`.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        kind = _type_name(m)
        low = kind.lower()
        has_running = any(b == "running_mean" for b, _ in m.named_buffers(recurse=False))
        if "renorm" in low:
            stats = _GLOBAL
        elif "batchnorm" in low:
            stats = _BATCH
        elif "instancenorm" in low:
            stats = _BATCH if has_running else _TILEWISE
        elif low == "groupnorm":
            stats = _TILEWISE
        elif low == "layernorm":
            stats = "statistics of each sample over its normalized shape"
        elif low == "localresponsenorm":
            stats = "local (neighbouring channels)"
        else:
            continue
        g = groups.setdefault(kind, {"type": kind, "count": 0, "statistics": stats, "names": []})
        g["count"] += 1
        g["names"].append(name or "(model)")
    return list(groups.values())


def _describe_layers(layers: Sequence[Mapping[str, Any]]) -> str:
    parts = [f"{g['count']} {g['type']} layer{'s' if g['count'] != 1 else ''}" for g in layers]
    return ", ".join(parts)


def mode_frozen(model: torch.nn.Module) -> bool:
    """Whether the model's BatchNorm layers ignore ``train()``/``eval()``.

    ``torch.jit.trace`` records the mode a model was traced in as a constant of every
    ``batch_norm`` call, so a traced TorchScript file normalizes the same way in train
    and in eval mode and its train/eval disparity cannot be measured (a scripted one,
    ``torch.jit.script``, reads the flag at run time).
    """
    if not isinstance(model, torch.jit.ScriptModule):
        return False
    try:
        graph = model.inlined_graph
    except (RuntimeError, AttributeError):  # pragma: no cover - exotic script modules
        return False

    def frozen(block: Any) -> bool:
        for node in block.nodes():
            if node.kind() == "aten::batch_norm":
                training = list(node.inputs())[5]
                if training.node().kind() == "prim::Constant":
                    return True
            if any(frozen(b) for b in node.blocks()):
                return True
        return False

    return frozen(graph)


def _as_loaded(model: torch.nn.Module | LoadedModel | str | os.PathLike[str]) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | os.PathLike):
        return load_model(model)
    if isinstance(model, torch.nn.Module):
        kind = "torchscript" if isinstance(model, torch.jit.ScriptModule) else "module"
        return LoadedModel(module=model, path=Path(_type_name(model)), kind=kind, metadata={})
    raise TypeError(
        f"model must be a torch.nn.Module, a LoadedModel or a path, not {type(model).__name__}"
    )


def resolve_ndim(ndim: int | None, meta: Mapping[str, Any], image: ArrayLike) -> int:
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
        sl = tuple(region)
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
        stacklevel=3,
    )
    return tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(spatial, shape, strict=True))


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


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _default_tile(spatial: tuple[int, ...], alignment: tuple[int, ...]) -> tuple[int, ...]:
    # about the tile sizes of the paper (3D) and of 2D tools, with at least two tiles per
    # axis where the image allows, so that the seam map has seams to show
    target = 64 if len(spatial) == 3 else 256
    return tuple(
        max(a, (min(target, max(n // 2, 1)) // a) * a)
        for n, a in zip(spatial, alignment, strict=True)
    )


def _sweep_sizes(
    spatial: tuple[int, ...],
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
    max_cost: float,
    max_total: float,
) -> list[int]:
    """Cubic tile sizes, doubling up to the whole image, within a compute budget.

    Costs are voxels predicted relative to the image's: a size is skipped when its
    windows cost more than ``max_cost`` times the image, and the smallest sizes are
    dropped until the sweep costs at most ``max_total`` times the image.
    """
    step = _lcm(alignment)
    largest = max(round_up(n, a) for n, a in zip(spatial, alignment, strict=True))
    size = round_up(max(max(halo), 2 * step, 8), step)
    sizes = []
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(round_up(largest, step))
    volume = math.prod(spatial)

    def cost(s: int) -> float:
        grid = BlockGrid(spatial, s, halo, alignment)
        return len(grid) * math.prod(grid.window_shape) / volume

    costs = {s: cost(s) for s in sizes}
    kept = [s for s in sizes if costs[s] <= max_cost] or [sizes[-1]]
    while len(kept) > 1 and sum(costs[s] for s in kept) > max_total:
        kept.pop(0)
    return kept


def _splits_with_valid_overlap(w: int, h: int, a: int) -> bool:
    """Whether :func:`~nahtlos.analysis.metrics.tile_mismatch` can split a window of length ``w``."""
    length, valid_lo, valid_hi = _split_geometry(w, h, a)
    return w % a == 0 and length < w and valid_hi > valid_lo


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
            while w < room and not _splits_with_valid_overlap(w, h, a):
                w += a
            ok = _splits_with_valid_overlap(w, h, a)
            need = next(
                (x for x in range(a, 64 * (h + a), a) if _splits_with_valid_overlap(x, h, a)),
                4 * h,
            )
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


def _slice_2d(
    volume: np.ndarray, spatial_index: int | None
) -> np.ndarray:  # (..., [Z,] Y, X) -> (..., Y, X)
    return volume if spatial_index is None else volume[..., spatial_index, :, :]


# --------------------------------------------------------------------------- the run


def diagnose(
    model: torch.nn.Module | LoadedModel | str | os.PathLike[str],
    image: ArrayLike | str | os.PathLike[str],
    labels: ArrayLike | str | os.PathLike[str] | None = None,
    *,
    ndim: int | None = None,
    tile: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    alignment: int | Sequence[int] | None = None,
    activation: str | None = None,
    input_normalization: InputNormalization | str | None = None,
    channel_names: Sequence[str] | None = None,
    tile_sizes: Sequence[int] | None = None,
    mismatch_window: int | Sequence[int] | None = None,
    mismatch_stride: int | Sequence[int] | None = None,
    max_windows: int = 16,
    batch_size: int = 1,
    threshold: float = 0.5,
    tolerance: float = 1e-5,
    erf_mass: float = 0.99,
    receptive_field: bool = True,
    make_figures: bool = True,
    region: Sequence[slice] | None = None,
    max_voxels: int = 2**24,
    sweep_budget: float = 16.0,
    device: str | torch.device | None = None,
    progress: bool = True,
    image_source: str | None = None,
    labels_source: str | None = None,
    label_kind: str = "auto",
    global_stats: bool = True,
) -> DiagnosisReport:
    """Diagnose how a model behaves under tile-and-stitch inference on an image.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` (TorchScript included), the result of
        :func:`nahtlos.nets.checkpoint.load_model`, or a path to a model file. A model's
        metadata (``ndim``, ``halo``, ``alignment``, ``activation``,
        ``input_normalization``, ``channel_names``) is used where the arguments
        leave them out (project checkpoints: also ``classes`` and ``block``).
    image
        ``(*spatial)`` or ``(C_in, *spatial)`` array-like, or a path for
        :func:`nahtlos.io.files.open_image`.
    labels
        Optional ground truth of the image: one mask per output channel
        ``(C_out, *spatial)``, or a class per pixel ``(*spatial)`` (channel ``c`` is
        class ``c``; for one output channel, every non-zero pixel).
    ndim
        Spatial dimensions (default: the model's metadata, else from the image).
    tile
        Inner tile (block) shape diagnosed; default about 64 (3D) or 256 (2D) voxels
        per axis, with at least two tiles per axis.
    halo, alignment
        Default: the model's metadata, else the measured receptive field
        (:func:`nahtlos.nets.receptive_field.recommend_halo`).
    activation
        ``sigmoid``, ``softmax`` or ``none`` (default: the model's, else sigmoid).
    input_normalization
        An :class:`~nahtlos.io.intensity.InputNormalization` or its mode; default the
        model's (global percentiles are recomputed on this image).
    channel_names
        Names of the output channels in the report.
    tile_sizes
        Cubic tile sizes of the sweep; default doubling sizes up to the whole image
        within ``sweep_budget``.
    mismatch_window, mismatch_stride, max_windows
        Tile-mismatch windows (default: the diagnosed window, stride half of it) and
        the most windows used, evenly spread.
    batch_size
        Windows per forward pass; in train mode also the batch whose statistics
        BatchNorm uses.
    threshold, tolerance
        Mask threshold of probabilities; largest difference still called "no".
    erf_mass
        ERF mass for the halo of tile-dependent models.
    receptive_field
        Measure the receptive field (needed for the halo unless given or known).
    make_figures
        Draw the figures (the numbers alone are much faster to get).
    region, max_voxels
        The region diagnosed (a slice per spatial axis); by default the whole image
        when it has at most ``max_voxels`` voxels, else its central part.
    sweep_budget
        Largest cost of the sweep, in predictions of the whole region.
    device
        Where to run (``cpu``, ``cuda``, ``auto``); default the model's device.
    progress
        Show a progress bar of the steps.
    image_source, labels_source
        Names of image and labels in the report (default: their paths).
    global_stats
        For models with InstanceNorm/GroupNorm layers (Python modules and checkpoints):
        also predict with whole-image normalization statistics
        (:mod:`nahtlos.engine.global_stats`) and report its tile mismatch, its difference from
        the whole-image prediction and, with labels, its Dice.
    label_kind
        ``"instances"`` (object ids, converted to boundaries / foreground /
        background as in training), ``"semantic"`` (a class per pixel, or one mask per
        output channel), or ``"auto"``: what the model's checkpoint was trained on,
        else semantic.

    Returns
    -------
    DiagnosisReport

    Raises
    ------
    BlockShapeError
        If halo or alignment are unknown, or the image is too small for the halo.
    ShapeMismatchError
        If image, labels and model do not fit together.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    loaded = _as_loaded(model)
    module, meta = loaded.module, dict(loaded.metadata)
    img: ArrayLike
    lab_in: ArrayLike | None
    if isinstance(image, str | os.PathLike):
        image_source = image_source or os.fspath(image)
        img = open_image(image)
    else:
        img = image
    if isinstance(labels, str | os.PathLike):
        labels_source = labels_source or os.fspath(labels)
        lab_in = open_image(labels)
    else:
        lab_in = labels
    kind_of_labels = meta.get("labels", "semantic") if label_kind == "auto" else label_kind
    if kind_of_labels not in ("instances", "semantic"):
        raise ValueError(f"label_kind {label_kind!r} is not one of 'auto', 'instances', 'semantic'")
    nd = resolve_ndim(ndim, meta, img)
    channels = split_channels(img, nd)
    spatial = tuple(int(s) for s in img.shape[-nd:])
    in_channels = int(img.shape[0]) if channels else 1
    if meta.get("in_channels") not in (None, in_channels):
        raise ShapeMismatchError(
            f"the model expects {meta['in_channels']} input channels but the image of shape "
            f"{tuple(img.shape)} has {in_channels}"
        )
    act_name = str(activation or meta.get("activation") or "sigmoid")
    act = activation_function(act_name)
    norm = _resolve_input_norm(input_normalization, meta)
    for name, value in (("batch_size", batch_size), ("max_windows", max_windows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} must lie strictly between 0 and 1")
    region_t = _resolve_region(region, spatial, max_voxels)
    shape = tuple(s.stop - s.start for s in region_t)
    names = axis_names(nd)

    first = next(iter(module.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    dev = resolve_device(device) if device is not None else home
    bar = tqdm(total=len(_STEPS), desc="diagnose", unit="step", disable=not progress)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def step(name: str, began: float, tick: bool = True) -> float:
        now = time.perf_counter()
        timings[name] = round(now - began, 3)
        if tick:
            bar.update(1)
        return now

    try:
        with preserved_state(module):
            module.to(dev)
            # 1. input normalization
            t = time.perf_counter()
            bar.set_postfix_str(_STEPS[0])
            if norm is not None and norm.mode == "global" and norm.values is None:
                norm.fit(img, channel_axis=0 if channels else None)
            transform: Callable[[np.ndarray], np.ndarray] | None = (
                norm if norm is not None and norm.mode != "none" else None
            )
            key = (slice(None), *region_t) if channels else region_t
            arr = np.asarray(img[key], dtype=np.float32)
            arr = arr if channels else arr[None]
            t = step(_STEPS[0], t)

            # 2. receptive field: halo and alignment
            bar.set_postfix_str(_STEPS[1])
            rf = _measure_receptive_field(module, nd, in_channels, dev) if receptive_field else None
            halo_t, halo_source, align_t = _halo_and_alignment(
                halo, alignment, meta, rf, nd, erf_mass
            )
            if tile is None and meta.get("block") is not None:
                tile = meta["block"]  # the block the model was made to predict with
            tile_t = as_per_axis(tile, nd, "tile") if tile is not None else None
            grid = BlockGrid(
                shape,
                tile_t if tile_t is not None else _default_tile(shape, align_t),
                halo_t,
                align_t,
                auto=halo_source != "argument",
            )
            halo_t = grid.halo
            t = step(_STEPS[1], t)

            # 3. whole-image prediction, the reference
            bar.set_postfix_str(_STEPS[2])
            with measuring_mode(module, train=False):
                whole = predict_whole(
                    module,
                    arr,
                    halo_t,
                    align_t,
                    ndim=nd,
                    input_transform=transform,
                    output_transform=act,
                )
            n_out = int(whole.shape[0])
            names_c = _channel_names(channel_names, meta, n_out)
            masks = None
            if lab_in is not None:
                lab_key = (slice(None), *region_t) if len(lab_in.shape) == nd + 1 else region_t
                lab = np.asarray(lab_in[lab_key])
                if kind_of_labels == "instances":
                    # what the model was trained on: boundaries / foreground / background
                    from ..io import instances_to_semantic

                    mode = meta.get("boundary_mode", "thick")
                    lab = instances_to_semantic(lab.astype(np.int64), mode)
                masks = _label_masks(lab, n_out, shape)
            t = step(_STEPS[2], t)

            # 4. tiled prediction and seam map
            bar.set_postfix_str(_STEPS[3])
            with measuring_mode(module, train=False):
                tiled = np.asarray(
                    predict_blockwise(
                        module,
                        arr,
                        grid.block,
                        halo_t,
                        align_t,
                        ndim=nd,
                        batch_size=batch_size,
                        input_transform=transform,
                        output_transform=act,
                        progress=False,
                    )
                )
            seam = np.abs(tiled.astype(np.float64) - whole).astype(np.float32)
            per_channel_max = [float(seam[c].max()) for c in range(n_out)]
            seam_info = {
                "max_difference": max(per_channel_max),
                "per_channel_max": per_channel_max,
                "agreement": mask_agreement(tiled, whole, threshold),
                "seamless": max(per_channel_max) <= tolerance,
            }
            t = step(_STEPS[3], t)

            # 5. tile mismatch
            bar.set_postfix_str(_STEPS[4])
            if mismatch_window is not None:
                m_window = as_per_axis(mismatch_window, nd, "mismatch_window")
                split = max(range(nd), key=lambda i: (m_window[i], i))
            else:
                m_window, split = _mismatch_window(shape, grid.window_shape, halo_t, align_t)
            m_stride = (
                as_per_axis(mismatch_stride, nd, "mismatch_stride")
                if mismatch_stride is not None
                else tuple(
                    max(a, (w // 2) // a * a) for w, a in zip(m_window, align_t, strict=True)
                )
            )
            mismatch = tile_mismatch(
                module,
                arr,
                window=m_window,
                halo=halo_t,
                alignment=align_t,
                stride=m_stride,
                split_axis=split,
                ndim=nd,
                activation=act_name,
                threshold=threshold,
                tolerance=tolerance,
                input_transform=transform,
                max_windows=max_windows,
            )
            t = step(_STEPS[4], t)

            # 6. train/eval disparity on the same tiles
            bar.set_postfix_str(_STEPS[5])
            frozen = mode_frozen(module)
            disparity = train_eval_disparity(
                module,
                arr,
                block=grid.block,
                halo=halo_t,
                alignment=align_t,
                ndim=nd,
                batch_size=batch_size,
                activation=act_name,
                threshold=threshold,
                input_transform=transform,
                keep_predictions=True,
                eval_prediction=tiled,
            )
            train_pred = disparity.train_prediction
            assert train_pred is not None
            worst_block, worst = _worst_tile(grid, train_pred, tiled, threshold)
            disparity.train_prediction = disparity.eval_prediction = None  # keep reports small
            dice_scores: dict[str, list[float | None]] | None = None
            if masks is not None:
                dice_scores = {
                    "eval": dice_per_channel(
                        binarize(tiled, threshold), masks, skip_empty_target=True
                    ),
                    # a model frozen in eval mode has no train-mode prediction to score
                    "train": [None] * n_out
                    if frozen
                    else dice_per_channel(
                        binarize(train_pred, threshold), masks, skip_empty_target=True
                    ),
                    "whole": dice_per_channel(
                        binarize(whole, threshold), masks, skip_empty_target=True
                    ),
                }
            t = step(_STEPS[5], t)

            # 7. whole-image statistics for tile-wise norm layers (no retraining needed)
            bar.set_postfix_str(_STEPS[6])
            global_info = None
            if global_stats:
                global_info = _global_statistics(
                    module,
                    arr,
                    grid,
                    halo_t,
                    align_t,
                    rf,
                    whole,
                    masks,
                    nd,
                    batch_size,
                    transform,
                    act,
                    act_name,
                    threshold,
                    tolerance,
                    shape,
                    max_windows,
                )
            if global_info is not None:
                # the tile-wise side of the comparison was measured above
                global_info["tile_wise_agreement_with_whole"] = seam_info["agreement"]
                if dice_scores is not None:
                    global_info["tile_wise_dice"] = dice_scores["eval"]
            t = step(_STEPS[6], t)

            # 8. tile-size sweep
            bar.set_postfix_str(_STEPS[7])
            sizes = (
                sorted({int(s) for s in tile_sizes})
                if tile_sizes is not None
                else _sweep_sizes(shape, halo_t, align_t, max_cost=8.0, max_total=sweep_budget)
            )
            sweep = _sweep(
                module,
                arr,
                sizes,
                grid,
                tiled,
                whole,
                masks,
                nd,
                batch_size,
                transform,
                act,
                threshold,
                # one tick per tile size: the sweep is the longest step
                on_start=lambda n: setattr(bar, "total", len(_STEPS) + n - 1),
                on_point=lambda: bar.update(1),
            )
            t = step(_STEPS[7], t, tick=False)

            # 9. figures and verdict
            bar.set_postfix_str(_STEPS[8])
            layers = normalization_layers(module)
            verdict = _verdict(
                model_kind=loaded.kind,
                frozen=frozen,
                mismatch=mismatch,
                seam=seam_info,
                disparity=disparity,
                rf=rf,
                layers=layers,
                norm=norm,
                halo=halo_t,
                halo_source=halo_source,
                alignment=align_t,
                erf_mass=erf_mass,
                dice=dice_scores,
                sweep=sweep,
                channel_names=names_c,
                tolerance=tolerance,
                global_info=global_info,
            )
            figures = {}
            if make_figures:
                figures = _figures(
                    frozen=frozen,
                    arr=arr,
                    whole=whole,
                    tiled=tiled,
                    seam=seam,
                    train=train_pred,
                    grid=grid,
                    worst_block=worst_block,
                    worst=worst,
                    rf=rf,
                    sweep=sweep,
                    names=names,
                    channel_names=names_c,
                    threshold=threshold,
                    tolerance=tolerance,
                    whole_dice=None if dice_scores is None else dice_scores["whole"],
                    erf_mass=erf_mass,
                )
            step(_STEPS[8], t)
    finally:
        bar.close()
        module.to(home)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    return DiagnosisReport(
        verdict=verdict,
        model={
            "source": os.fspath(loaded.path),
            "kind": loaded.kind,
            "ndim": nd,
            "in_channels": in_channels,
            "out_channels": n_out,
            "channel_names": names_c,
            "activation": act_name,
            "input_normalization": None if norm is None else norm.to_dict(),
        },
        image={
            "source": image_source or f"array of shape {tuple(img.shape)}",
            "shape": [int(s) for s in img.shape],
            "region": [[s.start, s.stop] for s in region_t],
            "labels": None if lab_in is None else (labels_source or "array"),
        },
        settings={
            "tile": list(grid.block),
            "halo": list(halo_t),
            "alignment": list(align_t),
            "window": list(grid.window_shape),
            "halo_source": halo_source,
            "batch_size": batch_size,
            "threshold": threshold,
            "tolerance": tolerance,
            "erf_mass": erf_mass,
            "device": str(dev),
        },
        tile_mismatch=mismatch,
        seam=seam_info,
        train_eval_disparity=disparity,
        worst_tile=worst,
        receptive_field=rf,
        normalization_layers=layers,
        dice=dice_scores,
        sweep=sweep,
        timings=timings,
        figures=figures,
        created=created,
        global_statistics=global_info,
    )


def _global_statistics(
    module: torch.nn.Module,
    arr: np.ndarray,
    grid: BlockGrid,
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
    rf: ReceptiveField | None,
    whole: np.ndarray,
    masks: np.ndarray | None,
    nd: int,
    batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    act_name: str,
    threshold: float,
    tolerance: float,
    shape: tuple[int, ...],
    max_windows: int,
) -> dict[str, Any] | None:
    """Tile-wise norms vs whole-image statistics on the diagnosed image.

    ``None`` when the model has no layer to freeze (or is TorchScript, whose layers
    cannot be measured one by one) or the input normalization is tile-wise.
    """
    if isinstance(module, torch.jit.ScriptModule) or not tile_norm_layers(module):
        return None
    if getattr(transform, "mode", None) == "tilewise":
        return None
    t0 = time.perf_counter()
    # the halo of the frozen network: its receptive field with statistics held constant
    local = rf.local_trf_radius if rf is not None else None
    g_halo = (
        tuple(round_up(r, a) for r, a in zip(local, alignment, strict=True))
        if local is not None
        else halo
    )
    g_grid = BlockGrid(shape, grid.block, g_halo, alignment, auto=True)
    g_halo = g_grid.halo
    with measuring_mode(module, train=False):
        stats = compute_global_stats(
            module,
            arr,
            block=g_grid.block,
            halo=g_halo,
            alignment=alignment,
            ndim=nd,
            batch_size=batch_size,
            input_transform=transform,
            progress=False,
        )
        frozen = freeze_norms(module, stats).eval()
        g_tiled = np.asarray(
            predict_blockwise(
                frozen,
                arr,
                g_grid.block,
                g_halo,
                alignment,
                ndim=nd,
                batch_size=batch_size,
                input_transform=transform,
                output_transform=act,
                progress=False,
            )
        )
        reference = (
            whole
            if g_halo == halo
            else predict_whole(
                module,
                arr,
                g_halo,
                alignment,
                ndim=nd,
                input_transform=transform,
                output_transform=act,
            )
        )
        window, split = _mismatch_window(shape, g_grid.window_shape, g_halo, alignment)
        stride = tuple(max(a, (w // 2) // a * a) for w, a in zip(window, alignment, strict=True))
        mismatch = tile_mismatch(
            frozen,
            arr,
            window=window,
            halo=g_halo,
            alignment=alignment,
            stride=stride,
            split_axis=split,
            ndim=nd,
            activation=act_name,
            threshold=threshold,
            tolerance=tolerance,
            input_transform=transform,
            max_windows=max_windows,
        )
    info: dict[str, Any] = {
        "layers": len(stats.layers),
        "halo": list(g_halo),
        "tile_mismatch": mismatch.to_dict(),
        "max_difference_to_whole": float(np.abs(g_tiled.astype(np.float64) - reference).max()),
        "agreement_with_whole": mask_agreement(g_tiled, reference, threshold),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if masks is not None:
        info["dice"] = dice_per_channel(binarize(g_tiled, threshold), masks, skip_empty_target=True)
    return info


def _fmt_mean(values: Sequence[float | None]) -> str:
    m = _mean(values)
    return "n/a" if m is None else f"{m:.3f}"


def _measure_receptive_field(
    module: torch.nn.Module, ndim: int, in_channels: int, device: torch.device
) -> ReceptiveField | None:
    """The receptive field (:mod:`nahtlos.nets.receptive_field`), or ``None`` if it cannot be probed."""
    try:
        return measure_receptive_field(module, ndim, in_channels, device=device)
    except NahtlosError as exc:
        # the rest of the diagnosis stands without it when the halo is known otherwise
        warnings.warn(
            f"the receptive field could not be measured ({exc}); the report leaves it out",
            NahtlosWarning,
            stacklevel=3,
        )
        return None


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


def _channel_names(given: Sequence[str] | None, meta: Mapping[str, Any], n: int) -> list[str]:
    # project checkpoints call them "classes"
    names = list(given) if given is not None else meta.get("channel_names", meta.get("classes"))
    if names is None:
        return [f"channel {c}" for c in range(n)]
    if len(names) != n:
        raise ShapeMismatchError(
            f"{len(names)} channel names {list(names)} given for a model with {n} output channels"
        )
    return [str(x) for x in names]


def _worst_tile(
    grid: BlockGrid, train: np.ndarray, evaluated: np.ndarray, threshold: float
) -> tuple[Any, dict[str, Any]]:
    """The tile whose train- and eval-mode masks differ most (ties: largest difference)."""
    best: tuple[float, float] = (-1.0, -1.0)
    chosen: Any = None
    info: dict[str, Any] = {}
    for blk in grid:
        k = (slice(None), *blk.inner)
        a, b = train[k], evaluated[k]
        losses = [1.0 - d for d in mask_agreement(a, b, threshold)]
        diff = float(np.abs(a.astype(np.float64) - b).max())
        score = (float(np.mean(losses)), diff)
        if score > best:
            best, chosen = score, blk
            info = {
                "index": list(blk.index),
                "start": list(blk.start),
                "stop": list(blk.stop),
                "per_channel": losses,
                "max_difference": diff,
            }
    return chosen, info


def _sweep(
    module: torch.nn.Module,
    arr: np.ndarray,
    sizes: Sequence[int],
    grid: BlockGrid,
    tiled: np.ndarray,
    whole: np.ndarray,
    masks: np.ndarray | None,
    ndim: int,
    batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    threshold: float,
    on_start: Callable[[int], Any] | None = None,
    on_point: Callable[[], Any] | None = None,
) -> list[SweepPoint]:
    shape = grid.shape
    plans: dict[tuple[int, ...], int] = {}
    for s in sizes:
        if s < 1:
            raise BlockShapeError(f"tile size {s} of the sweep must be at least 1")
        g = BlockGrid(shape, s, grid.halo, grid.alignment, auto=True)
        plans.setdefault(g.block, s)
    plans.setdefault(grid.block, max(grid.block))  # the diagnosed tile, already predicted
    points = []
    if on_start is not None:
        on_start(len(plans))
    for block, size in sorted(plans.items(), key=lambda kv: (kv[1], kv[0])):
        g = BlockGrid(shape, block, grid.halo, grid.alignment)
        t0 = time.perf_counter()
        if block == grid.block:
            pred = tiled
        else:
            with measuring_mode(module, train=False):
                pred = np.asarray(
                    predict_blockwise(
                        module,
                        arr,
                        block,
                        grid.halo,
                        grid.alignment,
                        ndim=ndim,
                        batch_size=batch_size,
                        input_transform=transform,
                        output_transform=act,
                        progress=False,
                    )
                )
        scores = (
            None
            if masks is None
            else dice_per_channel(binarize(pred, threshold), masks, skip_empty_target=True)
        )
        points.append(
            SweepPoint(
                size=int(size),
                tile=g.block,
                window=g.window_shape,
                blocks=len(g),
                max_difference=float(np.abs(pred.astype(np.float64) - whole).max()),
                agreement=mask_agreement(pred, whole, threshold),
                dice=scores,
                seconds=round(time.perf_counter() - t0, 3),
            )
        )
        if on_point is not None:
            on_point()
    return points


def _disparity_level(per_channel: Sequence[float]) -> DisparityLevel:
    worst = max(per_channel, default=0.0)
    if worst == 0:
        return "none"
    return "substantial" if worst >= DISPARITY_THRESHOLD else "small"


def _verdict(
    *,
    model_kind: str,
    frozen: bool,
    mismatch: TileMismatch,
    seam: Mapping[str, Any],
    disparity: TrainEvalDisparity,
    rf: ReceptiveField | None,
    layers: Sequence[Mapping[str, Any]],
    norm: InputNormalization | None,
    halo: tuple[int, ...],
    halo_source: str,
    alignment: tuple[int, ...],
    erf_mass: float,
    dice: Mapping[str, Sequence[float | None]] | None,
    sweep: Sequence[SweepPoint],
    channel_names: Sequence[str],
    tolerance: float,
    global_info: Mapping[str, Any] | None = None,
) -> Verdict:
    """The plain-words conclusion and what to do (DESIGN.md §1 and the paper's advice)."""
    findings: list[str] = []
    actions: list[str] = []
    seamless = mismatch.seamless and bool(seam["seamless"])
    tilewise = [g for g in layers if g["statistics"] == _TILEWISE]
    running = [g for g in layers if g["statistics"] == _BATCH]
    if rf is not None:
        tile_dependent: bool | None = bool(rf.tile_dependent)
    elif tilewise:
        tile_dependent = True
    else:
        tile_dependent = False if seamless else None
    level = "not measurable" if frozen else _disparity_level(disparity.per_channel)
    halo_s = ",".join(map(str, halo))
    align_s = ",".join(map(str, alignment))
    python_hint = '`nahtlos.nets.convert.convert_norms(model, "batchrenorm")` on the Python model'
    if model_kind == "torchscript":  # a compiled graph cannot have its layers swapped
        convert_hint = f" ({python_hint}; a TorchScript file cannot be converted)"
    else:
        convert_hint = f" (`nahtlos convert MODEL OUT --to batchrenorm`, or {python_hint})"
    to_convert: list[Mapping[str, Any]] = []
    cause = ""

    def per_channel(values: Sequence[float]) -> str:
        return ", ".join(f"{n} {v:.2g}" for n, v in zip(channel_names, values, strict=False))

    # seams
    if seamless:
        findings.append(
            "The tiled prediction equals the whole-image prediction ("
            + (
                "identical"
                if seam["max_difference"] == 0
                else f"largest difference {seam['max_difference']:.1e}"
            )
            + ") and overlapping tiles agree (tile mismatch: no). "
            "The result does not depend on the tile size."
        )
    else:
        findings.append(
            f"Tiles disagree: where two overlapping tiles both see full context their "
            f"predictions differ by up to {mismatch.indicator:.2g} in probability (1 − Dice "
            f"{per_channel(mismatch.per_channel)}); the stitched prediction differs from the "
            f"whole-image prediction by up to {seam['max_difference']:.2g}."
        )
        if tile_dependent and tilewise:
            cause = "normalization with the statistics of each tile"
            findings.append(
                f"The cause is {cause}: {_describe_layers(tilewise)}. Every output pixel "
                "depends on the whole tile, so no halo can make stitching exact."
            )
            to_convert = list(tilewise)
            if global_info is not None:
                g_tm = global_info["tile_mismatch"]
                measured = (
                    "seamless (tile mismatch: no)"
                    if g_tm["seamless"]
                    else f"tile mismatch {g_tm['label']}"
                )
                g_dice = global_info.get("dice")
                t_dice = global_info.get("tile_wise_dice")
                if g_dice is not None and t_dice is not None:
                    measured += (
                        f"; mean Dice vs labels {_fmt_mean(g_dice)} with whole-image statistics "
                        f"vs {_fmt_mean(t_dice)} tile-wise"
                    )
                actions.append(
                    "Without retraining: predict with whole-image normalization statistics, "
                    "`nahtlos predict MODEL IMAGE OUT --norm-stats global` (computed block-wise "
                    "in one pass per norm layer; `sampled:0.1` estimates them from a tenth of "
                    f"the blocks). Measured on this image: {measured}."
                )
            elif model_kind == "torchscript":
                actions.append(
                    "Without retraining: whole-image normalization statistics "
                    "(`nahtlos predict ... --norm-stats global`) make it seamless, but need the "
                    "layers one by one: use the Python model or a nahtlos checkpoint, not a "
                    "TorchScript file."
                )
            good = [p for p in sweep if min(p.agreement, default=1.0) >= 0.99]
            if good and good[0].blocks > 1:
                actions.append(
                    f"Meanwhile use tiles as large as memory allows: from tile "
                    f"{'×'.join(map(str, good[0].tile))} on, the masks agree with the "
                    "whole-image prediction to Dice ≥ 0.99 on every channel (tile-size sweep)."
                )
            else:
                actions.append(
                    "Meanwhile use tiles as large as memory allows; agreement with the "
                    "whole-image prediction grows with the tile size (tile-size sweep)."
                )
        elif tile_dependent:
            cause = "layers that mix the whole tile"
            culprits = ", ".join(f"{c.name} ({c.type})" for c in rf.culprits[:6]) if rf else ""
            findings.append(
                "The prediction of every pixel depends on the whole tile"
                + (f", through {culprits}." if culprits else ".")
            )
            actions.append(
                "Replace the layers that see the whole tile (e.g. global attention, tile-wise "
                "normalization) by local ones, or use tiles as large as memory allows."
            )
        elif norm is not None and norm.mode == "tilewise":
            cause = "tile-wise input normalization"
            findings.append(
                "The input is scaled with the percentiles of each tile (tile-wise input "
                "normalization), so the same pixel gets a different value in every tile."
            )
            actions.append(
                "Scale the input with percentiles of the whole image (input normalization "
                "'global'), computed once; then train or fine-tune with the same scaling."
            )
        elif rf is not None and rf.shift_equivariant is False:
            cause = "position-dependent layers"
            findings.append(f"The network cannot be stitched exactly: {rf.reason()}.")
            actions.append(
                f"Use at least the halo {','.join(map(str, rf.halo(erf_mass)))} (the effective "
                "receptive field) to keep the differences small."
            )
        elif (
            rf is not None
            and rf.trf_radius is not None
            and any(h < r for h, r in zip(halo, rf.trf_radius, strict=True))
        ):
            cause = "a halo smaller than the receptive field"
            findings.append(
                f"The halo {halo_s} ({halo_source}) is smaller than the theoretical receptive "
                f"field radius {','.join(map(str, rf.trf_radius))}: pixels near tile borders "
                "miss context."
            )
            actions.append(
                f"Use the halo {','.join(map(str, rf.halo(erf_mass)))} (the receptive-field "
                "radius rounded up to the alignment); `nahtlos predict` picks it when --halo "
                "is left out."
            )
        else:
            findings.append(
                "No normalization with tile statistics was found: the halo may be smaller than "
                "the receptive field, or the tiles may not sit on the network's down-sampling "
                f"grid (halo {halo_s}, alignment {align_s})."
            )
            actions.append(
                "Measure the receptive field (`nahtlos rf MODEL`) and use its halo and alignment."
            )

    # train/eval disparity
    worst = max(disparity.per_channel, default=0.0)
    if level == "substantial":
        stats_layers = _describe_layers(running) or "normalization layers"
        findings.append(
            f"Train/eval disparity {worst:.2f} (1 − Dice, {per_channel(disparity.per_channel)}): "
            "for the very same tiles the network predicts other masks in eval mode than in train "
            f"mode. The running statistics stored by its {stats_layers} do not represent the "
            "statistics of the tiles (typical after training with small batches)."
        )
        if dice is not None:
            tr = _mean(dice["train"])
            ev = _mean(dice["eval"])
            if tr is not None and ev is not None and tr > ev:
                findings.append(
                    f"On your labels the mean Dice is {tr:.2f} in train mode but {ev:.2f} in "
                    "eval mode: the stored statistics cost quality."
                )
        to_convert += [g for g in running if g not in to_convert]
        actions.append(
            "Do not predict in train mode to work around the disparity: that makes every tile "
            "depend on its own content again (tiling artifacts)."
        )
    elif level == "small":
        findings.append(
            f"Train/eval disparity is small ({worst:.2g}): eval-mode masks differ from "
            "train-mode masks only in a few uncertain pixels."
        )
    elif level == "not measurable":
        findings.append(
            "Train/eval disparity cannot be measured: this TorchScript file was made with "
            "torch.jit.trace, which freezes its BatchNorm layers in the mode they were traced "
            "in, so the model predicts the same in train and in eval mode."
        )
        if running:
            actions.append(
                "To measure the train/eval disparity, diagnose the Python model, or export it "
                "with torch.jit.script instead of torch.jit.trace."
            )
    else:
        findings.append("Train mode and eval mode give the same masks (train/eval disparity 0).")

    if to_convert:
        actions.insert(
            0,
            f"Convert the {_describe_layers(to_convert)} to BatchRenorm and fine-tune"
            f"{convert_hint}: BatchRenorm normalizes with the same global statistics in "
            "training and inference, so predictions are seamless and eval mode matches train "
            "mode, without the quality loss of BatchNorm with small batches.",
        )

    if seamless and level != "substantial":
        headline = (
            f"Seamless: tiles with halo {halo_s} and alignment {align_s} stitch into exactly the "
            "whole-image prediction"
            + {
                "none": ", and train and eval mode agree.",
                "not measurable": " (train/eval disparity not measurable for a traced model).",
            }.get(level, ".")
        )
        if not actions:
            actions.append(
                f"Nothing to fix. Predict tile by tile with halo {halo_s} and alignment "
                f"{align_s} (`nahtlos predict MODEL IMAGE OUT --halo {halo_s} --alignment "
                f"{align_s}`); every tile size gives the same result."
            )
    elif seamless:
        headline = (
            f"Seamless, but eval mode predicts differently from train mode (train/eval "
            f"disparity {worst:.2f}): the stored normalization statistics do not fit these "
            "images."
        )
    elif level != "substantial":
        headline = "Not seamless: the prediction depends on how the image is tiled" + (
            f", because of {cause}." if cause else "."
        )
    else:
        headline = (
            "Not seamless, and eval mode predicts differently from train mode (train/eval "
            f"disparity {worst:.2f})"
            + (f"; the tiling artifacts come from {cause}." if cause else ".")
        )
    return Verdict(
        seamless=seamless,
        tile_dependent=tile_dependent,
        disparity=level,
        headline=headline,
        findings=findings,
        actions=actions,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _figures(
    *,
    frozen: bool,
    arr: np.ndarray,
    whole: np.ndarray,
    tiled: np.ndarray,
    seam: np.ndarray,
    train: np.ndarray,
    grid: BlockGrid,
    worst_block: Any,
    worst: Mapping[str, Any],
    rf: ReceptiveField | None,
    sweep: Sequence[SweepPoint],
    names: tuple[str, ...],
    channel_names: Sequence[str],
    threshold: float,
    tolerance: float,
    whole_dice: Sequence[float | None] | None,
    erf_mass: float,
) -> dict[str, bytes]:
    nd = len(grid.shape)
    figures: dict[str, bytes] = {}
    # seam map: central slice of the region, the channel with the largest seams
    z = grid.shape[0] // 2 if nd == 3 else None
    c = int(np.argmax([seam[k].max() for k in range(seam.shape[0])]))
    seam_2d = _slice_2d(seam, z).max(axis=0)
    rows = list(range(grid.block[-2], grid.shape[-2], grid.block[-2]))
    cols = list(range(grid.block[-1], grid.shape[-1], grid.block[-1]))
    figures["seam_map"] = seam_figure(
        SeamView(
            image=_slice_2d(arr[0], z),
            whole=_slice_2d(whole[c], z),
            tiled=_slice_2d(tiled[c], z),
            seam=seam_2d,
            borders=(rows, cols),
            axes=(names[-2], names[-1]),
            where=f"{names[0]} = {z} (central slice)" if z is not None else "",
            channel=channel_names[c],
            tolerance=tolerance,
        )
    )
    # train vs eval: the worst tile, the channel where it differs most
    inner = worst_block.inner

    def at(channel: int) -> tuple[Any, ...]:
        return (channel, *inner)

    losses = list(worst["per_channel"])
    diffs = [float(np.abs(train[at(k)] - tiled[at(k)]).max()) for k in range(len(losses))]
    c = max(range(len(losses)), key=lambda k: (losses[k], diffs[k]))
    zt = (inner[0].stop - inner[0].start) // 2 if nd == 3 else None
    span = ", ".join(f"{n} {s.start}–{s.stop}" for n, s in zip(names, inner, strict=True))
    if not frozen:
        figures["train_eval"] = disparity_figure(
            DisparityView(
                image=_slice_2d(arr[at(0)], zt),
                train=_slice_2d(train[at(c)], zt),
                eval=_slice_2d(tiled[at(c)], zt),
                axes=(names[-2], names[-1]),
                where=f"{names[0]} = {inner[0].start + zt} (central slice of the tile)"
                if zt is not None
                else "",
                tile=span,
                channel=channel_names[c],
                one_minus_dice=losses[c],
                threshold=threshold,
            )
        )
    if rf is not None:
        figures["receptive_field"] = _rf_figure(rf, erf_mass)
    figures["tile_sweep"] = sweep_figure(
        [p.to_dict() for p in sweep],
        channel_names,
        whole_dice=whole_dice,
        tolerance=tolerance,
        current=max(grid.block),
    )
    return figures


def _rf_figure(rf: ReceptiveField, mass: float) -> bytes:
    """The receptive-field picture of :mod:`nahtlos.nets.receptive_field`, as PNG bytes."""
    buf = io.BytesIO()
    receptive_field_figure(rf, mass=mass).savefig(buf, format="png", dpi=120)
    return buf.getvalue()
