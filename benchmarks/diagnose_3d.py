"""How long ``nahtlos diagnose`` takes on a 3D volume, next to one ``nahtlos predict``.

Both commands run end to end as the user would run them (fresh processes, TorchScript
model file, ``.npy`` image), on the same volume (the synthetic ``embryo`` dataset of
:mod:`nahtlos.paper.synth`, nuclei as labels) and the same 3-level MONAI UNet
(channels 16-32-64-128, strides 2-2-2, BatchNorm in eval mode with non-trivial running
statistics), and the table puts the diagnosis beside the peer: a single block-wise
prediction of the whole volume with the same tile and halo. The steps of the diagnosis
come from its report.json.

    .venv/bin/python benchmarks/diagnose_3d.py                       # 128x256x256
    .venv/bin/python benchmarks/diagnose_3d.py --shape 64,128,128 --norm instance
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_model(norm: str, seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm=norm)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval()


def synthetic_volume(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic embryo volume scaled to about [0, 1], and its nuclei as class 1."""
    from nahtlos.paper.synth import synthesize

    sample = synthesize("embryo", shape, seed=seed)
    image = sample.image.astype(np.float32)
    lo, hi = np.percentile(image, [1.0, 99.8])
    return (image - lo) / max(float(hi - lo), 1e-6), (sample.labels > 0).astype(np.uint8)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    print(res.stdout.strip(), file=sys.stderr)
    return seconds


def main() -> None:
    from nahtlos.nets.checkpoint import save_torchscript

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,256,256")
    parser.add_argument("--norm", default="batch", help="MONAI norm of the UNet")
    parser.add_argument("--tile", default="64,64,64", help="tile diagnosed and predicted")
    parser.add_argument("--halo", type=int, default=24, help="for the peer (TRF radius → 24)")
    parser.add_argument("--out", help="keep the report in this folder")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    nahtlos = str(Path(sys.executable).with_name("nahtlos"))
    has_rf = importlib.util.find_spec("nahtlos.nets.receptive_field") is not None

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        volume, nuclei = synthetic_volume(shape)
        np.save(work / "image.npy", volume)
        np.save(work / "labels.npy", nuclei)  # a class per voxel: nuclei = class 1
        # scripted, not traced: tracing would freeze BatchNorm in eval mode
        model = save_torchscript(build_model(args.norm), work / "model.pt")
        out = Path(args.out) if args.out else work / "report"
        cmd = [nahtlos, "diagnose", str(model), str(work / "image.npy"), "--out", str(out)]
        cmd += ["--labels", str(work / "labels.npy"), "--tile", args.tile, "--no-progress"]
        cmd += ["--overwrite", "--device", "cpu"]
        if not has_rf:  # without nahtlos.nets.receptive_field the halo must be given
            cmd += ["--halo", str(args.halo), "--alignment", "8"]
        diag_s = timed(cmd)
        report = json.loads((out / "report.json").read_text())
        predict = [nahtlos, "predict", str(model), str(work / "image.npy"), str(work / "p.npy")]
        predict += ["--block", args.tile, "--halo", ",".join(map(str, report["settings"]["halo"]))]
        predict += ["--alignment", ",".join(map(str, report["settings"]["alignment"]))]
        predict += ["--no-progress", "--device", "cpu"]
        pred_s = timed(predict)

    s = report["settings"]
    print(
        f"\nvolume {shape}, MONAI UNet (16, 32, 64, 128), strides (2, 2, 2), norm {args.norm}; "
        f"tile {s['tile']}, halo {s['halo']} ({s['halo_source']}), alignment {s['alignment']}; "
        f"{torch.get_num_threads()} torch threads, CPU; labels given\n"
    )
    print("| command / step | wall time (s) | × one `nahtlos predict` |")
    print("| --- | ---: | ---: |")
    print(f"| `nahtlos predict` (peer: one block-wise pass) | {pred_s:.1f} | 1.00 |")
    print(f"| **`nahtlos diagnose`** (end to end) | **{diag_s:.1f}** | **{diag_s / pred_s:.2f}** |")
    for step, sec in report["timings"].items():
        if step != "total":
            print(f"| &nbsp;&nbsp;{step} | {sec:.1f} | {sec / pred_s:.2f} |")
    sweep = ", ".join(str(p["size"]) for p in report["tile_size_sweep"])
    disparity = report["train_eval_disparity"]["mean"]  # null when not measurable
    print(
        f"\nverdict: {report['verdict']['headline']}\ntile mismatch {report['tile_mismatch']['label']}, "
        f"train/eval disparity {'not measurable' if disparity is None else f'{disparity:.3f}'}, "
        f"sweep sizes {sweep}, "
        f"receptive field {'measured' if report['receptive_field'] else 'not available'}"
    )


if __name__ == "__main__":
    main()
