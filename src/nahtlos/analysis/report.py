"""The diagnosis report people look at: JSON (with its schema), Markdown, HTML, figures.

:func:`nahtlos.analysis.diagnose.diagnose` measures; this module turns its results into files:

- ``report.json``, valid against :func:`report_schema` (shipped as
  ``diagnosis_report.schema.json`` in the package; :func:`validate_report` checks a
  report against it with ``jsonschema``);
- ``report.md``, with the pictures as ``figures/*.png`` beside it;
- ``report.html``, self-contained: the pictures are embedded, nothing is fetched.

Both documents put the verdict first, in plain words, and what to do about it. The
figures are drawn with matplotlib's object-oriented API (no pyplot state), so they can
be made from any thread.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NahtlosError

__all__ = [
    "FIGURES",
    "REPORT_SCHEMA_FILE",
    "DisparityView",
    "ReportOutputError",
    "ReportValidationError",
    "SeamView",
    "disparity_figure",
    "render_html",
    "render_markdown",
    "report_schema",
    "seam_figure",
    "sweep_figure",
    "validate_report",
    "write_report",
]

REPORT_SCHEMA_FILE = "diagnosis_report.schema.json"

#: Figure name -> (title, caption in plain words), in the order the report shows them.
FIGURES: dict[str, tuple[str, str]] = {
    "seam_map": (
        "Seam map",
        "Where the tiled prediction differs from the prediction of the whole image in one "
        "pass. Dashed lines are tile borders. A seamless network gives zero (black) "
        "everywhere; bright lines along the tile borders are stitching artifacts.",
    ),
    "train_eval": (
        "Train mode vs eval mode, worst tile",
        "The same tile predicted with the network in train mode (normalization with the "
        "statistics of the tile itself) and in eval mode (the statistics stored during "
        "training), with their difference. White contours mark the 0.5 threshold. If the two "
        "differ, the stored statistics do not represent your images.",
    ),
    "receptive_field": (
        "Receptive field",
        "How strongly each input pixel influences the centre output pixel (log scale). The "
        "box is the theoretical receptive field: pixels outside it cannot influence the "
        "centre. A red box around the whole picture means every pixel of the tile matters, "
        "so no overlap between tiles can make stitching exact.",
    ),
    "tile_sweep": (
        "Tile-size sweep",
        "How the prediction changes with the tile size used for inference. For a seamless "
        "network the tiled prediction equals the whole-image one at every size (agreement "
        "1, difference ~0). For networks whose normalization depends on the tile, agreement "
        "grows with the tile size.",
    ),
}


class ReportValidationError(NahtlosError, ValueError):
    """A report that does not match :func:`report_schema`."""


class ReportOutputError(NahtlosError, FileExistsError):
    """The report folder exists and holds a report, or is not a folder."""


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``report.json``."""
    text = resources.files(__package__).joinpath(REPORT_SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_report(data: Mapping[str, Any]) -> None:
    """Check a report dict (or loaded ``report.json``) against the schema.

    Raises
    ------
    ReportValidationError
        Naming the first offending field and why.
    ImportError
        If ``jsonschema`` is not installed (``pip install jsonschema``).
    """
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(report_schema())
    validator = validator_cls(report_schema(), format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(dict(data)), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise ReportValidationError(
            f"report field {where!r} does not match the schema: {first.message}"
            + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")
        )


# --------------------------------------------------------------------------- figures


@dataclass
class SeamView:
    """A 2D view (a central slice for 3D) of the stitched prediction and its seams.

    Attributes
    ----------
    image
        Input intensities (first channel, after input normalization).
    whole, tiled
        Whole-image and tiled probabilities of ``channel``.
    seam
        ``|tiled - whole|``, largest over channels.
    borders
        Tile borders along the rows and along the columns (positions in the view).
    axes
        Names of the row and column axes.
    where
        Which slice this is (empty for 2D images).
    channel
        Name of the channel shown.
    tolerance
        Largest difference still called "no seams" (the diagnosis' tolerance).
    """

    image: np.ndarray
    whole: np.ndarray
    tiled: np.ndarray
    seam: np.ndarray
    borders: tuple[Sequence[int], Sequence[int]]
    axes: tuple[str, str]
    where: str
    channel: str
    tolerance: float = 1e-5


@dataclass
class DisparityView:
    """A 2D view of one tile predicted in train mode and in eval mode."""

    image: np.ndarray
    train: np.ndarray
    eval: np.ndarray
    axes: tuple[str, str]
    where: str
    tile: str
    channel: str
    one_minus_dice: float
    threshold: float


# Large enough to read when the HTML page scales a figure to its width.
_STYLE: dict[Any, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 14,
}


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _styled(draw: Any) -> Any:
    """Run a figure function under the report's font sizes."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _panel_size(shape: tuple[int, ...], n: int, width: float = 15.0) -> tuple[float, float]:
    h, w = shape
    panel_w = width / n
    return width, max(2.6, min(7.5, panel_w * h / max(w, 1) + 1.3))


def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


@_styled
def seam_figure(view: SeamView) -> bytes:
    """Input with tile borders, whole-image and tiled predictions, and the seam map (PNG)."""
    from matplotlib.colors import LogNorm

    width, height = _panel_size(view.seam.shape, 4)
    fig = _new_figure(width, height)
    axs = fig.subplots(1, 4)
    lo, hi = _intensity_range(view.image)
    axs[0].imshow(view.image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    axs[0].set_title("Input image and tile borders")
    prob = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    axs[1].imshow(view.whole, **prob)
    axs[1].set_title(f"Whole image in one pass\n({view.channel})")
    im = axs[2].imshow(view.tiled, **prob)
    axs[2].set_title(f"Tiled and stitched\n({view.channel})")
    fig.colorbar(im, ax=axs[1:3], shrink=0.8, label="probability")
    floor = 1e-6
    largest = float(np.max(view.seam)) if view.seam.size else 0.0
    sm = axs[3].imshow(
        np.clip(view.seam, floor, 1.0),
        cmap="magma",
        norm=LogNorm(vmin=floor, vmax=1.0),
        interpolation="nearest",
    )
    verdict = "no seams" if largest <= view.tolerance else "seams"
    axs[3].set_title(f"|tiled − whole|, all channels\nlargest {largest:.2g}: {verdict}")
    fig.colorbar(sm, ax=axs[3], shrink=0.8, label="absolute difference (log)")
    for ax in axs:
        for r in view.borders[0]:
            ax.axhline(r - 0.5, color="#00e5ff", lw=0.8, ls="--", alpha=0.8)
        for c in view.borders[1]:
            ax.axvline(c - 0.5, color="#00e5ff", lw=0.8, ls="--", alpha=0.8)
        ax.set_xlabel(view.axes[1])
        ax.set_ylabel(view.axes[0])
    if view.where:
        fig.suptitle(view.where)
    return _png(fig)


@_styled
def disparity_figure(view: DisparityView) -> bytes:
    """Input, train-mode and eval-mode predictions of one tile, and their difference (PNG)."""
    width, height = _panel_size(view.train.shape, 4)
    fig = _new_figure(width, height)
    axs = fig.subplots(1, 4)
    lo, hi = _intensity_range(view.image)
    axs[0].imshow(view.image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    axs[0].set_title("Input tile")
    prob = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    for ax, data, name in ((axs[1], view.train, "Train mode"), (axs[2], view.eval, "Eval mode")):
        im = ax.imshow(data, **prob)
        if np.nanmin(data) < view.threshold < np.nanmax(data):
            ax.contour(data, levels=[view.threshold], colors="white", linewidths=0.8)
        ax.set_title(f"{name}\n({view.channel})")
    fig.colorbar(im, ax=axs[1:3], shrink=0.8, label="probability")
    diff = np.abs(view.train - view.eval)
    dm = axs[3].imshow(diff, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    axs[3].set_title(f"|train − eval|\n1 − Dice = {view.one_minus_dice:.2g}")
    fig.colorbar(dm, ax=axs[3], shrink=0.8, label="absolute difference")
    for ax in axs:
        ax.set_xlabel(view.axes[1])
        ax.set_ylabel(view.axes[0])
    fig.suptitle(f"Worst tile: {view.tile}" + (f" — {view.where}" if view.where else ""))
    return _png(fig)


@_styled
def sweep_figure(
    sweep: Sequence[Mapping[str, Any]],
    channel_names: Sequence[str],
    whole_dice: Sequence[float | None] | None = None,
    tolerance: float = 1e-5,
    current: int | None = None,
) -> bytes:
    """Agreement with the whole image, largest difference and Dice vs tile size (PNG).

    Like the paper's Fig. 6; ``whole_dice`` (Dice of the whole-image prediction, the
    limit of large tiles) is drawn as dashed lines when labels were given.
    """
    points = sorted(sweep, key=lambda p: p["size"])
    sizes = [int(p["size"]) for p in points]
    has_dice = any(p.get("dice") is not None for p in points)
    n = 3 if has_dice else 2
    fig = _new_figure(5.2 * n, 4.2)
    axs = fig.subplots(1, n)
    colors = [f"C{i}" for i in range(len(channel_names))]
    # distinct markers and dashes: equal curves (common when seamless) stay visible
    styles = [
        {"color": colors[c], "marker": "os^Dv<>p"[c % 8], "ls": ("-", "--", ":", "-.")[c % 4]}
        for c in range(len(channel_names))
    ]
    labels = [
        "whole" if int(p["blocks"]) == 1 else "×".join(str(t) for t in p["tile"]) for p in points
    ]

    def setup(ax: Any, title: str, ylabel: str) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, labels, rotation=30 if len(sizes) > 3 else 0, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("tile size (voxels; window = tile + 2 × halo)")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if current is not None:
            ax.axvline(current, color="0.6", lw=1, ls=":")

    ax = axs[0]
    for c, name in enumerate(channel_names):
        ax.plot(sizes, [p["agreement"][c] for p in points], label=name, **styles[c])
    low = min((min(p["agreement"]) for p in points), default=1.0)
    ax.set_ylim(min(low - 0.02, 0.95), 1.005)
    setup(ax, "Agreement with the whole-image prediction", "Dice (tiled vs whole masks)")
    ax.legend(fontsize=8)

    ax = axs[1]
    floor = 1e-8
    ax.plot(sizes, [max(float(p["max_difference"]), floor) for p in points], "o-", color="k")
    ax.axhline(tolerance, color="tab:green", ls="--", lw=1)
    ax.text(sizes[0], tolerance * 1.5, "seamless below", color="tab:green", fontsize=8)
    if any(float(p["max_difference"]) == 0 for p in points):
        ax.text(sizes[0], floor * 2, "bottom row: identical (0)", fontsize=8, color="0.3")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 2.0)
    setup(ax, "Largest |tiled − whole|", "absolute difference (log)")

    if has_dice:
        ax = axs[2]
        for c, name in enumerate(channel_names):
            ys = [(p["dice"] or [None] * len(channel_names))[c] for p in points]
            if all(y is None for y in ys):
                continue
            ax.plot(sizes, [math.nan if y is None else y for y in ys], label=name, **styles[c])
            limit = None if whole_dice is None else whole_dice[c]
            if limit is not None:
                ax.axhline(float(limit), color=colors[c], ls="--", lw=1)
        ax.set_ylim(-0.02, 1.02)
        setup(ax, "Dice against the labels (eval mode)", "Dice")
        ax.legend(fontsize=8, title="dashed: whole image", title_fontsize=7)
    if current is not None:
        fig.suptitle("dotted line: the tile size diagnosed above", fontsize=9, color="0.4")
    return _png(fig)


# --------------------------------------------------------------------------- text


def _fmt(value: Any, digits: int = 3) -> str:
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
            "×".join(_fmt(v) for v in value)
            if all(isinstance(v, int) for v in value)
            else (", ".join(_fmt(v) for v in value))
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


_PER_AXIS = ("halo", "alignment")


def _mean(values: Sequence[float | None] | None) -> float | None:
    vals = [v for v in values or [] if v is not None]
    return float(np.mean(vals)) if vals else None


def _key_numbers(data: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, value, what it means) rows of the summary table."""
    tm, ted, seam = data["tile_mismatch"], data["train_eval_disparity"], data["seam"]
    names = data["model"]["channel_names"]
    per = ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, tm["per_channel"], strict=False))
    rows = [
        (
            "Tile mismatch (indicator)",
            tm["label"],
            f"largest difference between two overlapping tiles where both see full context; "
            f"'no' means below {_fmt(tm['tolerance'])}",
        ),
        ("Tile mismatch (1 − Dice)", per, "per channel, mean over windows"),
        (
            "Tiled vs whole image",
            _fmt(seam["max_difference"]),
            "largest |difference| of the stitched prediction from the whole-image prediction",
        ),
        (
            "Train/eval disparity",
            ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, ted["per_channel"], strict=False))
            + f" (mean {_fmt(ted['mean'])})"
            if ted["measurable"]
            else "not measurable (traced TorchScript model)",
            "1 − Dice between train-mode and eval-mode masks of the same tiles",
        ),
    ]
    rf = data.get("receptive_field")
    s = data["settings"]
    if rf is not None:
        trf = "whole tile" if rf["trf_radius"] is None else _fmt_axes(rf["trf_radius"])
        rows.append(("Receptive field (TRF radius)", trf, "pixels that can influence an output"))
        rows.append(
            (
                "Effective receptive field",
                _fmt_axes(rf["erf_radius"]),
                f"radius holding {100 * float(rf.get('erf_mass', 0.99)):g}% of the influence",
            )
        )
    g = data.get("global_statistics")
    if g is not None:
        gtm = g["tile_mismatch"]
        rows.append(
            (
                "Tile mismatch with whole-image statistics",
                gtm["label"],
                f"the {g['layers']} InstanceNorm/GroupNorm layers frozen to the statistics of the "
                "whole image (`--norm-stats global`)",
            )
        )
        rows.append(
            (
                "Whole-image statistics vs whole image",
                _fmt(g["max_difference_to_whole"]),
                "largest |difference| of their block-wise prediction from the whole-image pass",
            )
        )
        if g.get("dice") is not None:
            rows.append(
                (
                    "Dice vs labels (whole-image statistics)",
                    ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, g["dice"], strict=False))
                    + f" (mean {_fmt(_mean(g['dice']))})",
                    "block-wise prediction with whole-image statistics",
                )
            )
    td = data["verdict"]["tile_dependent"] if rf is None else rf["tile_dependent"]
    rows.append(
        (
            "Tile-dependent",
            "not measured" if td is None else _fmt(bool(td)),
            "every pixel of a tile affects every output (then no halo makes stitching exact)",
        )
    )
    rows.append(
        (
            "Halo used",
            f"{_fmt_axes(s['halo'])}, from {s['halo_source']}",
            "context added around each tile",
        )
    )
    rows.append(("Alignment", _fmt_axes(s["alignment"]), "tiles start on multiples of it"))
    rows.append(("Tile", f"{_fmt(s['tile'])} (window {_fmt(s['window'])})", "inner tile diagnosed"))
    dice = data.get("dice")
    if dice is not None:
        for mode in ("eval", "train", "whole"):
            vals = dice[mode]
            rows.append(
                (
                    f"Dice vs labels ({mode})",
                    ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, vals, strict=False))
                    + f" (mean {_fmt(_mean(vals))})",
                    {
                        "eval": "tiled prediction, eval mode",
                        "train": "tiled prediction, train mode",
                        "whole": "whole image in one pass, eval mode",
                    }[mode],
                )
            )
    return rows


