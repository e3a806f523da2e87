"""The five MNIST distortions (R, RTS, P, E, TC of paper.md §1) as one batched, seeded function.

``distort_batch`` serves both the ``distort`` stage (float64 on the CPU, then rounded to uint8) and
the training loop's fresh per-batch draws (any device and dtype): every random number comes from
the ``generator`` passed in, on the device of the input, in a fixed order.

Each warp is described *forward*, as a person would ("rotate the digit by +angle"), and implemented
by sampling the input through the *inverse* map with our grid generators (src/stn/grids.py:
output pixel → input location, normalised (x, y), ``align_corners`` explicit). Recorded parameters
(all in pixels and degrees, image axes x → right, y → down):

- R, RTS: ``angle`` = the angle the digit was rotated by, **counter-clockwise as displayed**, in
  degrees; ``scale`` (RTS); ``tx``, ``ty`` (RTS) = offset of the digit centre from the canvas centre;
  ``theta`` (N, 6) = the sampling matrix (output → input) that produced the image.
- P: ``scale``; ``corners`` (N, 4, 2) = the corner moves, corners in the order top-left, top-right,
  bottom-right, bottom-left; ``theta`` (N, 8) = the sampling homography (h33 = 1). Output pixels
  beyond the homography's horizon (w ≤ 0) are black.
- E: ``offsets`` (N, G², 2) = how far the image content moves at each control point (row-major
  from the top-left): the output pixel at control point c shows the input at c − offset;
  ``scale`` (1 unless ``prescale``); ``theta`` (N, 2·G²) = the sampling TPS offsets (normalised).
- TC: ``x``, ``y`` = the digit's top-left corner on the canvas; ``patch_src`` (N, K) = index of the
  clutter digit in the pool; ``patch_crop`` (N, K, 2) = (x, y) of the crop in that digit;
  ``patch_pos`` (N, K, 2) = (x, y) of the patch on the canvas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from src.stn.grids import AffineGrid, GridGenerator, ProjectiveGrid, TPSGrid, base_grid

DISTORTIONS = ("r", "rts", "p", "e", "tc")
DIGIT = 28  # input side in pixels


def px_unit(size: int, align_corners: bool) -> float:
    """Length of one pixel in normalised coordinates for a side of ``size`` pixels."""
    return 2.0 / (size - 1) if align_corners else 2.0 / size


_GRIDS: dict[tuple, GridGenerator] = {}


def _grid(kind: str, size: int, align_corners: bool, device, dtype, **kw) -> GridGenerator:
    """Grid generators are cached per (kind, size, convention, device, dtype): TPS solves its system once."""
    key = (kind, size, align_corners, str(device), dtype, tuple(sorted(kw.items())))
    if key not in _GRIDS:
        cls = {"aff": AffineGrid, "proj": ProjectiveGrid, "tps": TPSGrid}[kind]
        _GRIDS[key] = cls((size, size), align_corners, **kw).to(device=device, dtype=dtype)
    return _GRIDS[key]


def _uniform(lo_hi, n: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, generator=g, device=like.device, dtype=like.dtype)


def _sample(x: torch.Tensor, grid: torch.Tensor, cfg, align_corners: bool) -> torch.Tensor:
    return F.grid_sample(x, grid, mode=str(cfg.get("interp", "bilinear")), padding_mode="zeros",
                         align_corners=align_corners)


# ------------------------------------------------------------------ R and RTS: similarity transforms

def _ink_extent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor):
    """Per image, the min/max x and y (px, about the digit centre) of its rotated+scaled ink pixels.

    A linear function's extremes over the ink lie on its convex hull, so each row's leftmost and
    rightmost ink pixels suffice (2·28 candidates instead of 784).
    """
    n, _, h, w = x.shape
    dt = cos.dtype
    ink = x[:, 0] > 0  # (N, H, W)
    empty = ~ink.flatten(1).any(1)
    ink = ink | empty[:, None, None]  # an empty image is placed as if its whole frame were ink
    cols = torch.arange(w, device=x.device)
    left = torch.where(ink, cols, w).amin(2)  # (N, H); w where a row has no ink
    right = torch.where(ink, cols, -1).amax(2)
    has = right >= 0
    u = torch.cat([left, right], 1).to(dt) - (w - 1) / 2  # candidates' x about the centre, px
    v = (torch.arange(h, device=x.device, dtype=dt) - (h - 1) / 2).repeat(2)
    valid = torch.cat([has, has], 1)
    # forward map in display coordinates (y down): counter-clockwise on screen by +angle
    px = scale[:, None] * (cos[:, None] * u + sin[:, None] * v)
    py = scale[:, None] * (cos[:, None] * v - sin[:, None] * u)
    big = torch.tensor(math.inf, device=x.device, dtype=dt)
    return (torch.where(valid, px, big).amin(1), torch.where(valid, px, -big).amax(1),
            torch.where(valid, py, big).amin(1), torch.where(valid, py, -big).amax(1))


def similarity(x, cfg, g, align_corners):
    """R (canvas 28, no scale or shift) and RTS: rotate by +angle, scale, then place on the canvas."""
    n, size = x.shape[0], int(cfg.canvas)
    like = x.new_empty(0)  # dtype and device of every draw
    angle = _uniform(cfg.angle, n, g, like)
    scale = _uniform(cfg.scale, n, g, like) if "scale" in cfg else torch.ones_like(angle)
    rad = angle * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    placement = str(cfg.get("placement", "centre"))
    if placement == "inside":
        x0, x1, y0, y1 = _ink_extent(x, cos, sin, scale)
        half = size / 2 - 0.5 * scale * (cos.abs() + sin.abs())  # each ink pixel, as a square, inside
        lo_x, hi_x, lo_y, hi_y = -half - x0, half - x1, -half - y0, half - y1
        ux, uy = torch.rand(2, n, generator=g, device=like.device, dtype=like.dtype)
        tx = torch.where(hi_x >= lo_x, lo_x + (hi_x - lo_x) * ux, (lo_x + hi_x) / 2)  # too big: centre it
        ty = torch.where(hi_y >= lo_y, lo_y + (hi_y - lo_y) * uy, (lo_y + hi_y) / 2)
    elif placement in ("centre", "center"):
        tx = ty = torch.zeros_like(angle)
    else:
        raise ValueError(f"placement must be 'inside' or 'centre', got {placement!r}")
    # inverse map, output px → input px: u = R(-angle) (v - t) / s; then px → normalised units
    k_out, k_in = px_unit(size, align_corners), px_unit(DIGIT, align_corners)
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) / scale[:, None, None]
    lin = a * (k_in / k_out)
    shift = -(a @ torch.stack([tx, ty], -1)[..., None])[..., 0] * k_in
    theta = torch.cat([lin, shift[..., None]], -1).reshape(n, 6)
    out = _sample(x, _grid("aff", size, align_corners, like.device, like.dtype)(theta), cfg, align_corners)
    params = {"angle": angle, "theta": theta}
    if cfg.name != "r":
        params.update(scale=scale, tx=tx, ty=ty)
    return out, params


# ------------------------------------------------------------------ P: projective

def _square_to_quad(q: torch.Tensor) -> torch.Tensor:
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
    one = torch.ones_like(g)
    return torch.stack([a, b, c, d, e, f, g, h, one], -1).reshape(-1, 3, 3)


def _adjugate3(m: torch.Tensor) -> torch.Tensor:
    """Adjugate of (N, 3, 3) matrices (the inverse up to scale, which a homography ignores)."""
    c = [[m[:, (i + 1) % 3, (j + 1) % 3] * m[:, (i + 2) % 3, (j + 2) % 3]
          - m[:, (i + 1) % 3, (j + 2) % 3] * m[:, (i + 2) % 3, (j + 1) % 3] for j in range(3)] for i in range(3)]
    return torch.stack([torch.stack(row, -1) for row in c], -2).transpose(1, 2)


FRAME = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))  # TL, TR, BR, BL in normalised (x, y)


def projective(x, cfg, g, align_corners):
    """P: scale about the centre by U[scale], then move the 4 corners by N(0, σ²) px and warp projectively.

    ``corners: frame`` moves the corners of the 28×28 frame (the homography then acts on the scaled
    digit); ``box`` moves the corners of the scaled digit's box.
    """
    n, size = x.shape[0], int(cfg.canvas)
    like = x.new_empty(0)  # dtype and device of every draw
    scale = _uniform(cfg.scale, n, g, like)
    moves = float(cfg.corner_sigma_px) * torch.randn(n, 4, 2, generator=g, device=like.device, dtype=like.dtype)
    corners = str(cfg.get("corners", "frame"))
    if corners not in ("frame", "box"):
        raise ValueError(f"corners must be 'frame' or 'box', got {corners!r}")
    k_in, k_out = px_unit(DIGIT, align_corners), px_unit(size, align_corners)
    frame = torch.tensor(FRAME, device=like.device, dtype=like.dtype) / k_in  # the digit frame's corners, px
    quad = (frame if corners == "frame" else frame * scale[:, None, None]) + moves
    fwd = _square_to_quad(quad)  # unit square → moved quad (output px); its adjugate inverts it
    # output px → unit square → input frame [-1, 1]² (normalised) → undo the scale ("frame" only)
    to_frame = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, -1.0], [0.0, 0.0, 1.0]], device=like.device, dtype=like.dtype)
    out_px = torch.tensor([1 / k_out, 1 / k_out, 1.0], device=like.device, dtype=like.dtype)  # normalised → px
    inv = (to_frame @ _adjugate3(fwd)) * out_px
    if corners == "frame":
        inv = torch.cat([inv[:, :2] / scale[:, None, None], inv[:, 2:]], 1)
    theta = (inv / inv[:, 2:3, 2:3]).reshape(n, 9)[:, :8]
    out = _sample(x, _grid("proj", size, align_corners, like.device, like.dtype)(theta), cfg, align_corners)
    # A strongly moved corner can put the horizon (w = 0) inside the canvas; the pixels beyond it would
    # show a point-mirrored ghost of the digit, so they are black (about 2 % of images have such pixels).
    b = base_grid(size, size, align_corners, dtype=like.dtype, device=like.device)
    w = theta[:, 6, None, None] * b[..., 0] + theta[:, 7, None, None] * b[..., 1] + 1
    return out * (w > 0)[:, None], {"scale": scale, "corners": moves, "theta": theta}


# ------------------------------------------------------------------ E: thin-plate spline

def elastic(x, cfg, g, align_corners):
    """E: move the G×G control points by N(0, σ²) px and warp with the TPS through them."""
    n, size = x.shape[0], int(cfg.canvas)
    like = x.new_empty(0)  # dtype and device of every draw
    side = int(cfg.grid)
    scale = _uniform(cfg.scale, n, g, like) if cfg.get("prescale", False) else like.new_ones(n)
    offsets = float(cfg.sigma_px) * torch.randn(n, side * side, 2, generator=g, device=like.device, dtype=like.dtype)
    k_in, k_out = px_unit(DIGIT, align_corners), px_unit(size, align_corners)
    theta = (-offsets * k_out).reshape(n, -1)  # output control point c samples the input at c − offset
    tps = _grid("tps", size, align_corners, like.device, like.dtype, n_side=side, span=float(cfg.get("span", 1.0)))
    grid = tps(theta) * ((k_in / k_out) / scale)[:, None, None, None]  # then undo the prescale
    out = _sample(x, grid, cfg, align_corners)
    return out, {"scale": scale, "offsets": offsets, "theta": theta}


# ------------------------------------------------------------------ TC: translated and cluttered

def cluttered(x, cfg, g, align_corners, pool=None):
    """TC: paste the digit at a uniform integer position, then add K clutter patches cropped from ``pool``.

    No resampling: the digit and the patches keep their exact pixel values (integer placement).
    ``pool`` (M, 1, 28, 28), uint8 or float, defaults to the batch itself.
    """
    n, size, k, ps = x.shape[0], int(cfg.canvas), int(cfg.n_patches), int(cfg.patch_size)
    dev = x.device
    if pool is None:
        pool = x
    if size < DIGIT or ps > DIGIT or ps > size:
        raise ValueError(f"TC needs canvas >= {DIGIT} >= patch_size, got canvas {size}, patch {ps}")
    pos = torch.randint(0, size - DIGIT + 1, (n, 2), generator=g, device=dev)
    src = torch.randint(0, pool.shape[0], (n, k), generator=g, device=dev)
    crop = torch.randint(0, DIGIT - ps + 1, (n, k, 2), generator=g, device=dev)
    at = torch.randint(0, size - ps + 1, (n, k, 2), generator=g, device=dev)
    # flat pixel indices: the digit at pos, patch j at at[:, j], crops inside their pool digits
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
    canvas = canvas.view(n, 1, size, size)
    params = {"x": pos[:, 0], "y": pos[:, 1], "patch_src": src, "patch_crop": crop, "patch_pos": at}
    return canvas.clamp_(0, 1), {k: v.to(x.dtype) for k, v in params.items()}


# ------------------------------------------------------------------ the public entry point

def distort_batch(x: torch.Tensor, cfg, generator: torch.Generator, align_corners: bool = False,
                  clutter_pool: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distort a batch of digits as ``cfg`` (a conf/data/<d> node) says.

    x: float (N, 1, 28, 28) in [0, 1], any device and dtype. ``generator`` must live on x's device;
    all random draws come from it, in a fixed order, so (x, cfg, generator state) fixes the result.
    Returns images (N, 1, S, S) of x's dtype in [0, 1] and a dict of float parameter tensors (N, …)
    (module docstring). ``clutter_pool`` (M, 1, 28, 28), uint8 or float: the digits TC crops its
    patches from (default: the batch itself). Half-precision inputs are computed in float32.
    """
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, DIGIT, DIGIT) or not x.is_floating_point():
        raise ValueError(f"distort_batch expects float images (N, 1, {DIGIT}, {DIGIT}), got {x.dtype} {tuple(x.shape)}")
    name = str(cfg.name)
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    if name in ("r", "rts"):
        out, params = similarity(xw, cfg, generator, align_corners)
    elif name == "p":
        out, params = projective(xw, cfg, generator, align_corners)
    elif name == "e":
        out, params = elastic(xw, cfg, generator, align_corners)
    elif name == "tc":
        out, params = cluttered(xw, cfg, generator, align_corners, clutter_pool)
    else:
        raise ValueError(f"unknown distortion {name!r}; choose one of {DISTORTIONS}")
    if name != "tc":  # bilinear weights can overshoot [0, 1] by an ulp; TC is already clipped
        out = out.clamp_(0, 1)
    return out.to(x.dtype), {k: v.to(work) for k, v in params.items()}
