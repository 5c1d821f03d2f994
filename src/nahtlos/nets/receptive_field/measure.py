"""Measuring a model's receptive field: the probes of the other modules, run in order.

:func:`receptive_field` builds a :class:`~.prober.Prober` for the model and measures,
in this order: the TRF per axis (or, for tile-dependent models, the culprit layers and
the TRF with the tile statistics frozen), the alignment by shifting, and the ERF of the
real model; finally it checks that the real model's gradient stays inside the TRF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ...axes import as_per_axis, round_up
from .alignment import alignment as shift_alignment
from .culprits import CulpritFinder
from .erf import ErfMaps, measure_erf
from .prober import Prober
from .result import Culprit, ReceptiveField, ReceptiveFieldError
from .trf import axis_trf, check_full, extent

__all__ = ["receptive_field"]


class _HasModule(Protocol):
    """A loaded model file (:class:`~nahtlos.nets.checkpoint.LoadedModel`)."""

    module: torch.nn.Module


@dataclass(frozen=True)
class _Trf:
    """The TRF found by :func:`_measure_trf` (see :class:`ReceptiveField` for the fields)."""

    tile_dependent: bool
    before: tuple[int, ...] | None = None
    after: tuple[int, ...] | None = None
    local_before: tuple[int, ...] | None = None
    local_after: tuple[int, ...] | None = None
    culprits: tuple[Culprit, ...] = ()
    verified: bool = False

    @property
    def reach(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(before, after) a halo can capture: the TRF, else the local TRF, else ``None``."""
        if self.before is not None and self.after is not None:
            return self.before, self.after
        if self.local_before is not None and self.local_after is not None:
            return self.local_before, self.local_after
        return None


