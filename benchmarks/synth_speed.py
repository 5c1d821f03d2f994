"""Speed and peak memory of the synthetic datasets: in memory vs block-wise to OME-Zarr.

Every case runs in a fresh Python process so that its peak resident memory is its own.
The peer is scikit-image's ``binary_blobs`` at the same size: a one-line generator of
binary blobs (no labels, no image formation), as a yardstick of what a voxel costs.

    python benchmarks/synth_speed.py            # 3D 128x256x256, and writes up to 256x512x512
    python benchmarks/synth_speed.py --quick    # smaller sizes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time, tempfile, os
import numpy as np
kind, name, shape = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3].split(","))
t = time.perf_counter()
if kind == "blobs":
    from skimage.data import binary_blobs
    length = max(shape)
    # binary_blobs makes cubes; crop to the shape (it is timed on the full cube's share)
    out = binary_blobs(length, blob_size_fraction=0.05, n_dim=len(shape), rng=0)
    out = out[tuple(slice(0, s) for s in shape)]
    elapsed = (time.perf_counter() - t) * np.prod(shape) / length ** len(shape)
elif kind == "memory":
    from nahtlos.paper.synth import synthesize
    synthesize(name, shape, seed=0)
    elapsed = time.perf_counter() - t
else:
    from nahtlos.paper.synth import write_synthetic
    with tempfile.TemporaryDirectory() as d:
        write_synthetic(name, os.path.join(d, "x.zarr"), shape, seed=0, progress=False)
        elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": elapsed, "peak_mib": peak}))
"""


def run(kind: str, name: str, shape: tuple[int, ...]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CASE, kind, name, ",".join(map(str, shape))],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    small = (64, 128, 128) if args.quick else (128, 256, 256)
    large = [(64, 256, 256), (128, 256, 256)] if args.quick else [(128, 512, 512), (256, 512, 512)]
    rows = []
    for name in ("organoids", "plants", "embryo"):
        for kind, shape in [("memory", small)] + [("ome-zarr", s) for s in large]:
            r = run(kind, name, shape)
            rows.append((name, kind, shape, r))
            print(f"  done {name} {kind} {shape}: {r['seconds']:.1f} s", file=sys.stderr)
    for shape in [small, *large]:
        rows.append(("binary_blobs (peer)", "memory", shape, run("blobs", "", shape)))

    print("| dataset | how | shape | output MiB | time s | µs / voxel | peak RSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, kind, shape, r in rows:
        voxels = 1
        for s in shape:
            voxels *= s
        # bytes per voxel: image + uint32 labels (+ uint8 classes for organoids)
        nbytes = voxels * {"organoids": 1 + 4 + 1, "plants": 2 + 4, "embryo": 2 + 4}.get(name, 1)
        print(
            f"| {name} | {kind} | {'x'.join(map(str, shape))} | {nbytes / 2**20:.0f} | "
            f"{r['seconds']:.1f} | {1e6 * r['seconds'] / voxels:.2f} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
