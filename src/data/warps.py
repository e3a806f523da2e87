"""The five MNIST distortions (R, RTS, P, E, TC of paper.md §1): random draws on the CPU, warps anywhere.

A distortion is chosen by the ``warp`` key of its config (conf/data/<d>.yaml) through ``WARPS``; R and
RTS are one warp (``similarity``) with different keys. Each warp has two halves:

- ``draw(x_cpu, cfg, g, align_corners, pool_len[, table])``: every random parameter of a batch, drawn from a
  **CPU** ``torch.Generator`` in float64 (integers for TC) in a fixed order, plus the sampling matrix
  built from them. Acceptance tests (P's redraws) run here too, on the CPU digits; what they read of
  each digit alone a warp may name as its ``digit_table``, which the training loop computes once for
  the training set. So a batch's parameters depend only on (generator state, digits), never on the
  device or the image dtype.
- ``apply(x, params, cfg, align_corners, pool)``: the warp itself (grid + ``grid_sample`` / scatter)
  on x's device in x's dtype.

``distort_batch`` serves both the ``distort`` stage (float64 on the CPU, then rounded to uint8) and
the training loop's fresh per-batch draws (parameters on the CPU, warp on the accelerator).

Each warp is described *forward*, as a person would ("rotate the digit by +angle"), and implemented
by sampling the input through the *inverse* map (output pixel → input location, normalised (x, y),
``align_corners`` explicit, as src/stn/grids.py). Recorded parameters (float64 on the CPU, in pixels
and degrees, image axes x → right, y → down):

- similarity (R, RTS): ``angle`` = the angle the digit was rotated by, **counter-clockwise as
  displayed**, in degrees; ``scale``; ``tx``, ``ty`` = offset of the digit square's centre from the
  canvas centre; ``theta`` (N, 6) = the sampling matrix (output → input) that produced the image.
- projective (P): ``scale``; ``corners`` (N, 4, 2) = the corner moves, corners in the order top-left,
  top-right, bottom-right, bottom-left; ``redraws`` = how many candidate draws were rejected before
  this one; ``theta`` (N, 9) = the sampling homography, row-major, unit norm, w > 0 on the digit's
  side of the horizon. Output pixels beyond the horizon (w ≤ 0) are black.
- elastic (E): ``offsets`` (N, G², 2) = how far the image content moves at each control point
  (row-major from the top-left): the output pixel at control point c shows the input at c − offset;
  ``scale`` (1 unless ``prescale``); ``theta`` (N, 2·G²) = the sampling TPS offsets (normalised).
- clutter (TC): ``x``, ``y`` = the digit's top-left corner on the canvas; ``patch_src`` (N, K) =
  index of the clutter digit in the pool; ``patch_crop`` (N, K, 2) = (x, y) of the crop in that
  digit; ``patch_pos`` (N, K, 2) = (x, y) of the patch on the canvas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from src.stn.grids import TPSGrid, base_grid

DIGIT = 28  # input side in pixels
DRAW = torch.float64  # every random parameter is drawn in this dtype, on the CPU
FRAME = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))  # TL, TR, BR, BL in normalised (x, y)


def px_unit(size: int, align_corners: bool) -> float:
    """Length of one pixel in normalised coordinates for a side of ``size`` pixels."""
    return 2.0 / (size - 1) if align_corners else 2.0 / size


class Recipe(dict):
    """A distortion config (conf/data/<d>.yaml) as a plain dict with attribute access. Draws read it
    every batch, where OmegaConf's checked access (an exception raised inside for every absent key)
    costs about a millisecond a training step."""

    __slots__ = ()

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def recipe(cfg) -> Recipe:
    """``cfg`` (a conf/data node or a flat mapping) as a ``Recipe``; a ``Recipe`` is returned unchanged."""
    if isinstance(cfg, Recipe):
        return cfg
    return Recipe(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, make: Callable):
    """Constants (base grids, TPS systems) built once per (what, size, convention, device, dtype)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _uniform(lo_hi, n: int, g: torch.Generator) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=DRAW)


