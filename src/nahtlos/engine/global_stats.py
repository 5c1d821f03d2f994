"""Seamless inference for InstanceNorm/GroupNorm models: whole-image statistics, streamed.

A network whose norm layers compute statistics over their input (InstanceNorm,
GroupNorm) predicts every voxel from the whole tile, so no halo makes tiles stitch.
The limit of its quality as tiles grow is the network run once on the whole
zero-padded image. This module computes exactly that, block-wise:

1. the norm layers are visited in the order the network calls them; for each layer a
   streaming pass runs the network *up to that layer* on every block (earlier norm
   layers already frozen) and accumulates, in float64, the sum and sum of squares of
   the layer's input per channel (or per group) over the block's exact valid region;
2. the layer is frozen to the mean and variance of the whole padded image;
3. with every norm frozen the network is tile-independent: block-wise prediction with
   a halo covering its (now finite) receptive field equals the whole-image prediction.

The statistics domain is the zero-padded image of :func:`~nahtlos.engine.predict.predict_whole`
(the image grown by the halo on every side and to a multiple of the alignment), so the
frozen network reproduces that reference.

A cheaper ``sampled`` mode visits only a fraction of the blocks in every layer pass
and reports the estimated standard error of its statistics.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..axes import as_per_axis
from ..errors import NahtlosError, ShapeMismatchError
from .geometry import Block, BlockGrid
from .predict import (
    ArrayLike,
    image_layout,
    model_device_dtype,
    place_model,
    read_window,
    resolve_ndim,
)

__all__ = [
    "FrozenNorm",
    "GlobalNormStats",
    "LayerStats",
    "compute_global_stats",
    "freeze_norms",
    "tile_norm_layers",
]


class GlobalStatsError(NahtlosError, ValueError):
    """The model or its inputs do not allow whole-image statistics."""


def tile_norm_layers(
    model: torch.nn.Module, ignore_running_stats: bool = False
) -> list[tuple[str, torch.nn.Module]]:
    """The norm layers of ``model`` that normalize with statistics of their input.

    InstanceNorm (1/2/3D) without running statistics and GroupNorm always; InstanceNorm
    with ``track_running_stats=True`` only when ``ignore_running_stats`` (in eval mode it
    uses its running statistics and is already tile-independent).
    """
    found: list[tuple[str, torch.nn.Module]] = []
    for name, m in model.named_modules():
        instance = isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)
        if isinstance(m, torch.nn.GroupNorm) or (
            instance and (not m.track_running_stats or ignore_running_stats)
        ):
            found.append((name, m))
    return found


@dataclass
class LayerStats:
    """Whole-image statistics of one norm layer's input.

    ``mean`` and ``var`` (biased) have one entry per channel (InstanceNorm) or per
    group (GroupNorm); ``count`` is the number of values per entry they summarize and
    ``stderr`` (sampled mode) the estimated standard error of the mean, in units of
    the standard deviation.
    """

    name: str
    kind: str
    groups: int | None
    mean: np.ndarray
    var: np.ndarray
    count: float
    stderr: float | None = None


@dataclass
class GlobalNormStats:
    """The frozen statistics of every tile-wise norm layer, with what they belong to."""

    layers: list[LayerStats]
    fingerprint: str
    mode: str = "global"
    fraction: float = 1.0
    blocks_used: int = 0
    blocks_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_stderr(self) -> float | None:
        """Largest estimated standard error of a mean (sampled mode), in σ units."""
        errs = [s.stderr for s in self.layers if s.stderr is not None]
        return max(errs) if errs else None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to a ``.npz`` file (numbers) with a JSON header (names and provenance)."""
        header = {
            "fingerprint": self.fingerprint,
            "mode": self.mode,
            "fraction": self.fraction,
            "blocks_used": self.blocks_used,
            "blocks_total": self.blocks_total,
            "extra": self.extra,
            "layers": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "groups": s.groups,
                    "count": s.count,
                    "stderr": s.stderr,
                }
                for s in self.layers
            ],
        }
        arrays = {f"mean_{i}": s.mean for i, s in enumerate(self.layers)}
        arrays |= {f"var_{i}": s.var for i, s in enumerate(self.layers)}
        p = Path(path)
        tmp = p.with_name(p.name + ".partial.npz")
        arrays["header"] = np.array(json.dumps(header))
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GlobalNormStats:
        """Inverse of :meth:`save`."""
        with np.load(path) as data:
            header = json.loads(str(data["header"]))
            layers = [
                LayerStats(
                    name=h["name"],
                    kind=h["kind"],
                    groups=h["groups"],
                    count=h["count"],
                    stderr=h["stderr"],
                    mean=data[f"mean_{i}"],
                    var=data[f"var_{i}"],
                )
                for i, h in enumerate(header["layers"])
            ]
        return cls(
            layers=layers,
            fingerprint=header["fingerprint"],
            mode=header["mode"],
            fraction=header["fraction"],
            blocks_used=header["blocks_used"],
            blocks_total=header["blocks_total"],
            extra=header.get("extra", {}),
        )


