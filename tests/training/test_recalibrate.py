"""Recalibration: the stored statistics are exactly those of the patch set, nothing else
changes, and a BatchNorm network trained with batch size 1 loses its train/eval disparity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tifffile
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import nuclei, nuclei_config
from nahtlos.cli import app
from nahtlos.nets.checkpoint import load_model, read_checkpoint
from nahtlos.nets.norms import BatchRenorm2d
from nahtlos.training.loop import train
from nahtlos.training.recalibrate import (
    RecalibrationError,
    image_patches,
    population_statistics,
    running_stat_layers,
)

runner = CliRunner()


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        BatchRenorm2d(3, r_max=2.0, d_max=1.5),
        nn.ReLU(),
        nn.Conv2d(3, 1, 1),
    )
    for m in (net[1], net[4]):  # running statistics far from anything the data gives
        m.running_mean.uniform_(-3, 3)
        m.running_var.uniform_(5, 9)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)
    return net


def _patches(rng, n=5, shape=(2, 12, 10)):
    return [
        (rng.normal(0, 1, shape) * rng.uniform(0.5, 3) + rng.normal(0, 2)).astype(np.float32)
        for _ in range(n)
    ]


def _reference(net, patches, method):
    """The statistics each layer should get, in float64, computed by hand."""
    ref = copy.deepcopy(net).double().eval()
    x = torch.from_numpy(np.stack(patches)).double()
    out = {}
    for idx in (1, 4):  # the norm layers, in call order
        h = x
        with torch.no_grad():
            for k in range(idx):
                h = ref[k](h)
        if method == "pooled":
            mean = h.mean(dim=(0, 2, 3))
            var = h.var(dim=(0, 2, 3), correction=0)
        else:
            mean = h.mean(dim=(2, 3)).mean(0)
            var = h.var(dim=(2, 3), correction=0).mean(0)
        out[idx] = (mean.numpy(), var.numpy())
        with torch.no_grad():  # deeper layers see the recalibrated shallower ones
            ref[idx].running_mean.copy_(mean)
            ref[idx].running_var.copy_(var)
    return out


@pytest.mark.parametrize("method", ["layerwise", "pooled"])
def test_stored_statistics_are_those_of_the_patch_set(rng, method):
    net = _net()
    patches = _patches(rng)
    want = _reference(net, patches, method)
    stats = population_statistics(net, patches, method, batch_size=2)
    assert [s.name for s in stats] == ["1", "4"]
    for idx, layer in ((1, net[1]), (4, net[4])):
        mean, var = want[idx]
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-5, atol=1e-6)


def test_precise_uses_train_mode_batch_statistics(rng):
    net = _net()
    patches = _patches(rng, n=4)
    ref = copy.deepcopy(net).double()
    captured = {1: [], 4: []}
    for idx in captured:
        ref[idx].register_forward_pre_hook(
            lambda m, a, idx=idx: captured[idx].append(a[0].detach().clone())
        )
    ref.train()
    with torch.no_grad():
        for b in range(0, 4, 2):  # batches of two patches, as the call below
            ref(torch.from_numpy(np.stack(patches[b : b + 2])).double())
    population_statistics(net, patches, "precise", batch_size=2)
    for idx in captured:
        means = [h.mean(dim=(0, 2, 3)) for h in captured[idx]]
        vars_ = [h.var(dim=(0, 2, 3), correction=0) for h in captured[idx]]
        np.testing.assert_allclose(
            net[idx].running_mean.numpy(), torch.stack(means).mean(0).numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            net[idx].running_var.numpy(), torch.stack(vars_).mean(0).numpy(), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("method", ["layerwise", "pooled", "precise"])
def test_only_the_running_statistics_change(rng, method):
    net = _net().train()
    net[3].train(False)
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    population_statistics(net, _patches(rng), method)
    after = net.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert [m.training for m in net.modules()] == flags
    assert (net[4].r_max, net[4].d_max) == (2.0, 1.5)


def test_errors_name_what_is_wrong(rng):
    with pytest.raises(RecalibrationError, match="not one of layerwise, pooled, precise"):
        population_statistics(_net(), _patches(rng), "ema")
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2))
    with pytest.raises(RecalibrationError, match="no BatchNorm or BatchRenorm layers"):
        population_statistics(plain, [np.zeros((1, 8, 8), np.float32)])
    assert running_stat_layers(plain) == []
    with pytest.raises(RecalibrationError, match=r"patch \(16, 16\) does not fit"):
        image_patches([np.zeros((10, 20), np.float32)], 2, (16, 16), 3)


def test_image_patches_random_and_tiling(rng):
    image = rng.normal(size=(2, 20, 30)).astype(np.float32)
    tiles = image_patches([image], 2, (8, 16), "all")
    assert len(tiles) == 3 * 2 and all(t.shape == (2, 8, 16) for t in tiles)
    np.testing.assert_array_equal(tiles[-1], image[:, 12:20, 14:30])  # moved inward
    drawn = image_patches([image], 2, (8, 8), 7, seed=3, input_transform=lambda a: a * 2)
    again = image_patches([image], 2, (8, 8), 7, seed=3, input_transform=lambda a: a * 2)
    assert len(drawn) == 7 and all(np.array_equal(a, b) for a, b in zip(drawn, again, strict=True))
    single = image_patches([image[0]], 2, (8, 8), 2)
    assert single[0].shape == (1, 8, 8)
    # tile-wise input normalization sees each (1, *patch) tile whole, as in prediction
    from nahtlos.io import InputNormalization

    norm = InputNormalization(mode="tilewise")
    plain = image[0]
    tiles = image_patches([plain], 2, (8, 16), "all", input_transform=norm)
    np.testing.assert_allclose(tiles[0], norm(plain[None, :8, :16]), rtol=1e-6)


# ------------------------------------------------------------------------------ training


@pytest.fixture
def files(tmp_path):
    image, labels = nuclei(gradient=80)
    tifffile.imwrite(tmp_path / "image.tif", image)
    np.save(tmp_path / "labels.npy", labels)
    return str(tmp_path / "image.tif"), str(tmp_path / "labels.npy")


def _config(files, tmp_path, norm="batch", **train):
    defaults = {"steps": 40, "batch_size": 1, "accumulate": 1, "val_every": 40}
    defaults |= {"checkpoint_every": 40}
    return nuclei_config(files, tmp_path, {"norm": norm}, **(defaults | train))


def test_batchnorm_with_batch_one_loses_its_disparity(files, tmp_path):
    result = train(_config(files, tmp_path, recalibrate=16), progress=False)
    rec = result.recalibration
    assert rec is not None and rec["method"] == "pooled" and rec["patches"] == 16
    before, after = np.mean(rec["before"]["disparity"]), np.mean(rec["after"]["disparity"])
    assert after < before, (before, after)
    meta = read_checkpoint(tmp_path / "run" / "model.pt")["prediction"]
    assert meta["recalibration"]["after"] == rec["after"]
    assert (tmp_path / "run" / "recalibration.json").is_file()
    # the last training checkpoint keeps the moving averages: resuming continues training
    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-000040.pt")
    final = read_checkpoint(tmp_path / "run" / "model.pt")
    key = next(k for k in final["model"] if k.endswith("running_mean"))
    assert not torch.equal(last["model"][key], final["model"][key])


def test_instance_norm_runs_skip_recalibration(files, tmp_path):
    result = train(_config(files, tmp_path, norm="instance", steps=2), progress=False)
    assert result.recalibration is None
    assert "recalibration" not in read_checkpoint(tmp_path / "run" / "model.pt")["prediction"]


def test_cli_recalibrate_writes_a_new_checkpoint(files, tmp_path):
    train(_config(files, tmp_path, steps=20, recalibrate=0), progress=False)
    src, dst = tmp_path / "run" / "model.pt", tmp_path / "recal.pt"
    image, labels = files
    args = ["recalibrate", str(src), str(dst), "--image", image, "--labels", labels]
    result = runner.invoke(app, [*args, "--patches", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    layers = len(running_stat_layers(load_model(src).module))
    assert layers >= 4
    assert f"recalibrated {layers} layers (pooled, 8 patches)" in result.output
    assert "train/eval disparity per class, before -> after" in result.output
    meta = load_model(dst).metadata
    assert meta["recalibration"]["patches"] == 8
    again = runner.invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 2 and "exists" in again.output
    for patches in ("x", "0"):
        bad = runner.invoke(app, [*args, "--overwrite", "--patches", patches, "--no-progress"])
        assert bad.exit_code == 2 and f"--patches {patches!r}" in bad.output


def test_auto_recalibrates_batchnorm_networks_and_leaves_batchrenorm_alone(files, tmp_path):
    cfg = _config(files, tmp_path, steps=3)
    assert cfg.train.recalibrate == "auto" and cfg.train.recalibrate_method == "pooled"
    result = train(cfg, progress=False)
    assert result.recalibration is not None and result.recalibration["method"] == "pooled"
    # 'all': the tiles covering the training half (48 x 96 pixels -> 2 x 3 tiles of 32)
    assert result.recalibration["patches"] == 6
    brn = _config(files, tmp_path / "brn", norm="batchrenorm", steps=3)
    assert train(brn, progress=False).recalibration is None
    forced = _config(files, tmp_path / "forced", norm="batchrenorm", steps=3, recalibrate="all")
    assert train(forced, progress=False).recalibration is not None


def test_recalibrating_a_finished_run_by_resuming_it(files, tmp_path):
    cfg = _config(files, tmp_path, steps=4, recalibrate=0)
    assert train(cfg, progress=False).recalibration is None
    again = cfg.model_copy(deep=True)
    again.train.recalibrate = "all"
    last = tmp_path / "run" / "checkpoints" / "step-000004.pt"
    result = train(again, resume=last, progress=False)
    rec = result.recalibration
    assert result.losses == [] and rec is not None
    assert rec["before"] is not None and rec["after"] is not None  # validated before, too
    assert rec["before"] != rec["after"]


def test_precise_does_not_depend_on_the_order_of_the_patches(rng):
    patches = _patches(rng, n=6)
    forward, backward = _net(), _net()
    population_statistics(forward, patches, "precise", batch_size=1)
    population_statistics(backward, patches[::-1], "precise", batch_size=1)
    for a, b in ((forward[1], backward[1]), (forward[4], backward[4])):
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-5)
    assert forward[4].freeze_statistics is False  # restored


def test_configuration_of_recalibration_names_the_value(files, tmp_path):
    from nahtlos.training.config import ConfigError

    for bad in (True, "off", -1):
        with pytest.raises(ConfigError, match=rf"train.recalibrate: {bad!r}: give 'auto'"):
            _config(files, tmp_path, recalibrate=bad)


def test_resuming_from_the_recalibrated_model_keeps_the_step_file(files, tmp_path):
    cfg = _config(files, tmp_path, steps=2, recalibrate="all")
    train(cfg, progress=False)
    step = tmp_path / "run" / "checkpoints" / "step-000002.pt"
    before = read_checkpoint(step)["model"]
    train(cfg, resume=tmp_path / "run" / "model.pt", progress=False)
    after = read_checkpoint(step)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
