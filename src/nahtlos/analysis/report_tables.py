"""The report's numbers as text: the rows of its tables, for any output format.

:func:`key_numbers`, :func:`sweep_table`, :func:`norm_rows` and
:func:`settings_rows` read a ``report.json`` dict and return plain strings; the
templates of :mod:`nahtlos.analysis.report` lay them out as Markdown or HTML. A
figure that was not measured (``null``) reads "not measurable", never as a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import mean_of

__all__ = [
    "NOT_MEASURABLE",
    "fmt",
    "key_numbers",
    "norm_rows",
    "settings_rows",
    "status",
    "sweep_table",
]

#: What the report says for a train/eval figure of a model whose mode is frozen.
NOT_MEASURABLE = "not measurable (traced TorchScript model)"

_PER_AXIS = ("halo", "alignment")

Row = tuple[str, str, str]


def fmt(value: Any, digits: int = 3) -> str:
    """A number for people: ``–`` for missing, ``0`` for exact zero, else short."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.2g}"
        return f"{value:.{digits}g}"
    if isinstance(value, list | tuple):
        return (
            "×".join(fmt(v) for v in value)
            if all(isinstance(v, int) for v in value)
            else (", ".join(fmt(v) for v in value))
        )
    return str(value)


def _fmt_axes(values: Sequence[int] | None) -> str:
    """Per-axis values (halo, alignment, radii): one number if equal, else ``Z 4, Y 8, X 8``."""
    if values is None:
        return "–"
    if len(set(values)) == 1:
        return f"{values[0]} (every axis)"
    names = ("Z", "Y", "X")[3 - len(values) :]
    return ", ".join(f"{n} {v}" for n, v in zip(names, values, strict=True))


def _per_channel(names: Sequence[str], values: Sequence[float | None] | None) -> str:
    """``"cells 0.9, edges –"``."""
    return ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, values or [], strict=False))


def _with_mean(names: Sequence[str], values: Sequence[float | None]) -> str:
    """Per channel and their mean."""
    return _per_channel(names, values) + f" (mean {fmt(mean_of(values))})"


def _indicator_rows(data: Mapping[str, Any]) -> list[Row]:
    tm, ted, seam = data["tile_mismatch"], data["train_eval_disparity"], data["seam"]
    names = data["model"]["channel_names"]
    return [
        (
            "Tile mismatch (indicator)",
            tm["label"],
            f"largest difference between two overlapping tiles where both see full context; "
            f"'no' means below {fmt(tm['tolerance'])}",
        ),
        (
            "Tile mismatch (1 − Dice)",
            _per_channel(names, tm["per_channel"]),
            "per channel, mean over windows",
        ),
        (
            "Tiled vs whole image",
            fmt(seam["max_difference"]),
            "largest |difference| of the stitched prediction from the whole-image prediction",
        ),
        (
            "Train/eval disparity",
            _with_mean(names, ted["per_channel"]) if ted["measurable"] else NOT_MEASURABLE,
            "1 − Dice between train-mode and eval-mode masks of the same tiles",
        ),
    ]


def _rf_rows(rf: Mapping[str, Any] | None) -> list[Row]:
    if rf is None:
        return []
    trf = "whole tile" if rf["trf_radius"] is None else _fmt_axes(rf["trf_radius"])
    return [
        ("Receptive field (TRF radius)", trf, "pixels that can influence an output"),
        (
            "Effective receptive field",
            _fmt_axes(rf["erf_radius"]),
            f"radius holding {100 * float(rf.get('erf_mass', 0.99)):g}% of the influence",
        ),
    ]


def _global_rows(g: Mapping[str, Any] | None, names: Sequence[str]) -> list[Row]:
    if g is None:
        return []
    rows = [
        (
            "Tile mismatch with whole-image statistics",
            g["tile_mismatch"]["label"],
            f"the {g['layers']} InstanceNorm/GroupNorm layers frozen to the statistics of the "
            "whole image (`--norm-stats global`)",
        ),
        (
            "Whole-image statistics vs whole image",
            fmt(g["max_difference_to_whole"]),
            "largest |difference| of their block-wise prediction from the whole-image pass",
        ),
    ]
    if g.get("dice") is not None:
        rows.append(
            (
                "Dice vs labels (whole-image statistics)",
                _with_mean(names, g["dice"]),
                "block-wise prediction with whole-image statistics",
            )
        )
    return rows


