"""Shared helpers of the transformer-core tests: config access, cached model builds, test images.

Independent of the library's grid code on purpose: pixel-centre coordinates and rotations are
written out from their definitions here, so tests compare the library against the formulas.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.models.nets import build_net, classifier_params
from src.stn.grids import GRIDS

CONF = Path(__file__).resolve().parents[1] / "conf"
TRANSFORMS = sorted(GRIDS)  # every registered transform; each needs its identity in ``identity_theta``
ALL_MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))  # every model config
ST_MODELS = [m for m in ALL_MODELS if OmegaConf.load(CONF / "model" / f"{m}.yaml").transform is not None]
SIZES = [(28, 1), (42, 2), (60, 2)]  # (input size, ST downsampling): R/P/E, RTS, TC


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run on tiny tensors, where intra-op threads only add contention (gradcheck on a busy
    2-core machine ran 30× slower with 2 threads). Import this into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def config():
    """conf/config.yaml (its defaults list is not composed; tests read the `stn` and `budget` blocks)."""
    return OmegaConf.load(CONF / "config.yaml")


@functools.cache
def model_config(name: str):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def budget(hw: int) -> int:
    b = config().budget
    return classifier_params(b.family, (hw, hw), list(b.widths))


@functools.cache
def _built(name: str, hw: int, downsample: int):
    torch.manual_seed(0)
    return build_net(model_config(name), (hw, hw), budget(hw), config().stn, downsample)


def build(name: str, hw: int, downsample: int):
    """A budget-matched network of the study (a fresh copy of a cached build: fitting widths is slow)."""
    return copy.deepcopy(_built(name, hw, downsample))


def identity_theta(transform: str, batch: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Identity θ written out from the documented layouts (not taken from the generators)."""
    rows = {"aff": [1, 0, 0, 0, 1, 0], "proj": [1, 0, 0, 0, 1, 0, 0, 0], "tps": [0] * 32}
    return torch.tensor(rows[transform], dtype=dtype).repeat(batch, 1)


def pixel_centres(h: int, w: int, align_corners: bool, dtype=torch.float64) -> torch.Tensor:
    """(h, w, 2) normalised (x, y) of the pixel centres, from the definition of align_corners."""
    def axis(n):
        i = torch.arange(n, dtype=dtype)
        return 2 * i / (n - 1) - 1 if align_corners else (2 * i + 1) / n - 1
    yy, xx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return torch.stack([xx, yy], -1)


def rotation(deg: float, dtype=torch.float64) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=dtype)


def theta_for_affine(transform: str, a: torch.Tensor) -> torch.Tensor:
    """θ (1, K) of each transform that realises the affine map a (2×3) of normalised coordinates."""
    if transform == "aff":
        return a.reshape(1, 6)
    if transform == "proj":
        return torch.cat([a.reshape(6), a.new_zeros(2)])[None]
    ctrl = tps_control_points_4x4(a.dtype)  # TPS: target_i = a·c_i, θ_i = target_i − c_i
    return (ctrl @ a[:, :2].T + a[:, 2] - ctrl).reshape(1, -1)


def tps_control_points_4x4(dtype=torch.float64) -> torch.Tensor:
    """The 16 control points as documented: 4×4 over [-1, 1]², x fastest."""
    t = torch.tensor([-1, -1 / 3, 1 / 3, 1], dtype=dtype)
    return torch.stack([t.repeat(4), t.repeat_interleave(4)], 1)


def blobs(coords: torch.Tensor, centres, sigma: float) -> torch.Tensor:
    """A smooth image: a sum of Gaussians evaluated at normalised coords (..., 2)."""
    out = torch.zeros(coords.shape[:-1], dtype=coords.dtype)
    for k, (cx, cy) in enumerate(centres):
        d2 = (coords[..., 0] - cx) ** 2 + (coords[..., 1] - cy) ** 2
        out = out + (1.0 - 0.3 * k) * torch.exp(-d2 / (2 * sigma**2))
    return out


def digit_batch(n: int, hw: int, seed: int = 0, dtype=torch.float32):
    """Digit-like [0, 1] images on a black background (a few random strokes of blobs), and labels."""
    g = torch.Generator().manual_seed(seed)
    coords = pixel_centres(hw, hw, False, dtype=torch.float64)
    imgs = []
    for _ in range(n):
        centres = (torch.rand(4, 2, generator=g, dtype=torch.float64) - 0.5).tolist()
        imgs.append(blobs(coords, centres, 0.12).clamp(0, 1))
    labels = torch.randint(0, 10, (n,), generator=g)
    return torch.stack(imgs)[:, None].to(dtype), labels
