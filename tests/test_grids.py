"""Grid generators: coordinate conventions, identity, known geometry, projective oracle and clamp, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.stn.grids import AffineGrid, ProjectiveGrid, TPSGrid, base_grid, make_grid_generator
from src.stn.transformer import SpatialTransformer
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import TRANSFORMS, blobs, identity_theta, pixel_centres, rotation, theta_for_affine

SIZES = [(7, 7), (8, 8), (6, 9)]  # odd, even, non-square
ACS = [False, True]


def sample(x, grid, ac):
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=ac)


@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("hw", SIZES)
def test_base_grid_is_pixel_centres(hw, ac):
    torch.testing.assert_close(base_grid(*hw, align_corners=ac, dtype=torch.float64), pixel_centres(*hw, ac),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_identity_reproduces_input(transform, hw, ac, dtype, tol):
    gen = make_grid_generator(transform, hw, ac)
    x = torch.rand(2, 3, *hw, dtype=dtype)
    torch.testing.assert_close(gen.identity().to(dtype), identity_theta(transform, dtype=dtype)[0])
    y = sample(x, gen(identity_theta(transform, 2, dtype)), ac)
    assert (y - x).abs().max() <= tol


@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("hw", [(8, 8), (10, 12), (9, 11)])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_downsampled_identity_equals_reference_resize(transform, hw, ac):
    x = torch.rand(2, 1, *hw, dtype=torch.float64)
    out_hw = (hw[0] // 2, hw[1] // 2)
    for mode, ref in [("avgpool2", F.avg_pool2d(x, 2)),
                      ("sample_half", F.interpolate(x, size=out_hw, mode="bilinear", align_corners=ac))]:
        st = SpatialTransformer(nn.Flatten(), hw[0] * hw[1], transform, hw, downsample=2, downsample_mode=mode,
                                align_corners=ac).double()
        y, _ = st(x)
        assert st.out_hw == out_hw == tuple(y.shape[-2:])
        assert (y - ref).abs().max() <= 1e-12, mode
    if not ac and hw[0] % 2 == 0 and hw[1] % 2 == 0:
        # analytic: half-pixel centres of a 2× coarser grid sit between 2×2 blocks, so bilinear = 2×2 mean
        assert (y - F.avg_pool2d(x, 2)).abs().max() <= 1e-12


@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_one_pixel_translation(transform, axis, ac):
    h, w = 6, 9
    n = w if axis == "x" else h
    step = 2 / (n - 1) if ac else 2 / n  # one pixel in normalised units
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    a[0 if axis == "x" else 1, 2] = step
    x = torch.rand(1, 1, h, w, dtype=torch.float64)
    y = sample(x, make_grid_generator(transform, (h, w), ac).double()(theta_for_affine(transform, a)), ac)
    dim = 3 if axis == "x" else 2
    shifted = x.narrow(dim, 1, n - 1)  # output pixel i shows input pixel i + 1
    assert (y.narrow(dim, 0, n - 1) - shifted).abs().max() <= 1e-9
    assert y.narrow(dim, n - 1, 1).abs().max() <= 1e-9  # the last line came from outside: zero padding


@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_inverse_rotation_recovers_input(transform, ac):
    """Render a smooth image rotated by 37° analytically, undo it through the sampler: the input comes back."""
    n, deg = 41, 37.0
    centres, sigma = [(0.3, -0.1), (-0.25, 0.25)], 0.25  # asymmetric, so a wrong rotation shows
    coords = pixel_centres(n, n, ac)
    r = rotation(deg)
    x = blobs(coords, centres, sigma)
    rotated = blobs(coords @ r.T, centres, sigma)  # rotated(p) = x(R p): what sampling with θ = R gives
    gen = make_grid_generator(transform, (n, n), ac).double()

    def undo(rot):
        theta = theta_for_affine(transform, torch.cat([rot, torch.zeros(2, 1, dtype=rot.dtype)], 1))
        return sample(rotated[None, None], gen(theta), ac)[0, 0]

    inside = coords.norm(dim=-1) < 0.6
    err = (undo(r.T) - x)[inside].abs().max()  # θ = R⁻¹ = Rᵀ
    wrong = (undo(r) - x)[inside].abs().max()  # the forward matrix instead of its inverse
    assert err < 0.01
    assert wrong > 0.3


@pytest.mark.parametrize("ac", ACS)
def test_projective_with_affine_parameters_is_affine(ac):
    torch.manual_seed(0)
    a = torch.eye(2, 3, dtype=torch.float64) + 0.2 * torch.randn(3, 2, 3, dtype=torch.float64)
    proj = ProjectiveGrid((6, 9), ac).double()(torch.cat([a.reshape(3, 6), a.new_zeros(3, 2)], 1))
    aff = AffineGrid((6, 9), ac)(a.reshape(3, 6))
    assert (proj - aff).abs().max() <= 1e-12


def _norm_to_pixel(h, w, ac) -> torch.Tensor:
    """3×3 map from normalised to pixel coordinates (pixel centres at integers), as kornia uses."""
    if ac:
        sx, sy = (w - 1) / 2, (h - 1) / 2
    else:
        sx, sy = w / 2, h / 2
    return torch.tensor([[sx, 0, (w - 1) / 2], [0, sy, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("ac", ACS)
def test_projective_matches_kornia(ac):
    """θ of the homography sending the output frame's corners to chosen input points, against kornia's
    DLT (pixel space, forward src→dst) on the grid points and against kornia's warp_perspective."""
    pytest.importorskip("kornia")
    from kornia.geometry.linalg import transform_points
    from kornia.geometry.transform import get_perspective_transform, warp_perspective

    h, w = 7, 9
    torch.manual_seed(1)
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64)
    targets = 0.8 * corners + 0.15 * torch.randn(4, 2, dtype=torch.float64)
    s = _norm_to_pixel(h, w, ac)
    to_pix = lambda m, p: transform_points(m[None], p[None])[0]  # noqa: E731
    h_pix = get_perspective_transform(to_pix(s, corners)[None], to_pix(s, targets)[None])[0]  # output px → input px
    h_norm = torch.linalg.inv(s) @ h_pix @ s
    theta = (h_norm / h_norm[2, 2]).reshape(-1)[:8][None]
    assert theta[0, 6:].abs().min() > 1e-3  # a genuinely projective map

    ours = ProjectiveGrid((h, w), ac).double()(theta)[0]
    pts = to_pix(s, pixel_centres(h, w, ac).reshape(-1, 2))
    ref = to_pix(torch.linalg.inv(s), to_pix(h_pix, pts)).reshape(h, w, 2)
    assert (ours - ref).abs().max() <= 1e-10
    assert (ProjectiveGrid((2, 2), True).double()(theta)[0].reshape(4, 2)[[0, 1, 3, 2]] - targets).abs().max() <= 1e-10

    x = torch.rand(1, 1, h, w, dtype=torch.float64)
    kornia_img = warp_perspective(x, torch.linalg.inv(h_pix)[None], (h, w), align_corners=ac)  # takes input→output
    assert (sample(x, ours[None], ac) - kornia_img).abs().max() <= 1e-10


