"""Grid generators: θ → sampling grid T_θ(G).

Convention (used everywhere in this repo, data generator and figures included):
a grid maps every pixel of the *output* image to a location in the *input* image, in
normalised coordinates (x, y) ∈ [-1, 1]², x first, exactly as ``F.grid_sample`` reads it.
``align_corners`` is passed explicitly on every call; with ``False`` (our default) ±1 are the
outer edges of the border pixels, with ``True`` the centres of the corner pixels.

Every generator derives its grid from one canonical base grid (``base_grid``), built by
``F.affine_grid`` on the identity, so the identity θ of every transform reproduces it exactly.

To add a transform: subclass ``GridGenerator``, set ``n_params``, implement ``identity()`` and
``forward(theta) -> (B, H, W, 2)``, and register the class in ``GRIDS``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def base_grid(h: int, w: int, align_corners: bool, dtype=torch.float32, device=None) -> torch.Tensor:
    """The identity sampling grid of an h×w output, shape (h, w, 2), (x, y) order."""
    eye = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=dtype, device=device)
    return F.affine_grid(eye, [1, 1, h, w], align_corners=align_corners)[0]


class GridGenerator(nn.Module):
    """Maps a batch of transform parameters θ (B, n_params) to a grid (B, H, W, 2)."""

    n_params: int

    def __init__(self, out_hw: tuple[int, int], align_corners: bool):
        super().__init__()
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        self.align_corners = bool(align_corners)

    def identity(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, theta: torch.Tensor) -> None:
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(
                f"{type(self).__name__} expects θ of shape (B, {self.n_params}), got {tuple(theta.shape)}"
            )


class AffineGrid(GridGenerator):
    """6 parameters, row-major 2×3 matrix [a11 a12 tx; a21 a22 ty]."""

    n_params = 6

    def identity(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        # Same values as F.affine_grid (base grid with a ones column times θᵀ), without materialising
        # one base grid per batch element: 2-3× faster in float64. The base is built in θ's dtype.
        self._check(theta)
        b = theta.shape[0]
        g = base_grid(*self.out_hw, align_corners=self.align_corners, dtype=theta.dtype, device=theta.device)
        base = torch.cat([g.reshape(-1, 2), g.new_ones(g.shape[0] * g.shape[1], 1)], 1)
        return (base @ theta.view(b, 2, 3).transpose(1, 2)).view(b, *self.out_hw, 2)


class ProjectiveGrid(GridGenerator):
    """8 parameters: the homography [h11 h12 h13; h21 h22 h23; h31 h32 1] (h33 fixed to 1).

    The perspective divide uses a sign-preserving clamp |w| ≥ eps, so a transform that sends the
    horizon through the image gives large but finite coordinates (and finite gradients) instead
    of inf/NaN. ``last_clamped`` holds the fraction of points clamped on the last call (a tensor).
    """

    n_params = 8

    def __init__(self, out_hw, align_corners: bool, eps: float = 1e-3):
        super().__init__(out_hw, align_corners)
        self.eps = float(eps)
        g = base_grid(*self.out_hw, align_corners=self.align_corners)
        self.register_buffer("base", torch.cat([g.reshape(-1, 2), torch.ones(g.shape[0] * g.shape[1], 1)], 1),
                             persistent=False)
        self.last_clamped = torch.zeros(())

    def identity(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        b = theta.shape[0]
        hom = torch.cat([theta, theta.new_ones(b, 1)], 1).view(b, 3, 3)
        uvw = self.base.to(theta.dtype) @ hom.transpose(1, 2)  # (B, HW, 3)
        w = uvw[..., 2:]
        small = w.abs() < self.eps
        self.last_clamped = small.float().mean().detach()  # a tensor: no device sync here
        w = torch.where(small, torch.where(w < 0, -self.eps, self.eps), w)
        return (uvw[..., :2] / w).view(b, *self.out_hw, 2)


def tps_kernel(r2: torch.Tensor) -> torch.Tensor:
    """U(r) = r² log r², with U(0) = 0 (evaluated on a safe argument, so no NaN appears)."""
    safe = torch.where(r2 > 0, r2, torch.ones_like(r2))
    return torch.where(r2 > 0, r2 * torch.log(safe), torch.zeros_like(r2))


def tps_control_points(n_side: int = 4, span: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """n_side² control points on a regular grid over [-span, span]², (x, y), x fastest."""
    t = torch.linspace(-span, span, n_side, dtype=dtype)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


def tps_system(ctrl: torch.Tensor) -> torch.Tensor:
    """The (N+3)×(N+3) thin-plate-spline matrix L = [[K, P], [Pᵀ, 0]] (λ = 0: exact interpolation)."""
    n = ctrl.shape[0]
    k = tps_kernel(torch.cdist(ctrl, ctrl).pow(2))
    p = torch.cat([ctrl.new_ones(n, 1), ctrl], 1)
    top = torch.cat([k, p], 1)
    bottom = torch.cat([p.t(), ctrl.new_zeros(3, 3)], 1)
    return torch.cat([top, bottom], 0)


class TPSGrid(GridGenerator):
    """Thin-plate spline with N = n_side² control points; θ holds their offsets (B, 2N), (x, y) pairs.

    The spline maps control point c_i of the output frame to c_i + θ_i in the input. Because it
    is linear in the targets and reproduces affine maps exactly, grid = G + M·θ, where
    M = (basis(G) · L⁻¹)[:, :N] is solved once in float64 here and kept as a buffer: a forward
    pass is one matrix product, and zero offsets give the base grid G bit-exactly.
    """

    def __init__(self, out_hw, align_corners: bool, n_side: int = 4, span: float = 1.0):
        super().__init__(out_hw, align_corners)
        self.n_side, self.span = int(n_side), float(span)
        ctrl = tps_control_points(self.n_side, self.span)
        n = ctrl.shape[0]
        self.n_params = 2 * n
        system = tps_system(ctrl)
        cond = torch.linalg.cond(system).item()
        if not math.isfinite(cond) or cond > 1e12:
            raise ValueError(f"TPS system is ill-conditioned (cond={cond:.3g}); control points must be distinct")
        g = base_grid(*self.out_hw, align_corners=self.align_corners, dtype=torch.float64).reshape(-1, 2)
        basis = torch.cat([tps_kernel(torch.cdist(g, ctrl).pow(2)), g.new_ones(g.shape[0], 1), g], 1)
        m = torch.linalg.solve(system, basis.t()).t()[:, :n]  # L symmetric: basis·L⁻¹ = (L⁻¹·basisᵀ)ᵀ
        self.register_buffer("ctrl", ctrl.float(), persistent=False)
        self.register_buffer("weights", m.float(), persistent=False)
        self.register_buffer("base", g.float(), persistent=False)

    def identity(self) -> torch.Tensor:
        return torch.zeros(self.n_params)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        b = theta.shape[0]
        offsets = theta.view(b, -1, 2)
        grid = self.base.to(theta.dtype) + self.weights.to(theta.dtype) @ offsets
        return grid.view(b, *self.out_hw, 2)


GRIDS: dict[str, type[GridGenerator]] = {"aff": AffineGrid, "proj": ProjectiveGrid, "tps": TPSGrid}


def make_grid_generator(transform: str, out_hw, align_corners: bool, proj_eps: float = 1e-3,
                        tps_grid: int = 4, tps_span: float = 1.0) -> GridGenerator:
    """Build the grid generator named ``transform`` (one of ``GRIDS``)."""
    if transform == "aff":
        return AffineGrid(out_hw, align_corners)
    if transform == "proj":
        return ProjectiveGrid(out_hw, align_corners, eps=proj_eps)
    if transform == "tps":
        return TPSGrid(out_hw, align_corners, n_side=tps_grid, span=tps_span)
    raise ValueError(f"unknown transform {transform!r}; choose one of {sorted(GRIDS)}")