def _sample(x: torch.Tensor, grid: torch.Tensor, cfg, align_corners: bool) -> torch.Tensor:
    return F.grid_sample(x, grid, mode=str(cfg.get("interp", "bilinear")), padding_mode="zeros",
                         align_corners=align_corners)


# ------------------------------------------------------------------ similarity: R and RTS

def draw_similarity(x_cpu, cfg, g, align_corners, pool_len=None):
    """Rotate the digit's 28×28 square by +angle about its centre, scale it, then place it on the canvas.

    ``placement: square`` follows the stnbhwd demo (demo/distort_mnist.lua): the scaled square (side
    28·scale) lies at a uniform position fully inside the canvas, whatever ink it holds; ``centre``
    keeps it at the canvas centre (R). Without a ``scale`` key the scale is 1.
    """
    n, size = x_cpu.shape[0], int(cfg.canvas)
    angle = _uniform(cfg.angle, n, g)
    scale = _uniform(cfg.scale, n, g) if "scale" in cfg else torch.ones(n, dtype=DRAW)
    placement = str(cfg.get("placement", "centre"))
    if placement == "square":
        room = (size - DIGIT * scale) / 2  # how far the square's centre may move from the canvas centre, px
        if bool((room < 0).any()):
            raise ValueError(f"a square of side {DIGIT}·{float(scale.max()):.2f} does not fit a {size}-px canvas")
        tx, ty = room * (2 * torch.rand(2, n, generator=g, dtype=DRAW) - 1)
    elif placement in ("centre", "center"):
        tx = ty = torch.zeros(n, dtype=DRAW)
    else:
        raise ValueError(f"placement must be 'square' or 'centre', got {placement!r}")
    rad = angle * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # inverse map, output px → input px: u = R(-angle) (v - t) / s; then px → normalised units
    k_out, k_in = px_unit(size, align_corners), px_unit(DIGIT, align_corners)
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) / scale[:, None, None]
    shift = -(a @ torch.stack([tx, ty], -1)[..., None])[..., 0] * k_in
    theta = torch.cat([a * (k_in / k_out), shift[..., None]], -1).reshape(n, 6)
    return {"angle": angle, "scale": scale, "tx": tx, "ty": ty, "theta": theta}


def apply_similarity(x, params, cfg, align_corners, pool=None):
    n, size = x.shape[0], int(cfg.canvas)
    grid = F.affine_grid(params["theta"].view(n, 2, 3), [n, 1, size, size], align_corners=align_corners)
    return _sample(x, grid, cfg, align_corners)


# ------------------------------------------------------------------ projective: P

# The acceptance tests and the homography algebra work on a few numbers per image: numpy float64
# (elementwise IEEE arithmetic, the same bits as torch's, at a fraction of torch's per-call cost).

def _np(t) -> np.ndarray:
    """A CPU tensor (or array) as a numpy array; float types numpy lacks become float64."""
    if isinstance(t, np.ndarray):
        return t
    return (t if t.dtype in (torch.uint8, torch.float32, torch.float64, torch.int64, torch.bool) else t.to(DRAW)).numpy()


def _square_to_quad_np(q: np.ndarray) -> np.ndarray:
    """Homographies (N, 3, 3) taking the unit square's corners (0,0),(1,0),(1,1),(0,1) to q (N, 4, 2).

    Closed form (Heckbert 1989): elementwise arithmetic only, so no solver enters the data.
    """
    x, y = q[..., 0], q[..., 1]
    sx, sy = x[:, 0] - x[:, 1] + x[:, 2] - x[:, 3], y[:, 0] - y[:, 1] + y[:, 2] - y[:, 3]
    dx1, dx2, dy1, dy2 = x[:, 1] - x[:, 2], x[:, 3] - x[:, 2], y[:, 1] - y[:, 2], y[:, 3] - y[:, 2]
    den = dx1 * dy2 - dx2 * dy1
    g, h = (sx * dy2 - dx2 * sy) / den, (dx1 * sy - sx * dy1) / den
    a, b, c = x[:, 1] - x[:, 0] + g * x[:, 1], x[:, 3] - x[:, 0] + h * x[:, 3], x[:, 0]
    d, e, f = y[:, 1] - y[:, 0] + g * y[:, 1], y[:, 3] - y[:, 0] + h * y[:, 3], y[:, 0]
    return np.stack([a, b, c, d, e, f, g, h, np.ones_like(g)], -1).reshape(-1, 3, 3)


