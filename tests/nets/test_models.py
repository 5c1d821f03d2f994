from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from nahtlos.nets.models import build_model, model_alignment, unetr_halo
from nahtlos.nets.norms import BatchRenorm2d
from nahtlos.nets.receptive_field import receptive_field
from nahtlos.testing import assert_blockwise_equal
from nahtlos.training.config import validate_config
from nahtlos.training.loop import prediction_metadata

NORM_TYPES = {
    "batch": torch.nn.BatchNorm2d,
    "instance": torch.nn.InstanceNorm2d,
    "instance_running": torch.nn.InstanceNorm2d,
    "group": torch.nn.GroupNorm,
    "batchrenorm": BatchRenorm2d,
}
ALL_NORMS = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    BatchRenorm2d,
)


def _feature_norms(model):
    return [m for m in model.modules() if isinstance(m, ALL_NORMS)]


@pytest.mark.parametrize("norm", [*NORM_TYPES, "identity"])
def test_unet_with_each_norm(norm):
    torch.manual_seed(0)
    net = build_model("unet", 2, 2, 3, norm, channels=(8, 16, 32), strides=(2, 2))
    y = net(torch.rand(2, 2, 32, 48))
    assert y.shape == (2, 3, 32, 48)
    layers = _feature_norms(net)
    if norm == "identity":
        assert layers == []
        return
    assert layers and all(type(m) is NORM_TYPES[norm] for m in layers)
    if norm in ("batch", "instance_running", "batchrenorm"):
        # the paper's momentum for every running average
        assert all(m.momentum == 0.01 for m in layers)
        assert all(getattr(m, "track_running_stats", True) for m in layers)
    if norm == "group":
        assert all(m.num_groups == 8 for m in layers)


def test_paper_defaults():
    net = build_model("unet", 3, 1, 3, "batch")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    widths = sorted({m.out_channels for m in convs})
    assert {32, 64, 128} <= set(widths)
    assert model_alignment("unet", (2, 2)) == 4 and model_alignment("unetr") == 16


def test_unetr_small_2d_with_replaced_decoder_norm():
    torch.manual_seed(0)
    net = build_model(
        "unetr",
        2,
        1,
        3,
        "batchrenorm",
        img_size=(64, 64),
        feature_size=8,
        hidden_size=32,
        mlp_dim=64,
        num_heads=2,
    )
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 3, 64, 64)
    kinds = {type(m) for m in _feature_norms(net)}
    # decoder norms replaced; the ViT keeps its LayerNorm (as in the paper)
    assert BatchRenorm2d in kinds and torch.nn.LayerNorm in kinds
    assert torch.nn.InstanceNorm2d not in kinds
    assert unetr_halo((64, 96)) == (16, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("unetr", 2, 1, 3, "batch", img_size=(40, 64), hidden_size=32, num_heads=2)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model("resnet", 2, 1, 3, "batch")
    with pytest.raises(ValueError, match="strides"):
        build_model("unet", 2, 1, 3, "batch", channels=(8, 16), strides=(2, 2))


def _analytic_unet_radius(
    strides: Sequence[int], kernel_size: int = 3, num_res_units: int = 0
) -> int:
    """Theoretical receptive-field radius (input pixels, per side) of a MONAI ``UNet``, by hand.

    Exact, by construction of MONAI's U-Net: with same-size padding ``p = k // 2``,
    a stride-1 convolution at a level whose pixels are ``J`` input pixels apart reaches
    ``p * J``; a strided convolution or transposed convolution between levels ``J``
    and ``s * J`` reaches ``p * J`` (the finer side), and the coarse pixel ``q`` sits
    exactly on fine pixel ``s * q``, so no grid offset adds to it. The deepest path
    (all down-sampling layers, the bottom, all up-sampling layers) is the longest;
    skip connections only add shorter paths; residual projections never reach
    further than the convolutions beside them. A down layer is one strided
    convolution (``num_res_units = 0``) or a residual unit of ``num_res_units``
    convolutions, the first strided; the bottom is one convolution or a unit of
    ``num_res_units``; an up layer is a transposed convolution, followed by a one-
    convolution residual unit when ``num_res_units > 0``.
    """
    p = kernel_size // 2
    jumps = [1]
    for s in strides:
        jumps.append(jumps[-1] * int(s))
    radius = 0
    for level in range(len(strides)):
        fine, coarse = jumps[level], jumps[level + 1]
        radius += p * fine + max(num_res_units - 1, 0) * p * coarse  # down
        radius += p * fine + (p * fine if num_res_units > 0 else 0)  # up
    radius += max(num_res_units, 1) * p * jumps[-1]  # bottom
    return radius


def _measured_trf_radius(net, ndim, align, n=96):
    """Largest distance from an output pixel to an input pixel in its computation graph.

    All weights positive and a positive input keep every ReLU/PReLU active, so that the
    gradient is non-zero exactly on the graph; every offset modulo the alignment is probed.
    """
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1.0)
    radius = 0
    for o in range(align):
        x = torch.ones(1, 1, *(n,) * ndim, dtype=torch.float64, requires_grad=True)
        c = n // 2 + o
        net(x)[(0, 0, *(c,) * ndim)].backward()
        idx = np.nonzero(x.grad[0, 0].numpy())
        radius = max(radius, *(max(c - i.min(), i.max() - c) for i in idx))
    return int(radius)


@pytest.mark.parametrize(
    ("strides", "res"), [((2, 2), 0), ((2, 2), 2), ((2, 2, 2), 1), ((3, 2), 0), ((2,), 3)]
)
def test_unet_halo_rule_matches_gradient_support_and_receptive_field(strides, res):
    torch.manual_seed(0)
    net = build_model(
        "unet",
        2,
        1,
        1,
        "batch",
        channels=(2,) * (len(strides) + 1),
        strides=strides,
        num_res_units=res,
    )
    want = _analytic_unet_radius(strides, 3, res)
    assert receptive_field(net, 2, 1).trf_radius == (want, want)
    align = int(np.prod(strides))
    n = -(-(2 * want + 2 * align) // align) * align
    assert _measured_trf_radius(net, 2, align, n=n) == want


def test_checkpoint_halo_makes_stitching_exact(rng):
    cfg = validate_config(
        {
            "data": {"train": [{"image": "i.tif", "labels": "l.tif"}], "patch": [32, 32]},
            "model": {"ndim": 2, "norm": "batch", "channels": [4, 8, 8], "num_res_units": 1},
        }
    )
    torch_rng = torch.get_rng_state()
    meta = prediction_metadata(cfg)  # builds and probes a network ...
    assert torch.equal(torch_rng, torch.get_rng_state())  # ... without moving the training RNG
    assert meta["halo"] == [16, 16] and meta["alignment"] == [4, 4]  # radius 13 -> 16
    assert not meta["tile_dependent"]
    torch.manual_seed(1)
    net = build_model("unet", 2, 1, 3, "batch", channels=(4, 8, 8), num_res_units=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    image = rng.random((1, 52, 61)).astype(np.float32)
    assert_blockwise_equal(net.eval(), image, [(16, 16), (24, 32)], meta["halo"], 4, ndim=2)
