"""The ``data_stats`` stage: ``python -m src.data.stats`` → reports/data.md.

What each distorted test set of params.yaml's grid looks like, measured on the regenerated files so that
the analysis quotes data statistics from a generated file: how much of the raw digit's ink an image
shows, how often a stroke touches the border, how far the ink wanders from the centre. For P also what
the 28×28 frame costs: the test split's recorded draws (scale, corner moves) rendered again on a canvas
twice as large, where nothing leaves the frame, beside the same draws at the stored size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from src.data.distort import load_split
from src.data.mnist import load_raw
from src.data.warps import FRAME, _sampling_homography, _square_to_quad_np, apply_projective, px_unit, recipe
from src.runinfo import REPO, UserError, stage_main, write_atomic

BORDER_INK = 0.3  # a stroke "touches the border" when a pixel of the outermost ring is brighter than this
FAR_CORNER_PX = 10.0  # a corner moved further than this (Euclidean) is a strong perspective
OUT = REPO / "reports" / "data.md"
PARAMS = REPO / "params.yaml"  # its `distortions`: the grid described


def image_stats(images: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """Distorted images (N, 1, S, S) against their raw digits (N, 1, 28, 28), both uint8."""
    x = images.double() / 255
    ink = x.sum((1, 2, 3))
    ring = torch.cat([x[:, 0, 0], x[:, 0, -1], x[:, 0, :, 0], x[:, 0, :, -1]], 1)
    centre = torch.arange(x.shape[-1], dtype=torch.float64) - (x.shape[-1] - 1) / 2  # px about the canvas centre
    mass = ink.clamp_min(1e-12)
    cx, cy = (x[:, 0].sum(1) * centre).sum(1) / mass, (x[:, 0].sum(2) * centre).sum(1) / mass
    return {"canvas": x.shape[-1], "ink_vs_raw": (ink / (digits.double() / 255).sum((1, 2, 3))).mean().item(),
            "border": (ring.amax(1) > BORDER_INK).double().mean().item(),
            "spread_x": cx.std().item(), "spread_y": cy.std().item()}


def render_projective(digits: torch.Tensor, params: dict, cfg, size: int, align_corners: bool) -> torch.Tensor:
    """The recorded P draws (``scale``, ``corners``) of ``digits`` rendered on a size × size canvas, float64."""
    scale, moves = params["scale"].double().numpy(), params["corners"].double().numpy()
    frame = np.array(FRAME) / px_unit(int(cfg.canvas), align_corners)  # the 28×28 frame's corners, px
    quad = (frame if cfg.corners == "frame" else frame * scale[:, None, None]) + moves  # as draw_projective
    theta = _sampling_homography(_square_to_quad_np(quad), scale, cfg.corners, size, align_corners)
    sized = recipe({**cfg, "canvas": size})
    x = digits.double() / 255
    return apply_projective(x, {"theta": torch.from_numpy(theta)}, sized, align_corners).clamp_(0, 1)


def frame_stats(split: dict, digits: torch.Tensor, cfg, align_corners: bool) -> dict[str, float]:
    """P's frame cost: the ink a draw keeps on its canvas against on one twice as large."""
    cfg = recipe(cfg)
    small, large = (render_projective(digits, split["params"], cfg, s, align_corners)
                    for s in (int(cfg.canvas), 2 * int(cfg.canvas)))
    off = (small - split["images"].double() / 255).abs().max().item()
    if off > 1 / 255:  # the stored images are these renders rounded to 8 bits
        raise UserError(f"P: re-rendering the recorded draws misses the stored test images by {off:.4f}; "
                        "run `dvc repro distort@p`")
    raw = (digits.double() / 255).sum((1, 2, 3))
    ink_small, ink_large = small.sum((1, 2, 3)), large.sum((1, 2, 3))
    cost = (1 - ink_small / ink_large.clamp_min(1e-12)).clamp_min(0)  # ≥ 0 but for rounding: the large canvas holds the small
    s2 = split["params"]["scale"].double() ** 2
    moved = split["params"]["corners"].double().norm(dim=2)  # (N, 4) px
    return {"large": 2 * int(cfg.canvas), "cost_mean": cost.mean().item(), "cost_median": cost.median().item(),
            "cost_p90": cost.quantile(0.9).item(), "kept_small": (ink_small / raw).mean().item(),
            "kept_large": (ink_large / raw).mean().item(), "scale_sq": s2.mean().item(),
            "foreshortening": (ink_large / (s2 * raw)).mean().item(), "move_mean": moved.mean().item(),
            "far": (moved.amax(1) > FAR_CORNER_PX).double().mean().item()}


