"""A run's numbers as rows, CSV and markdown tables in the paper's layout.

Cell results (``result.json``) become one row per (cell, evaluated dataset)
(:func:`result_rows`), per whole-image-statistics mode and per sweep window; rows go
to CSV and back with their types (:func:`write_csv`, :func:`read_csv`), and into
Table 1 (U-Net), Table 2 (UNETR), the transfer table and the whole-image-statistics
table (:func:`tables_markdown`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .presets import (
    FEATURE_NORM,
    INPUT_LABEL,
    NORM_LABEL,
    REPORTED_CLASSES,
    TABLE1_NORMS,
    TABLE2_NORMS,
    TRANSFER_DATASETS,
)

__all__ = [
    "AS_TRAINED",
    "RECALIBRATED",
    "global_stats_markdown",
    "global_stats_rows",
    "read_csv",
    "recalibration_markdown",
    "result_rows",
    "seed_means",
    "seeds_markdown",
    "sweep_rows",
    "table_markdown",
    "tables_markdown",
    "transfer_markdown",
    "write_csv",
]


AS_TRAINED = "as trained"
RECALIBRATED = "recalibrated"


def result_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, evaluated dataset, statistics) with every number, as written to
    CSV. ``statistics`` is ``as trained`` (the norms' moving averages) or
    ``recalibrated`` (population statistics of the final network, BatchNorm/BatchRenorm
    cells of presets that recalibrate)."""
    rows = []
    for res in results:
        cell = res["cell"]
        evaluations = [(AS_TRAINED, d, ev) for d, ev in res["evaluations"].items()]
        evaluations += [(RECALIBRATED, d, ev) for d, ev in res.get("recalibrated", {}).items()]
        for statistics, dataset, ev in evaluations:
            row: dict[str, Any] = {
                "arch": cell["arch"],
                "norm": cell["norm"],
                "input_norm": cell["input_norm"],
                "feature_norm": "tilewise" if cell["norm"] == "instance" else "global",
                "train_dataset": cell["dataset"],
                "eval_dataset": dataset,
                "statistics": statistics,
            }
            for key in ("dice_eval", "dice_train", "disparity"):
                for cls, v in ev[key].items():
                    row[f"{key}_{cls}"] = v
            vals = [v for v in ev["disparity"].values() if v is not None]
            row["disparity_mean"] = float(np.mean(vals)) if vals else None
            mm = ev["mismatch"]
            row["mismatch_indicator"] = mm["indicator"]
            row["mismatch_seamless"] = mm["seamless"]
            for cls, v in mm["per_class"].items():
                row[f"mismatch_{cls}"] = v
            row["mismatch_windows"] = mm["windows"]
            row["steps"] = res["steps"]
            row["train_seconds"] = res["train_seconds"]
            row["eval_seconds"] = res.get("eval_seconds")
            rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows (dicts) as CSV; missing values are empty fields."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.partial")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, _columns(rows))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, p)
    return p


