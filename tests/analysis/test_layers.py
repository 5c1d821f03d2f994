"""Normalization layers read from the module tree, and train/eval mode frozen by tracing."""

from __future__ import annotations

import warnings

import torch
from diagnosis_cases import bn_with_bad_statistics

from conftest import make_unet
from nahtlos.analysis.layers import mode_frozen, normalization_layers


def test_normalization_layers_of_scripted_models():
    net = make_unet(2, 2, norm="instance")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
    for model in (net, scripted):
        (layers,) = normalization_layers(model)
        assert layers["type"] == "InstanceNorm2d" and layers["count"] == 4
        assert "tile-wise" in layers["statistics"]


def test_tracing_freezes_the_batchnorm_mode_scripting_does_not():
    net = bn_with_bad_statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
        scripted = torch.jit.script(net)
    assert mode_frozen(traced) and not mode_frozen(scripted)
    assert not mode_frozen(net)
