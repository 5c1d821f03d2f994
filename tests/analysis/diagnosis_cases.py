"""Models and images shared by the diagnosis tests (tests/analysis).

A 2-level UNet sees 12 voxels around every output voxel (kernel 3), so ``HALO`` and
``ALIGN`` make tiles stitch exactly when the normalization allows it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from conftest import make_unet
from nahtlos.analysis.diagnose import diagnose
from nahtlos.analysis.results import DiagnosisReport

HALO, ALIGN = 12, 4  # covers the TRF of the 2-level test UNets (kernel 3)


def noisy_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform noise, four times brighter in the left third: tiles differ in statistics."""
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    img[..., : shape[-1] // 3] *= 4  # heterogeneous: tiles differ in statistics
    return img


def bn_with_bad_statistics(seed: int = 3) -> torch.nn.Module:
    """A BatchNorm UNet whose running statistics fit no image: eval differs from train."""
    net = make_unet(2, 2, norm="batch", seed=seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.05)
    return net


def identity_net() -> torch.nn.Module:
    """The BatchNorm UNet without normalization layers."""
    net = make_unet(2, 2, norm="batch")
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())
    return net


def run_diagnosis(model: Any, image: Any, **kw: Any) -> DiagnosisReport:
    """``diagnose`` with the test halo, quietly, without figures or receptive field
    unless asked for."""
    kw.setdefault("halo", HALO)
    kw.setdefault("alignment", ALIGN)
    kw.setdefault("progress", False)
    kw.setdefault("make_figures", False)
    kw.setdefault("receptive_field", False)  # measured where a test needs it
    return diagnose(model, image, **kw)
