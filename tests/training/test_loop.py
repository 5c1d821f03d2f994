from __future__ import annotations

import csv
import importlib

import numpy as np
import pytest
import tifffile
import torch
import yaml
from typer.testing import CliRunner

from conftest import nuclei, nuclei_config
from nahtlos.analysis.metrics import binarize, dice_per_channel
from nahtlos.cli import app
from nahtlos.engine.predict import predict_blockwise, predict_whole
from nahtlos.errors import FormatError, ShapeMismatchError
from nahtlos.io import InputNormalization, instances_to_semantic, open_image
from nahtlos.nets.checkpoint import is_checkpoint, load_model, read_checkpoint
from nahtlos.nets.norms import BatchRenorm2d
from nahtlos.training.config import ConfigError, load_config, validate_config
from nahtlos.training.data import open_volume, split_volume
from nahtlos.training.loop import train, validate

runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    image, labels = nuclei()
    tifffile.imwrite(tmp_path / "image.tif", image)
    np.save(tmp_path / "labels.npy", labels)
    return str(tmp_path / "image.tif"), str(tmp_path / "labels.npy")


def _config(files, tmp_path, activation="sigmoid", **train):
    defaults = {"steps": 12, "batch_size": 2, "accumulate": 2, "val_every": 4}
    defaults |= {"checkpoint_every": 6}
    return nuclei_config(files, tmp_path, {"activation": activation}, **(defaults | train))


# ------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_writes_its_outputs(files, tmp_path):
    cfg = _config(files, tmp_path, steps=36, accumulate=1, val_every=36, checkpoint_every=36)
    result = train(cfg, progress=False)
    losses = result.losses
    assert len(losses) == 36
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.05
    out = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "validation.csv", "curves.png", "model.pt"):
        assert (out / name).is_file(), name
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == losses
    assert result.validation[-1]["dice_eval_foreground"] > 0.3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 36


def test_resume_continues_exactly(files, tmp_path):
    # BatchRenorm, the checkpoint (step 6) in the middle of the r_max/d_max ramp
    cfg = _config(files, tmp_path, renorm={"warmup_steps": 3, "ramp_steps": 6})
    cfg.model.norm = "batchrenorm"
    full = train(cfg, progress=False)
    with (tmp_path / "run" / "validation.csv").open() as f:
        val_full = list(csv.DictReader(f))
    # as if interrupted after the checkpoint at step 6
    resumed = train(cfg, resume=tmp_path / "run" / "checkpoints" / "step-000006.pt", progress=False)
    assert resumed.start_step == 6
    assert resumed.losses == full.losses[6:]  # bit-identical
    with (tmp_path / "run" / "log.csv").open() as f:
        assert [float(r["loss"]) for r in csv.DictReader(f)] == full.losses
    with (tmp_path / "run" / "validation.csv").open() as f:
        assert list(csv.DictReader(f)) == val_full
    a = read_checkpoint(tmp_path / "run" / "model.pt")
    assert a["step"] == 12 and a["schedule"]["last_step"] == 11
    # extending a finished run continues from its last step
    longer = cfg.model_copy(deep=True)
    longer.train.steps = 14
    more = train(longer, resume=tmp_path / "run" / "model.pt", progress=False)
    assert more.start_step == 12 and len(more.losses) == 2


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "dice", "lr_schedule": "cosine", "lr_warmup": 3},
        {"loss": "dice_bce", "lr_schedule": "poly", "recalibrate": 4},
        {"loss": "dice_ce", "lr_schedule": "constant", "loss_weights": {"dice": 0.5, "ce": 2}},
    ],
)
def test_resume_is_bit_identical_with_every_loss_and_schedule(files, tmp_path, options):
    activation = "softmax" if options["loss"] == "dice_ce" else "sigmoid"
    cfg = _config(files, tmp_path, activation, **options)
    cfg.data.foreground_bias = 0.5
    full = train(cfg, progress=False)
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    from nahtlos.training.schedules import learning_rate

    want = [
        learning_rate(s, 12, 1e-3, cfg.train.lr_schedule, cfg.train.lr_warmup) for s in range(12)
    ]
    assert lrs == pytest.approx(want)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["loss"] == options["loss"] and saved["lr_schedule"] == options["lr_schedule"]
    assert (
        read_checkpoint(tmp_path / "run" / "model.pt")["config"]["train"]["loss"] == options["loss"]
    )
    resumed = train(cfg, resume=tmp_path / "run" / "checkpoints" / "step-000006.pt", progress=False)
    assert resumed.losses == full.losses[6:]  # bit-identical
    if options.get("recalibrate"):
        assert resumed.recalibration == full.recalibration


