"""The experiment runner: a miniature grid, resume, CSV round trip, tables and figures."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nahtlos.cli import app
from nahtlos.paper.experiments import (
    PRESETS,
    TABLE1_NORMS,
    TABLE2_NORMS,
    ArchPreset,
    Cell,
    ExperimentError,
    Preset,
    grid,
    read_csv,
    reproduce,
    result_rows,
    shared_training,
    tables_markdown,
)
from nahtlos.paper.experiments.cell_training import cell_config
from nahtlos.paper.experiments.inputs import Geometry, ImageFiles


def mini_preset(**changes: object) -> Preset:
    """Every cell of both tables, a few steps each, on tiny images."""
    preset = Preset(
        name="mini",
        ndim=2,
        datasets=("organoids", "plants", "embryo"),
        train_shape=(96, 96),
        n_train=1,
        val_shape=(96, 128),
        n_val=1,
        unet=ArchPreset(
            patch=(48, 48),
            model={"channels": [4, 8, 16], "strides": [2, 2]},
            steps=4,
            batch_size=1,
            accumulate=1,
            lr=1e-3,
            warmup_steps=1,
            ramp_steps=2,
        ),
        unetr=ArchPreset(
            patch=(64, 64),
            model={"feature_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_heads": 2},
            steps=2,
            batch_size=1,
            accumulate=1,
            lr=1e-3,
            warmup_steps=1,
            ramp_steps=1,
        ),
        sweep_windows=(48,),
        checkpoint_every=2,
        val_every=100,
        workers=1,
        threads=1,
        device="cpu",
    )
    return dataclasses.replace(preset, **changes)  # type: ignore[arg-type]


def _mtimes(root, cells):
    return {c.key: os.stat(root / "cells" / c.key / "result.json").st_mtime_ns for c in cells}


def test_mini_grid_tables_resume_and_csv(tmp_path):
    preset = mini_preset()
    out = tmp_path / "run"
    first = reproduce(preset, out, progress=False)
    cells = grid(preset)
    assert len(cells) == 3 * (len(TABLE1_NORMS) + len(TABLE2_NORMS))
    assert sorted(first.ran) == sorted(c.key for c in cells) and not first.skipped

    # every cell in the tables: own dataset for all, plus the transfer evaluations
    rows = read_csv(out / "results.csv")
    own = {(r["arch"], r["train_dataset"], r["norm"], r["input_norm"]) for r in rows}
    assert own == {(c.arch, c.dataset, c.norm, c.input_norm) for c in cells}
    transfer = [r for r in rows if r["train_dataset"] != r["eval_dataset"]]
    assert len(transfer) == 2 * len(TABLE1_NORMS)
    assert len(rows) == len(cells) + len(transfer)
    tables = (out / "tables.md").read_text()
    for title in ("Table 1: U-Net", "Table 2: UNETR", "Transfer", "whole-image statistics"):
        assert title in tables
    table_lines = [ln for ln in tables.splitlines() if ln.startswith("| ")]
    assert table_lines and not any("–" in ln for ln in table_lines)  # no empty cell

    # CSV round trip: the numbers and the tables built from them are unchanged
    results = [json.loads((out / "cells" / c.key / "result.json").read_text()) for c in cells]
    assert rows == [{k: v for k, v in r.items() if v is not None} for r in result_rows(results)]
    assert tables_markdown(rows) == tables_markdown(result_rows(results))

    # what the norms guarantee whatever the training: seams and disparity
    by = {
        (r["arch"], r["train_dataset"], r["eval_dataset"], r["norm"], r["input_norm"]): r
        for r in rows
    }
    for d in preset.datasets:
        for norm, inp in (("batch", "global"), ("batchrenorm", "global"), ("identity", "global")):
            assert by[("unet", d, d, norm, inp)]["mismatch_seamless"] is True
        for inp in ("global", "tilewise"):
            assert by[("unet", d, d, "instance", inp)]["mismatch_indicator"] > 1e-5
            assert by[("unet", d, d, "instance", inp)]["disparity_mean"] == 0
        assert by[("unet", d, d, "identity", "global")]["disparity_mean"] == 0
        # batch size 1: BatchNorm's train mode is InstanceNorm (the same trained network)
        for arch in ("unet", "unetr"):
            bn, inst = by[(arch, d, d, "batch", "global")], by[(arch, d, d, "instance", "global")]
            for key in (k for k in bn if k.startswith("dice_train_")):
                assert bn[key] == pytest.approx(inst[key.replace("train", "eval")], abs=1e-9)
        assert by[("unet", d, d, "batch", "tilewise")]["mismatch_seamless"] is False
    gs = read_csv(out / "global_stats.csv")
    assert {r["dataset"] for r in gs} == set(preset.datasets)
    assert all(r["mismatch_seamless"] is (r["statistics"] == "global") for r in gs)
    # the sweep's whole-image point equals block-wise prediction with whole-image statistics
    sweep = read_csv(out / "sweep.csv")
    for g in (r for r in gs if r["statistics"] == "global"):
        whole = next(
            s
            for s in sweep
            if s["dataset"] == g["dataset"]
            and (s["norm"], s["input_norm"]) == ("instance", "global")
            and s["window"] == "whole"
        )
        for key in (k for k in g if k.startswith("dice_")):
            assert whole[key] == pytest.approx(g[key], abs=1e-3)

    for name in ("sweep.png", *(f"stitched-{d}.png" for d in preset.datasets)):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000

    # resume: an interrupted training (final checkpoint lost) and a lost evaluation
    interrupted = Cell("unet", "embryo", "batchrenorm", "global")
    lost = Cell("unetr", "plants", "instance", "global")
    run = out / "cells" / interrupted.key
    (run / "result.json").unlink()
    (run / "train" / "checkpoints" / "step-000004.pt").unlink()
    (run / "train" / "model.pt").unlink()
    (out / "cells" / lost.key / "result.json").unlink()
    before = _mtimes(out, [c for c in cells if c not in (interrupted, lost)])
    second = reproduce(preset, out, progress=False)
    assert sorted(second.ran) == sorted([interrupted.key, lost.key])
    assert len(second.skipped) == len(cells) - 2
    assert _mtimes(out, [c for c in cells if c not in (interrupted, lost)]) == before
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["resumed_from"] == 2
    assert json.loads((out / "cells" / lost.key / "result.json").read_text())["weights_from"] == (
        "unetr-plants-batch-global"
    )
    assert (out / "tables.md").read_text() == tables  # bit-identical resumed training
    timing = ("train_seconds", "eval_seconds")
    assert [
        {k: v for k, v in r.items() if k not in timing} for r in read_csv(out / "results.csv")
    ] == [{k: v for k, v in r.items() if k not in timing} for r in rows]

    # a folder of another preset is not silently mixed
    with pytest.raises(ExperimentError, match="another preset"):
        reproduce(mini_preset(unet=dataclasses.replace(preset.unet, steps=5)), out, progress=False)


def test_batchnorm_with_batch_size_one_trains_the_instancenorm_network(tmp_path):
    """Why InstanceNorm cells reuse the BatchNorm cells' training (shared_training)."""
    from nahtlos.paper.synth import write_synthetic
    from nahtlos.training.config import validate_config
    from nahtlos.training.loop import train

    write_synthetic("embryo", tmp_path / "e.tif", (64, 64), seed=3, progress=False)
    weights = {}
    for norm in ("batch", "instance"):
        cfg = validate_config(
            {
                "data": {
                    "train": [
                        {"image": str(tmp_path / "e.tif"), "labels": str(tmp_path / "e_labels.tif")}
                    ],
                    "patch": [32, 32],
                    "input_norm": {"mode": "tilewise"},
                },
                "model": {"ndim": 2, "norm": norm, "channels": [4, 8, 8]},
                "train": {"steps": 5, "batch_size": 1, "accumulate": 2, "checkpoint_every": 5},
                "out": str(tmp_path / norm),
            }
        )
        train(cfg, progress=False)
        weights[norm] = torch.load(tmp_path / norm / "model.pt", weights_only=True)["model"]
    inst, bn = weights["instance"], weights["batch"]
    assert set(inst) < set(bn) and all(torch.equal(inst[k], bn[k]) for k in inst)
    quick = PRESETS["quick"]
    assert shared_training(quick, Cell("unetr", "plants", "instance", "global")) == Cell(
        "unetr", "plants", "batch", "global"
    )
    bigger = dataclasses.replace(quick, unet=dataclasses.replace(quick.unet, batch_size=2))
    assert shared_training(bigger, Cell("unet", "plants", "instance", "global")) is None