def _geometry_rows(data: Mapping[str, Any]) -> list[Row]:
    rf, s = data.get("receptive_field"), data["settings"]
    td = data["verdict"]["tile_dependent"] if rf is None else rf["tile_dependent"]
    return [
        (
            "Tile-dependent",
            "not measured" if td is None else fmt(bool(td)),
            "every pixel of a tile affects every output (then no halo makes stitching exact)",
        ),
        (
            "Halo used",
            f"{_fmt_axes(s['halo'])}, from {s['halo_source']}",
            "context added around each tile",
        ),
        ("Alignment", _fmt_axes(s["alignment"]), "tiles start on multiples of it"),
        ("Tile", f"{fmt(s['tile'])} (window {fmt(s['window'])})", "inner tile diagnosed"),
    ]


_DICE_MEANING = {
    "eval": "tiled prediction, eval mode",
    "train": "tiled prediction, train mode",
    "whole": "whole image in one pass, eval mode",
}


def _dice_rows(data: Mapping[str, Any], names: Sequence[str]) -> list[Row]:
    dice = data.get("dice")
    if dice is None:  # no labels
        return []
    measurable = {"train": data["train_eval_disparity"]["measurable"]}
    return [
        (
            f"Dice vs labels ({mode})",
            _with_mean(names, dice[mode]) if measurable.get(mode, True) else NOT_MEASURABLE,
            meaning,
        )
        for mode, meaning in _DICE_MEANING.items()
    ]


def key_numbers(data: Mapping[str, Any]) -> list[Row]:
    """(quantity, value, what it means) rows of the summary table."""
    names = data["model"]["channel_names"]
    return [
        *_indicator_rows(data),
        *_rf_rows(data.get("receptive_field")),
        *_global_rows(data.get("global_statistics"), names),
        *_geometry_rows(data),
        *_dice_rows(data, names),
    ]


def sweep_table(data: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Head and rows of the tile-size sweep table."""
    names = data["model"]["channel_names"]
    has_dice = any(p["dice"] is not None for p in data["tile_size_sweep"])
    head = ["tile", "window", "tiles", "largest |tiled − whole|", "agreement (Dice)"]
    if has_dice:
        head.append("Dice vs labels")
    rows = []
    for p in sorted(data["tile_size_sweep"], key=lambda q: q["size"]):
        row = [
            fmt(p["tile"]),
            fmt(p["window"]),
            str(p["blocks"]),
            fmt(float(p["max_difference"])),
            ", ".join(fmt(v) for v in p["agreement"]),
        ]
        if has_dice:
            row.append(_per_channel(names, p["dice"]))
        rows.append(row)
    return head, rows


def norm_rows(data: Mapping[str, Any]) -> list[list[str]]:
    """(type, count, statistics, first names) per group of normalization layers."""
    rows = []
    for layer in data["normalization_layers"]:
        shown = ", ".join(layer["names"][:4]) + (" …" if len(layer["names"]) > 4 else "")
        rows.append([layer["type"], str(layer["count"]), layer["statistics"], shown])
    return rows


def settings_rows(data: Mapping[str, Any]) -> list[list[str]]:
    """(setting, value) per setting, then the time of each step."""
    s = data["settings"]
    rows = [[k, _fmt_axes(v) if k in _PER_AXIS else fmt(v)] for k, v in s.items()]
    rows += [[f"time: {k}", f"{t:.1f} s"] for k, t in data["timings"].items()]
    return rows


def status(data: Mapping[str, Any]) -> str:
    """``ok`` (seamless, no substantial disparity), ``warn`` (one problem) or ``bad`` (both)."""
    v = data["verdict"]
    if v["seamless"] and v["disparity"] != "substantial":
        return "ok"
    if v["seamless"] or v["disparity"] != "substantial":
        return "warn"
    return "bad"
