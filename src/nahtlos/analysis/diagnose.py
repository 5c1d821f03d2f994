"""``diagnose``: can a network be tiled seamlessly, and does eval mode match train mode?

One run bundles the paper's two indicators with the receptive field into a report
people can read (DESIGN.md §2 has the definitions). This module runs the steps in
order; each lives where its job is:

1. input normalization: the model's own (from its checkpoint) or the caller's
   (:mod:`~nahtlos.analysis.plan` resolves model, image, region and labels);
2. receptive field (:mod:`nahtlos.nets.receptive_field`): halo, alignment, tile dependence;
3. the whole-image prediction in one pass, the reference of "seamless"
   (:mod:`~nahtlos.analysis.measure`);
4. the tiled prediction at the diagnosed tile size, and its seam map
   ``|tiled - whole|``;
5. tile mismatch (overlapping sub-tiles compared on their valid overlap);
6. train/eval disparity on the same tiles, and the worst tile;
7. for tile-wise norm layers, the same with whole-image statistics
   (:mod:`~nahtlos.analysis.global_comparison`);
8. a tile-size sweep (:mod:`~nahtlos.analysis.sweep`): agreement with the whole-image
   prediction (and Dice against labels) vs the inference tile size, like the paper's
   Fig. 6;
9. figures (:mod:`~nahtlos.analysis.figures`), and a verdict in plain words with what
   to do (:mod:`~nahtlos.analysis.verdict`).

The result is a :class:`~nahtlos.analysis.results.DiagnosisReport`; the model comes
back exactly as it was: parameters, buffers (running statistics, step counters), every
module's train/eval flag and its device.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.geometry import BlockGrid
from ..engine.predict import ArrayLike, resolve_device
from ..io import InputNormalization
from ..nets.checkpoint import LoadedModel
from ..nets.receptive_field import ReceptiveField
from ..nets.state import preserved_state
from .figures import diagnosis_figures
from .global_comparison import compare_global_statistics
from .layers import mode_frozen, normalization_layers
from .measure import (
    DisparityResult,
    Workbench,
    label_dice,
    measure_disparity,
    probe_receptive_field,
    seam_map,
)
from .metrics import TileMismatch
from .plan import (
    Subject,
    resolve_channel_names,
    resolve_ndim,
    resolve_subject,
    tile_grid,
)
from .results import DISPARITY_THRESHOLD, DiagnosisReport, SweepPoint, Verdict
from .sweep import run_sweep, sweep_sizes
from .verdict import Evidence, conclude

__all__ = [
    "DISPARITY_THRESHOLD",
    "DiagnosisReport",
    "SweepPoint",
    "Verdict",
    "diagnose",
    "mode_frozen",
    "normalization_layers",
    "resolve_ndim",
]

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


class _Steps:
    """The progress bar over the steps, and how long each took."""

    def __init__(self, progress: bool) -> None:
        self.bar = tqdm(total=len(_STEPS), desc="diagnose", unit="step", disable=not progress)
        self.timings: dict[str, float] = {}

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    @contextlib.contextmanager
    def step(self, index: int, tick: bool = True) -> Iterator[None]:
        began = time.perf_counter()
        self.bar.set_postfix_str(_STEPS[index])
        yield
        self.timings[_STEPS[index]] = round(time.perf_counter() - began, 3)
        if tick:
            self.bar.update(1)

    def sweep_points(self, n: int) -> None:
        """One tick per tile size: the sweep is the longest step."""
        self.bar.total = len(_STEPS) + n - 1


@dataclass
class _Measured:
    """The predictions and numbers of steps 3-8."""

    whole: np.ndarray
    masks: np.ndarray | None
    names: list[str]
    tiled: np.ndarray
    seam: np.ndarray
    seam_info: dict[str, Any]
    mismatch: TileMismatch
    disparity: DisparityResult
    dice: dict[str, list[float | None]] | None
    global_info: dict[str, Any] | None
    sweep: list[SweepPoint]


@contextlib.contextmanager
def _borrowed(module: torch.nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """The model on ``device`` (default: its own) while measuring; afterwards exactly as
    it was (parameters, buffers, train/eval flags) and back on its own device."""
    first = next(iter(module.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    dev = resolve_device(device) if device is not None else home
    try:
        with preserved_state(module):
            module.to(dev)
            yield dev
    finally:
        module.to(home)


def _check_settings(batch_size: int, max_windows: int, threshold: float) -> None:
    for name, value in (("batch_size", batch_size), ("max_windows", max_windows)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} must lie strictly between 0 and 1")


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
        :func:`nahtlos.io.open_image`.
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
        An :class:`~nahtlos.io.InputNormalization` or its mode; default the
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
    subject = resolve_subject(
        model,
        image,
        labels,
        ndim=ndim,
        activation=activation,
        input_normalization=input_normalization,
        region=region,
        max_voxels=max_voxels,
        label_kind=label_kind,
        image_source=image_source,
        labels_source=labels_source,
    )
    _check_settings(batch_size, max_windows, threshold)
    module = subject.loaded.module
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with _Steps(progress) as steps, _borrowed(module, device) as dev:
        with steps.step(0):
            bench = Workbench(
                module,
                subject.read_region(),
                subject.ndim,
                subject.activation,
                subject.input_transform(),
                batch_size,
                threshold,
                tolerance,
                max_windows,
            )
        with steps.step(1):
            rf = (
                probe_receptive_field(module, subject.ndim, subject.in_channels, dev)
                if receptive_field
                else None
            )
            grid, halo_source = tile_grid(
                subject, rf, tile=tile, halo=halo, alignment=alignment, erf_mass=erf_mass
            )
        m = _measure(
            bench,
            subject,
            grid,
            rf,
            steps,
            channel_names=channel_names,
            mismatch_window=mismatch_window,
            mismatch_stride=mismatch_stride,
            global_stats=global_stats,
            tile_sizes=tile_sizes,
            sweep_budget=sweep_budget,
        )
        with steps.step(8):
            layers = normalization_layers(module)
            found = _verdict(subject, m, rf, grid, layers, halo_source, erf_mass)
            figures = _figures(bench, m, grid, rf, erf_mass) if make_figures else {}
    steps.timings["total"] = round(time.perf_counter() - t_start, 3)
    return DiagnosisReport(
        verdict=found,
        model=subject.model_info(int(m.whole.shape[0]), m.names),
        image=subject.image_info(),
        settings=_settings(grid, halo_source, bench, erf_mass, dev),
        tile_mismatch=m.mismatch,
        seam=m.seam_info,
        train_eval_disparity=m.disparity.disparity,
        worst_tile=m.disparity.worst,
        receptive_field=rf,
        normalization_layers=layers,
        dice=m.dice,
        sweep=m.sweep,
        timings=steps.timings,
        figures=figures,
        created=created,
        global_statistics=m.global_info,
    )


def _settings(
    grid: BlockGrid, halo_source: str, bench: Workbench, erf_mass: float, device: torch.device
) -> dict[str, Any]:
    """The report's ``settings`` section."""
    return {
        "tile": list(grid.block),
        "halo": list(grid.halo),
        "alignment": list(grid.alignment),
        "window": list(grid.window_shape),
        "halo_source": halo_source,
        "batch_size": bench.batch_size,
        "threshold": bench.threshold,
        "tolerance": bench.tolerance,
        "erf_mass": erf_mass,
        "device": str(device),
    }