def test_old_checkpoints_resume_with_the_recipe_they_started_with(files, tmp_path):
    from nahtlos.training.config import upgrade_config

    cfg = _config(files, tmp_path, steps=4, checkpoint_every=2, val_every=100)
    train(cfg, progress=False)
    raw = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002.pt")["config"]
    for key in ("loss", "lr_schedule", "recalibrate"):
        raw["train"].pop(key)  # as written before these fields existed
    old = validate_config(upgrade_config(raw))
    assert (old.train.loss, old.train.lr_schedule, old.train.recalibrate) == ("dice", "constant", 0)


def test_init_starts_from_weights_with_a_fresh_optimizer(files, tmp_path):
    cfg = _config(files, tmp_path, steps=3, val_every=100)
    train(cfg, progress=False)
    source = read_checkpoint(tmp_path / "run" / "model.pt")
    tuned_cfg = _config(files, tmp_path, steps=2, val_every=100, recalibrate=0)
    tuned_cfg.train.init = str(tmp_path / "run" / "model.pt")
    tuned_cfg.out = str(tmp_path / "tuned")
    started = {}

    def capture(module, args):
        if not started:
            started.update({k: v.clone() for k, v in module.state_dict().items()})

    train_module = importlib.import_module("nahtlos.training.loop")

    original = train_module._Run.step

    def first_step(self, step):
        if not started:
            capture(self.model, ())
            started["adam"] = len(self.optimizer.state)
        return original(self, step)

    train_module._Run.step = first_step
    try:
        tuned = train(tuned_cfg, progress=False)
    finally:
        train_module._Run.step = original
    assert tuned.start_step == 0 and len(tuned.losses) == 2
    assert started.pop("adam") == 0  # a fresh optimizer: no moments yet
    for key, value in source["model"].items():
        assert torch.equal(started[key], value), key
    final = read_checkpoint(tmp_path / "tuned" / "model.pt")
    assert final["step"] == 2 and final["config"]["train"]["init"] == tuned_cfg.train.init
    # weights that do not fit the configured network: one clear error
    wrong = _config(files, tmp_path, steps=1)
    wrong.model.channels = [4, 8, 16]
    wrong.train.init = str(tmp_path / "run" / "model.pt")
    with pytest.raises(ShapeMismatchError, match=r"train.init .* do not fit"):
        train(wrong, progress=False)
    result = runner.invoke(
        app,
        [
            "train",
            "--image",
            files[0],
            "--labels",
            files[1],
            "--dims",
            "2",
            "--steps",
            "1",
            "--init",
            str(tmp_path / "run" / "model.pt"),
            "--resume",
            str(tmp_path / "run" / "model.pt"),
        ],
    )
    assert result.exit_code == 2 and "either --resume" in result.output


def test_schedule_reaches_the_layers_per_optimizer_step(files, tmp_path, monkeypatch):
    cfg = _config(
        files,
        tmp_path,
        steps=8,
        accumulate=3,
        val_every=4,
        renorm={"warmup_steps": 2, "ramp_steps": 4, "r_max": 2.5, "d_max": 4.0},
    )
    cfg.model.norm = "batchrenorm"
    seen = []
    original = BatchRenorm2d.forward

    def forward(self, x):
        if self.training and torch.is_grad_enabled():  # training passes, not validation
            seen.append((self.r_max, self.d_max))
        return original(self, x)

    monkeypatch.setattr(BatchRenorm2d, "forward", forward)
    train(cfg, progress=False)
    loaded = [m for m in load_model(tmp_path / "run" / "model.pt").module.modules()]
    layers = sum(isinstance(m, BatchRenorm2d) for m in loaded)
    assert layers > 0 and len(seen) == 8 * 3 * layers
    # the loaded network renormalizes like the trained one in train mode (r_max/d_max
    # are not in the state dict; the checkpoint's schedule restores them)
    assert all((m.r_max, m.d_max) == (2.5, 4.0) for m in loaded if isinstance(m, BatchRenorm2d))
    # warm-up (plain BatchNorm), a linear ramp counted in optimizer steps, then the final
    # values; every micro-batch of an optimizer step sees the same values
    want = [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.375, 1.0), (1.75, 2.0), (2.125, 3.0)]
    want += [(2.5, 4.0), (2.5, 4.0)]
    for step, expected in enumerate(want):
        values = seen[step * 3 * layers : (step + 1) * 3 * layers]
        assert all(v == pytest.approx(expected) for v in values), (step, values)
    with (tmp_path / "run" / "log.csv").open() as f:
        logged = [(float(r["r_max"]), float(r["d_max"])) for r in csv.DictReader(f)]
    np.testing.assert_allclose(logged, want)