def _square_to_quad(q) -> torch.Tensor:
    return torch.from_numpy(_square_to_quad_np(_np(q)))


def _adjugate3(m: np.ndarray) -> np.ndarray:
    """Adjugate of (N, 3, 3) matrices (the inverse up to scale, which a homography ignores)."""
    c = [[m[:, (i + 1) % 3, (j + 1) % 3] * m[:, (i + 2) % 3, (j + 2) % 3]
          - m[:, (i + 1) % 3, (j + 2) % 3] * m[:, (i + 2) % 3, (j + 1) % 3] for j in range(3)] for i in range(3)]
    return np.stack([np.stack(row, -1) for row in c], -2).transpose(0, 2, 1)


def _det3(m: np.ndarray) -> np.ndarray:
    return (m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
            - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
            + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0]))


def _convex_np(quad: np.ndarray) -> np.ndarray:
    edge = np.roll(quad, -1, 1) - quad
    nxt = np.roll(edge, -1, 1)
    return ((edge[..., 0] * nxt[..., 1] - edge[..., 1] * nxt[..., 0]) > 0).all(1)


def quad_is_convex(quad) -> torch.Tensor:
    """(N,) True where the quadrilateral (N, 4, 2) TL, TR, BR, BL (y down) is strictly convex with the
    frame's orientation: every turn has the same strict sign. A fold, a bow tie or a mirror fails."""
    return torch.from_numpy(_convex_np(_np(quad)))


def _pixel_centres(align_corners: bool) -> np.ndarray:
    """(784, 2) normalised (x, y) centres of the digit's pixels, row-major (float64)."""
    return _cached(("centres", align_corners),
                   lambda: base_grid(DIGIT, DIGIT, align_corners, dtype=DRAW).reshape(-1, 2).numpy())


def ink_rows_table(x_cpu) -> dict[str, torch.Tensor]:
    """Each digit's ink, row by row: the column of every row's first and last ink pixel (N, 28) and the
    row's ink mass (N, 28, float64; 0 for a row without ink, whose columns mean nothing).

    It depends on the digit alone, so the training loop computes it once for its digits (``Warp.digit_table``)
    instead of once per batch."""
    img = _np(x_cpu).reshape(len(x_cpu), DIGIT, DIGIT)
    has = img > 0
    first, last = has.argmax(2), DIGIT - 1 - has[:, :, ::-1].argmax(2)  # argmax: the first True
    return {"ink_first": torch.from_numpy(first.astype(np.uint8)), "ink_last": torch.from_numpy(last.astype(np.uint8)),
            "ink_mass": torch.from_numpy(img.sum(2, dtype=np.float64))}


def _ink_rows(table: dict, align_corners: bool):
    """The rows of ``ink_rows_table`` as the normalised (x, y) of their first and last ink pixel
    (N, 28, 2, 2), and their mass (N, 28)."""
    centres = _pixel_centres(align_corners)[:DIGIT, 0]  # normalised x of the columns (= y of the rows)
    first, last, mass = (_np(table[k]) for k in ("ink_first", "ink_last", "ink_mass"))
    ys = np.broadcast_to(centres[:, None], (*mass.shape, 2))
    return np.stack([np.stack([centres[first], centres[last]], -1), ys], -1), mass


def _front_inside(fwd, u, v, size):
    """(w, inside) of points (u, v) of the unit square: their w, and whether they land inside the canvas
    in front of the horizon (no divide)."""
    xw, yw, w = (fwd[..., r, 0] * u + fwd[..., r, 1] * v + fwd[..., r, 2] for r in range(3))
    edge = size / 2 * w  # the canvas edges lie at ±size/2 px about its centre in either convention
    return w, (w > 0) & (np.abs(xw) <= edge) & (np.abs(yw) <= edge)


