"""Normalization layers: Batch Renormalization, its schedule, and a norm factory.

Tile-wise feature normalization (InstanceNorm, GroupNorm) makes every output pixel depend
on the whole tile, so tiled predictions cannot stitch seamlessly; BatchNorm is seamless
but its eval-mode statistics differ from the batch statistics it was trained with. Batch
Renormalization (Ioffe 2017) trains with the running statistics in the forward pass, so
training and inference normalize alike and tiles stitch exactly. See DESIGN.md §4.

* :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :class:`BatchRenorm3d`: the layer. Its
  state dict has the keys of ``torch.nn.BatchNorm*d`` (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``), so weights move between the
  two without renaming, and its eval output is exactly ``F.batch_norm``'s.
* :class:`RenormSchedule`: the r_max/d_max warm-up and ramp, applied by optimizer step.
* :func:`make_norm`, :func:`monai_norm`: norm layers by name (:data:`NORM_NAMES`), for
  plain PyTorch and for MONAI networks' ``norm=`` argument.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NormError

__all__ = [
    "NORM_NAMES",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
    "batchrenorm_layers",
    "group_count",
    "install_monai_hook",
    "make_norm",
    "monai_norm",
    "register_monai_norms",
]

NORM_NAMES: tuple[str, ...] = (
    "batch",
    "instance",
    "instance_running",
    "batchrenorm",
    "group",
    "identity",
)
"""Norm kinds known to :func:`make_norm`, :func:`monai_norm` and :func:`convert_norms`."""

#: Upper bound on the groups of ``group`` norms when ``num_groups`` is not given.
DEFAULT_MAX_GROUPS = 8

# Kinds whose eval output uses running statistics (and so need them to be meaningful).
_RUNNING_KINDS = frozenset({"batch", "instance_running", "batchrenorm"})


def check_norm_name(name: str) -> str:
    if name not in NORM_NAMES:
        raise NormError(f"unknown norm {name!r}; choose one of {', '.join(NORM_NAMES)}")
    return name


# ---------------------------------------------------------------------------------------
# Batch Renormalization
# ---------------------------------------------------------------------------------------


class _BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe 2017, Algorithm 1) over channel axis 1.

    Per channel, with μ_B and σ_B = sqrt(var_biased + eps) the statistics of the batch
    (over batch and spatial axes) and μ, σ the running ones::

        r = stopgrad(clip(σ_B / σ, 1/r_max, r_max))
        d = stopgrad(clip((μ_B - μ) / σ, -d_max, d_max))
        y = weight * ((x - μ_B) / σ_B * r + d) + bias
        μ ← μ + momentum (μ_B - μ);   σ ← σ + momentum (σ_B - σ)

    with r and d taken from the statistics before this step's update. In eval mode
    ``y = weight * (x - μ) / σ + bias``.

    The running σ is stored as ``running_var = σ² - eps`` (so σ = sqrt(running_var + eps),
    as in BatchNorm): eval mode is exactly ``F.batch_norm(x, running_mean, running_var,
    weight, bias, training=False, eps=eps)``, and conversion to and from BatchNorm copies
    the buffers unchanged. With ``r_max = 1`` and ``d_max = 0`` the training forward and
    its gradients are BatchNorm's; only the running-statistics update differs (σ, not the
    unbiased variance, is averaged).

    Parameters
    ----------
    num_features
        Channels C of inputs shaped (N, C, ...).
    eps
        Added to variances before the square root; must be > 0.
    momentum
        α of the running-statistics update, in (0, 1]; 0.01 as in Ioffe's paper.
    affine
        Learn a per-channel ``weight`` and ``bias``; with ``False`` none are registered.
    r_max, d_max
        Clipping bounds of r (≥ 1) and d (≥ 0). Plain attributes, changed between steps
        by :class:`RenormSchedule`; (1, 0) is plain BatchNorm.

    Attributes
    ----------
    freeze_statistics : bool
        When ``True``, training-mode forwards still renormalize but do not update the
        running statistics nor ``num_batches_tracked``.
    num_batches_tracked : torch.Tensor
        Buffer counting the running-statistics updates (training forwards while not
        frozen). With gradient accumulation it counts micro-batches; the r_max/d_max
        schedule counts optimizer steps instead (:class:`RenormSchedule`).
    """

    __constants__ = ("_input_dims", "_ndim")  # class attributes TorchScript must see
    _ndim = 0
    _input_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: float = 1.0,
        d_max: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise NormError(f"num_features must be a positive integer, got {num_features!r}")
        if not eps > 0:
            raise NormError(f"eps must be > 0 (it keeps σ away from zero), got {eps!r}")
        if not 0 < momentum <= 1:
            raise NormError(f"momentum must be in (0, 1], got {momentum!r}")
        _check_bounds(r_max, d_max)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.freeze_statistics = False
        # Declared here, not on the class: TorchScript cannot read postponed annotations.
        self.weight: torch.Tensor | None
        self.bias: torch.Tensor | None
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.num_batches_tracked: torch.Tensor
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def reset_running_stats(self) -> None:
        """Running mean 0, running σ² + eps = 1 + eps (BatchNorm's start), counter 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight 1, bias 0."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}"
        )

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._input_dims:
            raise ValueError(
                "BatchRenorm"
                + str(self._ndim)
                + "d expects (N, C, ...) inputs with "
                + str(self._ndim + 2)
                + " dimensions, got "
                + str(x.dim())
            )

    def renorm_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(r, d)`` for batch ``x`` against the current running statistics.

        Detached and in the dtype of the running statistics (float32 for reduced-precision
        inputs). Changes nothing.
        """
        mean_b, std_b = self._batch_stats(x)
        return self._factors(mean_b, std_b)

    def _batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            # Statistics of fp16/bf16 activations in float32: fp16 variances overflow
            # past 65504 and their rounding would leak into the running statistics.
            xs = x if x.dtype == self.running_mean.dtype else x.to(self.running_mean.dtype)
            # The native batch-norm kernel's statistics: on CPU about 3x faster than
            # torch.var_mean over (N, spatial) axes, which dominated the layer's cost.
            _, mean_b, invstd_b = torch.native_batch_norm(
                xs, None, None, None, None, True, 0.0, self.eps
            )
        return mean_b, invstd_b.reciprocal()

    def _factors(
        self, mean_b: torch.Tensor, std_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            std = (self.running_var + self.eps).sqrt()
            r = (std_b / std).clamp_(1.0 / self.r_max, self.r_max)
            d = ((mean_b - self.running_mean) / std).clamp_(-self.d_max, self.d_max)
        return r, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        mean_b, std_b = self._batch_stats(x)
        r, d = self._factors(mean_b, std_b)
        if not self.freeze_statistics:
            with torch.no_grad():
                self.running_mean.lerp_(mean_b, self.momentum)
                std = (self.running_var + self.eps).sqrt_()
                std.lerp_(std_b, self.momentum)
                # σ ≥ sqrt(eps) keeps σ² - eps ≥ 0 up to rounding, which the clamp absorbs.
                self.running_var.copy_(std.square_().sub_(self.eps).clamp_(min=0.0))
                self.num_batches_tracked.add_(1)
        # y = γ r x̂_B + (γ d + β): one native batch-norm call with the renormalization
        # folded into its affine parameters. r and d are constants, so autograd through
        # F.batch_norm gives exactly Ioffe's gradients (r times BatchNorm's) at native speed.
        weight = self.weight
        bias = self.bias
        if weight is not None and bias is not None:
            scale = weight * r
            shift = torch.addcmul(bias, weight, d)
        else:
            scale = r
            shift = d
        return F.batch_norm(x, None, None, scale, shift, True, 0.0, self.eps)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization of (N, C) or (N, C, L) inputs; see :class:`_BatchRenorm`."""

    _ndim = 1
    _input_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization of (N, C, H, W) inputs; see :class:`_BatchRenorm`."""

    _ndim = 2
    _input_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization of (N, C, D, H, W) inputs; see :class:`_BatchRenorm`."""

    _ndim = 3
    _input_dims = (5,)


_BATCHRENORM: dict[int, type[_BatchRenorm]] = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}


def _check_bounds(r_max: float, d_max: float) -> None:
    if not r_max >= 1:
        raise NormError(f"r_max must be ≥ 1 (1 means no renormalization), got {r_max!r}")
    if not d_max >= 0:
        raise NormError(f"d_max must be ≥ 0 (0 means no renormalization), got {d_max!r}")


def batchrenorm_layers(model: nn.Module) -> list[_BatchRenorm]:
    """Every BatchRenorm layer of ``model`` (including ``model`` itself)."""
    return [m for m in model.modules() if isinstance(m, _BatchRenorm)]


# ---------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------


class RenormSchedule:
    """r_max/d_max by optimizer step: BatchNorm warm-up, then linear ramps (DESIGN.md §4).

    ``(1, 0)`` for ``step < warmup_steps``; from there ``r_max`` and ``d_max`` grow
    linearly and reach their final values at ``step = warmup_steps + ramp_steps`` (at once
    when ``ramp_steps`` is 0), then stay.

    Count steps in optimizer steps, not in micro-batches of gradient accumulation: call
    :meth:`step` (or :meth:`apply` with the trainer's step) once per optimizer step. The
    last step applied is part of :meth:`state_dict`, so a resumed run continues the ramp.

    Parameters
    ----------
    warmup_steps
        Optimizer steps of plain BatchNorm.
    ramp_steps
        Optimizer steps of the linear ramp.
    r_max, d_max
        Final bounds (3 and 5 in Ioffe's paper).
    """

    def __init__(
        self, warmup_steps: int, ramp_steps: int, r_max: float = 3.0, d_max: float = 5.0
    ) -> None:
        for name, value in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
            if int(value) != value or value < 0:
                raise NormError(f"{name} must be a non-negative integer, got {value!r}")
        _check_bounds(r_max, d_max)
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        #: The last step given to :meth:`apply` (-1 before the first).
        self.last_step = -1

    def __repr__(self) -> str:
        return (
            f"RenormSchedule(warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, "
            f"r_max={self.r_max}, d_max={self.d_max})"
        )

    def values(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` at optimizer step ``step`` (0-based)."""
        if step < 0:
            raise NormError(f"schedule step must be ≥ 0, got {step}")
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.ramp_steps == 0 or step >= self.warmup_steps + self.ramp_steps:
            return self.r_max, self.d_max
        t = (step - self.warmup_steps) / self.ramp_steps
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def apply(self, model: nn.Module, step: int) -> tuple[float, float]:
        """Set ``r_max``/``d_max`` of every BatchRenorm layer of ``model`` for ``step``.

        Returns the values set. A model without BatchRenorm layers is left unchanged.
        """
        r_max, d_max = self.values(step)
        for layer in batchrenorm_layers(model):
            layer.r_max = r_max
            layer.d_max = d_max
        self.last_step = int(step)
        return r_max, d_max

    def step(self, model: nn.Module) -> tuple[float, float]:
        """Advance one optimizer step and :meth:`apply` it (the first call applies step 0)."""
        return self.apply(model, self.last_step + 1)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings and position, as plain Python values."""
        return {
            "warmup_steps": self.warmup_steps,
            "ramp_steps": self.ramp_steps,
            "r_max": self.r_max,
            "d_max": self.d_max,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"warmup_steps", "ramp_steps", "r_max", "d_max", "last_step"} - set(state)
        if missing:
            raise NormError(f"RenormSchedule state lacks {sorted(missing)}")
        other = RenormSchedule(
            state["warmup_steps"], state["ramp_steps"], state["r_max"], state["d_max"]
        )
        self.__dict__.update(other.__dict__)
        self.last_step = int(state["last_step"])


# ---------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------


def group_count(num_channels: int, max_groups: int = DEFAULT_MAX_GROUPS) -> int:
    """Groups of a ``group`` norm: the largest divisor of ``num_channels`` ≤ ``max_groups``.

    GroupNorm needs a group count that divides the channels; with this rule it does for
    every width (16 channels: 8 groups of 2; 12: 6 groups; 7: 7 groups; 1: 1 group).
    """
    if num_channels < 1 or max_groups < 1:
        raise NormError(
            f"group norm needs num_channels ≥ 1 and max_groups ≥ 1, got {num_channels}, "
            f"{max_groups}"
        )
    return max(g for g in range(1, min(num_channels, max_groups) + 1) if num_channels % g == 0)


def _group_norm(
    num_channels: int,
    num_groups: int | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    eps: float = 1e-5,
    affine: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.GroupNorm:
    if num_groups is None:
        num_groups = group_count(num_channels, max_groups)
    elif num_groups < 1 or num_channels % num_groups:
        raise NormError(
            f"num_groups={num_groups} does not divide the {num_channels} channels of a group "
            f"norm; leave num_groups out to use the largest divisor ≤ {max_groups}"
        )
    return nn.GroupNorm(
        num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype
    )


_BATCH: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE: dict[int, type[nn.Module]] = {
    1: nn.InstanceNorm1d,
    2: nn.InstanceNorm2d,
    3: nn.InstanceNorm3d,
}


def make_norm(name: str, num_features: int, ndim: int, **kwargs: Any) -> nn.Module:
    """A normalization layer by name.

    Parameters
    ----------
    name
        One of :data:`NORM_NAMES`:

        * ``batch``: ``nn.BatchNorm{ndim}d``.
        * ``instance``: ``nn.InstanceNorm{ndim}d(affine=True)``, statistics of each tile
          in training and inference (not seamless).
        * ``instance_running``: the same with ``track_running_stats=True``: tile
          statistics in training, running averages in inference (seamless in eval).
        * ``batchrenorm``: :class:`BatchRenorm1d`/``2d``/``3d``.
        * ``group``: ``nn.GroupNorm`` with ``num_groups`` (default: the largest divisor of
          ``num_features`` ≤ ``max_groups`` = 8, see :func:`group_count`); tile-wise.
        * ``identity``: ``nn.Identity`` (no feature normalization; kwargs are ignored).
    num_features
        Channels C.
    ndim
        Spatial dimensions: 1, 2 or 3.
    **kwargs
        Passed to the layer (``eps``, ``momentum``, ``affine``, ``r_max``, ...).
    """
    check_norm_name(name)
    if ndim not in (1, 2, 3):
        raise NormError(f"norm layers exist for ndim 1, 2 or 3, got ndim={ndim}")
    try:
        if name == "batch":
            return _BATCH[ndim](num_features, **kwargs)
        if name in ("instance", "instance_running"):
            kwargs.setdefault("affine", True)
            if name == "instance_running":
                kwargs.setdefault("track_running_stats", True)
            return _INSTANCE[ndim](num_features, **kwargs)
        if name == "batchrenorm":
            return _BATCHRENORM[ndim](num_features, **kwargs)
        if name == "group":
            return _group_norm(num_features, **kwargs)
    except TypeError as exc:
        raise NormError(f"invalid options {sorted(kwargs)} for a {name!r} norm: {exc}") from exc
    return nn.Identity()


# ---------------------------------------------------------------------------------------
# MONAI
# ---------------------------------------------------------------------------------------

_MONAI_FACTORIES = "monai.networks.layers.factories"
_MONAI_BATCHRENORM = "batchrenorm"
_MONAI_GROUP = "nahtlos_group"


def register_monai_norms() -> None:
    """Register ``batchrenorm`` and ``nahtlos_group`` with MONAI's ``Norm`` factory.

    Idempotent. Importing :mod:`nahtlos` does this as soon as MONAI's factories are
    imported, so ``monai.networks.nets.UNet(..., norm="batchrenorm")`` works.
    ``nahtlos_group`` builds ``nn.GroupNorm`` with a group count chosen per layer
    (:func:`group_count`), since MONAI passes one ``num_groups`` to every layer.
    """
    from monai.networks.layers.factories import Norm

    if _MONAI_BATCHRENORM.upper() not in Norm.components:
        Norm.add_factory_callable(
            _MONAI_BATCHRENORM,
            lambda dim=3: _BATCHRENORM[dim],
            "Batch Renormalization (nahtlos.BatchRenorm1d/2d/3d)",
        )
    if _MONAI_GROUP.upper() not in Norm.components:
        Norm.add_factory_callable(
            _MONAI_GROUP,
            lambda dim=None: _group_norm,
            "GroupNorm with the largest group count ≤ max_groups dividing the channels",
        )


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers nahtlos' norms right after MONAI's factory module is first imported.

    Importing MONAI takes seconds; this keeps ``import nahtlos`` (and the CLI) free of it
    while ``UNet(norm="batchrenorm")`` still works after ``import nahtlos``.
    """

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MONAI_FACTORIES or self._loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._loader is not None
        self._loader.exec_module(module)
        # Hand the module back to its real loader (for get_source, resources, reloads).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        _uninstall_hook()
        register_monai_norms()


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def install_monai_hook() -> None:
    """Register with MONAI now if it is imported, or right after it is."""
    if _MONAI_FACTORIES in sys.modules:
        register_monai_norms()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def monai_norm(name: str, **kwargs: Any) -> str | tuple[str, dict[str, Any]]:
    """What MONAI networks (``UNet``, ``BasicUNet``, ``UNETR``, ...) accept as ``norm=``.

    ``UNet(..., norm=monai_norm(name))`` (``norm_name=`` for ``UNETR``) builds the layers
    :func:`make_norm` would: ``instance`` and ``instance_running`` are affine;
    ``group`` is ``nahtlos_group``, whose group count is chosen per layer (pass
    ``num_groups`` to fix it; it must then divide every layer's channels); ``identity`` is
    ``""``, which MONAI's ``get_norm_layer`` turns into ``nn.Identity`` in every network
    (``None`` drops the layer in ``UNet``/``BasicUNet`` but breaks ``UNETR``).
    """
    check_norm_name(name)
    register_monai_norms()
    if name == "identity":
        return ""
    if name in ("instance", "instance_running"):
        kwargs.setdefault("affine", True)
        if name == "instance_running":
            kwargs.setdefault("track_running_stats", True)
        return ("instance", kwargs)
    monai_name = {"batch": "batch", "batchrenorm": _MONAI_BATCHRENORM, "group": _MONAI_GROUP}[name]
    return (monai_name, kwargs) if kwargs else monai_name


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------