def _parse(value: str) -> Any:
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_csv` back (numbers, booleans and blanks typed)."""
    with Path(path).open(newline="") as f:
        return [
            {k: _parse(v) for k, v in row.items() if _parse(v) is not None}
            for row in csv.DictReader(f)
        ]


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


def _mismatch_text(row: Mapping[str, Any] | None, cls: str = "boundaries") -> str:
    if row is None:
        return "–"
    if row.get("mismatch_seamless"):
        return "no"
    return _fmt(row.get(f"mismatch_{cls}"))


def _indicator_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("mismatch_seamless"):
        return "no"
    return f"{float(row['mismatch_indicator']):.2g}"


def _md(lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out)


def _find(
    rows: Sequence[Mapping[str, Any]],
    arch: str,
    column: tuple[str, str],
    train: str,
    ev: str,
    statistics: str = AS_TRAINED,
) -> Mapping[str, Any] | None:
    for r in rows:
        if (
            r["arch"] == arch
            and (r["norm"], r["input_norm"]) == column
            and r["train_dataset"] == train
            and r["eval_dataset"] == ev
            and r.get("statistics", AS_TRAINED) == statistics
        ):
            return r
    return None


def _header(columns: Sequence[tuple[str, str]], lead: int, repeat: int = 1) -> list[list[str]]:
    pad = [""] * (lead - 1)
    return [
        ["Normalization layer", *pad, *(NORM_LABEL[n] for n, _ in columns for _ in range(repeat))],
        ["Input norm", *pad, *(INPUT_LABEL[i] for _, i in columns for _ in range(repeat))],
        ["Feature norm", *pad, *(FEATURE_NORM[n] for n, _ in columns for _ in range(repeat))],
    ]


def table_markdown(rows: Sequence[Mapping[str, Any]], arch: str, datasets: Sequence[str]) -> str:
    """Table 1 (``unet``) or Table 2 (``unetr``) in the paper's layout.

    Rows: eval-mode Dice and train-mode Dice per dataset and class, train/eval disparity
    (mean over classes), tile mismatch (the boundaries magnitude, "no" when the
    indicator is below its tolerance) and the indicator itself (largest |Δp|).
    """
    columns = TABLE1_NORMS if arch == "unet" else TABLE2_NORMS
    lines = _header(columns, 3)
    for key, title in (("dice_eval", "dice, eval mode"), ("dice_train", "dice, train mode")):
        for d in datasets:
            for i, cls in enumerate(REPORTED_CLASSES[d]):
                lead = [title if d == datasets[0] and i == 0 else "", d if i == 0 else "", cls]
                vals = [(_find(rows, arch, c, d, d) or {}).get(f"{key}_{cls}") for c in columns]
                lines.append([*lead, *(_fmt(v) for v in vals)])
    for j, d in enumerate(datasets):
        vals = [(_find(rows, arch, c, d, d) or {}).get("disparity_mean") for c in columns]
        lines.append(["train/eval disparity" if j == 0 else "", d, "", *(_fmt(v) for v in vals)])
    for j, d in enumerate(datasets):
        cells = [_mismatch_text(_find(rows, arch, c, d, d)) for c in columns]
        lines.append(["tile mismatch (boundaries)" if j == 0 else "", d, "", *cells])
    for j, d in enumerate(datasets):
        cells = [_indicator_text(_find(rows, arch, c, d, d)) for c in columns]
        lines.append(["mismatch indicator, max abs. diff." if j == 0 else "", d, "", *cells])
    return _md(lines)


def recalibration_markdown(
    rows: Sequence[Mapping[str, Any]], arch: str, datasets: Sequence[str]
) -> str:
    """BatchNorm and BatchRenorm with their moving averages (as trained) and after
    recalibration: eval-mode Dice per class and train/eval disparity."""
    columns = [c for c in (TABLE1_NORMS if arch == "unet" else TABLE2_NORMS) if c[0] != "instance"]
    columns = [
        c for c in columns if any(_find(rows, arch, c, d, d, RECALIBRATED) for d in datasets)
    ]
    lines = [
        ["", "", "", *(f"{NORM_LABEL[n]} ({INPUT_LABEL[i]} input)" for n, i in columns)],
    ]

    def pair(r0: Mapping[str, Any] | None, r1: Mapping[str, Any] | None, key: str) -> str:
        return f"{_fmt((r0 or {}).get(key))} → {_fmt((r1 or {}).get(key))}"

    for d in datasets:
        for i, cls in enumerate(REPORTED_CLASSES[d]):
            lead = [
                "dice, eval mode" if d == datasets[0] and i == 0 else "",
                d if i == 0 else "",
                cls,
            ]
            cells = [
                pair(
                    _find(rows, arch, c, d, d),
                    _find(rows, arch, c, d, d, RECALIBRATED),
                    f"dice_eval_{cls}",
                )
                for c in columns
            ]
            lines.append([*lead, *cells])
    for j, d in enumerate(datasets):
        cells = [
            pair(
                _find(rows, arch, c, d, d),
                _find(rows, arch, c, d, d, RECALIBRATED),
                "disparity_mean",
            )
            for c in columns
        ]
        lines.append(["train/eval disparity" if j == 0 else "", d, "", *cells])
    return _md(lines)


def transfer_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Supplementary Table 1: U-Nets trained on plants and on embryo, evaluated on both."""
    data = TRANSFER_DATASETS
    lines = _header(TABLE1_NORMS, 3, repeat=len(data))
    lines.append(["trained on", "", "", *(d for _ in TABLE1_NORMS for d in data)])
    for j, ev in enumerate(data):
        for i, cls in enumerate(REPORTED_CLASSES[ev]):
            lead = ["dice, eval mode" if j == 0 and i == 0 else "", ev if i == 0 else "", cls]
            vals = [
                (_find(rows, "unet", c, tr, ev) or {}).get(f"dice_eval_{cls}")
                for c in TABLE1_NORMS
                for tr in data
            ]
            lines.append([*lead, *(_fmt(v) for v in vals)])
    for j, ev in enumerate(data):
        cells = [
            _mismatch_text(_find(rows, "unet", c, tr, ev)) for c in TABLE1_NORMS for tr in data
        ]
        lines.append(["tile mism. (boundaries)" if j == 0 else "", ev, "", *cells])
    return _md(lines)


def global_stats_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9 rows: InstanceNorm U-Nets tile-wise vs with whole-image statistics."""
    rows = []
    for res in results:
        gs = res.get("global_stats")
        if not gs:
            continue
        for mode in ("tilewise", "global"):
            row: dict[str, Any] = {"dataset": res["cell"]["dataset"], "statistics": mode}
            for cls, v in gs[f"dice_{mode}"].items():
                row[f"dice_{cls}"] = v
            mm = gs[f"mismatch_{mode}"]
            row["mismatch_indicator"] = mm["indicator"]
            row["mismatch_seamless"] = mm["seamless"]
            for cls, v in mm["per_class"].items():
                row[f"mismatch_{cls}"] = v
            row["halo"] = "x".join(str(h) for h in (gs["halo"] if mode == "global" else []))
            row["seconds"] = gs["seconds"] if mode == "global" else None
            rows.append(row)
    return rows


def global_stats_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> str:
    """Eval Dice and tile mismatch of the InstanceNorm U-Nets, tile-wise vs whole-image."""
    lines = [["dataset", "class", "Dice, tile statistics", "Dice, whole-image statistics"]]
    mism: list[list[str]] = []
    for d in datasets:
        by = {r["statistics"]: r for r in rows if r["dataset"] == d}
        if not by:
            continue
        for cls in REPORTED_CLASSES[d]:
            lines.append(
                [d, cls, *(_fmt(by.get(m, {}).get(f"dice_{cls}")) for m in ("tilewise", "global"))]
            )
        mism.append(
            [
                d,
                "tile mismatch (boundaries) / indicator",
                *(
                    f"{_mismatch_text(by.get(m))} / {_indicator_text(by.get(m))}"
                    for m in ("tilewise", "global")
                ),
            ]
        )
    return _md(lines + mism)


def sweep_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tile-size sweep rows: one per (cell, window)."""
    rows = []
    for res in results:
        cell = res["cell"]
        for point in res.get("sweep", []):
            row: dict[str, Any] = {
                "dataset": cell["dataset"],
                "norm": cell["norm"],
                "input_norm": cell["input_norm"],
                "window": point["window"],
            }
            row.update({f"dice_{k}": v for k, v in point["dice"].items()})
            rows.append(row)
    return rows


def tables_markdown(
    rows: Sequence[Mapping[str, Any]],
    gs_rows: Sequence[Mapping[str, Any]] = (),
    datasets: Sequence[str] = ("organoids", "plants", "embryo"),
) -> str:
    """All tables of a run as one markdown document (what ``tables.md`` holds)."""
    present = [d for d in datasets if any(r["train_dataset"] == d for r in rows)]
    parts = []
    for arch, title in (
        ("unet", "Table 1: U-Net"),
        ("unetr", "Table 2: UNETR"),
    ):
        if any(r["arch"] == arch for r in rows):
            parts += [f"### {title}", "", table_markdown(rows, arch, present), ""]
        if any(r["arch"] == arch and r.get("statistics") == RECALIBRATED for r in rows):
            parts += [
                f"### {title}: moving averages (as trained) → recalibrated statistics",
                "",
                recalibration_markdown(rows, arch, present),
                "",
            ]
    if any(r["train_dataset"] != r["eval_dataset"] for r in rows):
        parts += ["### Transfer (supplementary Table 1), U-Net", "", transfer_markdown(rows), ""]
    if gs_rows:
        parts += [
            "### InstanceNorm U-Net: tile statistics vs whole-image statistics",
            "",
            global_stats_markdown(gs_rows, present),
            "",
        ]
    return "\n".join(parts)


_SEED_KEYS = ("arch", "norm", "input_norm", "train_dataset", "eval_dataset", "statistics")


def seed_means(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several runs of the same grid (one per training seed), merged: every
    number becomes its mean over the runs, with ``<name>_min`` and ``<name>_max``."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            key = tuple(r.get(k, AS_TRAINED if k == "statistics" else None) for k in _SEED_KEYS)
            groups.setdefault(key, []).append(r)
    merged = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(_SEED_KEYS, key, strict=True)) | {"seeds": len(rs)}
        numbers = sorted(
            {k for r in rs for k, v in r.items() if k.startswith(("dice_", "disparity_"))}
        )
        for k in numbers:
            vals = [float(r[k]) for r in rs if isinstance(r.get(k), int | float)]
            if vals:
                row[k] = float(np.mean(vals))
                row[f"{k}_min"], row[f"{k}_max"] = min(vals), max(vals)
        merged.append(row)
    return merged


def seeds_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> str:
    """Per architecture: eval-mode Dice of each column and class, mean (min-max) over
    seeds, and the train/eval disparity; recalibrated networks get their own columns."""
    parts = []
    for arch in ("unet", "unetr"):
        mine = [r for r in rows if r["arch"] == arch and r["train_dataset"] == r["eval_dataset"]]
        if not mine:
            continue
        columns = [
            (c, stats)
            for c in (TABLE1_NORMS if arch == "unet" else TABLE2_NORMS)
            for stats in (AS_TRAINED, RECALIBRATED)
            if any((r["norm"], r["input_norm"]) == c and r["statistics"] == stats for r in mine)
        ]
        head = [
            f"{NORM_LABEL[n]} ({INPUT_LABEL[i]}){', recalibrated' if s == RECALIBRATED else ''}"
            for (n, i), s in columns
        ]
        lines = [["", "", *head]]
        present = [d for d in datasets if any(r["train_dataset"] == d for r in mine)]
        for d in present:
            for cls in (*REPORTED_CLASSES[d], "disparity"):
                key = "disparity_mean" if cls == "disparity" else f"dice_eval_{cls}"
                cells = []
                for c, stats in columns:
                    r = _find(mine, arch, c, d, d, stats) or {}
                    v = r.get(key)
                    cells.append(
                        ""
                        if v is None
                        else f"{v:.2f} ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})"
                    )
                lines.append([d, cls, *cells])
        parts += [
            f"### {'Table 1: U-Net' if arch == 'unet' else 'Table 2: UNETR'}",
            "",
            _md(lines),
            "",
        ]
    return "\n".join(parts)
