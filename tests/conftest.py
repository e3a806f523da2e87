"""Shared test fixtures. Data: a small synthetic MNIST in the raw-file format (src/data/mnist.py)."""

from __future__ import annotations

import pytest
import torch

SYN_SIZES = (40, 20, 20)  # train / val / test


def synthetic_digits(n: int, seed: int) -> torch.Tensor:
    """Smooth digit-like uint8 images (N, 1, 28, 28): three Gaussian blobs inside the central 20×20, black border."""
    g = torch.Generator().manual_seed(seed)
    centres = 8 + 12 * torch.rand(n, 3, 2, generator=g, dtype=torch.float64)
    sigma = 1.2 + 1.2 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    ax = torch.arange(28, dtype=torch.float64)
    dx = ax[None, None, None, :] - centres[..., 0, None, None]
    dy = ax[None, None, :, None] - centres[..., 1, None, None]
    img = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)).sum(1).clamp(max=1)
    img = torch.where(img < 0.05, torch.zeros_like(img), img)
    return (img * 255).round().to(torch.uint8)[:, None]


def synthetic_mnist(sizes=SYN_SIZES, seed: int = 0) -> dict:
    """{"train"|"val"|"test": {"images": uint8 (N,1,28,28), "labels": int64 (N,)}} with every class present."""
    out = {}
    for k, (split, n) in enumerate(zip(("train", "val", "test"), sizes)):
        g = torch.Generator().manual_seed(seed * 10 + k)
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        out[split] = {"images": synthetic_digits(n, seed * 10 + k), "labels": labels.to(torch.int64)}
    return out


@pytest.fixture(scope="session")
def synthetic_raw() -> dict:
    return synthetic_mnist()


@pytest.fixture
def raw_file(tmp_path, synthetic_raw):
    """The synthetic set written as the prepare stage would (file + .sha256 sidecar)."""
    from src.data.mnist import save_raw

    path = tmp_path / "raw" / "mnist.pt"
    save_raw(synthetic_raw, path)
    return path
