"""Shared fixtures: a small synthetic MNIST-shaped dataset in the stage's file formats."""

from __future__ import annotations

import pytest
import torch


def synthetic_split(n: int, seed: int) -> dict:
    """An easy 10-class task: class k is a bright 5×5 square at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    x = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    for k in range(10):
        r, c = divmod(k, 4)
        x[labels == k, 0, 4 + 7 * r:9 + 7 * r, 3 + 6 * c:8 + 6 * c] = 1.0
    return {"images": (x * 255).round().to(torch.uint8), "labels": labels}


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    raw = {"train": synthetic_split(2000, 0), "val": synthetic_split(400, 1), "test": synthetic_split(400, 2)}
    (root / "raw").mkdir()
    torch.save(raw, root / "raw" / "mnist.pt")
    out = root / "distorted" / "r"
    out.mkdir(parents=True)
    for split, d in raw.items():
        torch.save({**d, "params": {"angle": torch.zeros(len(d["labels"]))}}, out / f"{split}.pt")
    return {"raw_file": root / "raw" / "mnist.pt", "data_dir": root / "distorted"}
