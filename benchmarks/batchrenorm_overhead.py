"""Training-step time of a 3D MONAI UNet with BatchRenorm vs. BatchNorm, in one run.

Both networks have the same weights and shapes (the BatchRenorm one is made with
``nahtlos.convert_norms``) and run in the renormalization phase (r_max = 3, d_max = 5, so
clipping is active). Steps alternate between the two models, in alternating order, so
that load from other processes hits both alike. The tables report medians, the median of
the per-round ratios (each round runs both models back to back) and the ratio of the
minima (the least disturbed runs on a shared machine), on the wall clock and as process
CPU time (less sensitive to other processes; use ``--threads 1`` so that it does not count
threads waiting for each other). A second table times one norm
layer alone (forward + backward on one activation tensor): the per-layer overhead that
the convolutions of a full step dilute.

Usage::

    python benchmarks/batchrenorm_overhead.py [--size 64] [--batch 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from monai.networks.nets import UNet
from torch import nn

from nahtlos import BatchRenorm3d, convert_norms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()

    return step


def _layer_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step() -> None:
        x.grad = None
        layer(x).backward(g)

    return step


def _compare(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU times per step name."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            w, c = _timed(steps[name], device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def _table(title: str, wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| norm | clock | median (ms) | min (ms) | ratio: median of rounds | ratio of minima |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for clock, times in (("wall", wall), ("CPU", cpu)):
        bn, brn = times["BatchNorm"], times["BatchRenorm"]
        per_round = statistics.median(b / a for a, b in zip(bn, brn, strict=True))
        lines += [
            f"| BatchNorm | {clock} | {statistics.median(bn) * 1e3:.1f} | {min(bn) * 1e3:.1f} "
            f"| 1.000 | 1.000 |",
            f"| BatchRenorm | {clock} | {statistics.median(brn) * 1e3:.1f} | "
            f"{min(brn) * 1e3:.1f} | {per_round:.3f} | {min(brn) / min(bn):.3f} |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", default="16,32,64,128", help="UNet widths")
    parser.add_argument("--res-units", type=int, default=2, help="MONAI num_res_units")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels = tuple(int(c) for c in args.channels.split(","))

    torch.manual_seed(0)
    bn_net = UNet(
        3, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1),
        num_res_units=args.res_units, norm="batch",
    ).to(device)  # fmt: skip
    brn_net = convert_norms(copy.deepcopy(bn_net), "batchrenorm", r_max=3.0, d_max=5.0)
    n_layers = sum(isinstance(m, BatchRenorm3d) for m in brn_net.modules())
    shape = (args.batch, 1) + (args.size,) * 3
    x = torch.randn(shape, device=device)
    y = (torch.rand((args.batch, 3, *shape[2:]), device=device) > 0.5).float()
    nets = {"BatchNorm": bn_net.train(), "BatchRenorm": brn_net.train()}
    steps = {
        name: _train_step(net, torch.optim.SGD(net.parameters(), lr=1e-3), x, y)
        for name, net in nets.items()
    }
    step_wall, step_cpu = _compare(steps, args.rounds, args.warmup, device)

    c = channels[0]
    act = torch.randn((args.batch, c) + (args.size,) * 3, device=device, requires_grad=True)
    g = torch.randn_like(act)
    layers = {
        "BatchNorm": nn.BatchNorm3d(c).to(device).train(),
        "BatchRenorm": BatchRenorm3d(c, r_max=3.0, d_max=5.0).to(device).train(),
    }
    layer_wall, layer_cpu = _compare(
        {name: _layer_step(layer, act, g) for name, layer in layers.items()},
        args.rounds * 3,
        args.warmup,
        device,
    )

    print(
        f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
        f"UNet channels {channels}, num_res_units {args.res_units}, {n_layers} norm layers; "
        f"input {shape}; {args.rounds} rounds\n"
    )
    print(_table("Training step (forward, BCE loss, backward, SGD)", step_wall, step_cpu))
    print()
    title = f"One norm layer, forward + backward on {tuple(act.shape)}"
    print(_table(title, layer_wall, layer_cpu))


if __name__ == "__main__":
    main()