class FrozenNorm(torch.nn.Module):
    """An InstanceNorm or GroupNorm with fixed (whole-image) statistics.

    ``y = (x − mean) / sqrt(var + eps) · weight + bias`` with ``mean``/``var`` per
    channel, or per group broadcast to the group's channels; the affine parameters are
    those of the original layer.
    """

    def __init__(self, original: torch.nn.Module, stats: LayerStats) -> None:
        super().__init__()
        channels = int(getattr(original, "num_features", 0) or getattr(original, "num_channels", 0))
        mean = torch.as_tensor(stats.mean, dtype=torch.float64)
        var = torch.as_tensor(stats.var, dtype=torch.float64)
        if stats.groups is not None:
            per = channels // stats.groups
            mean, var = mean.repeat_interleave(per), var.repeat_interleave(per)
        if mean.numel() != channels:
            raise ShapeMismatchError(
                f"statistics of layer {stats.name!r} have {mean.numel()} channels, the layer {channels}"
            )
        eps = float(getattr(original, "eps", 1e-5))
        scale = 1.0 / torch.sqrt(var + eps)
        weight = getattr(original, "weight", None)
        bias = getattr(original, "bias", None)
        w = (
            weight.detach().double()
            if weight is not None
            else torch.ones(channels, dtype=torch.float64)
        )
        b = (
            bias.detach().double()
            if bias is not None
            else torch.zeros(channels, dtype=torch.float64)
        )
        # fold statistics and affine into one multiply-add per channel
        self.register_buffer("scale", (scale * w).float())
        self.register_buffer("shift", (b - mean * scale * w).float())
        self.layer_name = stats.name

    scale: torch.Tensor
    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


def freeze_norms(model: torch.nn.Module, stats: GlobalNormStats) -> torch.nn.Module:
    """A copy of ``model`` whose tile-wise norm layers use ``stats`` (tile-independent)."""
    frozen = copy.deepcopy(model)
    _install(frozen, stats.layers)
    return frozen


def _install(model: torch.nn.Module, layers: Sequence[LayerStats]) -> None:
    modules = dict(model.named_modules())
    for s in layers:
        parent_name, _, child = s.name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        original = modules[s.name]
        setattr(parent, child, FrozenNorm(original, s).to(model_device_dtype(model)[0]))


class _Stop(Exception):
    """Raised by the hook on the measured layer: the rest of the network is not needed."""


def _stats_fingerprint(
    model: torch.nn.Module,
    image: ArrayLike,
    halo: tuple[int, ...],
    alignment: tuple[int, ...],
    ignore_running_stats: bool,
    input_transform: Any,
    image_id: dict[str, Any] | None,
) -> str:
    """What the statistics depend on: weights, image, geometry, input normalization."""
    return _fingerprint(
        model,
        image,
        {
            "halo": list(halo),
            "alignment": list(alignment),
            "ignore_running_stats": ignore_running_stats,
            "input": getattr(input_transform, "to_dict", lambda: repr(input_transform))(),
            "image": image_id or {},
        },
    )


