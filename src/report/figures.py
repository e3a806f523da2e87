"""Pictures of what a spatial transformer did, as in the paper's Table 1 (right).

Each image gets three panels: (a) the input, (b) the input with the output frame T_θ(G) drawn on
it (the frame's quadrilateral for aff/proj, a warped lattice for tps), (c) the transformer output.

The frame is evaluated by the transformer's own grid generator on a corner-aligned lattice
(``GridGenerator.remake``), so its outer lines are the output frame's edges (±1) whatever
``align_corners`` the transformer uses; only the conversion to input pixels depends on it.
Uses matplotlib's object API (no pyplot, no global backend switch): safe in workers and tests.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from src.runinfo import write_atomic
from src.stn.transformer import SpatialTransformer


def to_pixels(xy: torch.Tensor, hw: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Normalised (x, y) → pixel (column, row), integers at pixel centres as ``imshow`` draws them."""
    size = xy.new_tensor([hw[1], hw[0]])
    return (xy + 1) * (size - 1) / 2 if align_corners else ((xy + 1) * size - 1) / 2


def frame_lattice(st: SpatialTransformer, theta: torch.Tensor, lines: int = 2, sub: int = 1) -> torch.Tensor:
    """T_θ on a corner-aligned lattice over the output frame: (B, m, m, 2) normalised input coords.

    ``lines`` lattice lines per axis (2 = the frame border only), each sampled at ``sub`` steps
    between lines, so m = (lines - 1)·sub + 1; curved (TPS) lines need sub > 1.
    """
    m = (lines - 1) * sub + 1
    gen = st.grid.remake((m, m), align_corners=True).to(theta.device)
    return gen(theta)


def frame_corners(lattice: torch.Tensor, in_hw: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Pixel coords (B, 4, 2) of the output frame's corners (top-left, top-right, bottom-right,
    bottom-left) in the input image, from a ``frame_lattice``."""
    corners = lattice[:, [0, 0, -1, -1], [0, -1, -1, 0]]
    return to_pixels(corners, in_hw, align_corners)


def _caption(i: int, st: SpatialTransformer, theta, labels, preds) -> str:
    parts = []
    if labels is not None:
        parts.append(f"y={int(labels[i])}")
    if preds is not None:
        parts.append(f"ŷ={int(preds[i])}")
    if text := st.grid.describe(theta[i]):  # the transform's own caption, e.g. the recovered rotation
        parts.append(text)
    return " ".join(parts) or "T_θ(G)"


@torch.no_grad()
def draw_transforms(model: nn.Module, images: torch.Tensor, path, *, labels=None, lattice: int | None = None,
                    per_row: int = 2, dpi: int = 100) -> Path:
    """Run ``model`` (a ``SpatialTransformer``, or a net with ``.st`` and ``.classifier``) on a batch
    of [0, 1] images (B, 1, H, W) and write the three-panel figure to ``path`` (PNG); returns the path.

    Predictions are shown when ``model`` has a classifier, labels when given.
    """
    st = model if isinstance(model, SpatialTransformer) else getattr(model, "st", None)
    if not isinstance(st, SpatialTransformer):
        raise ValueError(f"{type(model).__name__} has no spatial transformer to draw")
    ref = next(st.parameters())
    x = images.to(device=ref.device, dtype=ref.dtype)
    out, theta = st(x)
    preds = model.classifier(out).argmax(1) if model is not st else None
    return draw_warps(st, x, theta, path, labels=labels, preds=preds, lattice=lattice, per_row=per_row, dpi=dpi)


@torch.no_grad()
def draw_warps(st: SpatialTransformer, images: torch.Tensor, theta: torch.Tensor, path, *, labels=None, preds=None,
               lattice: int | None = None, per_row: int = 2, dpi: int = 100) -> Path:
    """The three-panel figure of given θ (e.g. from a cell's record): input, frame T_θ(G) on the input,
    and ``st.warp(input, θ)``. ``lattice``: lines per axis in panel (b); default 2 (the frame) for
    line-preserving transforms, 7 for tps (``GridGenerator.lattice_lines``)."""
    x = images.float()
    theta = theta.float()
    out = st.warp(x, theta)
    lines = lattice or st.grid.lattice_lines
    sub = st.grid.lattice_sub  # 1 where the transform maps lines to lines
    in_hw = tuple(x.shape[-2:])
    pix = to_pixels(frame_lattice(st, theta, lines, sub), in_hw, st.align_corners).cpu()
    x, out = x.cpu(), out.cpu()

    n = len(x)
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    fig = Figure(figsize=(3 * per_row * 1.5, rows * 1.7), layout="constrained")
    axes = fig.subplots(rows, 3 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    h, w = in_hw
    margin = 0.25 * max(h, w)
    for i in range(n):
        r, c = divmod(i, per_row)
        ax_in, ax_frame, ax_out = axes[r, 3 * c:3 * c + 3]
        for ax, img, title in ((ax_in, x[i, 0], "input"), (ax_frame, x[i, 0], None), (ax_out, out[i, 0], "output")):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if title:
                ax.set_title(title, fontsize=8)
        p = pix[i]
        last = p.shape[0] - 1
        for k in range(0, last + 1, sub):
            lw = 1.2 if k in (0, last) else 0.6  # the frame border stands out from the inner lattice
            ax_frame.plot(p[k, :, 0], p[k, :, 1], color="tab:orange", lw=lw)
            ax_frame.plot(p[:, k, 0], p[:, k, 1], color="tab:orange", lw=lw)
        ax_frame.plot(p[0, 0, 0], p[0, 0, 1], "o", color="tab:cyan", ms=3)  # top-left: shows orientation
        # show the frame where it leaves the image, but at most `margin` pixels beyond it
        lo = torch.clamp(p.reshape(-1, 2).min(0).values, min=-0.5 - margin).clamp(max=-0.5)
        hi = torch.clamp(p.reshape(-1, 2).max(0).values, max=p.new_tensor([w, h]) - 0.5 + margin)
        hi = torch.maximum(hi, p.new_tensor([w, h]) - 0.5)
        ax_frame.set_xlim(float(lo[0]), float(hi[0]))
        ax_frame.set_ylim(float(hi[1]), float(lo[1]))
        ax_frame.set_title(_caption(i, st, theta, labels, preds), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    path = Path(path)
    write_atomic(path, buf.getvalue())  # never a truncated PNG
    return path


def draw_preview(images: torch.Tensor, labels: torch.Tensor, name: str, path) -> Path:
    """An 8-wide mosaic of a dataset's first test images (uint8 (N, 1, S, S)) with their labels: what the
    distortion looks like, drawn from the stored files by the data report, never by the stage that makes them."""
    n, _, s, _ = images.shape
    cols = 8
    rows = -(-n // cols)
    pad = 2
    mosaic = torch.full((rows * (s + pad) - pad, cols * (s + pad) - pad), 0.35)
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[r * (s + pad):r * (s + pad) + s, c * (s + pad):c * (s + pad) + s] = images[i, 0].float() / 255
    fig = Figure(figsize=(6, 6 * mosaic.shape[0] / mosaic.shape[1] + 0.4), dpi=120)
    ax = fig.subplots()
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n):
        r, c = divmod(i, cols)
        ax.text(c * (s + pad) + 1, r * (s + pad) + 1, str(int(labels[i])), color="#ffcc00", fontsize=7,
                va="top", ha="left")
    ax.set_axis_off()
    ax.set_title(f"{name.upper()}: first {n} test images ({s}×{s}), label top-left", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path
