"""Block-wise prediction: nahtlos (exact halo) vs MONAI's sliding_window_inference.

Runs every method in its own process (so peak resident memory is its own) on the same
3D volume and the same MONAI UNet (BatchNorm in eval mode with non-trivial running
statistics, as after training), and prints a markdown table of wall time, peak memory
and the largest deviation from the whole-image reference (the network applied once to
the whole zero-padded volume).

    .venv/bin/python benchmarks/predict_vs_monai.py                 # 128x256x256
    .venv/bin/python benchmarks/predict_vs_monai.py --shape 64,128,128 --window 64,96,96
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ("whole", "nahtlos", "monai-0.25", "monai-0.5")


def build_model(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm="batch")
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval()


def make_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    vol = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    return vol + rng.normal(0, 0.05, shape).astype(np.float32)


def run_one(method: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from nahtlos import predict_blockwise, predict_whole
    from nahtlos.engine.predict import PredictionStats

    torch.set_num_threads(args.threads)
    image = np.load(workdir / "image.npy", mmap_mode="r")
    net = build_model()
    window = tuple(args.window)
    halo = args.halo
    block = tuple(w - 2 * halo for w in window)
    stats = PredictionStats()
    t0 = time.perf_counter()
    if method == "whole":
        pred = predict_whole(net, image, halo, 8)
    elif method == "nahtlos":
        pred = predict_blockwise(
            net, image, block, halo, 8, batch_size=1, progress=False, stats=stats
        )
    else:
        from monai.inferers import sliding_window_inference

        overlap = float(method.split("-")[1])
        x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        with torch.inference_mode():
            pred = sliding_window_inference(x, window, 1, net, overlap=overlap, mode="gaussian")[
                0
            ].numpy()
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "forward_fraction": stats.forward / stats.total if stats.total else float("nan"),
    }
    if method == "whole":
        np.save(workdir / "reference.npy", pred)
        result["deviation"] = 0.0
    else:
        ref = np.load(workdir / "reference.npy", mmap_mode="r")
        result["deviation"] = float(np.abs(np.asarray(pred) - ref).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,256,256")
    parser.add_argument("--window", default="112,160,160", help="window (= block + 2*halo)")
    parser.add_argument("--halo", type=int, default=24, help="TRF radius rounded to alignment 8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over all methods; the fastest run counts"
    )
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.window = tuple(int(v) for v in args.window.split(","))
    if args.method:  # child process: one method
        print(json.dumps(run_one(args.method, args, Path(args.workdir))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        np.save(workdir / "image.npy", make_volume(args.shape))
        rows: dict[str, dict[str, float]] = {}
        # Rounds interleave the methods so that a busy spell of the machine hits all alike.
        for _ in range(args.repeats):
            for method in METHODS:
                cmd = [sys.executable, __file__, "--method", method, "--workdir", tmp]
                cmd += ["--shape", ",".join(map(str, args.shape))]
                cmd += ["--window", ",".join(map(str, args.window))]
                cmd += ["--halo", str(args.halo), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                run = json.loads(out.strip().splitlines()[-1])
                print(f"{method}: {run}", file=sys.stderr)
                if method not in rows or run["seconds"] < rows[method]["seconds"]:
                    rows[method] = run

    block = tuple(w - 2 * args.halo for w in args.window)
    print(
        f"\nvolume {args.shape}, MONAI UNet channels (16, 32, 64, 128), strides (2, 2, 2), "
        f"BatchNorm eval; window {args.window}; nahtlos block {block} + halo {args.halo}; "
        f"{args.threads} torch threads, CPU; fastest of {args.repeats} interleaved runs\n"
    )
    print(
        "| method | wall time (s) | peak RSS (GB) | max deviation from whole image | time in forward |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    names = {
        "whole": "whole-image pass (reference)",
        "nahtlos": "nahtlos block-wise, exact halo",
        "monai-0.25": "MONAI sliding window, overlap 0.25, gaussian",
        "monai-0.5": "MONAI sliding window, overlap 0.5, gaussian",
    }
    for method in METHODS:
        r = rows[method]
        frac = "" if np.isnan(r["forward_fraction"]) else f"{100 * r['forward_fraction']:.1f} %"
        print(
            f"| {names[method]} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['deviation']:.2e} | {frac} |"
        )


if __name__ == "__main__":
    main()