def _fingerprint(model: torch.nn.Module, image: ArrayLike, parts: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(
        json.dumps(
            {**parts, "shape": list(image.shape), "dtype": str(getattr(image, "dtype", ""))},
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()[:32]


def _call_order(
    model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], example: torch.Tensor
) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name))
        for name, m in layers
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hd in handles:
            hd.remove()
    if len(order) != len(set(order)):
        dup = sorted({n for n in order if order.count(n) > 1})
        raise GlobalStatsError(
            f"norm layer(s) {dup} are called more than once per forward pass; whole-image "
            "statistics need one call per layer"
        )
    missing = sorted({n for n, _ in layers} - set(order))
    if missing:
        raise GlobalStatsError(f"norm layer(s) {missing} are never called by the model")
    return order


def compute_global_stats(
    model: torch.nn.Module,
    image: ArrayLike,
    *,
    block: int | Sequence[int],
    halo: int | Sequence[int],
    alignment: int | Sequence[int] = 1,
    ndim: int | None = None,
    batch_size: int = 1,
    fraction: float = 1.0,
    seed: int = 0,
    ignore_running_stats: bool = False,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    image_id: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> GlobalNormStats:
    """Whole-image statistics of every tile-wise norm layer, computed block-wise.

    Parameters
    ----------
    model
        A Python ``torch.nn.Module`` (forward hooks are needed: TorchScript cannot).
        Used in eval mode; it is not modified.
    image
        ``(*spatial)`` or ``(C, *spatial)`` array-like, read block by block.
    block, halo, alignment
        Block geometry of the passes; ``halo`` must cover the receptive field of the
        network with frozen norms, and is also the padding of the statistics domain
        (as in :func:`~nahtlos.engine.predict.predict_whole` with the same halo).
    fraction
        1 for exact statistics; less visits that fraction of the blocks (evenly
        spread, shuffled by ``seed``) in every pass and estimates the standard error.
    ignore_running_stats
        Also freeze InstanceNorm layers that track running statistics.
    input_transform
        Pointwise input normalization (e.g. global percentiles); applied to image
        voxels before zero padding.
    image_id
        What identifies the image beyond its shape and dtype (e.g. its path and
        modification time); part of the statistics' fingerprint.

    Returns
    -------
    GlobalNormStats
    """
    _check_measurable(model, fraction, input_transform)
    nd, channels, spatial = image_layout(image, ndim, block)
    align = as_per_axis(alignment, nd, "alignment")
    halo_t = as_per_axis(halo, nd, "halo")
    # the prediction's own block grid: the statistics passes cost as many windows
    grid = BlockGrid(spatial, block, halo_t, align)
    layers = tile_norm_layers(model, ignore_running_stats)
    fp = _stats_fingerprint(
        model, image, halo_t, align, ignore_running_stats, input_transform, image_id
    )
    blocks = _sample_blocks(list(grid), fraction, seed)
    mode = "global" if fraction == 1 else "sampled"
    if not layers:
        return GlobalNormStats([], fp, mode, fraction, len(blocks), len(grid))

    def read(batch: Sequence[_Window]) -> np.ndarray:
        # the statistics domain is the padded image of predict_whole: one halo before it
        return np.stack(
            [read_window(image, w.start(halo_t), w.shape, channels, input_transform) for w in batch]
        )

    work = copy.deepcopy(model).eval()
    place_model(work, device)
    n_channels = int(image.shape[0]) if channels else 1
    batches = _clipped_batches(blocks, grid, grid.padded_shape, batch_size)
    results = _measure_layers(work, layers, batches, read, n_channels, grid, fraction, progress)
    return GlobalNormStats(
        layers=results,
        fingerprint=fp,
        mode=mode,
        fraction=fraction,
        blocks_used=len(blocks),
        blocks_total=len(grid),
        extra={"domain": list(grid.padded_shape), "halo": list(halo_t), "alignment": list(align)},
    )


def _check_measurable(
    model: torch.nn.Module,
    fraction: float,
    input_transform: Callable[[np.ndarray], np.ndarray] | None,
) -> None:
    """Refuse what whole-image statistics cannot be measured for."""
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise GlobalStatsError(
            "whole-image statistics need a Python model (forward hooks); TorchScript files "
            "cannot be measured layer by layer: load the Python model or a nahtlos checkpoint"
        )
    if not 0 < fraction <= 1:
        raise GlobalStatsError(f"fraction {fraction} must be in (0, 1]")
    if getattr(input_transform, "mode", None) == "tilewise":
        raise GlobalStatsError(
            "tile-wise input normalization makes every tile's input depend on the tile: "
            "whole-image statistics need global input normalization"
        )


def _sample_blocks(blocks: list[Block], fraction: float, seed: int) -> list[Block]:
    """All blocks, or a ``fraction`` of them spread evenly over the grid order."""
    if fraction >= 1:
        return blocks
    # at least two blocks, so that the spread between blocks gives a standard error
    k = min(len(blocks), max(2, math.ceil(fraction * len(blocks))))
    rng = np.random.default_rng(seed)
    # stratified: one block from each of k equal runs of the grid order
    edges = np.linspace(0, len(blocks), k + 1)
    picks = sorted(
        {
            min(int(lo + rng.random() * (hi - lo)), len(blocks) - 1)
            for lo, hi in itertools.pairwise(edges)
        }
    )
    return [blocks[i] for i in picks]


def _measure_layers(
    work: torch.nn.Module,
    layers: list[tuple[str, torch.nn.Module]],
    batches: list[list[_Window]],
    read: Callable[[Sequence[_Window]], np.ndarray],
    n_channels: int,
    grid: BlockGrid,
    fraction: float,
    progress: bool,
) -> list[LayerStats]:
    """Measure the norm layers of ``work`` one by one in call order, freezing each in turn.

    Each layer's pass runs the network up to that layer (earlier layers already frozen
    in ``work``) on every batch of windows.
    """
    dev, dtype = model_device_dtype(work)
    modules = dict(work.named_modules())
    example = torch.zeros((2, n_channels, *grid.window_shape), dtype=dtype, device=dev)
    order = _call_order(work, [(n, modules[n]) for n, _ in layers], example)
    results: list[LayerStats] = []
    with tqdm(
        total=len(order) * len(batches),
        desc="norm statistics",
        unit="batch",
        disable=not progress,
        leave=False,
    ) as bar:
        for name in order:
            module = dict(work.named_modules())[name]
            acc = _Accumulator()
            for windows, batch in _layer_inputs(work, module, batches, read, dev, dtype):
                acc.add(windows, batch, _groups(module))
                bar.update(1)
            stats = acc.result(
                name, type(module).__name__, _groups(module), fraction < 1, len(grid)
            )
            results.append(stats)
            _install(work, [stats])  # freeze before measuring the next layer
    return results


def _groups(module: torch.nn.Module) -> int | None:
    """The groups of a GroupNorm; ``None`` for statistics per channel."""
    return int(module.num_groups) if isinstance(module, torch.nn.GroupNorm) else None


def _layer_inputs(
    work: torch.nn.Module,
    module: torch.nn.Module,
    batches: list[list[_Window]],
    read: Callable[[Sequence[_Window]], np.ndarray],
    dev: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, list[_Window]]]:
    """The input of ``module`` for every batch, running ``work`` only up to it."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured["x"] = inputs[0]
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            with torch.inference_mode(), contextlib.suppress(_Stop):
                work(torch.from_numpy(read(batch)).to(dev, dtype=dtype))
            yield captured.pop("x"), batch
    finally:
        handle.remove()


@dataclass(frozen=True)
class _Window:
    """A block's window clipped to the statistics domain, and its valid region inside."""

    window: tuple[slice, ...]
    valid: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(w.stop - w.start for w in self.window)

    def start(self, before: tuple[int, ...]) -> tuple[int, ...]:
        """The window's start in image coordinates, the domain being ``before`` ahead."""
        return tuple(w.start - b for w, b in zip(self.window, before, strict=True))


