from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# pytest-xdist runs one process per core: one torch thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def make_unet(
    ndim: int,
    levels: int,
    norm: str | tuple = "batch",
    in_channels: int = 1,
    out_channels: int = 2,
    num_res_units: int = 0,
    seed: int = 0,
) -> torch.nn.Module:
    """A small MONAI UNet in eval mode, with non-trivial BatchNorm running statistics."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    channels = (4, 8, 16, 16)[: levels + 1]
    net = UNet(
        ndim,
        in_channels,
        out_channels,
        channels=channels,
        strides=(2,) * levels,
        norm=norm,
        num_res_units=num_res_units,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net.eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def nuclei(
    shape: tuple[int, ...] = (96, 96), n: int = 40, seed: int = 0, gradient: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Bright, touching round nuclei on a noisy background (plus a linear intensity ramp
    of ``gradient`` along x), with instance labels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(3, 7)
        inside = ((grid - centre) ** 2).sum(-1) < radius**2
        labels[inside & (labels == 0)] = i
    image = 200.0 * (labels > 0) + rng.normal(50, 15, shape) + np.linspace(0, gradient, shape[-1])
    return image.astype(np.float32), labels


def nuclei_config(
    files: tuple[str, str], tmp_path: object, model: dict | None = None, **train: object
) -> object:
    """A small 2D U-Net configuration on a ``nuclei()`` image pair: half of it along x
    validates; ``model`` and ``train`` fields override the defaults here."""
    from pathlib import Path

    from nahtlos.training.config import validate_config

    image, labels = files
    return validate_config(
        {
            "data": {
                "train": [{"image": image, "labels": labels}],
                "split": {"fraction": 0.5, "axis": "x"},
                "patch": [32, 32],
            },
            "model": {"ndim": 2, "norm": "batch", "channels": [8, 16, 32]} | (model or {}),
            "train": {"val_block": [32, 32]} | train,
            "out": str(Path(str(tmp_path)) / "run"),
        }
    )