def _vanishing_theta(h: int, w: int) -> torch.Tensor:
    """A homography whose w = 1 + h31·x vanishes on the grid column x = x0 (and nowhere else on the grid)."""
    x0 = pixel_centres(h, w, False)[0, 3, 0].item()  # the fourth column's x
    return torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0 / x0, 0.0]], dtype=torch.float64)


def test_projective_clamp_keeps_grid_and_gradients_finite():
    h, w = 6, 9
    gen = ProjectiveGrid((h, w), False, eps=1e-3).double()
    assert gen.clamped_fraction(identity_theta("proj")).item() == 0.0

    theta = _vanishing_theta(h, w).requires_grad_()
    grid = gen(theta)
    wz = 1 + theta[0, 6].item() * pixel_centres(h, w, False)[..., 0]
    expected = (wz.abs() < gen.eps).double().mean().item()
    assert expected > 0  # the construction really hits the guard
    assert gen.clamped_fraction(theta).item() == pytest.approx(expected)
    assert torch.isfinite(grid).all()
    assert grid.abs().max() > 10  # clamped points land far outside: |w| was replaced by eps, not by 1
    x = torch.rand(1, 1, h, w, dtype=torch.float64, requires_grad=True)
    sample(x, grid, False).sum().backward()
    assert torch.isfinite(theta.grad).all() and torch.isfinite(x.grad).all()


