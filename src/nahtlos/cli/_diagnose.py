"""``nahtlos diagnose``: tile mismatch, train/eval disparity and receptive field, as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..analysis.diagnose import diagnose
from ..engine.predict import resolve_device
from ..io import open_image
from ..nets.checkpoint import load_model
from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_command)


def _region(text: str | None) -> list[slice] | None:
    """``"0:64,100:228,100:228"`` -> slices; ``None`` stays ``None``."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        start, sep, stop = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append(slice(int(start) if start else None, int(stop) if stop else None))
        except ValueError:
            raise fail(
                f"--region {text!r}: expected START:STOP per axis, e.g. 0:64,0:256,0:256"
            ) from None
    return out


@cli_errors
def diagnose_command(
    model: Annotated[
        Path, typer.Argument(help="TorchScript file or nahtlos checkpoint.", show_default=False)
    ],
    image: Annotated[
        str,
        typer.Argument(
            help="Image: .tif/.tiff, .npy, .zarr, or file.h5:dataset.", show_default=False
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for report.json, report.md, report.html and figures/."
        ),
    ],
    labels: Annotated[
        str | None,
        typer.Option(
            help="Ground truth: one mask per output channel (C,[Z,]Y,X) or a class per pixel."
        ),
    ] = None,
    label_kind: Annotated[
        str,
        typer.Option(
            help="instances (object ids -> boundaries/foreground/background), semantic, or auto "
            "(what the checkpoint was trained on)."
        ),
    ] = "auto",
    activation: Annotated[
        str | None,
        typer.Option(help="sigmoid, softmax or none (default: the model's, else sigmoid)."),
    ] = None,
    input_norm: Annotated[
        str | None,
        typer.Option(
            help="Input normalization: global, tilewise or none (default: the model's, else none)."
        ),
    ] = None,
    tile: Annotated[
        str | None, typer.Option(help="Inner tile diagnosed: N or Z,Y,X (default: automatic).")
    ] = None,
    halo: Annotated[
        str | None, typer.Option(help="Halo: N or Z,Y,X (default: model or receptive field).")
    ] = None,
    alignment: Annotated[
        str | None,
        typer.Option(help="Down-sampling factor: N or Z,Y,X (default: model or measured)."),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="Tile sizes of the sweep, e.g. 32,64,128 (default: automatic)."),
    ] = None,
    channel_names: Annotated[
        str | None, typer.Option(help="Output channel names, e.g. foreground,boundaries.")
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            help="Diagnose only this region: START:STOP per axis (default: all, up to 16M voxels)."
        ),
    ] = None,
    ndim: Annotated[
        int | None, typer.Option(min=2, max=3, help="Spatial dimensions (default: model/image).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 1,
    max_windows: Annotated[int, typer.Option(min=1, help="Tile-mismatch windows at most.")] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    input_key: Annotated[
        str | None, typer.Option(help="Dataset inside an HDF5 file or zarr group.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    global_stats: Annotated[
        bool,
        typer.Option(
            help="For InstanceNorm/GroupNorm models: also predict with whole-image statistics "
            "(what `nahtlos predict --norm-stats global` does) and compare."
        ),
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Diagnose MODEL on IMAGE: is tiled prediction seamless, does eval mode match train mode?

    Writes OUT/report.html (open it in a browser), OUT/report.md and OUT/report.json.
    """
    if activation is not None and activation not in ("sigmoid", "softmax", "none"):
        raise fail(f"--activation {activation!r} is not one of sigmoid, softmax, none")
    if input_norm is not None and input_norm not in ("global", "tilewise", "none"):
        raise fail(f"--input-norm {input_norm!r} is not one of global, tilewise, none")
    if (out / "report.json").exists() and not overwrite:
        raise fail(f"{str(out)!r} already holds a report; pass --overwrite or another --out")
    loaded = load_model(model, map_location="cpu")
    img = open_image(image, input_key)
    lab = open_image(labels) if labels is not None else None
    names = [n.strip() for n in channel_names.split(",")] if channel_names else None
    sizes = parse_ints(sweep, "sweep")
    report = diagnose(
        loaded,
        img,
        lab,
        ndim=ndim,
        tile=parse_ints(tile, "tile"),
        halo=parse_ints(halo, "halo"),
        alignment=parse_ints(alignment, "alignment"),
        activation=activation,
        input_normalization=input_norm,
        channel_names=names,
        tile_sizes=(sizes,) if isinstance(sizes, int) else sizes,
        region=_region(region),
        batch_size=batch_size,
        max_windows=max_windows,
        device=resolve_device(device),
        progress=progress,
        global_stats=global_stats,
        image_source=image if input_key is None else f"{image}:{input_key}",
        labels_source=labels,
        label_kind=label_kind,
    )
    paths = report.write(out, overwrite=overwrite)
    typer.echo(report.verdict.headline)
    for action in report.verdict.actions:
        typer.echo(f"  - {action}")
    typer.echo(f"report: {paths['html']} (also {paths['markdown'].name}, {paths['json'].name})")
