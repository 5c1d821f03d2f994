"""How often BatchRenorm's r and d hit their bounds during a training run.

Reruns the embryo BatchRenorm command of docs/training.md (or any schedule) and logs,
per optimizer step, the fraction of (layer, channel) pairs whose raw r = σ_B/σ lies
outside [1/r_max, r_max] and whose raw d = (μ_B − μ)/σ lies outside [−d_max, d_max],
and the largest raw r (as max(r, 1/r)) and |d| over all layers. Used in docs/results.md
to explain the collapse described in docs/training.md.

    .venv/bin/nahtlos synth embryo embryo.tif --shape 512,512 --seed 0
    .venv/bin/python docs/brn_clipping.py embryo.tif embryo_labels.tif out-dir \\
        --warmup 150 --ramp 150 --steps 400

Writes out-dir/clipping.csv next to the usual training outputs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from nahtlos.nets import norms
from nahtlos.training.config import load_config
from nahtlos.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("labels")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--ramp", type=int, default=150)
    args = parser.parse_args()

    records: list[tuple[float, float, float, float]] = []
    original = norms._BatchRenorm._factors

    def factors(self, mean_b, std_b):  # type: ignore[no-untyped-def]
        if not torch.is_grad_enabled():  # validation passes (inference mode): not training
            return original(self, mean_b, std_b)
        with torch.no_grad():
            std = (self.running_var + self.eps).sqrt()
            raw_r, raw_d = std_b / std, (mean_b - self.running_mean) / std
            r_out = ((raw_r > self.r_max) | (raw_r < 1 / self.r_max)).float().mean()
            d_out = (raw_d.abs() > self.d_max).float().mean()
            records.append(
                (
                    float(r_out) if self.r_max > 1 else float("nan"),
                    float(d_out) if self.d_max > 0 else float("nan"),
                    float(torch.maximum(raw_r, 1 / raw_r).max()),
                    float(raw_d.abs().max()),
                )
            )
        return original(self, mean_b, std_b)

    norms._BatchRenorm._factors = factors  # type: ignore[method-assign]
    config = load_config(
        None,
        base={
            "data": {
                "train": [{"image": args.image, "labels": args.labels}],
                "split": {"fraction": 0.5, "axis": "x"},
                "patch": [128, 128],
            },
            "model": {"ndim": 2, "norm": "batchrenorm"},
            "train": {
                "steps": args.steps,
                "batch_size": 4,
                "accumulate": 1,
                "val_every": 50,
                "checkpoint_every": 1000,
                "renorm": {"warmup_steps": args.warmup, "ramp_steps": args.ramp},
            },
            "out": args.out,
        },
    )
    torch.set_num_threads(1)
    result = train(config, progress=False)
    per_step = len(records) // config.train.steps
    rows = np.array(records, dtype=np.float64).reshape(config.train.steps, per_step, 4)
    with (Path(args.out) / "clipping.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "r_at_bound", "d_at_bound", "max_r", "max_abs_d"])
        for s in range(config.train.steps):
            r_b, d_b = rows[s, :, 0], rows[s, :, 1]
            w.writerow(
                [
                    s + 1,
                    result.losses[s],
                    "" if np.isnan(r_b).all() else np.nanmean(r_b),
                    "" if np.isnan(d_b).all() else np.nanmean(d_b),
                    rows[s, :, 2].max(),
                    rows[s, :, 3].max(),
                ]
            )
    for row in result.validation:
        print({k: round(v, 3) for k, v in row.items() if k == "step" or "dice_eval" in k})


if __name__ == "__main__":
    main()
