"""Receptive fields of any model: TRF, ERF, alignment, tile dependence and the halo.

The halo is exact only when it covers the theoretical receptive field (TRF) and block
origins sit on the network's down-sampling grid (DESIGN.md §2). This package measures
both for any ``torch.nn.Module`` or TorchScript model, by probing it, not by reading
its configuration:

- The TRF is the support of the gradient of output voxels with respect to the input,
  on a positive float64 copy of the model (:mod:`.probe_model`) whose value-dependent
  zeros (max pooling's arg-max, dead activations) are made structural in the backward
  pass itself (:mod:`.structural`). Its support is then the set of input voxels
  connected to the output voxel in the computation graph, DESIGN.md's definition of
  the TRF. It is measured per axis on thin probes and checked by a full probe
  (:mod:`.trf`), as the maximum over one alignment cell.
- A model is *tile-dependent* when the TRF covers the whole input at two probe sizes.
  The layers to blame are probed one by one (:mod:`.culprits`, :mod:`.locality`); the
  TRF with the per-tile statistics held constant (:mod:`.frozen`) is the part of the
  dependence a halo can still capture.
- The alignment is the smallest input shift that shifts the output exactly along
  (:mod:`.alignment`).
- The ERF is the mean absolute gradient of the centre output voxel of the real model,
  with the radii that hold a given mass of it (:mod:`.erf`).

:func:`receptive_field` (:mod:`.measure`) runs the probes of :class:`.prober.Prober`
in that order and returns a :class:`ReceptiveField` (:mod:`.result`), which gives the
halo (:func:`recommend_halo`); :mod:`.figure` draws it.
"""

from .erf import MASSES, erf_levels, erf_mass_radius
from .figure import plot_receptive_field, receptive_field_figure
from .measure import receptive_field
from .result import Culprit, ReceptiveField, ReceptiveFieldError, recommend_halo

__all__ = [
    "MASSES",
    "Culprit",
    "ReceptiveField",
    "ReceptiveFieldError",
    "erf_levels",
    "erf_mass_radius",
    "plot_receptive_field",
    "receptive_field",
    "receptive_field_figure",
    "recommend_halo",
]