def _area_unit(fwd, scale, ink_scale, align_corners):
    """det(fwd) times the pixel-area factor: a digit pixel where fwd has w covers this / w³ of the area
    it has after the scale alone (1 for the unmoved frame); a homography's Jacobian is det / w³."""
    return _det3(fwd) * (px_unit(DIGIT, align_corners) / 2) ** 2 * (ink_scale / scale) ** 2


def _ink_kept_np(x, fwd, scale, ink_scale, size, align_corners):
    n = len(x)
    flat = x.reshape(n, -1)
    img, pix = np.nonzero(flat)
    mass = flat[img, pix].astype(np.float64)
    p = (ink_scale[img, None] * _pixel_centres(align_corners)[pix] + 1) / 2
    w, inside = _front_inside(fwd[img], p[:, 0], p[:, 1], size)
    area = _area_unit(fwd, scale, ink_scale, align_corners)[img] / w ** 3
    total = np.bincount(img, mass, minlength=n)
    kept = np.bincount(img, mass * area * inside, minlength=n)
    return np.where(total > 0, kept / np.maximum(total, 1e-300), 1.0)


def ink_kept(x_cpu, fwd, scale, ink_scale, size: int, align_corners: bool) -> torch.Tensor:
    """(N,) the fraction of each digit's ink mass, as the scaled digit would show it, that the warp puts
    inside the canvas: every ink pixel through the forward homography (pixel centre inside, in front of
    the horizon), weighted by the area the warp gives it (so a quad squeezed flat keeps little ink).

    ``fwd`` (N, 3, 3): unit square → output px about the canvas centre; a digit pixel at normalised p
    sits at (ink_scale·p + 1)/2 of that square. float64 on the CPU, ink pixels only.
    """
    return torch.from_numpy(_ink_kept_np(*map(_np, (x_cpu, fwd, scale, ink_scale)), size, align_corners))


def _ink_accepted_np(x, fwd, scale, ink_scale, size, align_corners, floor, rows=None):
    ends, mass = _ink_rows(ink_rows_table(x), align_corners) if rows is None else rows
    p = (ink_scale[:, None, None, None] * ends + 1) / 2
    w, inside = _front_inside(fwd[:, None, None], p[..., 0], p[..., 1], size)  # (N, 28, 2)
    has = mass > 0
    w_max = np.where(has[..., None], w, -np.inf).reshape(len(x), -1).max(1)
    least = _area_unit(fwd, scale, ink_scale, align_corners) / w_max ** 3
    total = mass.sum(1)
    sure = (mass * inside.all(2)).sum(1)
    ok = (least * sure >= floor * total) | (total == 0)
    sub = np.flatnonzero(~ok)
    if len(sub):
        ok[sub] = _ink_kept_np(x[sub], fwd[sub], scale[sub], ink_scale[sub], size, align_corners) >= floor
    return ok


def ink_accepted(x_cpu, fwd, scale, ink_scale, size: int, align_corners: bool, floor: float) -> torch.Tensor:
    """(N,) ``ink_kept(...) >= floor``, per pixel only where a lower bound from the rows cannot decide it.

    For a convex quad w > 0 over the whole square, and the image of a segment is a segment, so a row
    whose first and last ink pixels land inside lies inside; the area factor det/w³ over the ink is at
    least its smallest value at those row ends (w is linear). So the ink kept is at least that smallest
    factor times the mass of the rows inside, and only digits where that bound falls short of the floor
    are mapped pixel by pixel.
    """
    return torch.from_numpy(_ink_accepted_np(*map(_np, (x_cpu, fwd, scale, ink_scale)), size, align_corners, floor))


CORNER_MOVES = ("normal", "outward")


