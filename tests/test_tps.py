"""Thin-plate spline grid: parameterisation, exactness, conditioning, low precision, independent oracles.

θ holds offsets: control point c_i of the output frame maps to c_i + θ_i in the input (x, y pairs,
control points x fastest). The spline is the standard TPS (kernel centres at the c_i, λ = 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from src.stn.grids import AffineGrid, TPSGrid, base_grid, tps_control_points, tps_kernel, tps_system
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import pixel_centres, tps_control_points_4x4

F64 = torch.float64


def random_targets(seed: int, scale: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    ctrl = tps_control_points_4x4()
    return ctrl, ctrl + scale * torch.randn(ctrl.shape, generator=g, dtype=F64)


def test_control_points_layout():
    torch.testing.assert_close(tps_control_points(4, 1.0), tps_control_points_4x4(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("ac", [False, True])
def test_zero_offsets_give_base_grid(ac):
    gen = TPSGrid((6, 9), ac)
    assert torch.equal(gen.double()(torch.zeros(1, 32, dtype=F64))[0], base_grid(6, 9, ac, dtype=F64))
    assert (gen.float()(torch.zeros(1, 32))[0] - base_grid(6, 9, ac)).abs().max() <= 1e-7


@pytest.mark.parametrize("ac", [False, True])
def test_affine_targets_reproduce_affine_grid(ac):
    torch.manual_seed(0)
    a = torch.eye(2, 3, dtype=F64) + 0.3 * torch.randn(2, 3, dtype=F64)
    ctrl = tps_control_points_4x4()
    targets = ctrl @ a[:, :2].T + a[:, 2]
    tps = TPSGrid((6, 9), ac).double()((targets - ctrl).reshape(1, -1))
    assert (tps - AffineGrid((6, 9), ac)(a.reshape(1, 6))).abs().max() <= 1e-12
    # why: the radial weights of an affine target vanish, only the affine part remains
    coef = torch.linalg.solve(tps_system(ctrl), torch.cat([targets, targets.new_zeros(3, 2)]))
    assert coef[:16].abs().max() <= 1e-12
    torch.testing.assert_close(coef[16:], torch.cat([a[:, 2:], a[:, :2]], 1).T)


def test_control_points_map_to_their_targets():
    """A corner-aligned 10×10 output grid contains the 4×4 control points (every third line)."""
    ctrl, targets = random_targets(0)
    grid = TPSGrid((10, 10), True).double()((targets - ctrl).reshape(1, -1))[0]
    on_ctrl = grid[::3, ::3].reshape(-1, 2)
    torch.testing.assert_close(pixel_centres(10, 10, True)[::3, ::3].reshape(-1, 2), ctrl, rtol=0, atol=1e-15)
    assert (on_ctrl - targets).abs().max() <= 1e-12


@pytest.mark.parametrize("ac", [False, True])
def test_matches_scipy_thin_plate_spline(ac):
    interp = pytest.importorskip("scipy.interpolate")
    ctrl, targets = random_targets(1)
    pts = pixel_centres(7, 11, ac).reshape(-1, 2)
    ref = interp.RBFInterpolator(ctrl.numpy(), targets.numpy(), kernel="thin_plate_spline", degree=1,
                                 smoothing=0.0)(pts.numpy())
    ours = TPSGrid((7, 11), ac).double()((targets - ctrl).reshape(1, -1))[0].reshape(-1, 2)
    assert (ours - torch.from_numpy(ref)).abs().max() <= 1e-10
    assert (ours - pts).abs().max() > 0.05  # a real warp, not the identity


def test_matches_kornia_where_the_conventions_meet():
    """kornia's TPS puts its kernel centres on the *second* argument of get_tps_transform (the targets)
    and uses ½r²log r², so it is a different interpolant off the control points. It must agree with
    ours at the control points (both interpolate) and on affine targets (both reproduce affine maps)."""
    pytest.importorskip("kornia")
    from kornia.geometry.transform import get_tps_transform, warp_points_tps

    def kornia_map(src, dst, pts):
        kw, aw = get_tps_transform(src[None], dst[None])
        return warp_points_tps(pts[None], dst[None], kw, aw)[0]

    ctrl, targets = random_targets(2)
    gen = TPSGrid((10, 10), True).double()
    ours = gen((targets - ctrl).reshape(1, -1))[0]
    assert (ours[::3, ::3].reshape(-1, 2) - kornia_map(ctrl, targets, ctrl)).abs().max() <= 1e-10

    a = torch.tensor([[0.9, -0.2, 0.1], [0.3, 1.1, -0.05]], dtype=F64)
    affine_targets = ctrl @ a[:, :2].T + a[:, 2]
    pts = pixel_centres(10, 10, True).reshape(-1, 2)
    ours = gen((affine_targets - ctrl).reshape(1, -1))[0].reshape(-1, 2)
    assert (ours - kornia_map(ctrl, affine_targets, pts)).abs().max() <= 1e-10


def test_system_is_well_conditioned_and_degenerate_points_are_rejected():
    assert torch.linalg.cond(tps_system(tps_control_points(4, 1.0))).item() < 1e3
    with pytest.raises(ValueError, match="ill-conditioned"):
        TPSGrid((6, 6), False, span=0.0)  # all 16 control points coincide
    with pytest.raises(ValueError, match="ill-conditioned"):
        TPSGrid((6, 6), False, n_side=1)  # one point cannot fix an affine part


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_has_no_nan_in_low_precision(dtype):
    r2 = torch.tensor([0.0, 1e-8, 6e-8, 1e-4, 0.5, 1.0, 4.0], dtype=dtype, requires_grad=True)
    u = tps_kernel(r2)
    assert torch.isfinite(u).all() and u[0] == 0
    u.sum().backward()
    assert torch.isfinite(r2.grad).all()
    assert u[-1].item() == pytest.approx(4 * math.log(4.0), rel=2e-2)


def test_kernel_values():
    r2 = torch.tensor([0.0, 0.25, 1.0, 2.0], dtype=F64)
    expected = torch.tensor([0.0, 0.25 * math.log(0.25), 0.0, 2 * math.log(2.0)], dtype=F64)
    torch.testing.assert_close(tps_kernel(r2), expected, rtol=0, atol=1e-15)
