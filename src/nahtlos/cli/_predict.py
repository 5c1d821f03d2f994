"""``nahtlos predict``: block-wise prediction of an image file into an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..engine.autoblock import auto_geometry, parse_memory
from ..engine.distributed import ACTIVATIONS, predict_file
from ..engine.global_stats import (
    GlobalStatsError,
    freeze_norms,
    global_stats_model,
    parse_norm_stats,
    placeholder_stats,
    tile_norm_layers,
)
from ..engine.predict import resolve_device
from ..io import OUTPUT_DTYPES, InputNormalization, check_output_path, open_source
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
    stats_mode, fraction = parse_norm_stats(norm_stats)
    out_path = check_output_path(output, overwrite, resume)
    source = open_source(input, input_key, level=level)
    loaded = load_model(model, map_location="cpu")
    meta = loaded.metadata
    if stats_mode != "tile" and loaded.kind == "torchscript":
        raise GlobalStatsError(
            f"--norm-stats {norm_stats} needs a model whose layers can be measured one by one: "
            f"{str(model)!r} is TorchScript; use a nahtlos checkpoint, or the Python model with "
            "nahtlos.engine.global_stats.compute_global_stats"
        )
    frozen_norms = stats_mode != "tile" and bool(tile_norm_layers(loaded.module))
    if stats_mode != "tile" and not frozen_norms:
        typer.echo(
            f"nahtlos: --norm-stats {norm_stats}: the model has no InstanceNorm/GroupNorm layer "
            "with tile statistics; predicting as usual",
            err=True,
        )
    block_v = parse_ints(block, "block")
    halo_v = parse_ints(halo, "halo")
    align_v = parse_ints(alignment, "alignment")
    if halo_v is None and not frozen_norms:
        # (with frozen norms the model's own halo, meant for tile statistics, does not apply)
        halo_v = meta.get("halo")
    if align_v is None:
        align_v = meta.get("alignment")
    if ndim is None:
        ndim = len(block_v) if isinstance(block_v, tuple) else meta.get("ndim")
    if ndim is None:
        spatial = len(source.spatial_axes) if source.axes_known else 0
        ndim = spatial if spatial in (2, 3) else min(len(source.shape), 3)
    view = source.for_model(ndim)  # checks the image's axes fit the model before anything else
    if block_v is None and meta.get("window"):
        # a fixed-window model (a UNETR checkpoint): its block is the window minus the halo
        block_v = meta.get("block")
    auto = False
    if block_v is None or halo_v is None or align_v is None:
        # Left out or "auto": measured from the model (receptive field, memory).
        auto = True
        try:
            budget = None if max_memory is None else parse_memory(max_memory)
        except ValueError as exc:
            raise fail(f"--max-memory: {exc}") from None
        # with frozen norms the halo is the receptive field of the frozen network
        probe = (
            freeze_norms(loaded.module, placeholder_stats(loaded.module))
            if frozen_norms
            else loaded.module
        )
        geometry = auto_geometry(
            probe.to(resolve_device(device)),
            ndim,
            view.shape[0] if view.axes[0] == "c" else 1,
            view.shape[-ndim:],
            block=block_v,
            halo=halo_v,
            alignment=align_v,
            max_memory=budget,
            batch_size=batch_size,
            progress=progress,
        )
        typer.echo(geometry.describe(), err=True)
        block_v, halo_v, align_v = geometry.block, geometry.halo, geometry.alignment
    act: Any = (meta.get("activation") or "none") if activation == "auto" else activation
    if act == "identity":
        act = "none"
    norm = meta.get("input_normalization")
    # a checkpoint's input normalization is fitted again on this image
    normalization = None if not norm else InputNormalization.from_dict({**norm, "values": None})
    predictor: Any = loaded
    if frozen_norms:
        if normalization is not None:
            normalization.fit(
                view.array, channel_axis=0 if view.axes[0] == "c" else None, progress=progress
            )
        cache = norm_stats_file or out_path.with_name(out_path.name + ".norm-stats.npz")
        stat = source.path.stat() if source.path is not None else None
        predictor, stats, reused = global_stats_model(
            loaded.module,
            view.array,
            block=block_v,
            halo=halo_v,
            alignment=align_v,
            ndim=ndim,
            fraction=fraction,
            cache=cache,
            image_id={
                "path": str(source.path.resolve()) if source.path else None,
                "key": source.key,
                "level": source.level,
                "mtime_ns": stat.st_mtime_ns if stat else None,
                "size": stat.st_size if stat else None,
            },
            input_transform=normalization,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        how = (
            f"reused from {cache}"
            if reused
            else f"computed ({stats.blocks_used} of {stats.blocks_total} blocks per layer), saved to {cache}"
        )
        err = (
            ""
            if stats.max_stderr is None or stats.blocks_used == stats.blocks_total
            else f"; estimated standard error of the means ≤ {stats.max_stderr:.2g} σ"
        )
        typer.echo(
            f"whole-image statistics of {len(stats.layers)} norm layers {how}{err}", err=True
        )
    try:
        report = predict_file(
            predictor,
            source,
            out_path,
            block_v,
            halo_v,
            align_v,
            ndim=ndim,
            auto=auto,
            batch_size=batch_size,
            device=device,
            activation=act,
            normalization=normalization,
            output_dtype=output_dtype,  # type: ignore[arg-type]
            segmentation=None if segmentation == "none" else segmentation,  # type: ignore[arg-type]
            threshold=threshold,
            # project checkpoints call them "classes"
            channel_names=meta.get("channel_names", meta.get("classes")),
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
    done = f", {report.skipped} of {report.blocks} blocks already done" if report.skipped else ""
    typer.echo(f"wrote {report.output} ({report.predicted} blocks predicted{done})")