def _projective_candidates(n, scale_range, sigma, corners, move, g, align_corners):
    """n candidate draws: scale, corner moves, and the quad (output px about the centre) they give.

    ``move``: ``normal`` moves each corner by N(0, σ²) px in x and in y; ``outward`` moves it by |N(0, σ²)| px
    along its diagonal, away from the centre (a reading of "stretching the corners" in MATLAB data-preparation
    scripts circulated with reproductions, ../shared/paper.md §1)."""
    scale = _uniform(scale_range, n, g).numpy()
    if move == "normal":
        moves = (sigma * torch.randn(n, 4, 2, generator=g, dtype=DRAW)).numpy()
    else:
        reach = (sigma * torch.randn(n, 4, generator=g, dtype=DRAW)).abs().numpy()
        moves = reach[:, :, None] * (np.array(FRAME) / np.sqrt(2.0))  # FRAME's corners lie on the unit diagonals
    frame = np.array(FRAME) / px_unit(DIGIT, align_corners)  # the digit frame's corners, px
    quad = (frame if corners == "frame" else frame * scale[:, None, None]) + moves
    return scale, moves, quad


MAX_REDRAW_ROUNDS = 100


def draw_projective(x_cpu, cfg, g, align_corners, pool_len=None, table=None):
    """P: scale about the centre by U[scale], move the 4 corners by N(0, σ²) px (``corner_move``), warp projectively.

    A candidate is accepted when its quad is strictly convex and the warp keeps at least
    ``min_ink_inside`` of the scaled digit's ink inside the canvas (conf/data/p.yaml); rejected images
    get a fresh candidate, drawn for all of them at once in index order, until every image has one.
    ``corners: frame`` moves the corners of the 28×28 frame (the homography then acts on the scaled
    digit); ``box`` moves the corners of the scaled digit's box. ``table``: ``ink_rows_table`` of
    these digits, if the caller has it.
    """
    n, size = x_cpu.shape[0], int(cfg.canvas)
    corners = str(cfg.get("corners", "frame"))
    if corners not in ("frame", "box"):
        raise ValueError(f"corners must be 'frame' or 'box', got {corners!r}")
    move = str(cfg.get("corner_move", "normal"))
    if move not in CORNER_MOVES:
        raise ValueError(f"corner_move must be one of {', '.join(CORNER_MOVES)}, got {move!r}")
    floor = float(cfg.get("min_ink_inside", 0.0))
    spec = ((float(cfg.scale[0]), float(cfg.scale[1])), float(cfg.corner_sigma_px), corners, move)  # read once
    scale, moves, quad = _projective_candidates(n, *spec, g, align_corners)
    fwd = _square_to_quad_np(quad)
    x = _np(x_cpu) if floor > 0 else None
    rows = _ink_rows(ink_rows_table(x) if table is None else table, align_corners) if floor > 0 else None
    if rows is not None and len(rows[1]) != n:
        raise ValueError(f"the digit table has {len(rows[1])} rows for {n} digits")
    redraws = np.zeros(n)
    todo = np.arange(n)
    for _ in range(MAX_REDRAW_ROUNDS):
        ok = _convex_np(quad[todo])
        if floor > 0 and ok.any():
            conv = todo[ok]
            ok[ok.copy()] = _ink_accepted_np(x[conv], fwd[conv], scale[conv], _ink_scale(scale[conv], corners), size,
                                             align_corners, floor, (rows[0][conv], rows[1][conv]))
        todo = todo[~ok]
        if len(todo) == 0:
            break
        redraws[todo] += 1
        scale[todo], moves[todo], quad[todo] = _projective_candidates(len(todo), *spec, g, align_corners)
        fwd[todo] = _square_to_quad_np(quad[todo])
    else:
        raise ValueError(f"P: {len(todo)} image(s) found no acceptable draw in {MAX_REDRAW_ROUNDS} rounds")
    theta = _sampling_homography(fwd, scale, corners, size, align_corners)
    return {k: torch.from_numpy(v) for k, v in
            {"scale": scale, "corners": moves, "redraws": redraws, "theta": theta}.items()}


