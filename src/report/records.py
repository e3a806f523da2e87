"""A trained cell's record, read back, and what the report derives from it.

A record is what the train stage commits (``reports/{metrics,curves,cells}``): the metrics, the
learning curve, the provenance (whole config included) and the raw outcomes of the test set (every
prediction and, for ST models, every θ). With the regenerated test split, that is all a figure or
an analysis table needs: the transformer's output is ``st.warp(x, θ)``, its frame is θ's grid, and
per-image correctness is ``pred == label``. So report code is never a dependency of a train cell.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf

from src.config import precision_of
from src.data.warps import DIGIT
from src.runinfo import REPO, UserError, load_checked, widest_isa


@dataclass
class Record:
    key: str
    metrics: dict
    provenance: dict
    outcomes: dict  # pred uint8 (N,), theta float16 (N, K) for ST models, test_sha256

    @property
    def config(self):
        return OmegaConf.create(self.provenance["config"])

    @property
    def precision(self) -> str:
        return precision_of(self.provenance["config"])

    @property
    def theta(self) -> torch.Tensor | None:
        t = self.outcomes.get("theta")
        return None if t is None else t.float()


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_record(reports: Path, key: str) -> Record | None:
    """The complete record of a cell, or None (not run, unfinished, or unreadable)."""
    metrics = _json(reports / "metrics" / f"{key}.json")
    prov = _json(reports / "cells" / key / "provenance.json")
    path = reports / "cells" / key / "outcomes.pt"
    if metrics is None or prov is None or "config" not in prov or not path.is_file():
        return None
    try:
        outcomes = load_checked(path, hint=f"dvc repro -f -s train@{key}")
    except UserError:
        return None
    return Record(key, metrics, prov, outcomes)


def segment_commits(prov: dict) -> str:
    """The distinct commits of a record's training segments in order, joined by " → " (the first is the commit
    at its start, ``provenance['commit']``; a resumed run adds the commit it resumed at). Each in full, with
    its "-dirty" suffix where src/ or conf/ had uncommitted changes."""
    commits = [prov.get("commit", "?")] + [s.get("commit", "?") for s in prov.get("segments", [])]
    return " → ".join(dict.fromkeys(map(str, commits)))  # distinct, in order


def segment_devices(prov: dict) -> str:
    """The distinct machines a record trained on, in order, joined by " + " (one for a run never moved). A CPU
    segment that recorded its instruction sets names the widest in brackets: 'AMD EPYC (2 cores, 1 threads)
    [avx512_bf16]' and '… [avx2]' are two generations under one model name."""
    devices = [_device(s) for s in prov.get("segments", [])] or [str(prov.get("device", "?"))]
    return " + ".join(dict.fromkeys(devices))


def _device(segment: dict) -> str:
    """One segment's machine: its device, and its CPU's widest instruction set where recorded (and the float32
    kernels of a bf16-mixed segment on a CPU without native bfloat16, src.models.bf16)."""
    notes = [widest_isa(segment.get("cpu_flags")),
             "bf16 on float32 kernels" if segment.get("bf16_kernels") == "float32" else None]
    notes = [n for n in notes if n]
    return str(segment.get("device", "?")) + (f" [{'; '.join(notes)}]" if notes else "")


@functools.lru_cache(maxsize=8)
def test_split(data_dir: str, name: str) -> dict:
    """The regenerated test split of a distortion (checked against its manifest)."""
    from src.data.distort import load_split

    return load_split(Path(data_dir) / name, "test")


def correct(rec: Record, split: dict) -> torch.Tensor:
    """Per-image correctness of the record's predictions on ``split`` (the one it was tested on)."""
    if len(rec.outcomes["pred"]) != len(split["labels"]):
        raise UserError(f"{rec.key}: {len(rec.outcomes['pred'])} predictions for {len(split['labels'])} test images; "
                        f"the data changed since the cell was trained")
    return rec.outcomes["pred"].long() == split["labels"]


class Measure(NamedTuple):
    """What a test split records of each image, as one number per image: its label, its values (of the split:
    ``images``, ``params``) and the recorded parameters it reads."""
    label: str
    values: Callable[[dict], torch.Tensor]
    keys: tuple[str, ...]


