"""The measured receptive field of a model, and the halo it recommends.

:class:`ReceptiveField` holds what :func:`~nahtlos.nets.receptive_field.receptive_field`
measured (TRF, alignment, tile dependence, culprit layers, ERF) and derives from it the
halo, a JSON summary and a human-readable report; :func:`recommend_halo` gives the
halo for block-wise prediction and warns when no halo is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...axes import axis_names, round_up
from ...errors import NahtlosError, NahtlosWarning
from .erf import MASSES, erf_mass_radius

__all__ = ["Culprit", "ReceptiveField", "ReceptiveFieldError", "recommend_halo"]


class ReceptiveFieldError(NahtlosError, RuntimeError):
    """The receptive field of a model could not be measured."""


@dataclass(frozen=True)
class Culprit:
    """A layer that makes every output depend on its whole input (the tile).

    Attributes
    ----------
    name
        Qualified module name inside the model (``"model.0.adn.N"``), or ``"(model)"``
        when the mixing happens in the model's own ``forward``.
    type
        The layer's class name (``"InstanceNorm3d"``, ``"SABlock"``, ...).
    """

    name: str
    type: str

    def __str__(self) -> str:
        return f"{self.name} ({self.type})"


@dataclass
class ReceptiveField:
    """The receptive field of a model, as measured by :func:`~nahtlos.nets.receptive_field.receptive_field`.

    Attributes
    ----------
    ndim
        Number of spatial axes.
    in_channels
        Input channels the model was probed with.
    trf_before, trf_after
        Per axis, how many voxels before and after an output voxel its TRF reaches,
        the maximum over one alignment cell; ``None`` for tile-dependent models, whose
        TRF is the whole tile.
    alignment
        Per axis, the smallest input shift under which the output shifts exactly
        along (verified by shifting); for tile-dependent or non shift-equivariant
        models, the down-sampling factor.
    downsampling
        Per axis, the total down-sampling factor observed in the feature maps.
    shift_equivariant
        Whether shifting the input by the alignment shifts the output exactly;
        ``False`` for models with absolute positional information (e.g. learned
        position embeddings), ``None`` where not measurable (tile-dependent models).
    tile_dependent
        Whether the TRF covers the whole input, whatever its size.
    culprits
        The innermost layers that mix the whole tile (empty for tile-independent
        models).
    erf
        Mean absolute gradient of the centre output voxel w.r.t. the input, summed
        over input channels, shape ``erf_shape``.
    erf_center
        Index of the centre output voxel in ``erf``.
    verified
        Whether a full (not thin) probe confirmed the per-axis TRF.
    local_trf_before, local_trf_after
        Tile-dependent models only: the TRF with the statistics of per-tile
        normalization (InstanceNorm, GroupNorm, LayerNorm, BatchNorm in training
        mode) held constant, i.e. the part of the dependence a halo can capture
        (the paper's halo for its InstanceNorm U-Net); ``None`` if the model stays
        global even then (attention, global pooling).
    erf_local
        Tile-dependent models only: the ERF with the per-tile statistics held
        constant. The gradient through the statistics spreads over the whole tile,
        so the plain ERF's mass radius grows with the tile; this one does not.
    out_channels
        Output channels of the model, seen in the ERF's forward passes (``None`` if
        none ran); lets the block search skip a forward pass of its own.
    """

    ndim: int
    in_channels: int
    trf_before: tuple[int, ...] | None
    trf_after: tuple[int, ...] | None
    alignment: tuple[int, ...]
    downsampling: tuple[int, ...]
    shift_equivariant: bool | None
    tile_dependent: bool
    culprits: tuple[Culprit, ...]
    erf: np.ndarray = field(repr=False)
    erf_center: tuple[int, ...]
    verified: bool = False
    local_trf_before: tuple[int, ...] | None = None
    local_trf_after: tuple[int, ...] | None = None
    erf_local: np.ndarray | None = field(default=None, repr=False)
    out_channels: int | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """Axis names, ``("Z", "Y", "X")`` or ``("Y", "X")``."""
        return axis_names(self.ndim)

    @property
    def erf_shape(self) -> tuple[int, ...]:
        """Shape of the input the ERF was measured on."""
        return tuple(int(s) for s in self.erf.shape)

    @property
    def trf_radius(self) -> tuple[int, ...] | None:
        """Per axis, the larger of ``trf_before`` and ``trf_after``; ``None`` if tile-dependent."""
        if self.trf_before is None or self.trf_after is None:
            return None
        return tuple(max(b, a) for b, a in zip(self.trf_before, self.trf_after, strict=True))

    @property
    def local_trf_radius(self) -> tuple[int, ...] | None:
        """Per axis, the larger of ``local_trf_before`` and ``local_trf_after``."""
        if self.local_trf_before is None or self.local_trf_after is None:
            return None
        return tuple(
            max(b, a) for b, a in zip(self.local_trf_before, self.local_trf_after, strict=True)
        )

    def erf_radius(self, mass: float = 0.99, *, full: bool = False) -> tuple[int, ...]:
        """Per axis, the smallest radius around the centre that holds ``mass`` of the ERF.

        For tile-dependent models this is the radius of ``erf_local`` (the part of
        the ERF a halo can capture) unless ``full``.

        Raises
        ------
        ValueError
            If ``mass`` is not in (0, 1].
        """
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass {mass} must lie in (0, 1], e.g. 0.99")
        erf = self.erf if full or self.erf_local is None else self.erf_local
        return erf_mass_radius(erf, self.erf_center, mass)

    @property
    def erf_radii(self) -> dict[float, tuple[int, ...]]:
        """ERF radius per axis at each mass of :data:`MASSES`."""
        return {m: self.erf_radius(m) for m in MASSES}

    @property
    def exact(self) -> bool:
        """Whether a finite halo makes block-wise prediction exact for this model."""
        return not self.tile_dependent and self.shift_equivariant is True

    def halo(self, mass: float = 0.99) -> tuple[int, ...]:
        """The halo :func:`recommend_halo` gives, without its warning."""
        radius = self.trf_radius if self.exact and self.trf_radius is not None else None
        if radius is None:
            radius = self.erf_radius(mass)
        return tuple(round_up(r, a) for r, a in zip(radius, self.alignment, strict=True))

    def reason(self) -> str:
        """Why exact stitching is impossible (empty for exact models)."""
        if self.tile_dependent:
            if not self.culprits:
                return "its TRF is the whole tile (no single layer found responsible)"
            shown = ", ".join(str(c) for c in self.culprits[:3])
            more = len(self.culprits) - 3
            if more > 0:
                kinds = ", ".join(sorted({c.type for c in self.culprits}))
                shown += f" and {more} more ({kinds})"
            return f"its TRF is the whole tile, through {shown}"
        if self.shift_equivariant is False:
            return (
                "its output is not shift-equivariant (it depends on the position inside the "
                "tile, e.g. through position embeddings)"
            )
        return ""

    def to_dict(self, mass: float = 0.99) -> dict[str, Any]:
        """A JSON-ready summary (the ERF map itself is left out)."""
        return {
            "ndim": self.ndim,
            "axes": list(self.axes),
            "in_channels": self.in_channels,
            "trf_radius": _list(self.trf_radius),
            "trf_before": _list(self.trf_before),
            "trf_after": _list(self.trf_after),
            "local_trf_radius": _list(self.local_trf_radius),
            "alignment": list(self.alignment),
            "downsampling": list(self.downsampling),
            "shift_equivariant": self.shift_equivariant,
            "tile_dependent": self.tile_dependent,
            "culprits": [{"name": c.name, "type": c.type} for c in self.culprits],
            "erf_mass": mass,
            "erf_radius": list(self.erf_radius(mass)),
            "erf_radii": {str(m): list(r) for m, r in self.erf_radii.items()},
            "erf_radius_full": list(self.erf_radius(mass, full=True)),
            "erf_shape": list(self.erf_shape),
            "halo": list(self.halo(mass)),
            "exact": self.exact,
            "verified": self.verified,
        }

    def summary(self, mass: float = 0.99) -> str:
        """A short human-readable report, one item per line."""
        axes = ",".join(self.axes)

        def fmt(v: Sequence[int] | None) -> str:
            return "whole tile" if v is None else ",".join(str(int(x)) for x in v)

        lines = [f"axes                {axes}"]
        if self.trf_before is not None and self.trf_after is not None:
            lines.append(f"TRF radius          {fmt(self.trf_radius)}")
            lines.append(f"TRF before / after  {fmt(self.trf_before)} / {fmt(self.trf_after)}")
        else:
            lines.append("TRF radius          whole tile")
            local = self.local_trf_radius
            lines.append(
                "local TRF radius    "
                + (
                    fmt(local) + "  (tile statistics held constant)"
                    if local
                    else "none (still global)"
                )
            )
        lines.append(f"alignment           {fmt(self.alignment)}")
        eq = {True: "yes", False: "NO", None: "not measurable"}[self.shift_equivariant]
        lines.append(f"shift-equivariant   {eq}")
        td = "YES" if self.tile_dependent else "no"
        lines.append(f"tile-dependent      {td}")
        if self.culprits:
            lines.append("culprit layers      " + "; ".join(str(c) for c in self.culprits))
        for m, r in self.erf_radii.items():
            lines.append(f"ERF radius {m * 100:g}%".ljust(20) + fmt(r))
        if self.erf_local is not None:
            lines.append(
                "                    (tile statistics held constant; with them: "
                + fmt(self.erf_radius(mass, full=True))
                + f" at {mass * 100:g}%)"
            )
        rule = "TRF" if self.exact else f"ERF {mass * 100:g}%"
        lines.append(
            f"recommended halo    {fmt(self.halo(mass))}  ({rule}, rounded up to alignment)"
        )
        if not self.exact:
            lines.append(f"exact stitching     impossible: {self.reason()}")
        return "\n".join(lines)


def recommend_halo(rf: ReceptiveField, mass: float = 0.99, *, warn: bool = True) -> tuple[int, ...]:
    """The halo for block-wise prediction with the model measured by ``rf``.

    For a tile-independent, shift-equivariant model: the TRF radius rounded up to the
    alignment, which makes block-wise prediction exactly equal to the whole-image
    prediction. Otherwise no halo is exact; the ERF radius at ``mass`` (rounded up to
    the alignment) is returned with a :class:`~nahtlos.errors.NahtlosWarning` that
    names the layers to blame.

    Parameters
    ----------
    rf
        The result of :func:`~nahtlos.nets.receptive_field.receptive_field`.
    mass
        ERF mass for models without an exact halo.
    warn
        Emit the warning for models without an exact halo.
    """
    halo = rf.halo(mass)
    if warn and not rf.exact:
        warnings.warn(
            f"exact stitching is impossible for this model: {rf.reason()}. The halo "
            f"{halo} covers {mass * 100:g}% of the effective receptive field (ERF); "
            "block-wise predictions will differ slightly between tile sizes",
            NahtlosWarning,
            stacklevel=2,
        )
    return halo


def _list(v: Sequence[int] | None) -> list[int] | None:
    return None if v is None else [int(x) for x in v]
