"""``nahtlos predict``: block-wise prediction of an image file into an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.distributed import ACTIVATIONS
from ..engine.global_stats import parse_norm_stats
from ..engine.prepare import prepare_prediction
from ..io import OUTPUT_DTYPES, check_output_path, open_source
from ..nets.checkpoint import load_model
from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


@cli_errors
def predict(
    model: Annotated[
        Path, typer.Argument(help="TorchScript file (torch.jit.save) or nahtlos checkpoint.")
    ],
    input: Annotated[
        str,
        typer.Argument(
            help="Image: .tif/.tiff, .npy, .zarr (OME-Zarr 0.4/0.5), or file.h5:dataset."
        ),
    ],
    output: Annotated[
        Path,
        typer.Argument(
            help="Output: .ome.zarr (OME-Zarr 0.5 with pyramid and labels), .zarr (one zarr "
            "array), both resumable; or .npy/.tif. Channels first: (C,[Z,]Y,X)."
        ),
    ],
    block: Annotated[
        str | None,
        typer.Option(
            help="Inner block shape per axis, e.g. 64,128,128 (or one value); "
            "auto or left out: the largest that fits --max-memory."
        ),
    ] = None,
    halo: Annotated[
        str | None,
        typer.Option(help="Halo: N or Z,Y,X; auto or left out: from the receptive field."),
    ] = None,
    alignment: Annotated[
        str | None,
        typer.Option(help="Network down-sampling factor: N or Z,Y,X; auto or left out: measured."),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget for an automatic --block, e.g. 8G or 512MiB "
            "(default: half the free RAM, or free GPU memory)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    input_key: Annotated[
        str | None, typer.Option(help="Dataset inside an HDF5 file or zarr group.")
    ] = None,
    level: Annotated[
        int, typer.Option(min=0, help="Resolution level of an OME-Zarr input (0 = full).")
    ] = 0,
    ndim: Annotated[
        int | None,
        typer.Option(min=2, max=3, help="Spatial dimensions (default: from --block or the model)."),
    ] = None,
    activation: Annotated[
        str,
        typer.Option(help="none, sigmoid or softmax on the output; auto: the model's metadata."),
    ] = "auto",
    output_dtype: Annotated[
        str, typer.Option(help="float32, float16 or uint8 (probabilities x 255).")
    ] = "float32",
    segmentation: Annotated[
        str,
        typer.Option(
            help="Add labels/ to a .ome.zarr output: none, threshold (per channel), argmax."
        ),
    ] = "none",
    threshold: Annotated[float, typer.Option(help="Threshold of --segmentation threshold.")] = 0.5,
    pyramid_levels: Annotated[
        int | None,
        typer.Option(min=0, help="Extra resolution levels of a .ome.zarr output (default: auto)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run on Dask: 'local' (a LocalCluster) or a scheduler address tcp://host:port."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes of --scheduler local.")
    ] = None,
    max_windows: Annotated[
        int | None, typer.Option(min=1, help="At most this many windows in flight (memory bound).")
    ] = None,
    retries: Annotated[
        int, typer.Option(min=0, help="Retries of a failed Dask task before the run stops.")
    ] = 2,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted .zarr output, skipping finished blocks.")
    ] = False,
    norm_stats: Annotated[
        str,
        typer.Option(
            help="Statistics of InstanceNorm/GroupNorm layers: tile (each tile's own, not "
            "seamless), global (the whole image's, computed block-wise: seamless and equal to "
            "a whole-image pass), or sampled[:FRACTION] (estimated from a fraction of the blocks)."
        ),
    ] = "tile",
    norm_stats_file: Annotated[
        Path | None,
        typer.Option(
            help="Where --norm-stats global/sampled keeps its statistics for reuse "
            "(default: OUTPUT.norm-stats.npz)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Predict INPUT block-wise with MODEL and write the model output to OUTPUT.

    Input normalization and output activation are applied when the model's metadata
    names them (nahtlos checkpoints do); otherwise the raw output is written.
    """
    if resume and overwrite:
        raise fail("--resume continues an output and --overwrite replaces it: choose one")
    for name, value, allowed in (
        ("activation", activation, ("auto", *ACTIVATIONS)),
        ("output-dtype", output_dtype, OUTPUT_DTYPES),
        ("segmentation", segmentation, ("none", "threshold", "argmax")),
    ):
        if value not in allowed:
            raise fail(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    parse_norm_stats(norm_stats)  # a bad value fails before any file is touched
    out_path = check_output_path(output, overwrite, resume)
    source = open_source(input, input_key, level=level)
    prepared = prepare_prediction(
        load_model(model, map_location="cpu"),
        source,
        out_path,
        block=parse_ints(block, "block"),
        halo=parse_ints(halo, "halo"),
        alignment=parse_ints(alignment, "alignment"),
        ndim=ndim,
        activation=activation,
        norm_stats=norm_stats,
        norm_stats_file=norm_stats_file,
        max_memory=max_memory,
        batch_size=batch_size,
        device=device,
        progress=progress,
        log=lambda message: typer.echo(message, err=True),
    )
    try:
        report = prepared.predict_file(
            source,
            out_path,
            batch_size=batch_size,
            device=device,
            output_dtype=output_dtype,
            segmentation=None if segmentation == "none" else segmentation,
            threshold=threshold,
            pyramid_levels=pyramid_levels,
            scheduler=scheduler,
            workers=workers,
            max_windows=max_windows,
            retries=retries,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
    except KeyboardInterrupt:
        if out_path.suffix.lower() == ".zarr" and out_path.exists():
            typer.echo(f"nahtlos: {out_path} is incomplete; continue it with --resume", err=True)
        raise
    typer.echo(report.summary())