def _ink_scale(scale, corners: str):
    """Where the digit sits in the unit square mapped onto the quad: scaled for ``frame``, whole for ``box``."""
    return scale if corners == "frame" else np.ones_like(scale)


def _sampling_homography(fwd, scale, corners, size, align_corners):
    """θ (N, 9): output normalised → input normalised, row-major, from ``fwd`` (N, 3, 3): unit square →
    moved quad (output px), which its adjugate inverts.

    Scaled to unit norm with w > 0 on the digit's side of the horizon: adj(fwd)·p = det(fwd)·(u, v, 1)/λ
    with λ > 0 inside a convex quad, so the sign of det(fwd) fixes the side. (Dividing by h33 instead
    would flip the side whenever the canvas centre lies beyond the horizon, and black out the digit.)
    """
    fwd, scale = _np(fwd), _np(scale)
    k_out = px_unit(size, align_corners)
    # output px → unit square → input frame [-1, 1]² (normalised) → undo the scale ("frame" only)
    # (elementwise, no matrix product or reduction whose rounding could depend on the BLAS or the CPU)
    adj = _adjugate3(fwd)
    inv = np.stack([2 * adj[:, 0] - adj[:, 2], 2 * adj[:, 1] - adj[:, 2], adj[:, 2]], 1)  # [[2,0,-1],[0,2,-1],[0,0,1]]·adj
    inv = inv * np.array([1 / k_out, 1 / k_out, 1.0])  # columns: output normalised → px
    inv[:, :2] /= _ink_scale(scale, corners)[:, None, None]
    inv = inv.reshape(-1, 9)
    norm2 = inv[:, 0] * inv[:, 0]
    for k in range(1, 9):
        norm2 = norm2 + inv[:, k] * inv[:, k]
    return inv * (np.sign(_det3(fwd)) / np.sqrt(norm2))[:, None]


BEHIND = -4.0  # a normalised coordinate far outside the frame: zero padding samples black there


def apply_projective(x, params, cfg, align_corners, pool=None):
    """One batched homography grid (elementwise, so the same bits at any thread count) and one
    grid_sample. Pixels beyond the horizon (w ≤ 0) would show a point-mirrored ghost of the digit, so
    their grid points are sent outside the frame (black)."""
    n, size = x.shape[0], int(cfg.canvas)
    bx, by = _cached(("xy", size, align_corners, x.device, x.dtype), lambda: base_grid(
        size, size, align_corners, dtype=DRAW).reshape(1, -1, 2).to(device=x.device, dtype=x.dtype).unbind(-1))
    h = params["theta"][:, :, None]
    # (N, 2, S²): the x and y rows side by side, so every broadcast runs along contiguous memory
    num = h[:, [2, 5]].expand(n, 2, size * size).clone().addcmul_(h[:, [0, 3]], bx[:, None]).addcmul_(h[:, [1, 4]], by[:, None])
    w = (h[:, 7:8] * by[:, None]).add_(h[:, 8:9]).addcmul_(h[:, 6:7], bx[:, None])
    num.div_(w).masked_fill_(w <= 0, BEHIND)
    return _sample(x, num.transpose(1, 2).view(n, size, size, 2), cfg, align_corners)


# ------------------------------------------------------------------ elastic: E

def draw_elastic(x_cpu, cfg, g, align_corners, pool_len=None):
    """E: move the G×G control points by N(0, σ²) px; the TPS through them warps the digit."""
    n, size, side = x_cpu.shape[0], int(cfg.canvas), int(cfg.grid)
    scale = _uniform(cfg.scale, n, g) if cfg.get("prescale", False) else torch.ones(n, dtype=DRAW)
    offsets = float(cfg.sigma_px) * torch.randn(n, side * side, 2, generator=g, dtype=DRAW)
    theta = (-offsets * px_unit(size, align_corners)).reshape(n, -1)  # control point c samples the input at c − offset
    return {"scale": scale, "offsets": offsets, "theta": theta}


