"""The demo behind ``make demo``: block-wise vs whole-image prediction of a 3D volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .predict import predict_blockwise, predict_whole
from .testing import largest_difference

__all__ = ["run_demo", "synthetic_volume"]


def synthetic_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Blurry bright blobs on a dim, noisy background, scaled to about [0, 1]."""
    rng = np.random.default_rng(seed)
    points = np.zeros(shape, np.float32)
    n = max(1, int(np.prod(shape) / 4000))
    idx = tuple(rng.integers(0, s, n) for s in shape)
    points[idx] = 1.0
    blobs = ndimage.gaussian_filter(points, 3.0)
    blobs /= blobs.max()
    noise = rng.normal(0.0, 0.05, shape).astype(np.float32)
    return np.clip(blobs + 0.1 + noise, 0, None).astype(np.float32)


def _unet(norm: str, seed: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), norm=norm)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d) and m.running_mean is not None:
            assert m.running_var is not None
            # Non-trivial running statistics, as a trained network would have.
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def run_demo(out: Path, seed: int = 0) -> dict[str, float]:
    """Predict a synthetic volume block-wise and whole, for BatchNorm and InstanceNorm.

    Returns the largest block-wise vs whole-image difference per network.
    """
    out.mkdir(parents=True, exist_ok=True)
    image = synthetic_volume((48, 96, 96), seed)
    np.save(out / "image.npy", image)
    block, halo, alignment = (32, 48, 48), 12, 4
    print(f"synthetic volume {image.shape}, blocks {block}, halo {halo}, alignment {alignment}")
    results = {}
    for label, norm in (("BatchNorm (eval)", "batch"), ("InstanceNorm", "instance")):
        net = _unet(norm, seed)
        tiled = predict_blockwise(net, image, block, halo, alignment, batch_size=2, progress=False)
        whole = predict_whole(net, image, halo, alignment)
        diff, where = largest_difference(tiled, whole)
        np.save(out / f"prediction-{norm}.npy", tiled)
        results[label] = diff
        verdict = "yes, seamless" if diff <= 1e-5 else "NO, tile mismatch"
        print(
            f"  {label:18s} block-wise == whole image: {verdict} (max |diff| {diff:.2e} at {where})"
        )
    print(f"predictions written to {out}/")
    return results
