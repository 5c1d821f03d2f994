from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import make_unet
from nahtlos.analysis.metrics import dice, dice_per_channel, tile_mismatch, train_eval_disparity
from nahtlos.errors import BlockShapeError
from nahtlos.io import InputNormalization
from nahtlos.nets.state import measuring_mode

masks = hnp.arrays(bool, st.tuples(st.integers(1, 6), st.integers(1, 6)))


@settings(max_examples=80, deadline=None)
@given(a=masks, seed=st.integers(0, 1000))
def test_dice_matches_set_definition(a, seed):
    b = np.random.default_rng(seed).random(a.shape) > 0.5
    sa = {tuple(i) for i in np.argwhere(a)}
    sb = {tuple(i) for i in np.argwhere(b)}
    expected = 1.0 if not sa and not sb else 2 * len(sa & sb) / (len(sa) + len(sb))
    assert dice(a, b) == pytest.approx(expected)
    assert dice(a, b) == dice(b, a)
    assert dice(a, a) == 1.0


def test_dice_per_channel_skips_empty_ground_truth():
    pred = np.array([[1, 0], [1, 1], [0, 0]], bool)
    true = np.array([[1, 1], [0, 0], [0, 0]], bool)
    assert dice_per_channel(pred, true, skip_empty_target=True) == [
        pytest.approx(2 / 3),
        None,
        None,
    ]
    assert dice_per_channel(pred, true) == [pytest.approx(2 / 3), 0.0, 1.0]


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    img[..., : shape[-1] // 3] *= 4  # heterogeneous: tiles differ in statistics
    return img


def test_identity_model_has_no_mismatch_so_subtiles_are_aligned():
    # any misalignment of the compared regions would show on a random image
    res = tile_mismatch(
        torch.nn.Identity(), _image((70, 90)), window=(40, 64), halo=0, stride=16, activation="none"
    )
    assert res.indicator == 0.0 and res.seamless and res.label() == "no"
    assert len(res.windows) > 4


@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_eval_is_seamless_instancenorm_is_not(ndim):
    shape = (96, 96) if ndim == 2 else (32, 48, 64)
    window = (64, 64) if ndim == 2 else (32, 48, 64)
    image = _image(shape)
    bn = make_unet(ndim, 2, norm="batch")
    res = tile_mismatch(bn, image, window=window, halo=12, alignment=4, stride=32)
    assert res.indicator <= 1e-5 and res.label() == "no"
    inorm = make_unet(ndim, 2, norm="instance")
    res = tile_mismatch(inorm, image, window=window, halo=12, alignment=4, stride=32)
    assert res.indicator > 1e-3 and not res.seamless
    assert len(res.per_channel) == 2 and all(0 <= v <= 1 for v in res.per_channel)


def test_tilewise_input_normalization_causes_mismatch():
    bn = make_unet(2, 2, norm="batch")
    image = _image((96, 96)) * np.linspace(0.1, 10, 96, dtype=np.float32)  # illumination ramp
    res = tile_mismatch(
        bn,
        image,
        window=64,
        halo=12,
        alignment=4,
        stride=32,
        input_transform=InputNormalization("tilewise"),
    )
    assert res.indicator > 1e-3
    glob = InputNormalization("global").fit(image[None], channel_axis=0)
    assert tile_mismatch(
        bn, image, window=64, halo=12, alignment=4, stride=32, input_transform=glob
    ).seamless


def test_window_too_small_or_too_large():
    with pytest.raises(BlockShapeError, match="too small for halo"):
        tile_mismatch(torch.nn.Identity(), _image((64, 64)), window=16, halo=8)
    with pytest.raises(BlockShapeError, match="does not fit"):
        tile_mismatch(torch.nn.Identity(), _image((32, 64)), window=48, halo=0)


def _bn_with_bad_statistics():
    net = make_unet(2, 2, norm="batch", seed=3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.05)
    return net


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def test_disparity_batchnorm_vs_instance_and_identity():
    image = _image((64, 64))
    bn = _bn_with_bad_statistics()
    d = train_eval_disparity(bn, image, block=32, halo=12, alignment=4)
    assert max(d.per_channel) > 0.05
    for norm in ("instance", None):
        net = make_unet(2, 2, norm=norm or "batch")
        if norm is None:
            for module in list(net.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.BatchNorm2d):
                        setattr(module, name, torch.nn.Identity())
        d = train_eval_disparity(net, image, block=32, halo=12, alignment=4)
        assert d.per_channel == [0.0, 0.0] and d.mean == 0.0


def test_measuring_leaves_model_bit_identical_and_modes_restored():
    net = _bn_with_bad_statistics()
    net.train()
    dropout = torch.nn.Dropout(0.5)
    model = torch.nn.Sequential(net, dropout)
    model[0].model[0].eval()  # a submodule in a different mode than its parent
    before_state, before_modes = _snapshot(model)
    image = _image((64, 64))
    train_eval_disparity(model, image, block=32, halo=12, alignment=4)
    tile_mismatch(model, image, window=64, halo=12, alignment=4)
    after_state, after_modes = _snapshot(model)
    assert before_modes == after_modes
    assert before_state.keys() == after_state.keys()
    for k in before_state:
        assert torch.equal(before_state[k], after_state[k]), k


def test_dropout_is_off_while_measuring():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Dropout(0.9))
    x = torch.ones(1, 1, 8, 8)
    with measuring_mode(model, train=True):
        assert model.training and not model[1].training
        assert torch.equal(model(x), model(x))
    assert model[1].training