def apply_elastic(x, params, cfg, align_corners, pool=None):
    size, side, span = int(cfg.canvas), int(cfg.grid), float(cfg.get("span", 1.0))
    tps = _cached(("tps", size, side, span, align_corners, x.device, x.dtype),
                  lambda: TPSGrid((size, size), align_corners, n_side=side, span=span).to(device=x.device, dtype=x.dtype))
    k = px_unit(DIGIT, align_corners) / px_unit(size, align_corners)
    grid = tps(params["theta"]) * (k / params["scale"])[:, None, None, None]  # then undo the prescale
    return _sample(x, grid, cfg, align_corners)


# ------------------------------------------------------------------ clutter: TC

def draw_clutter(x_cpu, cfg, g, align_corners, pool_len=None):
    """TC: the digit's top-left corner and K patches (source digit, crop, position), uniform integers."""
    n, size, k, ps = x_cpu.shape[0], int(cfg.canvas), int(cfg.n_patches), int(cfg.patch_size)
    if size < DIGIT or ps > DIGIT or ps > size:
        raise ValueError(f"TC needs canvas >= {DIGIT} >= patch_size, got canvas {size}, patch {ps}")
    pos = torch.randint(0, size - DIGIT + 1, (n, 2), generator=g)
    src = torch.randint(0, int(pool_len), (n, k), generator=g)
    crop = torch.randint(0, DIGIT - ps + 1, (n, k, 2), generator=g)
    at = torch.randint(0, size - ps + 1, (n, k, 2), generator=g)
    return {"x": pos[:, 0], "y": pos[:, 1], "patch_src": src, "patch_crop": crop, "patch_pos": at}


def apply_clutter(x, params, cfg, align_corners, pool=None):
    """Paste the digit at its position, then add the K patches. No resampling: exact pixel values."""
    n, size, k, ps = x.shape[0], int(cfg.canvas), int(cfg.n_patches), int(cfg.patch_size)
    dev = x.device
    pos = torch.stack([params["x"], params["y"]], 1)
    src, crop, at = params["patch_src"], params["patch_crop"], params["patch_pos"]
    ar = torch.arange(DIGIT, device=dev)
    digit_idx = ((pos[:, 1, None, None] + ar[:, None]) * size + pos[:, 0, None, None] + ar).reshape(n, -1)
    canvas = x.new_zeros(n, size * size).scatter_(1, digit_idx, x.reshape(n, -1))
    pr = torch.arange(ps, device=dev)
    offs = (pr[:, None] * DIGIT + pr).reshape(-1)  # (ps²,) inside a 28×28 digit
    crop_idx = src * DIGIT * DIGIT + crop[..., 1] * DIGIT + crop[..., 0]  # (N, K)
    patches = pool.reshape(-1).take((crop_idx[..., None] + offs).to(pool.device)).to(device=dev, dtype=x.dtype)
    if pool.dtype == torch.uint8:
        patches = patches / 255
    offs = (pr[:, None] * size + pr).reshape(-1)  # (ps²,) on the canvas
    at_idx = (at[..., 1] * size + at[..., 0])[..., None] + offs  # (N, K, ps²)
    composite = str(cfg.get("composite", "add_clip"))
    if composite not in ("add_clip", "max"):
        raise ValueError(f"composite must be 'add_clip' or 'max', got {composite!r}")
    for j in range(k):  # one patch index at a time: no pixel is hit twice within one call (deterministic on GPU)
        if composite == "add_clip":
            canvas.scatter_add_(1, at_idx[:, j], patches[:, j])
        else:
            canvas.scatter_reduce_(1, at_idx[:, j], patches[:, j], reduce="amax")
    return canvas.view(n, 1, size, size).clamp_(0, 1)


# ------------------------------------------------------------------ the registry and the public entry point

@dataclass(frozen=True)
class Warp:
    draw: Callable  # (x_cpu, cfg, generator, align_corners, pool_len[, table]) -> {name: CPU tensor}
    apply: Callable  # (x, params on x's device, cfg, align_corners, pool) -> images
    needs_pool: bool = False  # TC crops its clutter from a pool of digits
    digit_table: Callable | None = None  # x_cpu -> {name: (N, ...) tensor}: what draw reads of each digit (as table)