def describe(data_dir: Path, raw_file: Path, distortions: list[str]) -> str:
    """reports/data.md for the test splits of ``distortions``."""
    digits = load_raw(raw_file)["test"]["images"]
    rows, p = {}, None
    for name in distortions:
        split = load_split(data_dir / name, "test")
        if len(split["images"]) != len(digits):
            raise UserError(f"{data_dir / name}: {len(split['images'])} test images for {len(digits)} digits; "
                            f"run `dvc repro distort@{name}`")
        rows[name.upper()] = image_stats(split["images"], digits)
        manifest = json.loads((data_dir / name / "manifest.json").read_text())
        if manifest["config"]["warp"] == "projective":
            p = (name.upper(), frame_stats(split, digits, manifest["config"], bool(manifest["align_corners"])))
    table = pd.DataFrame(rows).T
    table = pd.DataFrame({
        "canvas": [f"{int(c)}×{int(c)}" for c in table["canvas"]],
        "ink / raw digit's": [f"{v:.3f}" for v in table["ink_vs_raw"]],
        f"stroke on the border (> {BORDER_INK})": [f"{100 * v:.1f} %" for v in table["border"]],
        "ink-centroid spread x / y (px)": [f"{a:.2f} / {b:.2f}" for a, b in zip(table["spread_x"], table["spread_y"])],
    }, index=table.index)
    lines = [
        "# The distorted test sets",
        "",
        "Generated by `python -m src.data.stats` (DVC stage `data_stats`) from the regenerated test splits "
        f"({len(digits):,} images each) and their raw MNIST digits. *Ink*: the sum of an image's pixels in [0, 1], "
        "against its raw digit's (TC's includes its clutter). *Stroke on the border*: a pixel of the outermost "
        "ring brighter than the threshold. *Ink-centroid spread*: the standard deviation of the ink's centre of "
        "mass over the test set, in pixels.",
        "",
        table.to_markdown(disable_numparse=True),
        "",
    ]
    if p is not None:
        name, s = p
        lines += [
            f"## {name}: what the frame costs",
            "",
            f"The test split's recorded draws (scale, corner moves) rendered again on a {s['large']}×{s['large']} "
            "canvas, where nothing leaves the frame, beside the same draws at the stored size (which reproduce the "
            "stored images to within a grey level).",
            "",
            f"- Ink the frame removes (1 − stored-size ink / large-canvas ink): mean {100 * s['cost_mean']:.1f} %, "
            f"median {100 * s['cost_median']:.1f} %, 90th percentile {100 * s['cost_p90']:.1f} %.",
            f"- Ink kept, against the raw digit's: {s['kept_small']:.3f} at the stored size, {s['kept_large']:.3f} "
            "on the large canvas.",
            f"- That is the scale (E[s²] = {s['scale_sq']:.3f}) times the perspective foreshortening "
            f"({s['foreshortening']:.3f} of the scaled digit's ink on the large canvas).",
            f"- Corner moves: {s['move_mean']:.2f} px on average (Euclidean); {100 * s['far']:.1f} % of the images "
            f"have a corner moved by more than {FAR_CORNER_PX:g} px.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    def work(cfg) -> str:
        distortions = yaml.safe_load(PARAMS.read_text())["distortions"]
        write_atomic(OUT, describe(Path(cfg.paths.data_dir), Path(cfg.paths.raw_file), distortions))
        return f"data_stats: {os.path.relpath(OUT)} ({', '.join(distortions)})"

    stage_main(argv, work)


if __name__ == "__main__":
    main()