def test_validation_is_block_wise_and_leaves_the_model_alone(files, rng):
    image, labels = files
    vol = open_volume(image, labels, 2, input_norm=InputNormalization("global"))
    _, val = split_volume(vol, 0.5, 1)
    torch.manual_seed(0)
    from nahtlos.nets.models import build_model

    net = build_model("unet", 2, 1, 3, "batch", channels=(4, 8, 8))
    # a few train-mode passes so running statistics differ from batch statistics
    for _ in range(3):
        net(torch.rand(2, 1, 32, 32) * 3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scores = validate(net, [val], block=(16, 16), halo=(12, 12), alignment=(4, 4), batch_size=3)
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # independent reference: stitched predictions in each mode, then Dice per class
    region = val.image_region()
    gt = instances_to_semantic(np.asarray(open_image(labels))[val.region])
    preds = {}
    for mode in ("eval", "train"):
        net.train(mode == "train")
        preds[mode] = predict_blockwise(
            net,
            region,
            (16, 16),
            12,
            4,
            ndim=2,
            batch_size=3,
            input_transform=val.normalization,
            output_transform=torch.sigmoid,
            progress=False,
        )
        net.load_state_dict(before)
    for mode in ("eval", "train"):
        want = dice_per_channel(binarize(preds[mode]), gt.astype(bool), skip_empty_target=True)
        np.testing.assert_allclose(scores[f"dice_{mode}"], want, rtol=1e-12)
    disparity = [1 - d for d in dice_per_channel(binarize(preds["train"]), binarize(preds["eval"]))]
    np.testing.assert_allclose(scores["disparity"], disparity, rtol=1e-12)
    assert max(disparity) > 0.01  # BatchNorm with unrepresentative statistics


# ------------------------------------------------------------------------------ config


def test_config_errors_name_the_field(files, tmp_path):
    base = _config(files, tmp_path).model_dump(mode="json")

    def error(change):
        data = yaml.safe_load(yaml.safe_dump(base))
        change(data)
        with pytest.raises(ConfigError) as info:
            validate_config(data)
        return str(info.value)

    assert "data.patch" in error(lambda d: d["data"].update(patch=[30, 32]))
    assert "multiple of the network's alignment 4" in error(
        lambda d: d["data"].update(patch=[30, 32])
    )
    assert "train.lr" in error(lambda d: d["train"].update(lr=-1))
    assert "model.norm" in error(lambda d: d["model"].update(norm="layer"))
    msg = error(lambda d: d["train"].update(stpes=3))
    assert "train.stpes" in msg and "unknown field" in msg
    assert "num_classes" in error(lambda d: d["data"].update(labels="semantic"))
    assert "data.train" in error(lambda d: d["data"].pop("train"))
    assert "data.patch" in error(lambda d: d["data"].update(patch=[32, 32, 32]))
    msg = error(lambda d: d["train"].update(loss="focal"))
    assert "train.loss" in msg and "'focal'" in msg and "dice, dice_bce, dice_ce" in msg
    msg = error(lambda d: d["train"].update(lr_schedule="step"))
    assert "train.lr_schedule" in msg and "'step'" in msg and "constant, poly, cosine" in msg
    msg = error(lambda d: d["train"].update(recalibrate_method="ema"))
    assert "'ema'" in msg and "pooled" in msg
    assert "needs model.activation 'softmax'" in error(lambda d: d["train"].update(loss="dice_ce"))
    assert len(error(lambda d: d["train"].update(loss="focal")).splitlines()) == 1


def test_yaml_file_with_overrides(files, tmp_path):
    image = files[0]
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"train": [{"image": "image.tif", "labels": "labels.npy"}]},
                "model": {"ndim": 2},
                "out": "out",
            }
        )
    )
    cfg = load_config(path, ["train.steps=7", "data.patch=[64, 64]", "model.norm=identity"])
    assert cfg.train.steps == 7 and cfg.data.patch == [64, 64] and cfg.model.norm == "identity"
    assert cfg.data.train[0].image == image  # relative to the file
    assert cfg.out == str(tmp_path / "out")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(path, ["train.steps=many"])


