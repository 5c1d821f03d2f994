"""The verdict's rules: the cause named for seams, the disparity level, the headline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nahtlos.analysis.layers import BATCH, TILEWISE
from nahtlos.analysis.metrics import TileMismatch, TrainEvalDisparity
from nahtlos.analysis.results import SweepPoint
from nahtlos.analysis.verdict import Evidence, conclude, disparity_level
from nahtlos.io import InputNormalization


def _rf(tile_dependent=False, shift_equivariant=True, trf=(4, 4)):
    return SimpleNamespace(
        tile_dependent=tile_dependent,
        shift_equivariant=shift_equivariant,
        trf_radius=trf,
        culprits=[SimpleNamespace(name="attn", type="Attention")] if tile_dependent else [],
        reason=lambda: "a position embedding",
        halo=lambda mass: (16, 16),
    )


def _evidence(seamless=False, per_channel=(0.0, 0.0), **kw):
    base = {
        "model_kind": "module",
        "mismatch": TileMismatch(0.0 if seamless else 0.3, [0.0, 0.1], 1e-5),
        "seam": {"seamless": seamless, "max_difference": 0.0 if seamless else 0.2},
        "disparity": TrainEvalDisparity(None if per_channel is None else list(per_channel)),
        "rf": None,
        "layers": [],
        "norm": None,
        "halo": (8, 8),
        "halo_source": "argument",
        "alignment": (4, 4),
        "erf_mass": 0.99,
        "dice": None,
        "sweep": [SweepPoint(64, (64, 64), (80, 80), 1, 0.0, [1.0, 1.0], None, 0.1)],
        "channel_names": ["a", "b"],
    }
    return Evidence(**{**base, **kw})


IN = {"type": "InstanceNorm2d", "count": 4, "statistics": TILEWISE, "names": []}
BN = {"type": "BatchNorm2d", "count": 2, "statistics": BATCH, "names": []}


@pytest.mark.parametrize(
    ("evidence", "cause"),
    [
        (_evidence(layers=[IN]), "normalization with the statistics of each tile"),
        (_evidence(rf=_rf(tile_dependent=True)), "layers that mix the whole tile"),
        (_evidence(norm=InputNormalization("tilewise")), "tile-wise input normalization"),
        (_evidence(rf=_rf(shift_equivariant=False)), "position-dependent layers"),
        (_evidence(rf=_rf(trf=(20, 20))), "a halo smaller than the receptive field"),
    ],
)
def test_the_first_cause_that_applies_is_named(evidence, cause):
    v = conclude(evidence)
    assert not v.seamless
    assert (
        v.headline
        == f"Not seamless: the prediction depends on how the image is tiled, because of {cause}."
    )


def test_no_known_cause_points_to_the_receptive_field():
    v = conclude(_evidence(rf=_rf()))
    assert v.headline.endswith("tiled.") and "`nahtlos rf MODEL`" in v.actions[-1]


@pytest.mark.parametrize(
    ("per_channel", "level"),
    [
        ((0.0, 0.0), "none"),
        ((0.01, 0.0), "small"),
        ((0.3, 0.1), "substantial"),
        (None, "not measurable"),
    ],
)
def test_disparity_levels(per_channel, level):
    ev = _evidence(seamless=True, per_channel=per_channel, layers=[BN])
    assert disparity_level(ev.disparity) == level
    v = conclude(ev)
    assert v.disparity == level and v.seamless
    if level == "substantial":
        assert "BatchRenorm" in v.actions[0] and "BatchNorm2d" in v.actions[0]
    if level == "not measurable":
        assert "not measurable" in v.headline and "torch.jit.script" in v.actions[0]
