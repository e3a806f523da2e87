"""The ``data_stats`` stage: ``python -m src.data.stats`` → reports/data.md.

What each distorted test set of params.yaml's grid looks like, measured on the regenerated files so that
the analysis quotes data statistics from a generated file: how much of the raw digit's ink an image
shows, how often a stroke touches the border, how far the ink wanders from the centre. For P also what
the 28×28 frame costs: the test split's recorded draws (scale, corner moves) rendered again on a canvas
twice as large, beside the same draws at the stored size.
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
from src.data.warps import DIGIT, FRAME, _sampling_homography, _square_to_quad_np, apply_projective, px_unit, recipe
from src.runinfo import REPO, UserError, stage_main, write_atomic

BORDER_INK = 0.3  # a stroke "touches the border" when a pixel of the outermost ring is brighter than this
FAR_CORNER_PX = 10.0  # a corner moved further than this (Euclidean) is a strong perspective
OUT = REPO / "reports" / "data.md"
PARAMS = REPO / "params.yaml"  # its `distortions`: the grid described


def _ring(x: torch.Tensor) -> torch.Tensor:
    """(N, 4S) the outermost pixels of images (N, 1, S, S)."""
    return torch.cat([x[:, 0, 0], x[:, 0, -1], x[:, 0, :, 0], x[:, 0, :, -1]], 1)


def image_stats(images: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """Distorted images (N, 1, S, S) against their raw digits (N, 1, 28, 28), both uint8."""
    x = images.double() / 255
    ink = x.sum((1, 2, 3))
    centre = torch.arange(x.shape[-1], dtype=torch.float64) - (x.shape[-1] - 1) / 2  # px about the canvas centre
    mass = ink.clamp_min(1e-12)
    cx, cy = (x[:, 0].sum(1) * centre).sum(1) / mass, (x[:, 0].sum(2) * centre).sum(1) / mass
    return {"canvas": float(x.shape[-1]), "ink_vs_raw": (ink / (digits.double() / 255).sum((1, 2, 3))).mean().item(),
            "blank": float((ink == 0).sum()), "border": (_ring(x).amax(1) > BORDER_INK).double().mean().item(),
            "spread_x": cx.std().item(), "spread_y": cy.std().item()}


def render_projective(digits: torch.Tensor, params: dict, cfg, size: int, align_corners: bool) -> torch.Tensor:
    """The recorded P draws (``scale``, ``corners``) of ``digits`` rendered on a size × size canvas, float64."""
    scale, moves = params["scale"].double().numpy(), params["corners"].double().numpy()
    frame = np.array(FRAME) / px_unit(DIGIT, align_corners)  # the digit frame's corners, px (as _projective_candidates)
    quad = (frame if cfg.corners == "frame" else frame * scale[:, None, None]) + moves
    theta = _sampling_homography(_square_to_quad_np(quad), scale, cfg.corners, size, align_corners)
    x = digits.double() / 255
    return apply_projective(x, {"theta": torch.from_numpy(theta)}, recipe({**cfg, "canvas": size}), align_corners).clamp_(0, 1)


def frame_stats(split: dict, digits: torch.Tensor, cfg, align_corners: bool) -> dict[str, float]:
    """P's frame cost: the ink a draw keeps on its canvas against on one twice as large."""
    cfg = recipe(cfg)
    size = int(cfg.canvas)
    small, large = (render_projective(digits, split["params"], cfg, s, align_corners) for s in (size, 2 * size))
    off = (small - split["images"].double() / 255).abs().max().item()
    if off > 1 / 255:  # the stored images are these renders rounded to 8 bits
        raise UserError(f"P: re-rendering the recorded draws misses the stored test images by {off:.4f}; "
                        "run `dvc repro distort@p`")
    raw = (digits.double() / 255).sum((1, 2, 3))
    ink_small, ink_large = small.sum((1, 2, 3)), large.sum((1, 2, 3))
    cost = (1 - ink_small / ink_large.clamp_min(1e-12)).clamp_min(0)  # ≥ 0 but for rounding: the large canvas holds the small
    s2 = split["params"]["scale"].double() ** 2
    moved = split["params"]["corners"].double().norm(dim=2)  # (N, 4) px
    return {"large": 2.0 * size, "cut_large": (_ring(large).amax(1) > 0).double().mean().item(),
            "cost_mean": cost.mean().item(), "cost_median": cost.median().item(), "cost_p90": cost.quantile(0.9).item(),
            "kept_small": (ink_small / raw).mean().item(), "kept_large": (ink_large / raw).mean().item(),
            "scale_sq": s2.mean().item(), "foreshortening": (ink_large / (s2 * raw)).mean().item(),
            "move_mean": moved.mean().item(), "far": (moved.amax(1) > FAR_CORNER_PX).double().mean().item(),
            "redrawn": (split["params"]["redraws"] > 0).double().mean().item()}