def test_grid_and_presets():
    quick = PRESETS["quick"]
    cells = grid(quick)
    assert len(cells) == 30 and len({c.key for c in cells}) == 30
    assert [c.column for c in cells if c.arch == "unet" and c.dataset == "plants"] == list(
        TABLE1_NORMS
    )
    assert [c.column for c in cells if c.arch == "unetr" and c.dataset == "plants"] == list(
        TABLE2_NORMS
    )
    assert len(grid(quick, ("unet",), ("embryo",))) == 6
    for p in PRESETS.values():
        assert Preset.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert quick.fingerprint() == dataclasses.replace(quick, workers=7).fingerprint()
    assert quick.fingerprint() != dataclasses.replace(quick, seed=1).fingerprint()
    with pytest.raises(ExperimentError, match="unknown dataset 'cells'"):
        grid(quick, datasets=("cells",))
    with pytest.raises(ExperimentError, match="unknown architecture"):
        grid(quick, archs=("resnet",))


def test_paper_preset_is_the_papers_recipe(tmp_path):
    paper = PRESETS["paper"]
    files = {
        k: [ImageFiles(str(tmp_path / f"{k}.tif"), str(tmp_path / f"{k}_l.tif"))]
        for k in ("train", "val")
    }
    for cell in grid(paper):
        geo = Geometry((12, 12, 12), (4, 4, 4), (96, 96, 96))
        if cell.arch == "unetr":
            geo = Geometry((16, 16, 16), (16, 16, 16), (96, 96, 96))
        cfg = cell_config(paper, cell, files, geo, tmp_path / cell.key)
        assert cfg.model.ndim == 3 and cfg.data.patch == [96, 96, 96]
        assert (cfg.train.steps, cfg.train.batch_size, cfg.train.accumulate) == (25000, 1, 8)
        assert cfg.train.lr == 1e-3 and cfg.model.momentum == 0.01
        # BatchRenorm: BatchNorm for 40% of the steps, then a ramp over 30%
        assert (cfg.train.renorm.warmup_steps, cfg.train.renorm.ramp_steps) == (10000, 7500)
        assert cfg.data.input_norm.mode == cell.input_norm and cfg.model.norm == cell.norm
        # the paper's recipe, not nahtlos train's defaults
        assert (cfg.train.loss, cfg.train.lr_schedule, cfg.train.recalibrate) == (
            "dice",
            "constant",
            0,
        )
        assert cfg.data.foreground_bias == 0.0
        if cell.arch == "unet":
            assert cfg.model.channels == [32, 64, 128] and cfg.train.val_block == [72, 72, 72]
        else:
            assert (cfg.model.hidden_size, cfg.model.num_heads) == (768, 12)


