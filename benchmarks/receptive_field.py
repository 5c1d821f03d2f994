"""Time `nahtlos.nets.receptive_field` on 3D MONAI U-Nets (3 levels) against the classic probe.

The peer is what the receptive field is usually measured with (Luo et al. 2016, the
paper's Fig. 4): one forward and one backward pass of the real model for the centre
voxel of a cube that holds the whole TRF, in float32. It gives the gradient support of
one output voxel with the model's own weights (so dead ReLUs and max-pooling's arg-max
may hide part of the TRF), no maximum over the alignment cell, no alignment and no
culprit layers. `receptive_field` gives all of them; the target is < 30 s per model.

    .venv/bin/python benchmarks/receptive_field.py [--threads N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from monai.networks.nets import UNet

from nahtlos.nets.receptive_field import receptive_field


def make(channels: tuple[int, ...], num_res_units: int, norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(
        3, 1, 2, channels=channels, strides=(2, 2, 2), num_res_units=num_res_units, norm=norm
    ).eval()


def classic_probe(net: torch.nn.Module, size: int) -> tuple[float, int]:
    """Seconds and TRF radius (support of the centre voxel's gradient) of the classic probe."""
    x = torch.randn(1, 1, size, size, size, requires_grad=True)
    t0 = time.perf_counter()
    y = net(x)
    c = size // 2
    (g,) = torch.autograd.grad(y[0, :, c, c, c].sum(), [x])
    seconds = time.perf_counter() - t0
    support = np.nonzero(g[0, 0].abs().sum(dim=(1, 2)).numpy())[0]
    return seconds, int(max(c - support[0], support[-1] - c))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cases = [
        ("channels 4-8-16-16, 0 res units, BatchNorm", (4, 8, 16, 16), 0, "batch"),
        ("channels 16-32-64-128, 2 res units, BatchNorm", (16, 32, 64, 128), 2, "batch"),
        ("channels 16-32-64-128, 2 res units, InstanceNorm", (16, 32, 64, 128), 2, "instance"),
    ]
    rows = []
    for label, channels, nru, norm in cases:
        net = make(channels, nru, norm)
        t0, c0 = time.perf_counter(), time.process_time()
        rf = receptive_field(net, 3)
        ours, cpu = time.perf_counter() - t0, time.process_time() - c0
        radius = rf.trf_radius or rf.local_trf_radius
        assert radius is not None
        size = rf.erf_shape[0]
        peer, peer_radius = classic_probe(net, size)
        trf = "whole tile" if rf.trf_radius is None else str(rf.trf_radius[0])
        local = "" if rf.local_trf_radius is None else f" (local {rf.local_trf_radius[0]})"
        rows.append(
            f"| {label} | {ours:.1f} | {cpu:.1f} | {peer:.2f} | {ours / peer:.0f} | {trf}{local} | "
            f"{peer_radius} ({size}³) | {rf.alignment[0]} | {rf.halo()[0]} | "
            f"{'yes' if rf.verified else 'no'} |"
        )
        print(rows[-1], flush=True)
    print()
    print(
        "| 3D UNet, 3 levels | receptive_field (s) | its CPU time (s) | classic probe (s) "
        "| ratio | TRF radius "
        "| classic: centre-voxel support (cube) | alignment | halo | full-probe check |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