def receptive_field(
    model: torch.nn.Module | _HasModule,
    ndim: int,
    in_channels: int = 1,
    *,
    shape: int | Sequence[int] | None = None,
    device: str | torch.device | None = None,
    erf_samples: int = 2,
    erf_shape: int | Sequence[int] | None = None,
    max_voxels: int = 2**18,
    seed: int = 0,
    progress: bool = False,
) -> ReceptiveField:
    """Measure the receptive field of a model: TRF, alignment, tile dependence and ERF.

    See :mod:`nahtlos.nets.receptive_field` for how each quantity is measured. The
    model itself is not changed: the TRF, alignment and tile dependence are probed on
    a copy, the ERF on the model in eval mode (its train/eval flags are restored
    afterwards).

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` (including a TorchScript module) mapping
        ``(N, in_channels, *spatial)`` to ``(N, C_out, *spatial)``, or the result of
        :func:`nahtlos.nets.checkpoint.load_model`.
    ndim
        Number of spatial axes (2 or 3).
    in_channels
        Input channels.
    shape
        Probe input shape, for models that accept a single input size (e.g. UNETR's
        ``img_size``). By default nahtlos picks probe sizes itself and grows them
        until the TRF fits.
    device
        Where to run the probes; default the model's device.
    erf_samples
        Random inputs the ERF is averaged over.
    erf_shape
        Input shape for the ERF; default large enough to hold the whole TRF (for
        tile-dependent models 128 per axis in 2D, 64 in 3D, or ``shape``).
    max_voxels
        Largest probe (in voxels) for the float64 TRF probes; bounds memory.
    seed
        Seed of the random probe weights and inputs.
    progress
        Show a progress bar.

    Returns
    -------
    ReceptiveField

    Raises
    ------
    ShapeMismatchError
        If the model's output does not keep the input's spatial shape.
    ReceptiveFieldError
        If the model rejects every probe shape, or its TRF exceeds ``max_voxels``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
    >>> rf = receptive_field(net, ndim=2)
    >>> rf.trf_radius, rf.alignment, rf.tile_dependent
    ((3, 3), (1, 1), False)
    """
    module = model if isinstance(model, torch.nn.Module) else model.module
    if ndim < 1:
        raise ValueError(f"ndim must be at least 1, got {ndim}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    dev = _module_device(module, torch.device("cpu")) if device is None else torch.device(device)
    probe_shape = None if shape is None else as_per_axis(shape, ndim, "shape")
    bar = tqdm(desc="receptive field", unit="probe", disable=not progress, leave=False)
    try:
        prober = Prober(module, ndim, in_channels, probe_shape, dev, max_voxels, seed, bar)
        trf = _measure_trf(prober, CulpritFinder(prober))
        alignment, equivariant = _measure_alignment(prober, trf)
        prober.mode.freeze_forward = prober.mode.freeze_backward = False
        bar.set_description("receptive field: ERF")
        e_shape = _erf_shape(prober, erf_shape, trf)
        maps = measure_erf(
            module,
            ndim,
            in_channels,
            e_shape,
            _module_device(module, dev),
            erf_samples,
            seed,
            frozen=trf.tile_dependent,
        )
        bar.update(1)
    finally:
        bar.close()
    rf = _result(prober, trf, alignment, equivariant, maps)
    _check_erf_inside_trf(rf)
    return rf


def _module_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """The device of the module's first parameter or buffer, else ``default``."""
    return next((t.device for t in list(module.parameters()) + list(module.buffers())), default)


def _measure_trf(prober: Prober, finder: CulpritFinder) -> _Trf:
    """The TRF per axis, verified by a full probe; for tile-dependent models the local TRF."""
    extents: list[tuple[int, int]] = []
    for d in range(prober.ndim):
        ext = axis_trf(prober, finder, d)
        if ext is None:
            return _measure_local_trf(prober, finder)
        extents.append(ext)
    before = tuple(e[0] for e in extents)
    after = tuple(e[1] for e in extents)
    check = check_full(prober, before, after)
    if check is False:
        raise ReceptiveFieldError(
            "the per-axis TRF probes disagree with the full probe: the model's "
            "layers do not act on boxes of voxels; please report this model"
        )
    return _Trf(tile_dependent=False, before=before, after=after, verified=check is True)


def _measure_local_trf(prober: Prober, finder: CulpritFinder) -> _Trf:
    """A tile-dependent model: its culprits, and what a halo can still capture (the TRF
    with the tile statistics frozen; the prober's mode stays frozen for the alignment)."""
    culprits = finder.culprits()
    prober.mode.freeze_forward = prober.mode.freeze_backward = True
    local = [axis_trf(prober, finder, d, known_global=True) for d in range(prober.ndim)]
    if not all(e is not None for e in local):
        return _Trf(tile_dependent=True, culprits=culprits)
    return _Trf(
        tile_dependent=True,
        local_before=tuple(e[0] for e in local if e is not None),
        local_after=tuple(e[1] for e in local if e is not None),
        culprits=culprits,
    )


def _measure_alignment(prober: Prober, trf: _Trf) -> tuple[tuple[int, ...], bool | None]:
    """The alignment per axis and whether the model is shift-equivariant.

    Without a TRF to stay clear of, the alignment is the down-sampling factor and
    shift-equivariance is not measurable.
    """
    if trf.reach is None:
        return prober.downsampling, None
    before, after = trf.reach
    aligned = [shift_alignment(prober, d, before[d], after[d]) for d in range(prober.ndim)]
    alignment = tuple(
        a if a is not None else p for a, p in zip(aligned, prober.downsampling, strict=True)
    )
    return alignment, all(a is not None for a in aligned)


def _erf_shape(prober: Prober, erf_shape: int | Sequence[int] | None, trf: _Trf) -> tuple[int, ...]:
    """The ERF's input shape: given, the probe's only shape, or large enough for the TRF."""
    if erf_shape is not None:
        return as_per_axis(erf_shape, prober.ndim, "erf_shape")
    if prober.fixed:
        return prober.base
    if trf.reach is not None:
        # The centre voxel with its whole TRF: the ERF's mass is all inside.
        return tuple(
            round_up(2 * max(b, a) + 2, p)
            for b, a, p in zip(*trf.reach, prober.downsampling, strict=True)
        )
    default = 128 if prober.ndim <= 2 else 64
    return tuple(round_up(max(default, 4 * p), p) for p in prober.downsampling)


def _result(
    prober: Prober,
    trf: _Trf,
    alignment: tuple[int, ...],
    equivariant: bool | None,
    maps: ErfMaps,
) -> ReceptiveField:
    return ReceptiveField(
        ndim=prober.ndim,
        in_channels=prober.in_channels,
        trf_before=trf.before,
        trf_after=trf.after,
        alignment=tuple(int(a) for a in alignment),
        downsampling=prober.downsampling,
        shift_equivariant=equivariant,
        tile_dependent=trf.tile_dependent,
        culprits=trf.culprits,
        erf=maps.plain.astype(np.float32),
        erf_center=maps.center,
        verified=trf.verified,
        local_trf_before=trf.local_before,
        local_trf_after=trf.local_after,
        erf_local=None if maps.frozen is None else maps.frozen.astype(np.float32),
        out_channels=maps.out_channels,
    )


def _check_erf_inside_trf(rf: ReceptiveField) -> None:
    """The real model's gradient must vanish outside the (local) TRF of a shift-equivariant
    model; anything else is a bug of the probes."""
    if not rf.shift_equivariant:
        return
    if rf.trf_before is not None and rf.trf_after is not None:
        _check_inside(rf, rf.erf, rf.trf_before, rf.trf_after, "TRF")
    elif rf.erf_local is not None and rf.local_trf_before and rf.local_trf_after:
        _check_inside(rf, rf.erf_local, rf.local_trf_before, rf.local_trf_after, "local TRF")


def _check_inside(
    rf: ReceptiveField,
    erf: np.ndarray,
    before: Sequence[int],
    after: Sequence[int],
    what: str,
) -> None:
    support = erf > 0
    if not support.any():
        return
    for d in range(rf.ndim):
        lo, hi = extent(support, d)
        c = rf.erf_center[d]
        if c - lo > before[d] or hi - c > after[d]:
            raise ReceptiveFieldError(
                f"the model's gradient reaches {c - lo} voxels before / {hi - c} after the "
                f"centre along axis {rf.axes[d]}, beyond the measured {what} "
                f"({before[d]} / {after[d]}); please report this model"
            )