def test_mismatch_window_cuts_subtiles_of_the_inference_window():
    from nahtlos.analysis.metrics import tile_mismatch

    for geo in (
        Geometry((12, 12), (4, 4), (96, 96)),
        Geometry((16, 16), (16, 16), (64, 64)),
        Geometry((12, 12), (4, 4), (48, 48)),
    ):
        window, overlap = geo.mismatch_window()
        seen: list[tuple[int, ...]] = []

        class Recorder(torch.nn.Module):
            def forward(self, x, seen=seen):
                seen.append(tuple(x.shape[2:]))
                return x

        model = Recorder()
        image = np.random.default_rng(0).random((window[0], window[1] + 8)).astype(np.float32)
        tm = tile_mismatch(
            model,
            image,
            window=window,
            halo=geo.halo,
            alignment=geo.alignment,
            overlap=overlap,
            activation="none",
        )
        assert tm.seamless  # the identity is seamless
        assert set(seen) == {geo.window}


def test_cli_rejects_unknown_names(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["reproduce", "--preset", "huge", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "'huge' is not one of quick, paper" in res.output
    res = runner.invoke(app, ["reproduce", "--datasets", "cells", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "'cells' is not one of" in res.output


def test_recalibrated_networks_and_seed_means(tmp_path):
    from nahtlos.paper.experiments import reproduce_seeds

    unet = dataclasses.replace(mini_preset().unet, loss="dice_bce", recalibrate=4)
    preset = mini_preset(unet=unet, datasets=("plants",))
    runs = reproduce_seeds(
        preset, tmp_path / "run", [0, 1], archs=("unet",), progress=False, workers=1
    )
    assert [r.out.name for r in runs] == ["seed-0", "seed-1"]
    for r in runs:
        stats = {(row["norm"], row["statistics"]) for row in r.rows}
        assert ("batchrenorm", "recalibrated") in stats and ("batch", "recalibrated") in stats
        assert ("instance", "recalibrated") not in stats
        tables = (r.out / "tables.md").read_text()
        assert "moving averages (as trained) → recalibrated statistics" in tables
        cfg = json.loads((r.out / "manifest.json").read_text())["preset"]
        assert cfg["train_seed"] == int(r.out.name.split("-")[1])
    # the two seeds trained different networks on the same data
    a, b = (
        {
            (x["norm"], x["input_norm"], x["statistics"]): x["dice_eval_foreground"]
            for x in r.rows
            if x["eval_dataset"] == "plants"
        }
        for r in runs
    )
    assert a != b
    means = read_csv(tmp_path / "run" / "seeds.csv")
    checked = 0
    for row in means:
        key = (row["norm"], row["input_norm"], row["statistics"])
        if row["eval_dataset"] == "plants" and key in a:
            assert row["dice_eval_foreground"] == pytest.approx((a[key] + b[key]) / 2)
            assert row["dice_eval_foreground_min"] == pytest.approx(min(a[key], b[key]))
            checked += 1
    assert checked == len(a) >= 8  # every cell and every recalibrated network
    text = (tmp_path / "run" / "seeds.md").read_text()
    assert "BatchRenorm (global), recalibrated" in text and "training seeds 0, 1" in text
