"""``diagnose`` end to end: seams, train/eval disparity, labels, geometry, the model unchanged."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from diagnosis_cases import (
    ALIGN,
    HALO,
    bn_with_bad_statistics,
    identity_net,
    noisy_image,
    run_diagnosis,
)
from typer.testing import CliRunner

from conftest import make_unet
from nahtlos.analysis.diagnose import diagnose, mode_frozen
from nahtlos.analysis.metrics import binarize, dice_per_channel
from nahtlos.analysis.report import validate_report
from nahtlos.cli import app
from nahtlos.engine.predict import predict_blockwise, predict_whole
from nahtlos.errors import BlockShapeError, NahtlosWarning, ShapeMismatchError
from nahtlos.nets.checkpoint import save_torchscript


@pytest.fixture(scope="module")
def image():
    return noisy_image((64, 64))


@pytest.fixture(scope="module")
def bn_report(image):
    return run_diagnosis(make_unet(2, 2, norm="batch"), image)


@pytest.fixture(scope="module")
def in_report(image):
    return run_diagnosis(make_unet(2, 2, norm="instance"), image, receptive_field=True)


def test_batchnorm_eval_is_seamless(bn_report, image):
    tm = bn_report.tile_mismatch
    assert tm.indicator <= 1e-5 and tm.label() == "no" and tm.seamless
    assert bn_report.seamless and bn_report.verdict.headline.startswith("Seamless")
    # the seam map is |block-wise - whole image| of the stitched prediction
    net = make_unet(2, 2, norm="batch")
    tiled = predict_blockwise(
        net, image, bn_report.settings["tile"], HALO, ALIGN, output_transform=torch.sigmoid
    )
    whole = predict_whole(net, image, HALO, ALIGN, output_transform=torch.sigmoid)
    assert bn_report.seam["max_difference"] == pytest.approx(float(np.abs(tiled - whole).max()))
    assert bn_report.seam["max_difference"] <= 1e-5
    # seamless means: identical for every tile size
    assert len(bn_report.sweep) >= 3
    for point in bn_report.sweep:
        assert point.max_difference <= 1e-5 and point.agreement == [1.0, 1.0]


def test_instancenorm_is_tile_dependent(in_report):
    tm = in_report.tile_mismatch
    assert tm.indicator > 1e-3 and not tm.seamless and tm.label() != "no"
    v = in_report.verdict
    assert not v.seamless and v.tile_dependent is True
    assert any("InstanceNorm2d" in f for f in v.findings)
    assert "BatchRenorm" in v.actions[0] and "InstanceNorm2d" in v.actions[0]
    if in_report.receptive_field is not None:
        rf = in_report.to_dict()["receptive_field"]
        assert rf["tile_dependent"] and rf["trf_radius"] is None
        assert any("InstanceNorm" in c["type"] for c in rf["culprits"])
    # the tile covering the whole image is the whole-image prediction; smaller tiles differ
    by_blocks = {p.blocks: p for p in in_report.sweep}
    assert by_blocks[1].max_difference <= 1e-5
    assert all(p.max_difference > 1e-3 for p in in_report.sweep if p.blocks > 1)
    assert min(min(p.agreement) for p in in_report.sweep) < 1.0


def test_disparity_of_unrepresentative_running_statistics(image):
    rep = run_diagnosis(bn_with_bad_statistics(), image)
    ted = rep.train_eval_disparity
    assert max(ted.per_channel) > 0.05
    assert ted.mean == pytest.approx(np.mean(ted.per_channel))
    assert rep.verdict.disparity == "substantial"
    assert rep.seamless  # BatchNorm in eval mode stitches exactly; its problem is elsewhere
    assert "train mode" in rep.verdict.headline
    assert any("BatchRenorm" in a and "BatchNorm2d" in a for a in rep.verdict.actions)
    worst = rep.worst_tile
    assert max(worst["per_channel"]) > 0 and worst["max_difference"] > 0
    assert all(a < b for a, b in zip(worst["start"], worst["stop"], strict=True))


@pytest.mark.parametrize("net", ["instance", "identity"])
def test_no_disparity_without_running_statistics(image, in_report, net):
    rep = in_report if net == "instance" else run_diagnosis(identity_net(), image)
    assert rep.train_eval_disparity.per_channel == [0.0, 0.0]
    assert rep.train_eval_disparity.mean == 0.0 and rep.verdict.disparity == "none"
    if net == "identity":
        assert rep.seamless and not rep.normalization_layers
        assert rep.verdict.actions[0].startswith("Nothing to fix")


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, m.training) for name, m in model.named_modules()],
    )


def test_model_is_left_bit_identical(image):
    net = bn_with_bad_statistics()
    model = torch.nn.Sequential(net, torch.nn.Dropout(0.3))
    model.train()
    model[0].model[0].eval()  # a submodule in another mode than its parent
    before_state, before_modes = _snapshot(model)
    run_diagnosis(model, image)
    after_state, after_modes = _snapshot(model)
    assert before_modes == after_modes
    assert before_state.keys() == after_state.keys()
    for k in before_state:
        assert torch.equal(before_state[k], after_state[k]), k


def test_labels_give_dice_in_eval_train_and_whole(image):
    net = bn_with_bad_statistics()
    whole = predict_whole(net, image, HALO, ALIGN, output_transform=torch.sigmoid)
    labels = binarize(whole).astype(np.uint8)  # the eval-mode masks as ground truth
    rep = run_diagnosis(net, image, labels=labels)
    d = rep.dice
    assert d is not None
    expected_whole = [1.0 if labels[c].any() else None for c in range(2)]
    assert d["whole"] == expected_whole
    assert d["eval"] == expected_whole  # seamless: tiles stitch into the same masks
    train = [x for x in d["train"] if x is not None]
    assert train and min(train) < 1.0  # the train-mode masks differ
    assert all(p.dice == expected_whole for p in rep.sweep)
    # a class per pixel is one-hot encoded over the output channels
    classes = labels[1].astype(np.int64)  # class 1 where channel 1 is on, else class 0
    rep2 = run_diagnosis(net, image, labels=classes)
    pred = binarize(whole)
    onehot = np.stack([classes == 0, classes == 1])
    assert rep2.dice is not None
    assert rep2.dice["whole"] == dice_per_channel(pred, onehot, skip_empty_target=True)


def test_halo_and_alignment_come_from_the_receptive_field(image):
    rf_module = pytest.importorskip("nahtlos.nets.receptive_field")
    net = make_unet(2, 2, norm="batch")
    rep = diagnose(net, image, progress=False, make_figures=False)
    rf = rf_module.receptive_field(net, 2, 1)
    assert rep.settings["halo_source"] == "receptive field"
    assert tuple(rep.settings["halo"]) == tuple(rf_module.recommend_halo(rf))
    assert tuple(rep.settings["alignment"]) == tuple(rf.alignment)
    assert rep.seamless and rep.to_dict()["receptive_field"]["tile_dependent"] is False


def test_traced_models_cannot_show_disparity_scripted_ones_can(image):
    net = bn_with_bad_statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
        scripted = torch.jit.script(net)
    assert mode_frozen(traced) and not mode_frozen(scripted)
    assert not mode_frozen(net)
    rep = run_diagnosis(traced, image, make_figures=True)
    assert rep.verdict.disparity == "not measurable" and "train_eval" not in rep.figures
    assert any("torch.jit.trace" in f for f in rep.verdict.findings)
    assert rep.to_dict()["train_eval_disparity"]["measurable"] is False
    validate_report(rep.to_dict())
    rep = run_diagnosis(scripted, image)
    assert rep.verdict.disparity == "substantial"
    assert max(rep.train_eval_disparity.per_channel) > 0.05


def test_bad_inputs_name_the_problem(image):
    net = make_unet(2, 2, norm="batch")
    with pytest.raises(ShapeMismatchError, match=r"\(32, 32\)"):
        run_diagnosis(net, image, labels=np.zeros((32, 32)))
    with pytest.raises(BlockShapeError, match="halo"):
        diagnose(net, image, alignment=4, receptive_field=False, progress=False)
    with pytest.raises(ShapeMismatchError, match="3 channel names"):
        run_diagnosis(net, image, channel_names=["a", "b", "c"])


def test_large_images_are_diagnosed_on_a_central_region():
    img = noisy_image((64, 96))
    with pytest.warns(NahtlosWarning, match="central region"):
        rep = run_diagnosis(make_unet(2, 2, norm="batch"), img, max_voxels=48 * 72)
    (y0, y1), (x0, x1) = rep.image["region"]
    assert (y1 - y0, x1 - x0) == (48, 72) and (y0, x0) == (8, 12)
    assert rep.seamless


def test_global_statistics_compared_for_instance_norm(in_report, image):
    g = in_report.global_statistics
    assert g is not None and g["layers"] == 4
    # frozen whole-image statistics: seamless and equal to the whole-image prediction
    assert g["tile_mismatch"]["seamless"] and g["max_difference_to_whole"] <= 1e-4
    assert not in_report.tile_mismatch.seamless
    assert any("--norm-stats global" in a and "seamless" in a for a in in_report.verdict.actions)
    validate_report(in_report.to_dict())
    # nothing to freeze in a BatchNorm model, and TorchScript cannot be measured layer-wise
    assert (
        run_diagnosis(make_unet(2, 2, norm="batch"), image, tile_sizes=[64]).global_statistics
        is None
    )
    scripted = torch.jit.script(make_unet(2, 2, norm="instance"))
    rep = run_diagnosis(scripted, image, tile_sizes=[64])
    assert rep.global_statistics is None
    assert any("TorchScript" in a for a in rep.verdict.actions)


def test_figures_of_a_3d_image_show_central_slices():
    from matplotlib.image import imread

    img = noisy_image((32, 32, 80))
    rep = run_diagnosis(make_unet(3, 2, norm="batch"), img, make_figures=True)
    assert rep.seamless
    assert rep.settings["tile"] == [16, 16, 40]
    assert {"seam_map", "train_eval", "tile_sweep"} <= set(rep.figures)
    validate_report(rep.to_dict())
    for name in ("seam_map", "train_eval"):
        picture = imread(io.BytesIO(rep.figures[name]))
        assert picture.shape[1] > picture.shape[0] > 200  # four 2D panels side by side


# --------------------------------------------------------------------------- CLI


def test_cli_applies_the_models_metadata(tmp_path):
    net = make_unet(2, 2, norm="batch")
    meta = {
        "ndim": 2,
        "halo": HALO,
        "alignment": ALIGN,
        "activation": "softmax",
        "input_normalization": {"mode": "global", "low": 1.0, "high": 99.8},
        "channel_names": ["background", "nuclei"],
    }
    model_path = save_torchscript(
        net, tmp_path / "model.pt", example=torch.zeros(1, 1, 32, 32), metadata=meta
    )
    raw = (noisy_image((64, 64)) * 1000 + 200).astype(np.uint16)
    np.save(tmp_path / "image.npy", raw)
    out = tmp_path / "report"
    runner = CliRunner()
    args = ["diagnose", str(model_path), str(tmp_path / "image.npy"), "--out", str(out)]
    res = runner.invoke(app, [*args, "--no-progress", "--sweep", "32,64"])
    assert res.exit_code == 0, res.output
    assert "Seamless" in res.output and "report.html" in res.output
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert data["model"]["activation"] == "softmax"
    assert data["model"]["kind"] == "torchscript"
    assert data["model"]["channel_names"] == ["background", "nuclei"]
    assert data["settings"]["halo_source"] == "model metadata"
    assert data["verdict"]["disparity"] == "not measurable"  # saved with torch.jit.trace
    norm = data["model"]["input_normalization"]
    assert norm["mode"] == "global"
    assert norm["values"][0] == pytest.approx(np.percentile(raw, [1.0, 99.8]), rel=1e-6)
    assert [p["size"] for p in data["tile_size_sweep"]] == [32, 64]
    # an existing report is not overwritten by accident
    again = runner.invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 2 and "already holds a report" in again.output
    bad = runner.invoke(app, [*args, "--overwrite", "--activation", "relu"])
    assert bad.exit_code == 2 and "relu" in bad.output


def test_instance_labels_are_converted_like_in_training(image):
    from nahtlos.io import instances_to_semantic

    net = make_unet(2, 2, norm="batch", out_channels=3)
    instances = np.zeros((64, 64), np.int32)
    instances[5:20, 5:25] = 1
    instances[20:40, 10:30] = 2  # touching object: a shared border
    instances[45:60, 40:60] = 7
    semantic = instances_to_semantic(instances)
    as_instances = run_diagnosis(net, image, labels=instances, label_kind="instances")
    as_masks = run_diagnosis(net, image, labels=semantic)
    assert as_instances.dice is not None and as_masks.dice is not None
    assert as_instances.dice == as_masks.dice
    with pytest.raises(ValueError, match="label_kind"):
        run_diagnosis(net, image, labels=instances, label_kind="objects")