def _checked_split(data_dir: Path, name: str, labels: torch.Tensor) -> tuple[dict, dict]:
    """The test split of ``name`` and its generation manifest, refused unless made from these raw digits."""
    split = load_split(data_dir / name, "test")
    try:
        manifest = json.loads((data_dir / name / "manifest.json").read_text())
        manifest["config"]["warp"], manifest["align_corners"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{data_dir / name}/manifest.json lacks the generation config; run `dvc repro distort@{name}`") from None
    if not torch.equal(split["labels"], labels):
        raise UserError(f"{data_dir / name}: the test split was not made from these raw digits; "
                        f"run `dvc repro distort@{name}`")
    return split, manifest


def _frame_section(name: str, s: dict) -> list[str]:
    large = f"{int(s['large'])}×{int(s['large'])}"
    whole = ("where every draw lies whole (no ink on its outer ring)" if s["cut_large"] == 0 else
             f"where {100 * s['cut_large']:.1f} % of the draws still touch the outer ring (so the cost below is a lower bound)")
    return [
        f"## {name}: what the frame costs",
        "",
        f"The test split's recorded draws (scale, corner moves) rendered again on a {large} canvas, {whole}, beside "
        "the same draws at the stored size (which reproduce the stored images to within a grey level).",
        "",
        f"- Ink the frame removes (1 − stored-size ink / large-canvas ink): mean {100 * s['cost_mean']:.1f} %, "
        f"median {100 * s['cost_median']:.1f} %, 90th percentile {100 * s['cost_p90']:.1f} %.",
        f"- Ink kept, against the raw digit's: {s['kept_small']:.3f} at the stored size, {s['kept_large']:.3f} "
        f"on the {large} canvas: about the scale (E[s²] = {s['scale_sq']:.3f}) times the perspective "
        f"foreshortening ({s['foreshortening']:.3f} of the scaled digit's ink on the {large} canvas).",
        f"- Corner moves: {s['move_mean']:.2f} px on average (Euclidean); {100 * s['far']:.1f} % of the images "
        f"have a corner moved by more than {FAR_CORNER_PX:g} px.",
        f"- Images whose first draw was refused and redrawn (folded, or too little ink inside): "
        f"{100 * s['redrawn']:.2f} %.",
        "",
    ]


def describe(data_dir: Path, raw_file: Path, distortions: list[str]) -> str:
    """reports/data.md for the test splits of ``distortions``."""
    test = load_raw(raw_file)["test"]
    digits = test["images"]
    rows, frames = {}, []
    for name in distortions:
        split, manifest = _checked_split(data_dir, name, test["labels"])
        rows[name.upper()] = image_stats(split["images"], digits)
        if manifest["config"]["warp"] == "projective":
            frames += _frame_section(name.upper(), frame_stats(split, digits, manifest["config"],
                                                               bool(manifest["align_corners"])))
    t = pd.DataFrame(rows).T
    table = pd.DataFrame({
        "canvas": [f"{int(c)}×{int(c)}" for c in t["canvas"]],
        "ink / raw digit's": [f"{v:.3f}" for v in t["ink_vs_raw"]],
        "blank images": [f"{int(v)}" for v in t["blank"]],
        f"stroke on the border (> {BORDER_INK})": [f"{100 * v:.1f} %" for v in t["border"]],
        "ink-centroid spread x / y (px)": [f"{a:.2f} / {b:.2f}" for a, b in zip(t["spread_x"], t["spread_y"])],
    }, index=t.index)
    return "\n".join([
        "# The distorted test sets",
        "",
        "Generated by `python -m src.data.stats` (DVC stage `data_stats`) from the regenerated test splits "
        f"({len(digits):,} images each) and their raw MNIST digits. *Ink*: the sum of an image's pixels in [0, 1], "
        "against its raw digit's. *Blank*: images without any ink. *Stroke on the border*: a pixel of the "
        "outermost ring brighter than the threshold. *Ink-centroid spread*: the standard deviation of the ink's "
        "centre of mass over the test set, in pixels. TC's ink and centroid include its clutter.",
        "",
        table.to_markdown(disable_numparse=True),
        "",
        *frames,
    ])


def grid_distortions(path: Path) -> list[str]:
    """params.yaml's ``distortions``: a non-empty list of names."""
    try:
        names = yaml.safe_load(path.read_text())["distortions"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"{path}: `distortions` must be a non-empty list of names")
    return names


def main(argv: list[str] | None = None) -> None:
    def work(cfg) -> str:
        distortions = grid_distortions(PARAMS)
        write_atomic(OUT, describe(Path(cfg.paths.data_dir), Path(cfg.paths.raw_file), distortions))
        return f"data_stats: {os.path.relpath(OUT)} ({', '.join(distortions)})"

    stage_main(argv, work)


if __name__ == "__main__":
    main()