def test_projective_clamp_preserves_the_sign_of_w():
    """Points with 0 < w < eps divide by +eps, points with -eps < w < 0 by -eps."""
    eps = 0.3
    gen = ProjectiveGrid((7, 9), False, eps=eps).double()
    theta = torch.tensor([[1.0, 0.1, 0.05, -0.1, 1.0, 0.0, 1.2, 0.9]], dtype=torch.float64)
    grid = gen(theta)[0].reshape(-1, 2)
    pts = pixel_centres(7, 9, False).reshape(-1, 2)
    uvw = torch.cat([pts, pts.new_ones(len(pts), 1)], 1) @ torch.cat([theta[0], theta.new_ones(1)]).view(3, 3).T
    w = uvw[:, 2]
    assert ((w > -eps) & (w < 0)).any() and ((w > 0) & (w < eps)).any()  # both sides of the guard are hit
    w_safe = torch.where(w.abs() < eps, eps * torch.sign(w), w)
    torch.testing.assert_close(grid, uvw[:, :2] / w_safe[:, None], rtol=1e-12, atol=1e-12)
    assert gen.clamped_fraction(theta).item() == pytest.approx((w.abs() < eps).double().mean().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform", ["proj", "tps"])
def test_low_precision_grid_keeps_dtype_and_is_finite(transform, dtype):
    torch.manual_seed(0)
    gen = make_grid_generator(transform, (8, 8), False)
    theta = identity_theta(transform, 2) + 0.1 * torch.randn(2, gen.n_params, dtype=torch.float64)
    grid = gen(theta.to(dtype))
    assert grid.dtype == dtype
    assert torch.isfinite(grid).all()
    torch.testing.assert_close(grid.double(), gen.double()(theta), rtol=0, atol=0.05)


@pytest.mark.parametrize("ac", ACS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_grid_gradcheck(transform, ac):
    torch.manual_seed(0)
    gen = make_grid_generator(transform, (4, 5), ac).double()
    theta = identity_theta(transform, 1) + 0.05 * torch.randn(1, gen.n_params, dtype=torch.float64)
    assert torch.autograd.gradcheck(gen, (theta.requires_grad_(),))


STN_OPTIONS = {"proj_eps": 0.02, "tps_grid": 3, "tps_span": 0.9, "padding_mode": "zeros"}


@pytest.mark.parametrize("transform, expected", [("aff", {}), ("proj", {"eps": 0.02}),
                                                 ("tps", {"n_side": 3, "span": 0.9})])
def test_each_transform_reads_its_own_config_keys(transform, expected):
    """from_config takes exactly the keys the class declares; the others (and missing ones) are ignored."""
    assert make_grid_generator(transform, (4, 4), False, STN_OPTIONS).options() == expected
    defaults = make_grid_generator(transform, (4, 4), False).options()
    assert make_grid_generator(transform, (4, 4), False, {"align_corners": True}).options() == defaults
    assert defaults.keys() == expected.keys()


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_remake_keeps_transform_and_options(transform):
    gen = make_grid_generator(transform, (6, 9), False, STN_OPTIONS).double()
    other = gen.remake((6, 9), False).double()
    assert type(other) is type(gen) and other.options() == gen.options() and other.n_params == gen.n_params
    torch.manual_seed(0)
    theta = identity_theta(transform)[:, :gen.n_params] + 0.1 * torch.randn(1, gen.n_params, dtype=torch.float64)
    assert torch.equal(other(theta), gen(theta))
    coarse = gen.remake((3, 4), True)
    assert coarse.out_hw == (3, 4) and coarse.align_corners is True


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown transform"):
        make_grid_generator("similarity", (4, 4), False)
    with pytest.raises(ValueError, match=r"expects θ of shape \(B, 6\)"):
        AffineGrid((4, 4), False)(torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        TPSGrid((4, 4), False)(torch.zeros(2, 16))


MATRIX_STATS = {"det", "scale", "angle_abs_deg", "shift"}
STAT_KEYS = {"aff": {"theta_dev", "outside", *MATRIX_STATS}, "proj": {"theta_dev", "outside", *MATRIX_STATS, "clamped"},
             "tps": {"theta_dev", "outside", "offset_mean", "offset_max"}}
NEUTRAL = {"det": 1.0, "scale": 1.0}  # every other statistic is 0 at the identity


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_stats_are_neutral_at_the_identity(transform):
    gen = make_grid_generator(transform, (6, 9), False).double()
    stats = gen.stats(identity_theta(transform, 3))
    assert set(stats) == STAT_KEYS[transform]
    for k, v in stats.items():
        assert v.dim() == 0 and v.item() == pytest.approx(NEUTRAL.get(k, 0.0), abs=1e-12), k


@pytest.mark.parametrize("transform", ["aff", "proj"])
def test_matrix_stats_and_caption_of_a_known_map(transform):
    """Scaled by 0.8, rotated by 30°, shifted by (0.1, -0.2): the statistics read those back."""
    a = torch.cat([0.8 * rotation(30.0), torch.tensor([[0.1], [-0.2]], dtype=torch.float64)], 1)
    theta = theta_for_affine(transform, a).repeat(2, 1)
    stats = make_grid_generator(transform, (6, 9), False).double().stats(theta)
    pts = pixel_centres(6, 9, False) @ a[:, :2].T + a[:, 2]
    expected = {"det": 0.64, "scale": 0.8, "angle_abs_deg": 30.0, "shift": (0.1**2 + 0.2**2) ** 0.5,
                "theta_dev": (theta - identity_theta(transform, 2)).abs().mean().item(),
                "outside": (pts.abs() > 1).any(-1).double().mean().item()}
    assert expected["outside"] > 0  # the shift moves part of the frame out of the image
    for k, v in expected.items():
        assert stats[k].item() == pytest.approx(v, abs=1e-9), k
    caption = make_grid_generator(transform, (6, 9), False).describe(theta[0])
    assert caption == ("rot +30°" if transform == "aff" else "")


def test_projective_stats_report_the_clamped_fraction():
    h, w = 6, 9
    gen = ProjectiveGrid((h, w), False).double()
    theta = _vanishing_theta(h, w)
    assert gen.stats(theta)["clamped"].item() == pytest.approx(gen.clamped_fraction(theta).item())
    assert gen.stats(theta)["clamped"].item() > 0


def test_tps_stats_are_offset_lengths():
    torch.manual_seed(0)
    theta = 0.1 * torch.randn(3, 32, dtype=torch.float64)
    stats = TPSGrid((6, 9), False).double().stats(theta)
    lengths = torch.tensor([[(theta[b, 2 * i] ** 2 + theta[b, 2 * i + 1] ** 2).sqrt() for i in range(16)]
                            for b in range(3)], dtype=torch.float64)
    assert stats["offset_mean"].item() == pytest.approx(lengths.mean().item())
    assert stats["offset_max"].item() == pytest.approx(lengths.max().item())


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_lattice_sampling_matches_whether_lines_stay_straight(transform):
    """lattice_sub = 1 (draw only the lattice nodes) is right exactly for maps that keep lines straight."""
    torch.manual_seed(0)
    gen = make_grid_generator(transform, (6, 9), False).double()
    theta = identity_theta(transform) + 0.1 * torch.randn(1, gen.n_params, dtype=torch.float64)
    row = gen.remake((9, 9), True)(theta)[0, 4]  # the middle lattice line, 9 points along it
    d = row - row[0]
    bend = (d[:, 0] * d[-1, 1] - d[:, 1] * d[-1, 0]).abs().max().item()  # distance from the chord × its length
    straight = bend < 1e-12
    assert straight == (gen.lattice_sub == 1)
    assert gen.lattice_lines >= 2


@pytest.mark.parametrize("ac", ACS)
def test_affine_grid_matches_torch_affine_grid(ac):
    """The GEMM form of the affine grid is F.affine_grid: exactly at the identity, to float precision elsewhere."""
    torch.manual_seed(0)
    h, w = 6, 9
    theta = identity_theta("aff", 4) + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    ref = F.affine_grid(theta.view(-1, 2, 3), [4, 1, h, w], align_corners=ac)
    gen = AffineGrid((h, w), ac)
    assert (gen.double()(theta) - ref).abs().max() <= 1e-12
    assert (gen.float()(theta.float()) - ref).abs().max() <= 1e-6
    for dtype in (torch.float64, torch.float32):  # the float64 base grid, rounded once
        expected = base_grid(h, w, ac, dtype=torch.float64).to(dtype).expand(2, h, w, 2)
        assert torch.equal(AffineGrid((h, w), ac)(identity_theta("aff", 2, dtype)), expected)
