"""The ``data_stats`` stage: ``python -m src.report.data_stats`` → reports/data.md and reports/previews/.

What each distorted test set of params.yaml's grid looks like, measured on the regenerated files so that
the analysis quotes data statistics from a generated file: how much of the raw digit's ink an image
shows, how often a stroke touches the border, how far the ink wanders from the centre. For P also what
the 28×28 frame costs: the test split's recorded draws (scale, corner moves) rendered again on a canvas
twice as large, beside the same draws at the stored size. Last, the raw digits every distortion starts from,
split by split (training, validation, test and the test set's two halves): whether the digits the test
error is measured on are drawn like those the validation error is measured on. And a preview of every
dataset of the grid, the sensitivity study's variants included: its first test images with their labels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from src.data.mnist import load_raw
from src.data.warps import DIGIT, FRAME, _sampling_homography, _square_to_quad_np, apply_projective, px_unit, recipe
from src.report.figures import draw_preview
from src.report.records import test_split
from src.runinfo import REPO, UserError, atomic_dir, write_atomic
from src.config import stage_main

BORDER_INK = 0.3  # a stroke "touches the border" when a pixel of the outermost ring is brighter than this
FAR_CORNER_PX = 10.0  # a corner moved further than this (Euclidean) is a strong perspective
INK = 0.5  # a raw pixel is ink when brighter than this: the binarised digit of area, perimeter and bounding box
TEST_HALF = 5_000  # MNIST's test set (10,000) is two writer populations in turn: the first 5,000, then the last 5,000
CHUNK = 10_000  # raw digits measured at once (per-image statistics: the chunking changes no number)
OUT = REPO / "reports" / "data.md"
PARAMS = REPO / "params.yaml"  # its `distortions`: the grid described; with `sensitivity`'s own data, the previews
PREVIEW_N = 64  # test images per preview


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


def nist_halves(n: int) -> tuple[slice, slice] | None:
    """The first and the last TEST_HALF images of MNIST's test set, or None for a test set of another size.

    LeCun's MNIST page: "The first 5000 examples of the test set are taken from the original NIST training
    set. The last 5000 are taken from the original NIST test set" (SD-3, written by Census Bureau employees,
    and SD-1, by high-school students). Errors and digit statistics averaged over the whole test set mix the
    two; each half is one population."""
    return (slice(0, TEST_HALF), slice(TEST_HALF, n)) if n == 2 * TEST_HALF else None


def digit_stats(digits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image shape statistics of raw digits (N, 1, H, W) uint8, each (N,) float64.

    ``ink``: the pixel sum in [0, 1]; ``ink_px``: the fraction of pixels brighter than INK; ``stroke``: the
    mean stroke width 2·A/P of the binarised digit (A its ink pixels, P its perimeter: the ink/background
    pixel edges, 4-neighbours, the image border counting as background), which a long bar w px wide gives as
    w·L/(w + L), w for L ≫ w (the ends add 2w to the perimeter, and a diagonal edge's staircase counts up to
    √2 times its length: a measure to compare splits by, not a calibrated width); ``height``/``width``: the
    bounding box of the ink pixels; ``slant``: the shear of the grey-level second moments, atan(−μ11/μ02) in
    degrees, positive when the top of the digit leans right (the moment deskewing of MNIST digits). A digit
    without an ink pixel has stroke, height and width 0; one without a moment μ02 slant 0."""
    x = digits.double()[:, 0] / 255
    ink_px = x > INK
    area = ink_px.sum((1, 2)).double()
    padded = torch.nn.functional.pad(ink_px, (1, 1, 1, 1))
    edges = (padded[:, 1:] != padded[:, :-1]).sum((1, 2)) + (padded[:, :, 1:] != padded[:, :, :-1]).sum((1, 2))
    rows, cols = (torch.arange(n, dtype=torch.float64) for n in x.shape[1:])

    def extent(hit: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (N, K) any-ink per row/column → px spanned
        return (torch.where(hit, idx, -1.0).amax(1) - torch.where(hit, idx, float(len(idx))).amin(1) + 1).clamp_min(0)
    mass = x.sum((1, 2))
    weight = x / mass.clamp_min(1e-12)[:, None, None]
    cy, cx = (weight.sum(2) * rows).sum(1), (weight.sum(1) * cols).sum(1)
    dy, dx = rows[None, :, None] - cy[:, None, None], cols[None, None, :] - cx[:, None, None]
    mu11, mu02 = (weight * dx * dy).sum((1, 2)), (weight * dy * dy).sum((1, 2))
    slant = torch.where(mu02 > 0, torch.rad2deg(torch.atan(-mu11 / mu02.clamp_min(1e-12))), 0.0)
    return {"ink": mass, "ink_px": area / (x.shape[1] * x.shape[2]), "stroke": 2 * area / edges.double().clamp_min(1),
            "height": extent(ink_px.any(2), rows), "width": extent(ink_px.any(1), cols), "slant": slant}


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of per-image values and its standard error, std (ddof = 1) / √N."""
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


def split_stats(digits: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(mean, SE) of every ``digit_stats`` statistic over a split, measured CHUNK images at a time."""
    parts = [digit_stats(digits[i:i + CHUNK]) for i in range(0, len(digits), CHUNK)]
    return {k: mean_se(torch.cat([p[k] for p in parts])) for k in parts[0]}


def raw_splits(raw: dict) -> dict[str, torch.Tensor]:
    """The raw digits compared: training, validation, test and, for MNIST's 10,000 test images, its halves."""
    n_tr, n_va, n_te = (len(raw[s]["labels"]) for s in ("train", "val", "test"))
    splits = {f"training ({n_tr:,})": raw["train"]["images"],
              f"validation ({n_va:,})": raw["val"]["images"],
              f"test ({n_te:,})": raw["test"]["images"]}
    halves = nist_halves(n_te)
    if halves is not None:
        first, last = halves
        splits[f"test {first.start + 1:,}–{first.stop:,} (SD-3)"] = raw["test"]["images"][first]
        splits[f"test {last.start + 1:,}–{last.stop:,} (SD-1)"] = raw["test"]["images"][last]
    return splits


RAW_COLUMNS = {  # statistic → (column, decimals)
    "ink": ("ink mass", 2), "ink_px": ("ink pixels %", 2), "stroke": ("stroke width (px)", 3),
    "height": ("height (px)", 2), "width": ("width (px)", 2), "slant": ("slant (°)", 2)}


def _raw_section(raw: dict) -> list[str]:
    """The raw digits split by split, each statistic's mean ± its standard error, and the differences of test
    against validation and of the test set's two halves (± the standard error of a difference of independent
    means: the splits share no image)."""
    splits = raw_splits(raw)
    names = list(splits)
    s = {name: split_stats(d) for name, d in splits.items()}
    diffs = [("test − validation", names[2], names[1])] + ([("last − first test half", names[4], names[3])]
                                                            if len(names) == 5 else [])
    for label, a, b in diffs:
        s[label] = {k: (s[a][k][0] - s[b][k][0], (s[a][k][1] ** 2 + s[b][k][1] ** 2) ** 0.5) for k in RAW_COLUMNS}

    def cell(row: str, k: str) -> str:
        scale, dp = (100 if k == "ink_px" else 1), RAW_COLUMNS[k][1]
        m, e = s[row][k]
        return f"{scale * m:{'' if row in splits else '+'}.{dp}f} ± {scale * e:.{dp}f}"
    table = pd.DataFrame({col: [cell(r, k) for r in s] for k, (col, _) in RAW_COLUMNS.items()}, index=list(s))
    halves = ("By LeCun's MNIST page, the test set's first 5,000 images come from NIST's SD-3 (written by Census "
              "Bureau employees) and its last 5,000 from SD-1 (by high-school students); the page calls the first "
              "5,000 \"cleaner and easier\". " if len(names) == 5 else "")
    return [
        "## The raw digits: test against validation",
        "",
        "The raw MNIST digits every distorted split is made from: each statistic's mean over the split ± its "
        "standard error (std / √N), then differences ± the standard error of a difference of independent means. "
        "The validation split is the last 10,000 images of MNIST's training file (src/data/mnist.py). " + halves +
        f"*Ink mass*: the pixel sum in [0, 1]. *Ink pixels*: pixels brighter than {INK}, % of the image. *Stroke "
        "width*: 2·A/P of the binarised digit (A: its ink pixels, P: its ink/background pixel edges), which a bar "
        "w px wide and L long gives as w·L/(w + L): a measure to compare splits by (the ends and the staircase of "
        "a diagonal edge lower it alike in every split). *Height*, *width*: the bounding box of the ink pixels. "
        "*Slant*: atan(−μ11/μ02) of the grey-level second moments, in degrees, positive when the top leans right. "
        "Test error on the two halves against validation error, model by model: [results.md](results.md), "
        "\"Test against validation\".",
        "",
        table.to_markdown(disable_numparse=True),
        "",
    ]


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
    split = test_split(str(data_dir), name)
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
    """reports/data.md: the test splits of ``distortions``, then the raw digits of every split."""
    raw = load_raw(raw_file)
    test = raw["test"]
    digits = test["images"]
    rows, frames = {}, []
    for name in distortions:
        split, manifest = _checked_split(data_dir, name, test["labels"])
        rows[name.upper()] = image_stats(split["images"], digits)
        if manifest["config"]["warp"] == "projective":
            frames += _frame_section(name.upper(), frame_stats(split, digits, manifest["config"],
                                                               bool(manifest["align_corners"])))
    t = pd.DataFrame(rows).T
    raw_section = _raw_section(raw)
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
        "Generated by `python -m src.report.data_stats` (DVC stage `data_stats`) from the regenerated test splits "
        f"({len(digits):,} images each) and their raw MNIST digits. *Ink*: the sum of an image's pixels in [0, 1], "
        "against its raw digit's. *Blank*: images without any ink. *Stroke on the border*: a pixel of the "
        "outermost ring brighter than the threshold. *Ink-centroid spread*: the standard deviation of the ink's "
        "centre of mass over the test set, in pixels. TC's ink and centroid include its clutter.",
        "",
        table.to_markdown(disable_numparse=True),
        "",
        *frames,
        *raw_section,
    ])


