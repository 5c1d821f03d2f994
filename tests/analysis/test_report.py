"""The report files: JSON against its schema, Markdown, self-contained HTML, nulls for
what could not be measured."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diagnosis_cases import ALIGN, HALO, bn_with_bad_statistics, noisy_image, run_diagnosis

from nahtlos.analysis.metrics import binarize
from nahtlos.analysis.report import ReportValidationError, validate_report
from nahtlos.engine.predict import predict_whole


@pytest.fixture(scope="module")
def image():
    return noisy_image((64, 64))


@pytest.fixture(scope="module")
def written(tmp_path_factory, image):
    """A full report with figures, for a model whose eval and train modes differ."""
    out = tmp_path_factory.mktemp("report") / "diagnosis"
    net = bn_with_bad_statistics()
    labels = binarize(predict_whole(net, image, HALO, ALIGN, output_transform=torch.sigmoid))
    rep = run_diagnosis(
        net,
        image,
        labels=labels,
        make_figures=True,
        receptive_field=True,
        channel_names=["cells", "edges"],
    )
    paths = rep.write(out)
    return rep, out, paths


def test_report_files_validate_and_put_the_verdict_first(written):
    rep, out, _ = written
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert set(data["figures"]) >= {"seam_map", "train_eval", "tile_sweep"}
    if data["receptive_field"] is not None:
        assert "receptive_field" in data["figures"]
    for rel in data["figures"].values():
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["tile_mismatch"]["seamless"] is True
    assert data["train_eval_disparity"]["mean"] == pytest.approx(rep.train_eval_disparity.mean)
    assert set(data["dice"]) == {"eval", "train", "whole"}
    assert data["model"]["channel_names"] == ["cells", "edges"]
    md = (out / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Key numbers") < md.index("## Seam map")
    assert rep.verdict.headline in md
    for rel in data["figures"].values():
        assert f"]({rel})" in md
    page = (out / "report.html").read_text()
    assert page.index("Verdict") < page.index("Key numbers")
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == len(data["figures"]) and all(
        s.startswith("data:image/png;base64,") for s in srcs
    )
    assert "http://" not in page and "https://" not in page  # self-contained
    with pytest.raises(FileExistsError, match="already holds a report"):
        rep.write(out)


def test_schema_rejects_broken_reports(written):
    _, out, _ = written
    good = json.loads((out / "report.json").read_text())
    breakages = [
        lambda d: d["tile_mismatch"].pop("indicator"),
        lambda d: d["tile_mismatch"].__setitem__("indicator", "no"),
        lambda d: d["train_eval_disparity"].__setitem__("per_channel", [1.5, 0.0]),
        lambda d: d["verdict"].__setitem__("actions", []),
        lambda d: d.pop("receptive_field"),
        lambda d: d.__setitem__("unexpected", 1),
    ]
    for breakage in breakages:
        bad = copy.deepcopy(good)
        breakage(bad)
        with pytest.raises(ReportValidationError):
            validate_report(bad)


@pytest.fixture(scope="module")
def traced(tmp_path_factory, image):
    """The report of a traced TorchScript model (BatchNorm mode frozen), with labels."""
    net = bn_with_bad_statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
    labels = binarize(predict_whole(net, image, HALO, ALIGN, output_transform=torch.sigmoid))
    rep = run_diagnosis(model, image, labels=labels, make_figures=True, tile_sizes=[32, 64])
    out = tmp_path_factory.mktemp("traced") / "diagnosis"
    rep.write(out)
    return rep, out


def test_unmeasurable_figures_are_null_and_read_not_measurable(traced):
    rep, out = traced
    ted = rep.train_eval_disparity
    assert rep.verdict.disparity == "not measurable"
    assert ted.per_channel is None and ted.mean is None and not ted.measurable
    assert rep.worst_tile is None and "train_eval" not in rep.figures
    assert rep.dice is not None and rep.dice["train"] == [None, None]
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert data["train_eval_disparity"] == {
        "per_channel": None,
        "mean": None,
        "measurable": False,
        "worst_tile": None,
    }
    assert data["dice"]["train"] == [None, None]
    assert all(isinstance(v, float) for v in data["dice"]["whole"] if v is not None)
    assert data["global_statistics"] is None  # TorchScript: layers cannot be frozen one by one
    not_measurable = "not measurable (traced TorchScript model)"
    md = (out / "report.md").read_text()
    assert f"| Train/eval disparity | {not_measurable} |" in md
    assert f"| Dice vs labels (train) | {not_measurable} |" in md
    page = (out / "report.html").read_text()
    assert f"<td>Train/eval disparity</td><td>{not_measurable}</td>" in page
    assert f"<td>Dice vs labels (train)</td><td>{not_measurable}</td>" in page
    assert "(mean –)" not in md and "(mean –)" not in page


def test_schema_allows_null_exactly_where_not_measurable(traced, written):
    unmeasured = json.loads((traced[1] / "report.json").read_text())
    measured = json.loads((written[1] / "report.json").read_text())
    validate_report(measured)
    assert measured["train_eval_disparity"]["measurable"] is True
    stand_ins = {
        "per_channel": [0.0, 0.0],
        "mean": 0.0,
        "worst_tile": measured["train_eval_disparity"]["worst_tile"],
    }
    for key, number in stand_ins.items():
        bad = copy.deepcopy(unmeasured)
        bad["train_eval_disparity"][key] = number  # a number for what was not measured
        with pytest.raises(ReportValidationError, match="train_eval_disparity"):
            validate_report(bad)
        bad = copy.deepcopy(measured)
        bad["train_eval_disparity"][key] = None  # null for what was measured
        with pytest.raises(ReportValidationError, match="train_eval_disparity"):
            validate_report(bad)


def test_missing_labels_and_global_statistics_are_null(image):
    data = run_diagnosis(bn_with_bad_statistics(), image, tile_sizes=[64]).to_dict()
    assert data["dice"] is None and data["global_statistics"] is None
    assert all(p["dice"] is None for p in data["tile_size_sweep"])
    validate_report(data)
    for key in ("dice", "global_statistics"):
        bad = copy.deepcopy(data)
        bad.pop(key)
        with pytest.raises(ReportValidationError, match=key):
            validate_report(bad)


def _chromium(*args: str, tmp: Path, timeout: int = 90) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ]
    # its own session: chromium's helpers must not signal the test process's group
    return subprocess.run(
        [exe, *flags, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_html_report_renders_in_a_browser_with_every_image(written, tmp_path):
    from matplotlib.image import imread

    _, out, _ = written
    n_figures = len(json.loads((out / "report.json").read_text())["figures"])
    url = (out / "report.html").resolve().as_uri()
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", url, tmp=tmp_path)
    marker = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert marker, f"the page did not finish loading: {dom.stderr[-2000:]}"
    assert marker.group(1) == marker.group(2) == str(n_figures)
    shot = tmp_path / "report.png"
    _chromium(
        "--hide-scrollbars",
        "--window-size=1280,2000",
        f"--screenshot={shot}",
        url,
        tmp=tmp_path,
    )
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    gray = pixels.mean(axis=2)
    assert (gray < 0.9).mean() > 0.05, "the screenshot is (nearly) blank"
    colourful = np.abs(pixels - gray[..., None]).max(axis=2) > 0.15
    assert colourful.mean() > 0.01, "no coloured figure is visible"