WARPS: dict[str, Warp] = {
    "similarity": Warp(draw_similarity, apply_similarity),
    "projective": Warp(draw_projective, apply_projective, digit_table=ink_rows_table),
    "elastic": Warp(draw_elastic, apply_elastic),
    "clutter": Warp(draw_clutter, apply_clutter, needs_pool=True),
}


def warp_of(cfg) -> Warp:
    """The warp a conf/data node names with its ``warp`` key."""
    key = str(cfg.get("warp"))
    if key not in WARPS:
        raise ValueError(f"data.warp must be one of {', '.join(WARPS)}, got {key!r}")
    return WARPS[key]


def draw_params(x_cpu: torch.Tensor, cfg, generator: torch.Generator, align_corners: bool = False,
                pool_len: int | None = None, digit_table: dict | None = None) -> dict[str, torch.Tensor]:
    """Every random parameter of one batch, from a CPU generator (float64; TC's integers as int64).
    ``digit_table``: the warp's ``digit_table`` of these digits, precomputed (else derived when needed)."""
    if generator.device.type != "cpu":
        raise ValueError("distortion parameters are drawn from a CPU generator (device-independent streams)")
    cfg = recipe(cfg)
    warp = warp_of(cfg)
    extra = {"table": digit_table} if digit_table is not None and warp.digit_table else {}  # else it reads none
    return warp.draw(x_cpu, cfg, generator, align_corners, pool_len, **extra)


def distort_batch(x: torch.Tensor, cfg, generator: torch.Generator, align_corners: bool = False,
                  clutter_pool: torch.Tensor | None = None, x_cpu: torch.Tensor | None = None,
                  clamp: bool = True, digit_table: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distort a batch of digits as ``cfg`` (a conf/data/<d> node, or its ``recipe``) says.

    x: float (N, 1, 28, 28) in [0, 1], any device and dtype. ``generator`` is a CPU generator: all
    parameters come from it on the CPU (``draw_params``), so (digits, cfg, generator state) fixes
    them on every device; only the warp runs on x's device in x's dtype. ``x_cpu``: the same digits
    on the CPU (any dtype) for acceptance tests, to spare a device → host copy (default: ``x.cpu()``);
    ``digit_table``: the warp's ``digit_table(x_cpu)``, if the caller keeps it for its digits.
    ``clutter_pool`` (M, 1, 28, 28), uint8 or float, on x's device: the digits TC crops its patches
    from (default: the batch itself). Returns images (N, 1, S, S) of x's dtype (in [0, 1] when
    ``clamp``; a caller that rounds to 8 bits anyway may skip it) and the parameters (CPU, float64).
    Half-precision inputs are computed in float32.
    """
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, DIGIT, DIGIT) or not x.is_floating_point():
        raise ValueError(f"distort_batch expects float images (N, 1, {DIGIT}, {DIGIT}), got {x.dtype} {tuple(x.shape)}")
    cfg = recipe(cfg)  # a caller drawing many batches converts once
    warp = warp_of(cfg)
    pool = (x if clutter_pool is None else clutter_pool) if warp.needs_pool else None
    if x_cpu is None:
        x_cpu = x.detach().cpu()
    params = draw_params(x_cpu, cfg, generator, align_corners, None if pool is None else pool.shape[0], digit_table)
    work = torch.promote_types(x.dtype, torch.float32)
    on_dev = {k: v.to(device=x.device, dtype=work if v.is_floating_point() else v.dtype, non_blocking=True)
              for k, v in params.items()}
    out = warp.apply(x.to(work), on_dev, cfg, align_corners, pool)
    if clamp:  # bilinear weights can overshoot [0, 1] by an ulp
        out = out.clamp_(0, 1)
    return out.to(x.dtype), {k: v.to(DRAW) for k, v in params.items()}
