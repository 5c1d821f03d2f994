"""The diagnosis report people look at: JSON (with its schema), Markdown, HTML.

:func:`nahtlos.analysis.diagnose.diagnose` measures; this module turns its results into files:

- ``report.json``, valid against :func:`report_schema` (shipped as
  ``diagnosis_report.schema.json`` in the package; :func:`validate_report` checks a
  report against it with ``jsonschema``);
- ``report.md``, with the pictures as ``figures/*.png`` beside it;
- ``report.html``, self-contained: the pictures are embedded, nothing is fetched.

Both documents are rendered from jinja2 templates (``templates/report.md.j2`` and
``templates/report.html.j2``, HTML autoescaped) fed with the rows of
:mod:`nahtlos.analysis.report_tables`; they put the verdict first, in plain words,
and what to do about it. The figures themselves are drawn by
:mod:`nahtlos.analysis.figures`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import NahtlosError
from .report_tables import fmt, key_numbers, norm_rows, settings_rows, status, sweep_table

__all__ = [
    "FIGURES",
    "REPORT_SCHEMA_FILE",
    "ReportOutputError",
    "ReportValidationError",
    "render_html",
    "render_markdown",
    "report_schema",
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


# --------------------------------------------------------------------------- documents


def _md_cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, on one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


@lru_cache(maxsize=1)
def _templates() -> Any:
    """The jinja2 environment of the report templates (HTML autoescaped, Markdown not)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nahtlos.analysis", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md_cell"] = _md_cell
    return env


def _context(data: Mapping[str, Any], figure_srcs: Mapping[str, str]) -> dict[str, Any]:
    """What both templates show, as strings and rows of strings."""
    figures = [
        {
            "name": name,
            "title": title,
            "caption": caption,
            "src": figure_srcs[name],
            "table": sweep_table(data) if name == "tile_sweep" else None,
        }
        for name, (title, caption) in FIGURES.items()
        if name in figure_srcs
    ]
    return {
        "model": data["model"],
        "model_file": Path(data["model"]["source"]).name,
        "image": data["image"],
        "image_shape": fmt(data["image"]["shape"]),
        "version": data["nahtlos_version"],
        "created": data["created"],
        "verdict": data["verdict"],
        "status": status(data),
        "key_numbers": key_numbers(data),
        "figures": figures,
        "norm_rows": norm_rows(data),
        "settings": settings_rows(data),
    }


def render_markdown(data: Mapping[str, Any], figure_paths: Mapping[str, str]) -> str:
    """The report as Markdown; ``figure_paths`` maps figure names to relative PNG paths."""
    text: str = _templates().get_template("report.md.j2").render(_context(data, figure_paths))
    return text


def render_html(data: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML page (figures embedded as PNG data URIs)."""
    srcs = {
        name: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        for name, png in figures.items()
    }
    text: str = _templates().get_template("report.html.j2").render(_context(data, srcs))
    return text


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
