"""Figures of the transformer: pixel conversion, drawn frame geometry, and the written PNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.stn.grids import base_grid
from src.stn.transformer import SpatialTransformer
from src.stn.stats import rotation_deg
from src.report.figures import draw_transforms, frame_corners, frame_lattice, to_pixels
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import TRANSFORMS, build, digit_batch, identity_theta, rotation, theta_for_affine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def transformer(transform, hw, ac=False):
    return SpatialTransformer(nn.Flatten(), hw[0] * hw[1], transform, hw, align_corners=ac).double()


@pytest.mark.parametrize("ac", [False, True])
def test_pixel_conversion_puts_grid_points_on_pixel_centres(ac):
    """imshow draws pixel (i, j) centred at (x=j, y=i): the sampling grid must land there."""
    h, w = 5, 8
    pix = to_pixels(base_grid(h, w, ac, dtype=torch.float64), (h, w), ac)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    torch.testing.assert_close(pix, torch.stack([xx, yy], -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_identity_frame_is_the_image_border(transform, ac):
    h, w = 6, 9
    st = transformer(transform, (h, w), ac)
    corners = frame_corners(frame_lattice(st, identity_theta(transform, 2)), (h, w), ac)
    lo, hx, hy = (-0.5, w - 0.5, h - 0.5) if not ac else (0.0, w - 1.0, h - 1.0)
    expected = torch.tensor([[lo, lo], [hx, lo], [hx, hy], [lo, hy]], dtype=torch.float64)
    assert corners.shape == (2, 4, 2)
    torch.testing.assert_close(corners, expected.expand(2, 4, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_rotated_frame_corners_are_the_rotated_border(transform, ac):
    n, deg = 28, 30.0
    r = rotation(deg)
    st = transformer(transform, (n, n), ac)
    theta = theta_for_affine(transform, torch.cat([0.8 * r, torch.tensor([[0.1], [-0.2]], dtype=torch.float64)], 1))
    corners = frame_corners(frame_lattice(st, theta), (n, n), ac)[0]
    # analytic: pixel centre of the image + (scaled, rotated) half-extent of the frame, in pixels
    signs = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64)
    half = n / 2 if not ac else (n - 1) / 2
    centre = (n - 1) / 2 + half * torch.tensor([0.1, -0.2], dtype=torch.float64)
    expected = centre + half * 0.8 * signs @ r.T
    torch.testing.assert_close(corners, expected, rtol=0, atol=1e-9)
    if transform != "tps":
        assert rotation_deg(theta).item() == pytest.approx(deg)


@pytest.mark.parametrize("name", ["st_cnn", "st_cnn_proj", "st_fcn_tps"])
def test_draw_transforms_writes_a_png(tmp_path, name):
    net = build(name, 28, 1)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-identity transformer, so the drawing has something to show
        net.st.head.bias.add_(0.1 * torch.randn_like(net.st.head.bias))
    x, labels = digit_batch(5, 28)
    out = draw_transforms(net, x, tmp_path / "figs" / f"{name}.png", labels=labels)
    assert out == tmp_path / "figs" / f"{name}.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_draw_transforms_accepts_a_transformer_with_downsampling(tmp_path):
    st = SpatialTransformer(nn.Flatten(), 42 * 42, "aff", (42, 42), downsample=2)
    out = draw_transforms(st, digit_batch(2, 42)[0], tmp_path / "st.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_draw_transforms_needs_a_transformer(tmp_path):
    with pytest.raises(ValueError, match="no spatial transformer"):
        draw_transforms(build("fcn", 28, 1), digit_batch(1, 28)[0], tmp_path / "x.png")
