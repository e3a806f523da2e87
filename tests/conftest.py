"""Shared test fixtures: small synthetic MNIST-shaped data in the stages' file formats."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from src.run.fingerprint import synthetic_digits  # noqa: F401  (also the digits of the result fingerprint)

SYN_SIZES = (40, 20, 20)  # train / val / test


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
    from src.data.mnist import save_raw
    from src.runinfo import sha256_file

    save_raw(raw, root / "raw" / "mnist.pt")
    out = root / "distorted" / "r"
    out.mkdir(parents=True)
    files = {}
    for split, d in raw.items():
        torch.save({**d, "params": {"angle": torch.zeros(len(d["labels"]))}}, out / f"{split}.pt")
        files[f"{split}.pt"] = {"sha256": sha256_file(out / f"{split}.pt")}
    from src.config import compose_config

    cfg = compose_config(["data=r"])  # the stage's manifest records the generation config the data came from
    (out / "manifest.json").write_text(json.dumps({"files": files, "align_corners": bool(cfg.stn.align_corners),
                                                   "config": OmegaConf.to_container(cfg.data, resolve=True)}))
    return {"raw_file": root / "raw" / "mnist.pt", "data_dir": root / "distorted"}
