"""θ diagnostics, so a collapsing transformer (zoom-out, blank output, runaway scale) shows in the numbers."""

from __future__ import annotations

import math

import torch

from .transformer import SpatialTransformer


def rotation_deg(theta: torch.Tensor) -> torch.Tensor:
    """Rotation angle of the 2×2 part of affine/projective θ (the rotation of its polar decomposition).

    θ maps output to input, so this is the rotation of the input that the transformer undoes;
    positive is clockwise on screen (y points down).
    """
    a11, a12, a21, a22 = theta[:, 0], theta[:, 1], theta[:, 3], theta[:, 4]
    return torch.atan2(a21 - a12, a11 + a22) * (180 / math.pi)


@torch.no_grad()
def theta_stats(st: SpatialTransformer, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch statistics of θ; tensors on θ's device (no sync). All are 0 / 1 at the identity."""
    ident = st.grid.identity().to(theta)
    grid = st.grid(theta)
    out = {
        "theta_dev": (theta - ident).abs().mean(),
        "outside": (grid.abs() > 1).any(-1).float().mean(),
    }
    if st.transform in ("aff", "proj"):
        a = theta[:, [0, 1, 3, 4]].view(-1, 2, 2)
        det = torch.linalg.det(a)
        out["det"] = det.mean()
        out["scale"] = det.abs().sqrt().mean()
        out["angle_abs_deg"] = rotation_deg(theta).abs().mean()
        out["shift"] = theta[:, [2, 5]].norm(dim=1).mean()
    if st.transform == "proj":
        out["clamped"] = st.grid.last_clamped.to(theta.device)
    if st.transform == "tps":
        norms = theta.view(len(theta), -1, 2).norm(dim=-1)
        out["offset_mean"] = norms.mean()
        out["offset_max"] = norms.max()
    return out