def _measure(
    bench: Workbench,
    subject: Subject,
    grid: BlockGrid,
    rf: ReceptiveField | None,
    steps: _Steps,
    *,
    channel_names: Sequence[str] | None,
    mismatch_window: int | Sequence[int] | None,
    mismatch_stride: int | Sequence[int] | None,
    global_stats: bool,
    tile_sizes: Sequence[int] | None,
    sweep_budget: float,
) -> _Measured:
    """Steps 3 to 8: every prediction and number of the report."""
    with steps.step(2):
        whole = bench.whole(grid.halo, grid.alignment)
        n_out = int(whole.shape[0])
        names = resolve_channel_names(channel_names, subject.meta, n_out)
        masks = subject.label_masks(n_out)
    with steps.step(3):
        tiled = bench.tiled(grid)
        seam, seam_info = seam_map(bench, tiled, whole)
    with steps.step(4):
        mismatch = bench.mismatch(grid, mismatch_window, mismatch_stride)
    with steps.step(5):
        disparity = measure_disparity(bench, grid, tiled, mode_frozen(bench.module))
        dice = label_dice(bench, masks, whole, tiled, disparity.train)
    with steps.step(6):
        global_info = (
            compare_global_statistics(bench, grid, rf, whole, masks) if global_stats else None
        )
        if global_info is not None:
            # the tile-wise side of the comparison was measured above
            global_info["tile_wise_agreement_with_whole"] = seam_info["agreement"]
            global_info["tile_wise_dice"] = None if dice is None else dice["eval"]
    with steps.step(7, tick=False):
        sizes = (
            sorted({int(s) for s in tile_sizes})
            if tile_sizes is not None
            else sweep_sizes(
                grid.shape, grid.halo, grid.alignment, max_cost=8.0, max_total=sweep_budget
            )
        )
        sweep = run_sweep(
            bench,
            sizes,
            grid,
            tiled,
            whole,
            masks,
            on_start=steps.sweep_points,
            on_point=lambda: steps.bar.update(1),
        )
    return _Measured(
        whole,
        masks,
        names,
        tiled,
        seam,
        seam_info,
        mismatch,
        disparity,
        dice,
        global_info,
        sweep,
    )


def _verdict(
    subject: Subject,
    m: _Measured,
    rf: ReceptiveField | None,
    grid: BlockGrid,
    layers: list[dict[str, Any]],
    halo_source: str,
    erf_mass: float,
) -> Verdict:
    return conclude(
        Evidence(
            model_kind=subject.loaded.kind,
            mismatch=m.mismatch,
            seam=m.seam_info,
            disparity=m.disparity.disparity,
            rf=rf,
            layers=layers,
            norm=subject.norm,
            halo=grid.halo,
            halo_source=halo_source,
            alignment=grid.alignment,
            erf_mass=erf_mass,
            dice=m.dice,
            sweep=m.sweep,
            channel_names=m.names,
            global_info=m.global_info,
        )
    )


def _figures(
    bench: Workbench, m: _Measured, grid: BlockGrid, rf: ReceptiveField | None, erf_mass: float
) -> dict[str, bytes]:
    return diagnosis_figures(
        arr=bench.arr,
        whole=m.whole,
        tiled=m.tiled,
        seam=m.seam,
        grid=grid,
        train=m.disparity.train,
        worst_block=m.disparity.worst_block,
        worst=m.disparity.worst,
        rf=rf,
        sweep=[p.to_dict() for p in m.sweep],
        channel_names=m.names,
        threshold=bench.threshold,
        tolerance=bench.tolerance,
        whole_dice=None if m.dice is None else m.dice["whole"],
        erf_mass=erf_mass,
    )