def grid_datasets(path: Path) -> tuple[list[str], list[str]]:
    """params.yaml's ``distortions`` (a non-empty list of names) and the sensitivity study's variants with
    their own data (``sensitivity.p_data`` and ``e_data``, possibly empty)."""
    try:
        params = yaml.safe_load(path.read_text())
        names = params["distortions"]
        sens = params.get("sensitivity") or {}
        variants = [*(sens.get("p_data") or []), *(sens.get("e_data") or [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        names, variants = None, None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"{path}: `distortions` must be a non-empty list of names")
    if not all(isinstance(n, str) for n in variants):
        raise UserError(f"{path}: `sensitivity.p_data` and `e_data` must be lists of names")
    return names, variants


def write_previews(data_dir: Path, names: list[str], out_dir: Path) -> None:
    """``<out_dir>/<name>.png`` for every dataset named; the directory appears whole, with nothing stale in it."""
    with atomic_dir(out_dir) as tmp:
        for name in names:
            test = test_split(str(data_dir), name)  # loaded once with the statistics above
            draw_preview(test["images"][:PREVIEW_N], test["labels"][:PREVIEW_N], name, tmp / f"{name}.png")


def main(argv: list[str] | None = None) -> None:
    def work(cfg) -> str:
        distortions, variants = grid_datasets(PARAMS)
        data_dir = Path(cfg.paths.data_dir)
        write_atomic(OUT, describe(data_dir, Path(cfg.paths.raw_file), distortions))
        write_previews(data_dir, distortions + variants, Path(cfg.paths.preview_dir))
        return (f"data_stats: {os.path.relpath(OUT)} ({', '.join(distortions)}), "
                f"{len(distortions) + len(variants)} previews in {cfg.paths.preview_dir}")

    stage_main(argv, work)


if __name__ == "__main__":
    main()
