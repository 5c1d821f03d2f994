from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_unet
from nahtlos.analysis.metrics import tile_mismatch
from nahtlos.engine.global_stats import (
    GlobalNormStats,
    compute_global_stats,
    freeze_norms,
    tile_norm_layers,
)
from nahtlos.engine.predict import predict_blockwise, predict_whole
from nahtlos.testing import largest_difference

NORMS = {
    "instance": "instance",
    "instance_affine": ("instance", {"affine": True}),
    "group": ("group", {"num_groups": 2}),
}


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    img[..., : shape[-1] // 3] *= 3  # regions with different statistics
    return img


def _perturb_affine(net):
    gen = torch.Generator().manual_seed(5)
    for _, m in tile_norm_layers(net):
        if getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return net


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize(
    ("ndim", "shape", "blocks"),
    [(2, (70, 53), [(32, 32), (16, 48)]), (3, (20, 30, 26), [(8, 16, 12), (16, 8, 8)])],
)
def test_global_statistics_blockwise_equals_whole_image(norm, ndim, shape, blocks):
    net = _perturb_affine(make_unet(ndim, 2, norm=NORMS[norm], seed=2))
    image = _image(shape)
    halo, align = 12, 4
    reference = predict_whole(net, image, halo, align)
    span = float(reference.max() - reference.min())
    # the plain tile-wise prediction really is different
    tiled = predict_blockwise(net, image, blocks[0], halo, align, progress=False)
    assert largest_difference(tiled, reference)[0] > 1e-3 * span
    for block in blocks:
        stats = compute_global_stats(
            net, image, block=block, halo=halo, alignment=align, progress=False
        )
        assert len(stats.layers) == len(tile_norm_layers(net)) > 0
        frozen = freeze_norms(net, stats)
        got = predict_blockwise(frozen, image, block, halo, align, progress=False, batch_size=2)
        diff, where = largest_difference(got, reference)
        assert diff <= 1e-4 * span, (block, diff, where)


def test_frozen_model_is_seamless_and_original_untouched():
    net = make_unet(2, 2, norm="instance")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = _image((96, 96))
    stats = compute_global_stats(net, image, block=32, halo=12, alignment=4, progress=False)
    frozen = freeze_norms(net, stats)
    assert tile_mismatch(frozen, image, window=64, halo=12, alignment=4, stride=32).seamless
    assert not tile_mismatch(net, image, window=64, halo=12, alignment=4, stride=32).seamless
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules())


def test_sampled_statistics_close_to_exact_and_stderr_reported(tmp_path):
    net = make_unet(2, 2, norm="instance")
    image = _image((160, 160))
    exact = compute_global_stats(net, image, block=16, halo=12, alignment=4, progress=False)
    sampled = compute_global_stats(
        net, image, block=16, halo=12, alignment=4, fraction=0.25, progress=False
    )
    assert sampled.mode == "sampled" and sampled.blocks_used < sampled.blocks_total
    assert sampled.max_stderr is not None and sampled.max_stderr > 0
    for e, s in zip(exact.layers, sampled.layers, strict=True):
        sigma = np.sqrt(e.var)
        # within 5 estimated standard errors (and well within a tenth of a standard deviation)
        err = np.abs(s.mean - e.mean) / sigma
        assert err.max() <= max(5 * sampled.max_stderr, 1e-6)
        assert err.max() < 0.1
        assert np.abs(np.sqrt(s.var) / sigma - 1).max() < 0.1
    path = exact.save(tmp_path / "stats.npz")
    again = GlobalNormStats.load(path)
    assert again.fingerprint == exact.fingerprint
    for a, b in zip(again.layers, exact.layers, strict=True):
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.var, b.var)


def test_fingerprint_changes_with_model_and_image():
    net = make_unet(2, 2, norm="instance")
    image = _image((32, 32))
    a = compute_global_stats(net, image, block=32, halo=12, alignment=4, progress=False)
    b = compute_global_stats(net, image * 2, block=32, halo=12, alignment=4, progress=False)
    assert (
        a.fingerprint
        == compute_global_stats(
            net, image, block=16, halo=12, alignment=4, progress=False
        ).fingerprint
    )
    assert (
        a.fingerprint
        != compute_global_stats(
            make_unet(2, 2, norm="instance", seed=9),
            image,
            block=32,
            halo=12,
            alignment=4,
            progress=False,
        ).fingerprint
    )
    assert b.layers[0].mean.tolist() != a.layers[0].mean.tolist()


def test_running_stats_instance_norm_only_when_ignored():
    net = make_unet(2, 2, norm=("instance", {"track_running_stats": True, "affine": True}))
    assert tile_norm_layers(net) == []
    assert len(tile_norm_layers(net, ignore_running_stats=True)) > 0