def _clipped_batches(
    blocks: Sequence[Block], grid: BlockGrid, domain: tuple[int, ...], batch_size: int
) -> list[list[_Window]]:
    """The statistics windows of prediction blocks, batched by equal shape.

    The statistics domain is the padded image, one halo wider than the image on every
    side: the first and last block along each axis grow into that margin. Their
    windows are clipped at the domain's edge, which keeps them the size of an ordinary
    window, so a pass costs no more windows than a prediction. Clipping also matters
    for exactness: the whole-image network sees the domain's edge as the border of its
    feature maps (zero-padded features), not as more zero *input*. Window bounds stay
    multiples of the alignment because blocks, halos and the domain are.
    """
    by_shape: dict[tuple[int, ...], list[_Window]] = {}
    last = tuple(g - 1 for g in grid.grid_shape)
    for blk in blocks:
        window, valid = [], []
        for ax, (a, b, h, n) in enumerate(zip(blk.start, blk.stop, blk.halo, domain, strict=True)):
            lo = 0 if blk.index[ax] == 0 else a + h  # domain coordinates
            hi = n if blk.index[ax] == last[ax] else b + h
            w0, w1 = max(lo - h, 0), min(hi + h, n)
            window.append(slice(w0, w1))
            valid.append(slice(lo - w0, hi - w0))
        win = _Window(window=tuple(window), valid=tuple(valid))
        by_shape.setdefault(win.shape, []).append(win)
    return [
        group[i : i + batch_size]
        for group in by_shape.values()
        for i in range(0, len(group), batch_size)
    ]