def test_mismatched_image_and_labels_name_the_shapes(files, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((96, 80), np.int32))
    cfg = _config((files[0], str(tmp_path / "short.npy")), tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"\(96, 80\).*\(96, 96\)"):
        train(cfg, progress=False)


# ------------------------------------------------------------------------------ checkpoint + CLI


def test_checkpoint_predicts_through_the_cli_alone(files, tmp_path):
    cfg = _config(files, tmp_path, steps=3, val_every=100)
    train(cfg, progress=False)
    model = tmp_path / "run" / "model.pt"
    assert is_checkpoint(model)
    loaded = load_model(model)
    assert loaded.kind == "checkpoint" and not loaded.module.training
    meta = loaded.metadata
    for key in ("ndim", "in_channels", "out_channels", "halo", "alignment", "activation"):
        assert key in meta
    assert meta["arch"] == "unet" and meta["norm"] == "batch" and meta["ndim"] == 2
    assert meta["input_normalization"]["mode"] == "global"
    assert meta["halo"] == [12, 12] and meta["alignment"] == [4, 4]

    other, _ = nuclei((60, 76), seed=5)
    np.save(tmp_path / "other.npy", other * 3 + 100)
    out = tmp_path / "pred.zarr"
    result = runner.invoke(
        app,
        [
            "predict",
            str(model),
            str(tmp_path / "other.npy"),
            str(out),
            "--no-progress",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    got = np.asarray(open_image(out)[...])
    norm = InputNormalization("global").fit(other * 3 + 100)
    want = predict_whole(
        loaded.module, other * 3 + 100, 12, 4, input_transform=norm, output_transform=torch.sigmoid
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_cli_short_form_and_config_errors(files, tmp_path):
    image, labels = files
    out = tmp_path / "short"
    args = ["train", "--image", image, "--labels", labels, "--out", str(out), "--dims", "2"]
    args += ["--norm", "identity", "--steps", "2", "--patch", "32,32", "--no-progress"]
    args += ["--set", "train.accumulate=1", "--set", "model.channels=[4,8,8]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "validation Dice" in result.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["norm"] == "identity" and cfg["data"]["split"]["fraction"] == 0.3
    assert read_checkpoint(out / "model.pt")["step"] == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"data": {"train": [{"image": image, "labels": labels}]}, "modle": {}})
    )
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "modle: unknown field" in result.output
    result = runner.invoke(app, ["train", "--image", image, "--out", str(out)])
    assert result.exit_code == 2 and "--labels" in result.output


@pytest.mark.parametrize(
    ("shape", "model", "patch"),
    [
        (
            (48, 64),
            {
                "arch": "unetr",
                "norm": "batch",
                "feature_size": 4,
                "hidden_size": 16,
                "mlp_dim": 16,
                "num_heads": 2,
            },
            [48, 48],
        ),
        ((16, 24, 24), {"norm": "instance", "channels": [4, 4, 4]}, [16, 16, 16]),
    ],
    ids=["unetr-2d", "unet-3d"],
)
def test_unetr_and_3d_runs_predict_from_their_checkpoints(tmp_path, shape, model, patch):
    image, labels = nuclei(shape, n=8, seed=2)
    tifffile.imwrite(tmp_path / "img.tif", image)
    np.save(tmp_path / "lab.npy", labels)
    volume = {"image": str(tmp_path / "img.tif"), "labels": str(tmp_path / "lab.npy")}
    cfg = validate_config(
        {
            "data": {
                "train": [volume],
                "val": [volume],
                "patch": patch,
                "input_norm": {"mode": "tilewise"},
            },
            "model": {"ndim": len(shape), **model},
            "train": {"steps": 2, "accumulate": 1, "val_every": 2},
            "out": str(tmp_path / "run"),
        }
    )
    result = train(cfg, progress=False)
    assert len(result.validation) == 1
    meta = load_model(result.checkpoint).metadata
    assert meta["tile_dependent"] and meta["input_normalization"]["mode"] == "tilewise"
    if model.get("arch") == "unetr":
        assert meta["window"] == [48, 48] and meta["block"] == [16, 16]
        assert meta["alignment"] == [16, 16] and meta["halo"] == [16, 16]
    out = tmp_path / "pred.npy"
    res = runner.invoke(
        app,
        ["predict", str(result.checkpoint), str(tmp_path / "img.tif"), str(out), "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    pred = np.load(out)
    assert pred.shape == (3, *shape) and np.isfinite(pred).all()


def test_convert_a_checkpoint_and_fine_tune_it(files, tmp_path):
    cfg = _config(files, tmp_path, steps=3, val_every=100)
    train(cfg, progress=False)
    src, dst = tmp_path / "run" / "model.pt", tmp_path / "brn.pt"
    result = runner.invoke(app, ["convert", str(src), str(dst), "--to", "batchrenorm"])
    assert result.exit_code == 0, result.output
    before, after = load_model(src), load_model(dst)
    assert after.kind == "checkpoint" and after.metadata["norm"] == "batchrenorm"
    assert any(isinstance(m, BatchRenorm2d) for m in after.module.modules())
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(after.module(x), before.module(x), rtol=0, atol=0)
    tuned = train(
        load_config(
            None,
            ["train.steps=2", f"out={tmp_path / 'tuned'}"],
            base=read_checkpoint(dst)["config"],
        ),
        resume=dst,
        progress=False,
    )
    assert tuned.start_step == 0 and len(tuned.losses) == 2


def test_channel_mismatch_and_torchscript_are_told_apart(files, tmp_path):
    np.save(tmp_path / "rgb.npy", np.zeros((3, 96, 96), np.float32))
    cfg = _config((str(tmp_path / "rgb.npy"), files[1]), tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"3 channels.*model.in_channels is 1"):
        train(cfg, progress=False)
    from nahtlos.nets.checkpoint import save_torchscript

    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    save_torchscript(net, tmp_path / "net.pt", example=torch.zeros(1, 1, 8, 8))
    assert not is_checkpoint(tmp_path / "net.pt")
    assert load_model(tmp_path / "net.pt").kind == "torchscript"
    torch.save({"weights": net.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(FormatError, match="not a nahtlos checkpoint"):
        load_model(tmp_path / "plain.pt")


def test_export_drops_the_optimizer_and_still_predicts_and_fine_tunes(files, tmp_path):
    cfg = _config(files, tmp_path, steps=3, val_every=100)
    train(cfg, progress=False)
    src, dst = tmp_path / "run" / "model.pt", tmp_path / "small.pt"
    result = runner.invoke(app, ["export", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    full, small = read_checkpoint(src), read_checkpoint(dst)
    assert full["optimizer"] is not None and small["optimizer"] is None
    assert small["sampler"] is None
    assert dst.stat().st_size < src.stat().st_size / 2  # Adam keeps two moments per weight
    assert small["config"] == full["config"] and small["prediction"] == full["prediction"]
    for key, value in full["model"].items():
        assert torch.equal(small["model"][key], value), key
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(dst).module(x), load_model(src).module(x), rtol=0, atol=0
        )
    # an existing output is refused unless --overwrite, and a checkpoint never overwrites itself
    again = runner.invoke(app, ["export", str(src), str(dst)])
    assert again.exit_code == 2 and "exists" in again.output
    assert runner.invoke(app, ["export", str(src), str(dst), "--overwrite"]).exit_code == 0
    onto = runner.invoke(app, ["export", str(src), str(src), "--overwrite"])
    assert onto.exit_code == 2 and "itself" in onto.output
    assert read_checkpoint(src)["optimizer"] is not None
    # the step count travels with the copy: two more steps, with a fresh Adam and sampler
    tuned = train(
        load_config(None, ["train.steps=5", f"out={tmp_path / 'tuned'}"], base=small["config"]),
        resume=dst,
        progress=False,
    )
    assert tuned.start_step == 3 and len(tuned.losses) == 2
    assert all(np.isfinite(tuned.losses))
