"""P's acceptance rule: no folded quadrilateral and no digit pushed mostly out of the canvas survive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.data.warps import (DIGIT, FRAME, _square_to_quad, distort_batch, ink_accepted, ink_kept, ink_rows_table,
                             px_unit, quad_is_convex, warp_of)
from src.data.distort import quantize
from src.stn.grids import base_grid
from tests.conftest import synthetic_digits

REPO = Path(__file__).resolve().parents[1]


def p_cfg(**over):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf/data/p.yaml"), over)


def digits(n: int, seed: int = 1) -> torch.Tensor:
    return synthetic_digits(n, seed).double() / 255


def quads(p) -> torch.Tensor:
    """The moved frame corners (output px about the centre) of recorded P parameters (corners: frame)."""
    return torch.tensor(FRAME, dtype=torch.float64) / px_unit(DIGIT, False) + p["corners"]


def brute_ink_kept(x: torch.Tensor, quad: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """An independent oracle: every pixel's four corners through the forward homography (with the
    divide); its area is the shoelace area of the mapped square, counted where its centre is inside."""
    fwd = _square_to_quad(quad)
    c = base_grid(DIGIT, DIGIT, False, dtype=torch.float64).reshape(-1, 2)
    h = 1 / DIGIT  # half a pixel, normalised

    def to_out(pts):
        uv1 = torch.cat([(scale[:, None, None] * pts + 1) / 2, torch.ones(len(x), len(c), 1, dtype=torch.float64)], -1)
        out = uv1 @ fwd.transpose(1, 2)
        return out[..., :2] / out[..., 2:], out[..., 2]

    centre, w = to_out(c)
    inside = (w > 0) & (centre.abs() <= size / 2).all(-1)
    corners = [to_out(c + torch.tensor(d, dtype=torch.float64))[0] for d in ((-h, -h), (h, -h), (h, h), (-h, h))]
    area = sum(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0] for a, b in zip(corners, corners[1:] + corners[:1])) / 2
    area = area / scale[:, None] ** 2  # relative to the scaled digit's pixel (scale² px²)
    m = x.reshape(len(x), -1)
    return (m * area * inside).sum(1) / m.sum(1)


def test_a_folded_quadrilateral_is_not_convex():
    frame = torch.tensor(FRAME, dtype=torch.float64) * 14
    fold = frame.clone()
    fold[1], fold[2] = frame[2], frame[1]  # TR and BR swapped: a bow tie
    dent = frame.clone()
    dent[1] = torch.tensor([-5.0, -5.0])  # TR pushed inside: concave
    mirror = frame.flip(0)  # the same square traversed the other way round: a mirrored digit
    assert quad_is_convex(torch.stack([frame, fold, dent, mirror])).tolist() == [True, False, False, False]


def test_ink_kept_equals_the_per_pixel_oracle_and_the_shortcut_agrees():
    x = digits(300, 5)
    g = torch.Generator().manual_seed(0)
    scale = 0.75 + 0.25 * torch.rand(300, generator=g, dtype=torch.float64)
    quad = torch.tensor(FRAME, dtype=torch.float64) * 14 + 8 * torch.randn(300, 4, 2, generator=g, dtype=torch.float64)
    keep = quad_is_convex(quad)
    x, scale, fwd = x[keep], scale[keep], _square_to_quad(quad[keep])
    got = ink_kept(x, fwd, scale, scale, 28, False)
    want = brute_ink_kept(x, quad[keep], scale, 28)
    assert (got - want).abs().max() < 5e-3 and (want < 0.5).sum() > 10  # many digits lost ink
    for floor in (0.1, 0.5, 0.9):
        assert torch.equal(ink_accepted(x, fwd, scale, scale, 28, False, floor), got >= floor)


def test_no_non_convex_or_mostly_outside_draw_survives():
    x = digits(400, 2)
    cfg = p_cfg(corner_sigma_px=9.0)  # strong moves: many candidates fold or push the digit out
    y, p = distort_batch(x, cfg, torch.Generator().manual_seed(1))
    assert p["redraws"].sum() > 20  # the rule was exercised
    assert quad_is_convex(quads(p)).all()
    assert brute_ink_kept(x, quads(p), p["scale"], 28).min() >= cfg.min_ink_inside - 5e-3
    assert (quantize(y).flatten(1).amax(1) > 0).all()  # no blank image
    # without the rule the same generator would have produced folded (blank) quads
    off = p_cfg(corner_sigma_px=9.0, min_ink_inside=0.0)
    scale = torch.Generator().manual_seed(1)
    s0 = 0.75 + 0.25 * torch.rand(400, generator=scale, dtype=torch.float64)
    moves = 9.0 * torch.randn(400, 4, 2, generator=scale, dtype=torch.float64)
    first = torch.tensor(FRAME, dtype=torch.float64) * 14 + moves
    assert not quad_is_convex(first).all() and off.min_ink_inside == 0 and s0.shape == (400,)


def test_the_ink_table_matches_a_row_by_row_oracle():
    x = (digits(50, 9) * 255).round().to(torch.uint8)
    x[0] = 0  # a blank digit
    x[1, 0, :, 1:] = 0  # ink only in column 0
    x[2, 0, :, :-1] = 0  # ink only in column 27
    t = ink_rows_table(x)
    for i in range(len(x)):
        for r in range(DIGIT):
            row = x[i, 0, r]
            cols = torch.nonzero(row).flatten().tolist()
            assert float(t["ink_mass"][i, r]) == float(row.double().sum())
            if cols:
                assert (int(t["ink_first"][i, r]), int(t["ink_last"][i, r])) == (cols[0], cols[-1])
    assert torch.equal(ink_rows_table(x.double() / 255)["ink_first"], t["ink_first"])  # any dtype of the digits


@pytest.mark.parametrize("corners", ["frame", "box"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("cpu_dtype", [torch.uint8, torch.float64])
def test_a_precomputed_digit_table_gives_the_same_draws(corners, align_corners, cpu_dtype):
    """Training computes P's per-row ink table once for its digits and slices it per batch; the draws
    must be exactly those of the table derived from the batch itself."""
    pool = (digits(600, 7) * 255).round().to(torch.uint8)
    pool[:5] = 0  # blank digits: every row empty
    cfg = p_cfg(corner_sigma_px=9.0, corners=corners)
    assert warp_of(cfg).digit_table is ink_rows_table
    full = ink_rows_table(pool)
    for step in range(3):
        idx = torch.randperm(600, generator=torch.Generator().manual_seed(step))[:200]
        idx[0] = 0
        x = pool[idx].double() / 255
        x_cpu = pool[idx] if cpu_dtype == torch.uint8 else x
        table = {k: v[idx] for k, v in full.items()}
        a = distort_batch(x, cfg, torch.Generator().manual_seed(step), align_corners, x_cpu=x_cpu, digit_table=table)
        b = distort_batch(x, cfg, torch.Generator().manual_seed(step), align_corners, x_cpu=x_cpu)
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        assert a[1]["redraws"].sum() > 0
    with pytest.raises(ValueError, match="digit table has 199 rows for 200 digits"):
        distort_batch(x, cfg, torch.Generator(), align_corners, x_cpu=x_cpu, digit_table={k: v[1:] for k, v in table.items()})


def test_redraws_are_deterministic_and_keep_accepted_first_draws():
    x = digits(200, 3)
    cfg = p_cfg(corner_sigma_px=9.0)
    a = distort_batch(x, cfg, torch.Generator().manual_seed(4))
    b = distort_batch(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    # images whose first candidate was accepted keep it: the first round draws all N candidates in order
    g = torch.Generator().manual_seed(4)
    s0 = 0.75 + 0.25 * torch.rand(200, generator=g, dtype=torch.float64)
    first = a[1]["redraws"] == 0
    assert torch.equal(a[1]["scale"][first], s0[first])


def test_no_stored_p_image_is_blank():
    out = REPO / "data/distorted/p"
    if not (out / "manifest.json").is_file():
        pytest.skip("data/distorted/p not generated (dvc repro distort@p)")
    manifest = json.loads((out / "manifest.json").read_text())
    if "min_ink_inside" not in manifest["config"]:
        pytest.skip("data/distorted/p predates the acceptance rule; regenerate it")
    for split in ("train", "val", "test"):
        images = torch.load(out / f"{split}.pt", weights_only=True)["images"]
        assert int((images.flatten(1).amax(1) == 0).sum()) == 0, split