def centre_distance(split: dict) -> torch.Tensor:
    """TC: how far each digit lies from the canvas centre (px); ``x``, ``y`` are its top-left corner."""
    centre = (split["images"].shape[-1] - DIGIT) / 2
    p = split["params"]
    return torch.hypot(p["x"].double() - centre, p["y"].double() - centre)


MEASURES = {
    "angle": Measure("rotation angle (degrees)", lambda s: s["params"]["angle"], ("angle",)),
    "scale": Measure("scale", lambda s: s["params"]["scale"], ("scale",)),
    "corners": Measure("largest corner displacement (px)",
                       lambda s: s["params"]["corners"].norm(dim=-1).amax(-1), ("corners",)),
    "offsets": Measure("largest control-point move (px)",
                       lambda s: s["params"]["offsets"].norm(dim=-1).amax(-1), ("offsets",)),
    "position": Measure("distance of the digit from the canvas centre (px)", centre_distance, ("x", "y")),
}
# The measure each distortion's test error is binned by (conf/report/invariance.yaml): distortion → Measure.
INVARIANCE = {data: MEASURES[m]
              for data, m in yaml.safe_load((REPO / "conf/report/invariance.yaml").read_text()).items()}


def measures(split: dict) -> dict[str, torch.Tensor]:
    """The ``MEASURES`` of a split whose parameters it records."""
    params = split.get("params", {})
    return {name: m.values(split) for name, m in MEASURES.items() if set(m.keys) <= params.keys()}


N_BINS = 12  # equal-width bins of the recorded distortion strength, in the report and its figure
MIN_BIN_IMAGES = 100  # fewer test images than this: the bin is merged with its neighbour (``strength_bins``)


def strength_bins(values: torch.Tensor, n_bins: int = N_BINS,
                  min_images: int = MIN_BIN_IMAGES) -> list[tuple[float, float, torch.Tensor]]:
    """``n_bins`` equal-width bins of ``values`` (one per test image), sparse ones merged: walking from the
    smallest values up, a bin with fewer than ``min_images`` images is joined by the next until the group holds
    ``min_images``; a sparse group left at the top joins the one below it. Each bin: (lo, hi, image mask)."""
    v = values.double()
    edges = torch.linspace(float(v.min()), float(v.max()), n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(v, edges[1:-1], right=True)
    counts = torch.bincount(idx, minlength=n_bins).tolist()
    groups, size = [[]], 0  # runs of bin indices
    for b in range(n_bins):
        groups[-1].append(b)
        size += counts[b]
        if size >= min_images and b < n_bins - 1:
            groups.append([])
            size = 0
    if len(groups) > 1 and size < min_images:
        last = groups.pop()
        groups[-1] += last
    return [(float(edges[g[0]]), float(edges[g[-1] + 1]), (idx >= g[0]) & (idx <= g[-1])) for g in groups]


def binned_error(ok: torch.Tensor, values: torch.Tensor, n_bins: int = N_BINS,
                 min_images: int = MIN_BIN_IMAGES) -> pd.DataFrame:
    """Test error % in the bins of ``strength_bins``, seeds pooled: ``ok`` is the per-image correctness of one
    run (N,) or of several runs on the same test images (seeds, N), and each bin sums the wrong predictions and
    the predictions over them. Columns lo, hi, mid, n (test images), trials (n × runs), wrong, err."""
    ok = ok.reshape(-1, ok.shape[-1])
    rows = []
    for lo, hi, sel in strength_bins(values, n_bins, min_images):
        n = int(sel.sum())
        if n:
            wrong = int((~ok[:, sel].bool()).sum())
            rows.append({"lo": lo, "hi": hi, "n": n, "trials": n * len(ok), "wrong": wrong,
                         "err": 100.0 * wrong / (n * len(ok))})
    df = pd.DataFrame(rows, columns=["lo", "hi", "n", "trials", "wrong", "err"])
    df["mid"] = (df.lo + df.hi) / 2
    return df


def transformer(rec: Record):
    """The record's spatial transformer (architecture only: θ comes from the record, not from weights)."""
    from src.models.build import build_model

    net, _ = build_model(rec.config)
    return net.st


def theta_summary(rec: Record, split: dict) -> dict[str, float]:
    """The transform's own summary of θ on the whole test set (``GridGenerator.summary``): its statistics and
    how it follows what the split records of each image (``measures``)."""
    return transformer(rec).grid.summary(rec.theta, measures(split))