def _sweep_rows(data: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = data["model"]["channel_names"]
    has_dice = any(p["dice"] is not None for p in data["tile_size_sweep"])
    head = ["tile", "window", "tiles", "largest |tiled − whole|", "agreement (Dice)"]
    if has_dice:
        head.append("Dice vs labels")
    rows = []
    for p in sorted(data["tile_size_sweep"], key=lambda q: q["size"]):
        row = [
            _fmt(p["tile"]),
            _fmt(p["window"]),
            str(p["blocks"]),
            _fmt(float(p["max_difference"])),
            ", ".join(_fmt(v) for v in p["agreement"]),
        ]
        if has_dice:
            row.append(
                ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, p["dice"] or [], strict=False))
            )
        rows.append(row)
    return head, rows


def _norm_rows(data: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for layer in data["normalization_layers"]:
        shown = ", ".join(layer["names"][:4]) + (" …" if len(layer["names"]) > 4 else "")
        rows.append([layer["type"], str(layer["count"]), layer["statistics"], shown])
    return rows


def _status(data: Mapping[str, Any]) -> str:
    v = data["verdict"]
    if v["seamless"] and v["disparity"] != "substantial":
        return "ok"
    if v["seamless"] or v["disparity"] != "substantial":
        return "warn"
    return "bad"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(data: Mapping[str, Any], figure_paths: Mapping[str, str]) -> str:
    """The report as Markdown; ``figure_paths`` maps figure names to relative PNG paths."""
    v, m, img = data["verdict"], data["model"], data["image"]
    out = [
        "# Can this network be tiled seamlessly?",
        "",
        f"Model `{m['source']}` ({m['kind']}, {m['ndim']}D, {m['in_channels']} → "
        f"{m['out_channels']} channels, {m['activation']}) on image `{img['source']}` "
        f"(shape {_fmt(img['shape'])}). nahtlos {data['nahtlos_version']}, {data['created']}.",
        "",
        "## Verdict",
        "",
        f"**{v['headline']}**",
        "",
    ]
    out += [f"- {f}" for f in v["findings"]]
    out += ["", "### What to do", ""]
    out += [f"{i}. {a}" for i, a in enumerate(v["actions"], 1)]
    out += ["", "## Key numbers", ""]
    out.append(_md_table(["quantity", "value", "meaning"], _key_numbers(data)))
    for name, (title, caption) in FIGURES.items():
        if name not in figure_paths:
            continue
        out += ["", f"## {title}", "", f"![{title}]({figure_paths[name]})", "", caption]
        if name == "tile_sweep":
            head, rows = _sweep_rows(data)
            out += ["", _md_table(head, rows)]
    if data["normalization_layers"]:
        out += ["", "## Normalization layers", ""]
        out.append(_md_table(["type", "count", "statistics", "layers"], _norm_rows(data)))
    out += ["", "## Settings and timings", ""]
    s = data["settings"]
    settings = [[k, _fmt_axes(s[k]) if k in _PER_AXIS else _fmt(s[k])] for k in s]
    settings += [[f"time: {k}", f"{t:.1f} s"] for k, t in data["timings"].items()]
    out.append(_md_table(["setting", "value"], settings))
    out += ["", "Definitions: see the glossary in report.html or DESIGN.md §2.", ""]
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#1d2330;line-height:1.45;background:#fff}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #dde;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#566;margin-top:0}
.verdict{border-radius:10px;padding:1em 1.3em;margin:1.2em 0;border-left:10px solid}
.verdict.ok{background:#e9f7ee;border-color:#2e9d58}.verdict.warn{background:#fff6e0;border-color:#e0a100}
.verdict.bad{background:#fdecec;border-color:#d33}
.verdict h2{border:none;margin-top:0}.headline{font-size:1.25em;font-weight:600}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em}
td,th{border:1px solid #d5d9e0;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.meaning{color:#566;font-size:.9em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6ec}
#receptive_field img{max-width:min(100%,900px)}
figcaption{color:#445;font-size:.95em;margin-top:.4em}
details{margin-top:2em}code{background:#f2f4f8;padding:0 .25em;border-radius:3px}
"""

# Marks the document once every picture has been decoded, so a headless browser (and a
# reader) can tell a complete report from one with broken images.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  if (ok < imgs.length) {
    var p = document.createElement('p');
    p.style.color = '#d33';
    p.textContent = (imgs.length - ok) + ' picture(s) of this report could not be shown.';
    document.body.insertBefore(p, document.body.firstChild);
  }
});
"""

_GLOSSARY = [
    ("tile", "the part of the image whose prediction is kept; tiles are stitched side by side"),
    ("halo", "context added around each tile for the network to look at, then cut away"),
    (
        "alignment",
        "the network's total down-sampling factor; tiles and halos are multiples of it",
    ),
    (
        "seamless",
        "the stitched prediction equals the prediction of the whole image in one pass, "
        "for every tile size",
    ),
    (
        "tile mismatch",
        "two overlapping tiles are predicted separately and compared where both see full "
        "context; any difference means the prediction depends on how the image is tiled",
    ),
    (
        "train/eval disparity",
        "1 − Dice between the masks predicted in train mode and in eval mode for the same "
        "tiles; large values mean the running statistics of BatchNorm do not fit the data",
    ),
    (
        "TRF / ERF",
        "theoretical receptive field (every input pixel that can influence an output "
        "pixel) / effective receptive field (the pixels that influence it noticeably)",
    ),
    ("Dice", "overlap of two masks: 2|A∩B| / (|A| + |B|); 1 is perfect agreement"),
]


def render_html(data: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML page (figures embedded as PNG data URIs)."""
    e = html.escape
    v, m, img = data["verdict"], data["model"], data["image"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nahtlos diagnosis: {e(Path(m['source']).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Can this network be tiled seamlessly?</h1>",
        f'<p class="sub">Model <code>{e(m["source"])}</code> ({e(m["kind"])}, {m["ndim"]}D, '
        f"{m['in_channels']} → {m['out_channels']} channels, {e(m['activation'])}) on image "
        f"<code>{e(img['source'])}</code> (shape {e(_fmt(img['shape']))}). "
        f"nahtlos {e(data['nahtlos_version'])}, {e(data['created'])}.</p>",
        f'<section class="verdict {_status(data)}"><h2>Verdict</h2>',
        f'<p class="headline">{e(v["headline"])}</p>',
    ]
    if v["findings"]:
        parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in v["findings"]) + "</ul>")
    parts.append("<h3>What to do</h3><ol>")
    parts += [f"<li>{e(a)}</li>" for a in v["actions"]]
    parts.append("</ol></section>")
    parts.append(
        "<h2>Key numbers</h2><table><tr><th>quantity</th><th>value</th><th>meaning</th></tr>"
    )
    for q, val, meaning in _key_numbers(data):
        parts.append(
            f'<tr><td>{e(q)}</td><td>{e(val)}</td><td class="meaning">{e(meaning)}</td></tr>'
        )
    parts.append("</table>")
    for name, (title, caption) in FIGURES.items():
        if name not in figures:
            continue
        b64 = base64.b64encode(figures[name]).decode("ascii")
        parts.append(
            f'<section id="{name}"><h2>{e(title)}</h2><figure>'
            f'<img alt="{e(title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
        if name == "tile_sweep":
            head, rows = _sweep_rows(data)
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        parts.append("</section>")
    if data["normalization_layers"]:
        parts.append("<h2>Normalization layers</h2><table><tr><th>type</th><th>count</th>")
        parts.append("<th>statistics</th><th>layers</th></tr>")
        for row in _norm_rows(data):
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Settings and timings</h2><table>")
    for k, val in data["settings"].items():
        shown = _fmt_axes(val) if k in _PER_AXIS else _fmt(val)
        parts.append(f"<tr><td>{e(k)}</td><td>{e(shown)}</td></tr>")
    for k, t in data["timings"].items():
        parts.append(f"<tr><td>time: {e(k)}</td><td>{t:.1f} s</td></tr>")
    parts.append("</table>")
    parts.append("<details><summary>Glossary</summary><dl>")
    parts += [f"<dt><b>{e(t)}</b></dt><dd>{e(d)}</dd>" for t, d in _GLOSSARY]
    parts.append("</dl></details>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- files


def write_report(
    data: Mapping[str, Any],
    figures: Mapping[str, bytes],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``figures/*.png`` to ``out``.

    Everything is written to a temporary folder beside ``out`` first and moved into
    place at the end, so an interrupted run never leaves a report that looks complete.

    Raises
    ------
    FileExistsError
        If ``out`` already holds a report and ``overwrite`` is false.
    """
    target = Path(out)
    names = ("report.json", "report.md", "report.html")
    if target.exists() and not target.is_dir():
        raise ReportOutputError(f"report folder {str(target)!r} exists and is not a folder")
    if not overwrite and any((target / n).exists() for n in names):
        raise ReportOutputError(
            f"{str(target)!r} already holds a report; choose another folder or pass overwrite "
            "(--overwrite)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    rel = {name: f"figures/{name}.png" for name in figures}
    full = dict(data)
    full["figures"] = rel
    text = json.dumps(full, indent=2, allow_nan=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        (tmp / "figures").mkdir()
        for name, png in figures.items():
            (tmp / rel[name]).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(full, rel), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(full, figures), encoding="utf-8")
        (tmp / "report.json").write_text(text + "\n", encoding="utf-8")
        target.mkdir(exist_ok=True)
        (target / "figures").mkdir(exist_ok=True)
        for name in rel.values():
            os.replace(tmp / name, target / name)
        # report.json last: its presence marks a complete report
        for n in ("report.md", "report.html", "report.json"):
            os.replace(tmp / n, target / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    paths = {"json": target / "report.json", "markdown": target / "report.md"}
    paths["html"] = target / "report.html"
    paths.update({name: target / p for name, p in rel.items()})
    return paths