class _Accumulator:
    """Float64 sums and sums of squares per channel/group over blocks' valid regions."""

    def __init__(self) -> None:
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None
        self.n = 0.0
        self.block_means: list[torch.Tensor] = []
        self.block_counts: list[float] = []

    def add(self, x: torch.Tensor, batch: Sequence[_Window], groups: int | None) -> None:
        shape = batch[0].shape
        scale = []
        for w, f in zip(shape, x.shape[2:], strict=True):
            if w % f:
                raise GlobalStatsError(
                    f"a norm layer's input of spatial shape {tuple(x.shape[2:])} is not an integer "
                    f"down-sampling of the window {shape}"
                )
            scale.append(w // f)
        for i, win in enumerate(batch):
            region = tuple(
                slice(v.start // s, v.stop // s) for v, s in zip(win.valid, scale, strict=True)
            )
            key: tuple[Any, ...] = (i, slice(None), *region)
            v = x[key].double()
            c = v.shape[0]
            if groups is not None:
                v = v.reshape(groups, c // groups, *v.shape[1:])
            flat = v.reshape(v.shape[0], -1)
            s, ss, n = flat.sum(1), (flat * flat).sum(1), float(flat.shape[1])
            self.s = s if self.s is None else self.s + s
            self.ss = ss if self.ss is None else self.ss + ss
            self.n += n
            self.block_means.append(s / n)
            self.block_counts.append(n)

    def result(
        self, name: str, kind: str, groups: int | None, sampled: bool, total_blocks: int
    ) -> LayerStats:
        assert self.s is not None and self.ss is not None
        mean = self.s / self.n
        var = torch.clamp(self.ss / self.n - mean * mean, min=0.0)
        stderr = None
        if sampled:
            k = len(self.block_means)
            means = torch.stack(self.block_means)
            w = torch.tensor(self.block_counts, dtype=torch.float64)[:, None]
            spread = ((w * (means - mean) ** 2).sum(0) / w.sum()).sqrt()
            fpc = math.sqrt(max(0.0, 1 - k / total_blocks))
            se = spread / math.sqrt(max(k - 1, 1)) * fpc
            stderr = float((se / torch.sqrt(var + 1e-12)).max())
        return LayerStats(
            name=name,
            kind=kind,
            groups=groups,
            mean=mean.numpy(),
            var=var.numpy(),
            count=self.n,
            stderr=stderr,
        )


def placeholder_stats(
    model: torch.nn.Module, ignore_running_stats: bool = False
) -> GlobalNormStats:
    """Zero-mean, unit-variance statistics for every tile-wise norm layer.

    Freezing with them gives a network of the same *structure* as the truly frozen one:
    its receptive field (hence the halo of global-statistics inference) and its memory
    use, measured before the real statistics exist.
    """
    layers = []
    for name, m in tile_norm_layers(model, ignore_running_stats):
        groups = int(m.num_groups) if isinstance(m, torch.nn.GroupNorm) else None
        n = groups if groups is not None else int(getattr(m, "num_features", 0))
        layers.append(
            LayerStats(name, type(m).__name__, groups, np.zeros(n), np.ones(n), count=0.0)
        )
    return GlobalNormStats(layers, fingerprint="placeholder", mode="placeholder")


def parse_norm_stats(text: str) -> tuple[str, float]:
    """Parse ``tile``, ``global`` or ``sampled[:FRACTION]`` (default fraction 0.1).

    Raises
    ------
    GlobalStatsError
        For anything else, or a fraction outside (0, 1].
    """
    mode, _, frac = text.strip().lower().partition(":")
    if mode in ("tile", "global") and not frac:
        return mode, 1.0
    if mode == "sampled":
        try:
            fraction = float(frac) if frac else 0.1
        except ValueError:
            fraction = -1.0
        if 0 < fraction <= 1:
            return mode, fraction
        raise GlobalStatsError(
            f"--norm-stats {text!r}: the fraction of sampled blocks must be a number in (0, 1], "
            "e.g. sampled:0.1"
        )
    raise GlobalStatsError(
        f"--norm-stats {text!r} is not one of tile, global, sampled or sampled:FRACTION"
    )


def global_stats_model(
    model: torch.nn.Module,
    image: ArrayLike,
    *,
    block: int | Sequence[int],
    halo: int | Sequence[int],
    alignment: int | Sequence[int] = 1,
    ndim: int | None = None,
    fraction: float = 1.0,
    cache: str | os.PathLike[str] | None = None,
    image_id: dict[str, Any] | None = None,
    ignore_running_stats: bool = False,
    input_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, GlobalNormStats, bool]:
    """The model with whole-image statistics frozen in, reusing a cached computation.

    Parameters
    ----------
    cache
        A ``.npz`` file: loaded when it holds statistics of this model, image,
        geometry and input normalization (its fingerprint matches), else computed and
        saved there, so a second prediction of the same image costs one pass.
    image_id
        What identifies the image beyond its shape and dtype (e.g. its path and
        modification time); part of the fingerprint.
    Other parameters
        As for :func:`compute_global_stats`.

    Returns
    -------
    frozen, stats, reused
        The frozen copy of the model, its statistics, and whether they came from the cache.
    """
    kwargs: dict[str, Any] = {
        "block": block,
        "halo": halo,
        "alignment": alignment,
        "ndim": ndim,
        "batch_size": batch_size,
        "fraction": fraction,
        "ignore_running_stats": ignore_running_stats,
        "input_transform": input_transform,
        "image_id": image_id,
        "device": device,
        "progress": progress,
    }
    stats: GlobalNormStats | None = None
    if cache is not None and Path(cache).is_file():
        try:
            stats = GlobalNormStats.load(cache)
        except (OSError, ValueError, KeyError):
            stats = None
    nd = resolve_ndim(image, block, ndim)
    expected = _stats_fingerprint(
        model,
        image,
        as_per_axis(halo, nd, "halo"),
        as_per_axis(alignment, nd, "alignment"),
        ignore_running_stats,
        input_transform,
        image_id,
    )
    reused = (
        stats is not None
        and stats.fingerprint == expected
        and (stats.mode == "global" or (fraction < 1 and stats.fraction == fraction))
    )
    if not reused:
        stats = compute_global_stats(model, image, **kwargs)
        if cache is not None:
            stats.save(cache)
    assert stats is not None
    return freeze_norms(model, stats), stats, reused
