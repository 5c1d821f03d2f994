"""Memory model, block choice and automatic geometry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import make_unet
from nahtlos.engine.autoblock import (
    MemoryModel,
    auto_geometry,
    choose_block,
    forward_peak_memory,
    memory_model,
    parse_memory,
)
from nahtlos.errors import BlockShapeError
from nahtlos.nets.receptive_field import receptive_field


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8G", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000), (7, 7)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "G", "8 parsecs", "-1G", "0"])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


def test_forward_peak_memory_counts_live_activations():
    # conv -> relu -> conv -> relu -> conv: at most two 8-channel maps live at once.
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 1, 3, padding=1),
    ).eval()
    for window in ((32, 32), (64, 48)):
        voxels = math.prod(window)
        peak = forward_peak_memory(net, 1, window)
        assert peak == pytest.approx((1 + 16) * voxels * 4, rel=0.02)
        assert forward_peak_memory(net, 1, window, batch_size=3) == pytest.approx(
            3 * peak, rel=0.02
        )


def test_memory_model_predicts_other_windows():
    net = make_unet(3, 2, norm="batch")
    mm = memory_model(net, 3, 1, 4)
    assert mm.out_channels == 2 and mm.per_voxel > 0
    for window in ((40, 40, 40), (24, 64, 32)):
        measured = forward_peak_memory(net, 1, window)
        assert mm.forward_bytes(window) == pytest.approx(measured, rel=0.1)


@settings(max_examples=50, deadline=None)
@given(
    fixed=st.floats(0, 1e6),
    per_voxel=st.floats(1, 1e3),
    halo=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    alignment=st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8])),
    image=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    budget=st.floats(1e5, 1e10),
)
def test_choose_block_is_the_largest_that_fits(fixed, per_voxel, halo, alignment, image, budget):
    mm = MemoryModel(fixed, per_voxel, in_channels=1, out_channels=2, batch_size=1)

    def need(block):
        return mm.total_bytes(tuple(b + 2 * h for b, h in zip(block, halo, strict=True)))

    limits = tuple(-(-n // a) * a for n, a in zip(image, alignment, strict=True))
    try:
        block = choose_block(mm, 2, 1, halo, alignment, int(budget), image)
    except BlockShapeError as exc:
        assert need(alignment) > budget and "memory budget" in str(exc)
        return
    assert need(block) <= budget
    assert all(b % a == 0 and b <= m for b, a, m in zip(block, alignment, limits, strict=True))
    # One more alignment step on an axis that can still grow would not fit.
    edge = max(block)
    bigger = tuple(min(-(-(edge + 1) // a) * a, m) for a, m in zip(alignment, limits, strict=True))
    assert bigger == block or need(bigger) > budget


def test_auto_geometry_uses_receptive_field_and_memory():
    net = make_unet(2, 2, norm="batch")
    rf = receptive_field(net, 2)
    geo = auto_geometry(net, 2, 1, (500, 700), max_memory=2_000_000)
    assert geo.halo == rf.halo() and geo.alignment == rf.alignment
    assert set(geo.chosen) == {"block", "halo", "alignment"}
    assert geo.estimated_bytes is not None and geo.estimated_bytes <= 2_000_000
    assert all(b % a == 0 for b, a in zip(geo.block, geo.alignment, strict=True))
    assert "TRF radius" in geo.describe()
    given_all = auto_geometry(net, 2, 1, (50, 70), block=16, halo=12, alignment=4)
    assert given_all.chosen == () and given_all.receptive_field is None
    assert given_all.block == (16, 16)
    with pytest.raises(BlockShapeError, match="spatial axes"):
        auto_geometry(net, 2, 1, (5, 6, 7), block=16, halo=12, alignment=4)


def test_auto_geometry_reuses_the_probes_forward_passes():
    # Measured apart, the receptive field runs the model (the ERF's passes) and the
    # memory model runs it three times: once for the output channels, once per peak
    # window. auto_geometry takes the output channels from the probe: one pass fewer,
    # and the only inference passes left are the two peak windows.
    net = make_unet(2, 2, norm="batch")
    calls: list[tuple[bool, tuple[int, ...]]] = []

    def count(module, args, output):
        if module is net:  # the probe's copies carry the hook too
            calls.append((torch.is_inference_mode_enabled(), tuple(args[0].shape[2:])))

    net.register_forward_hook(count)
    rf = receptive_field(net, 2)
    probe_calls = len(calls)
    assert probe_calls > 0 and rf.out_channels == 2
    apart = memory_model(net, 2, 1, rf.alignment)
    assert calls[probe_calls:] == [(True, (24, 24)), (True, (24, 24)), (True, (48, 48))]
    before = len(calls)
    calls.clear()
    geo = auto_geometry(net, 2, 1, (500, 700), max_memory=2_000_000)
    assert len(calls) == before - 1
    assert [c for c in calls if c[0]] == [(True, (24, 24)), (True, (48, 48))]
    # The same memory model, so the same block.
    assert geo.memory == apart
    assert geo.block == choose_block(apart, 2, 1, geo.halo, geo.alignment, 2_000_000, (500, 700))


def test_peak_memory_ignores_model_grad_state():
    net = make_unet(2, 1)
    before = [p.requires_grad for p in net.parameters()]
    forward_peak_memory(net, 1, (32, 32))
    assert [p.requires_grad for p in net.parameters()] == before
    assert all(p.grad is None for p in net.parameters())
    assert not torch.is_inference_mode_enabled()
