"""Grid generators: θ → sampling grid T_θ(G).

Convention (used everywhere in this repo, data generator and figures included):
a grid maps every pixel of the *output* image to a location in the *input* image, in
normalised coordinates (x, y) ∈ [-1, 1]², x first, exactly as ``F.grid_sample`` reads it.
``align_corners`` is passed explicitly on every call; with ``False`` (our default) ±1 are the
outer edges of the border pixels, with ``True`` the centres of the corner pixels.

Every generator derives its grid from one canonical base grid (``base_grid``), built by
``F.affine_grid`` on the identity, so the identity θ of every transform reproduces it.

Precomputed constants (base grid, TPS weights) are kept in float64 and cast to θ's dtype in
``forward``: a float64 forward (gradcheck, oracle tests) is then exact to float64 precision instead
of inheriting float32 round-off, and float32 grids agree with ``F.affine_grid`` to float32 rounding
(exactly at the identity).

Every grid is one GEMM of θ with a precomputed matrix (plus, for the projective map, one clamped
divide): on CPU that is faster than ``F.affine_grid`` and than kornia's ``warp_perspective`` grid.

To add a transform: subclass ``GridGenerator``, set ``n_params``, implement ``identity()`` and
``forward(theta) -> (B, H, W, 2)``, name it for the report in ``label``, declare its ``stn`` config keys
in ``config_keys`` (and return its constructor arguments from ``options()``), override
``stats``/``summary``/``describe``/``lattice_*`` where the defaults do not fit, and decorate it with
``@register_transform("<name>")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def base_grid(h: int, w: int, align_corners: bool, dtype=torch.float32, device=None) -> torch.Tensor:
    """The identity sampling grid of an h×w output, shape (h, w, 2), (x, y) order."""
    eye = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=dtype, device=device)
    return F.affine_grid(eye, [1, 1, h, w], align_corners=align_corners)[0]


class GridGenerator(nn.Module):
    """Maps a batch of transform parameters θ (B, n_params) to a grid (B, H, W, 2).

    A subclass owns everything that depends on what θ means, so nothing outside ``src.stn``
    branches on the transform's name: its identity, its config keys (``config_keys``,
    read by ``from_config``), its diagnostics (``stats``), a caption (``describe``) and how a
    figure draws it (``lattice_lines`` lines per axis, each sampled at ``lattice_sub`` steps:
    maps that keep lines straight need 1), its test-set summary (``summary``) and its name in the
    report (``label``).
    """

    n_params: int
    name: ClassVar[str] = ""  # the registry key, set by ``register_transform``
    label: ClassVar[str] = ""  # how the report names it in a model's row ("ST-FCN <label>")
    config_keys: ClassVar[dict[str, str]] = {}  # ``stn`` config key → constructor argument
    lattice_lines: ClassVar[int] = 2
    lattice_sub: ClassVar[int] = 1

    def __init__(self, out_hw: tuple[int, int], align_corners: bool):
        super().__init__()
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        self.align_corners = bool(align_corners)

    @classmethod
    def from_config(cls, out_hw, align_corners: bool, stn_cfg: Mapping | None = None) -> GridGenerator:
        """Build from the ``stn`` config block: each class picks the keys it declares; missing keys
        fall back to the constructor defaults."""
        stn_cfg = {} if stn_cfg is None else stn_cfg
        kw = {arg: stn_cfg[key] for key, arg in cls.config_keys.items() if key in stn_cfg}
        return cls(out_hw, align_corners, **kw)

    def identity(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict:
        """Constructor arguments beyond (out_hw, align_corners)."""
        return {}

    def remake(self, out_hw: tuple[int, int], align_corners: bool) -> GridGenerator:
        """The same transform on another output lattice: θ means the same map of normalised
        coordinates at any resolution, so figures can evaluate it on a coarse or corner-aligned lattice."""
        return type(self)(out_hw, align_corners, **self.options())

    @torch.no_grad()
    def stats(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch diagnostics of θ, so a collapsing transformer (zoom-out, blank output, runaway
        scale) shows in the logs. Tensors on θ's device (no sync); subclasses add their own."""
        return {
            "theta_dev": (theta - self.identity().to(theta)).abs().mean(),
            "outside": (self(theta).abs() > 1).any(-1).float().mean(),
        }

    @torch.no_grad()
    def summary(self, theta: torch.Tensor, measures: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``stats`` of a whole test set as numbers, plus how θ follows the distortion's recorded per-image
        ``measures`` (``angle``, ``scale``, ``corners``: those the data record), where θ can say."""
        return {k: float(v) for k, v in self.stats(theta).items()}

    def describe(self, theta: torch.Tensor) -> str:
        """A short caption for one θ (a (K,) or (1, K) row), e.g. its rotation; '' if none."""
        return ""

    def _check(self, theta: torch.Tensor) -> None:
        if theta.dim() != 2 or theta.shape[1] != self.n_params:
            raise ValueError(
                f"{type(self).__name__} expects θ of shape (B, {self.n_params}), got {tuple(theta.shape)}"
            )


GRIDS: dict[str, type[GridGenerator]] = {}


def register_transform(name: str):
    """Class decorator: make a ``GridGenerator`` available as ``stn.transform=<name>``."""
    def add(cls: type[GridGenerator]) -> type[GridGenerator]:
        if name in GRIDS:
            raise ValueError(f"transform {name!r} is already registered ({GRIDS[name].__name__})")
        cls.name = name
        GRIDS[name] = cls
        return cls
    return add


def rotation_deg(theta: torch.Tensor) -> torch.Tensor:
    """Rotation angle of the 2×2 part of affine/projective θ (the rotation of its polar decomposition).

    θ maps output to input, so this is the rotation of the input that the transformer undoes;
    positive is clockwise on screen (y points down).
    """
    a11, a12, a21, a22 = theta[:, 0], theta[:, 1], theta[:, 3], theta[:, 4]
    return torch.atan2(a21 - a12, a11 + a22) * (180 / math.pi)


class _MatrixStats:
    """Diagnostics of θ whose first six entries are a 2×3 matrix [a11 a12 tx; a21 a22 ty]."""

    @torch.no_grad()
    def stats(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().stats(theta)
        det = torch.linalg.det(theta[:, [0, 1, 3, 4]].view(-1, 2, 2))
        out["det"] = det.mean()
        out["scale"] = det.abs().sqrt().mean()
        out["angle_abs_deg"] = rotation_deg(theta).abs().mean()
        out["shift"] = theta[:, [2, 5]].norm(dim=1).mean()
        return out

    @torch.no_grad()
    def summary(self, theta: torch.Tensor, measures: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Adds the Pearson r of the recovered rotation with the digit's angle and of the zoom with its scale."""
        out = super().summary(theta, measures)
        if "angle" in measures:
            angle = measures["angle"].float()
            out["r(rotation, angle)"] = float(torch.corrcoef(torch.stack([rotation_deg(theta), angle]))[0, 1])
        if "scale" in measures and float(measures["scale"].std()) > 0:
            zoom = torch.linalg.det(theta[:, [0, 1, 3, 4]].view(-1, 2, 2)).abs().sqrt()
            out["r(zoom, scale)"] = float(torch.corrcoef(torch.stack([zoom, measures["scale"].float()]))[0, 1])
        return out


def affine_weights(g: torch.Tensor) -> torch.Tensor:
    """(6, HW·2) matrix W with θ @ W = the affine grid of θ = [a11 a12 tx a21 a22 ty] on points g (HW, 2).

    Row 3c + k holds (x, y, 1)[k] in the slots of output coordinate c, so the grid is one GEMM
    whose result is already in grid_sample's interleaved (x, y) layout.
    """
    hom = torch.cat([g, g.new_ones(g.shape[0], 1)], 1).t()  # (3, HW)
    w = g.new_zeros(2, 3, g.shape[0], 2)
    w[0, :, :, 0] = hom
    w[1, :, :, 1] = hom
    return w.reshape(6, -1)


@register_transform("aff")
class AffineGrid(_MatrixStats, GridGenerator):
    """6 parameters, row-major 2×3 matrix [a11 a12 tx; a21 a22 ty].

    The grid is θ @ W, one GEMM on a precomputed (6, HW·2) matrix: on CPU this is several times
    faster than ``F.affine_grid`` forward + backward, and the identity still gives the base grid exactly.
    """

    n_params = 6
    label = "Aff"

    def __init__(self, out_hw, align_corners: bool):
        super().__init__(out_hw, align_corners)
        g = base_grid(*self.out_hw, align_corners=self.align_corners, dtype=torch.float64).reshape(-1, 2)
        self.register_buffer("weights", affine_weights(g), persistent=False)

    def identity(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        return torch.mm(theta, self.weights.to(theta.dtype)).view(theta.shape[0], *self.out_hw, 2)

    def describe(self, theta: torch.Tensor) -> str:
        return f"rot {float(rotation_deg(theta.reshape(1, -1))[0]):+.0f}°"


@register_transform("proj")
class ProjectiveGrid(_MatrixStats, GridGenerator):
    """8 parameters: the homography [h11 h12 h13; h21 h22 h23; h31 h32 1] (h33 fixed to 1).

    The perspective divide uses a sign-preserving clamp |w| ≥ eps, so a transform that sends the
    horizon through the image gives large but finite coordinates (and finite gradients) instead
    of inf/NaN. ``clamped_fraction(θ)`` (logged as ``clamped`` by ``stats``) says how often it bites;
    it is computed only when asked, not on every forward pass.
    """

    n_params = 8
    label = "Proj"
    config_keys = {"proj_eps": "eps"}

    def __init__(self, out_hw, align_corners: bool, eps: float = 1e-3):
        super().__init__(out_hw, align_corners)
        self.eps = float(eps)
        g = base_grid(*self.out_hw, align_corners=self.align_corners, dtype=torch.float64).reshape(-1, 2)
        # (3, HW) rows x, y, 1: hom @ base gives u, v, w as contiguous rows (no strided divide)
        self.register_buffer("base", torch.cat([g, g.new_ones(g.shape[0], 1)], 1).t().contiguous(), persistent=False)

    def options(self) -> dict:
        return {"eps": self.eps}

    def identity(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])

    def _w(self, theta: torch.Tensor) -> torch.Tensor:
        """The unclamped denominator w = h31·x + h32·y + 1, (B, HW)."""
        base = self.base.to(theta.dtype)
        return torch.addmm(base[2], theta[:, 6:], base[:2])

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        b = theta.shape[0]
        hom = torch.cat([theta, theta.new_ones(b, 1)], 1).view(b, 3, 3)
        u, v, w = (hom @ self.base.to(theta.dtype)).unbind(1)  # one GEMM, three (B, HW) rows
        # sign-preserving clamp |w| ≥ eps, its mask and fill built outside autograd (the clamped
        # points get no gradient either way; copysign's backward alone cost a fifth of the grid);
        # full_like keeps θ's dtype, and w = 0 goes to +eps
        with torch.no_grad():
            small = w.abs() < self.eps
            fill = torch.copysign(torch.full_like(w, self.eps), w)
        r = torch.where(small, fill, w).reciprocal()
        return torch.stack((u * r, v * r), -1).view(b, *self.out_hw, 2)

    @torch.no_grad()
    def clamped_fraction(self, theta: torch.Tensor) -> torch.Tensor:
        """Fraction of grid points whose |w| < eps, i.e. where the divide was clamped (a tensor)."""
        return (self._w(theta).abs() < self.eps).float().mean()

    @torch.no_grad()
    def stats(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().stats(theta)
        out["clamped"] = self.clamped_fraction(theta)
        return out

    @torch.no_grad()
    def summary(self, theta: torch.Tensor, measures: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Adds how much perspective θ uses, |h31| + |h32| (the most w = h31·x + h32·y + 1 departs over [-1, 1]²
        from its 1 at the centre), the fraction of images where that exceeds 1 (``horizon``: the line w = 0
        crosses the output, and the points beyond it map through infinity to the far side of the input),
        and its Pearson r with the largest corner displacement."""
        out = super().summary(theta, measures)
        persp = theta[:, 6:].abs().sum(1)
        out["perspective"] = float(persp.mean())
        out["horizon"] = float((persp > 1).float().mean())
        if "corners" in measures:
            moved = measures["corners"].float()
            out["r(perspective, corners)"] = float(torch.corrcoef(torch.stack([persp, moved]))[0, 1])
        return out


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


@register_transform("tps")
class TPSGrid(GridGenerator):
    """Thin-plate spline with N = n_side² control points; θ holds their offsets (B, 2N), (x, y) pairs.

    The spline maps control point c_i of the output frame to c_i + θ_i in the input. Because it
    is linear in the targets and reproduces affine maps exactly, grid = G + M·θ, where
    M = (basis(G) · L⁻¹)[:, :N] is solved once in float64 here. It is kept as ``weights``, a
    (2N, HW·2) matrix laid out for θ's (x, y) pairs and the grid's (x, y) pairs, so a forward
    pass is one ``addmm`` with no reshape copies, and zero offsets give the base grid G bit-exactly.
    """

    label = "TPS"
    config_keys = {"tps_grid": "n_side", "tps_span": "span"}
    lattice_lines = 7  # curved lines: an inner lattice, finely sampled, shows the warp
    lattice_sub = 4

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
        # weights[2i + c, 2p + c] = M[p, i]: θ's coordinate c of point i moves coordinate c of grid point p
        weights = torch.kron(m.t().contiguous(), torch.eye(2, dtype=m.dtype))
        self.register_buffer("ctrl", ctrl, persistent=False)
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("base", g.reshape(-1), persistent=False)

    def options(self) -> dict:
        return {"n_side": self.n_side, "span": self.span}

    def identity(self) -> torch.Tensor:
        return torch.zeros(self.n_params)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        grid = torch.addmm(self.base.to(theta.dtype), theta, self.weights.to(theta.dtype))
        return grid.view(theta.shape[0], *self.out_hw, 2)

    @torch.no_grad()
    def stats(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().stats(theta)
        norms = theta.view(len(theta), -1, 2).norm(dim=-1)
        out["offset_mean"] = norms.mean()
        out["offset_max"] = norms.max()
        return out


def make_grid_generator(transform: str, out_hw, align_corners: bool, stn_cfg: Mapping | None = None) -> GridGenerator:
    """Build the grid generator named ``transform`` (a key of ``GRIDS``); its options come from the
    ``stn`` config block ``stn_cfg`` (each class reads the keys it declares in ``config_keys``)."""
    if transform not in GRIDS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {sorted(GRIDS)}")
    return GRIDS[transform].from_config(out_hw, align_corners, stn_cfg)
