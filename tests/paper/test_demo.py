"""The shipped pre-trained networks and the demo behind ``make demo``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from nahtlos import predict_blockwise, predict_whole
from nahtlos.analysis.metrics import dice
from nahtlos.errors import InputNotFoundError
from nahtlos.io import InputNormalization, PredictionStore, open_source
from nahtlos.nets.checkpoint import read_checkpoint
from nahtlos.paper.pretrained import PRETRAINED_MODELS, load_pretrained, pretrained_path
from nahtlos.paper.synth import BOUNDARIES, FOREGROUND, semantic_classes, synthesize

# an embryo volume the networks never saw (they were trained on seed 1), with nuclei
SHAPE, SEED = (32, 96, 96), 3
TOL = 1e-5  # the tile-mismatch tolerance: float32 round-off of different conv algorithms


@pytest.fixture(scope="module")
def embryo():
    sample = synthesize("embryo", SHAPE, seed=SEED)
    classes = semantic_classes(sample.labels)
    assert (classes == FOREGROUND).sum() > 1000, "the test volume must contain nuclei"
    return sample.image, classes


def _prepare(name, image):
    loaded = load_pretrained(name)
    meta = loaded.metadata
    spec = {**meta["input_normalization"], "values": None}
    norm = InputNormalization.from_dict(spec).fit(image)
    return loaded, meta, norm


def _assert_stitching(name, tiled, image):
    """Tiled == the whole image in one pass for BatchRenorm; InstanceNorm differs."""
    loaded, meta, norm = _prepare(name, image)
    whole = predict_whole(
        loaded.module,
        image,
        meta["halo"],
        meta["alignment"],
        input_transform=norm,
        output_transform=torch.sigmoid,
    )
    difference = float(np.abs(tiled - whole).max())
    if name == "embryo-batchrenorm":
        assert difference <= TOL  # seamless: tiles stitch into the whole-image prediction
    else:
        assert difference > 100 * TOL  # InstanceNorm: tile statistics show


@pytest.mark.parametrize("name", PRETRAINED_MODELS)
def test_pretrained_checkpoints_are_small_and_prediction_only(name):
    path = pretrained_path(name)
    assert path.stat().st_size < 512 * 1024
    state = read_checkpoint(path)
    assert state["optimizer"] is None and state["sampler"] is None
    assert state["config"]["model"]["norm"] == name.removeprefix("embryo-")
    # both are the same architecture and recipe: only the norm differs
    other = read_checkpoint(pretrained_path(next(n for n in PRETRAINED_MODELS if n != name)))
    strip = {"norm": None}
    assert {**state["config"]["model"], **strip} == {**other["config"]["model"], **strip}
    assert state["config"]["data"]["patch"] == other["config"]["data"]["patch"]


@pytest.mark.parametrize("name", PRETRAINED_MODELS)
def test_pretrained_load_and_segment_unseen_nuclei(name, embryo):
    image, classes = embryo
    loaded, meta, norm = _prepare(name, image)
    assert loaded.kind == "checkpoint" and not loaded.module.training
    assert meta["classes"] == ["boundaries", "foreground", "background"]
    assert meta["tile_dependent"] is (name == "embryo-instance")
    tiled = predict_blockwise(
        loaded.module,
        image,
        (16, 48, 48),
        meta["halo"],
        meta["alignment"],
        input_transform=norm,
        output_transform=torch.sigmoid,
        progress=False,
    )
    assert tiled.shape == (3, *SHAPE) and tiled.min() >= 0 and tiled.max() <= 1
    # they learned the task: nuclei of an unseen volume are found, and their thin
    # boundaries far better than by the trivial all-boundary guess (Dice 2p / (1 + p))
    masks = tiled > 0.5
    assert dice(masks[1], classes == FOREGROUND) > 0.5
    share = float((classes == BOUNDARIES).mean())
    assert dice(masks[0], classes == BOUNDARIES) > 5 * (2 * share / (1 + share))
    _assert_stitching(name, tiled, image)


def test_unknown_pretrained_name():
    with pytest.raises(InputNotFoundError, match="embryo-batchrenorm"):
        pretrained_path("organoids-batch")


def test_demo_tiny(tmp_path):
    from nahtlos.paper.demo import run_demo

    out = tmp_path / "demo"
    # the demo replaces its own outputs, and nothing else in its folder
    (out / "diagnosis-embryo-instance").mkdir(parents=True)
    (out / "diagnosis-embryo-instance" / "stale.txt").write_text("old run")
    (out / "mine.txt").write_text("keep")
    lines: list[str] = []
    result = run_demo(
        out,
        shape=(32, 64, 96),
        block=(16, 32, 48),
        region=(32, 64, 96),
        tile=(16, 32, 48),
        tile_sizes=(32,),
        output_dtype="float32",
        progress=False,
        log=lines.append,
    )
    by_name = {m.name: m for m in result.models}
    assert list(by_name) == [*PRETRAINED_MODELS, "embryo-instance-global-stats"]
    image = np.asarray(open_source(result.image).array[...])
    assert image.shape == (32, 64, 96)
    # the synthetic volume is OME-Zarr with its ground truth
    root = zarr.open_group(result.image, mode="r")
    assert root.attrs["ome"]["version"] == "0.5" and "labels" in root

    for m in result.models:
        # a complete OME-Zarr 0.5 image with pyramid metadata and a segmentation
        store = PredictionStore.open(m.prediction, mode="r")
        assert store.complete
        pred_root = zarr.open_group(m.prediction, mode="r")
        assert pred_root.attrs["ome"]["version"] == "0.5"
        assert pred_root.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "c"
        assert pred_root["labels"].attrs["ome"]["labels"] == ["argmax"]
        report = json.loads((m.report / "report.json").read_text())
        assert report["tile_mismatch"]["label"] == m.tile_mismatch
        assert (m.report / "report.html").is_file()
        assert str(m.prediction.relative_to(out)) in (out / "summary.md").read_text()

    # stitched out-of-core output vs the whole volume in one pass (independent reference)
    for name in PRETRAINED_MODELS:
        stitched = np.asarray(open_source(by_name[name].prediction).array[...])
        _assert_stitching(name, stitched, image)

    brn, inn = by_name["embryo-batchrenorm"], by_name["embryo-instance"]
    assert brn.tile_mismatch == "no" and brn.seamless and brn.seam <= TOL
    assert inn.tile_mismatch != "no" and float(inn.tile_mismatch) > TOL and not inn.seamless
    assert inn.seam > 100 * TOL
    # frozen to whole-volume statistics, the InstanceNorm network stitches seamlessly
    frozen = by_name["embryo-instance-global-stats"]
    assert frozen.tile_mismatch == "no" and frozen.seamless
    assert (out / "seams.png").stat().st_size > 10_000
    assert not (out / "diagnosis-embryo-instance" / "stale.txt").exists()
    assert (out / "mine.txt").read_text() == "keep"
    text = "\n".join(lines)
    assert "report.html" in text and "napari" in text and str(result.image) in text
