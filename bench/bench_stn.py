"""Speed benchmark of the transformer and the training loop: ``python bench/bench_stn.py [--device cpu|cuda]``.

Every comparison is timed in this one process, interleaved round by round (ours, theirs, ours, …)
and reported as medians, so a noisy shared machine slows both sides alike:

1. transformer forward+backward (grid + sampler, gradients w.r.t. input and θ) at batch 256 for
   28/42/60 px: ours vs the bare ``affine_grid`` + ``grid_sample`` pair (aff, tps), kornia's
   ``warp_perspective`` (proj) and ``get_tps_transform`` + ``warp_image_tps`` (tps), and a whole
   PyTorch-tutorial-style STN vs ours with the same localisation net (``--transformer-only``: this
   section alone, spliced into the existing report);
2. cost of the transformer: one SGD training step of each ST model vs its baseline, per distortion;
3. training-loop efficiency: our Lightning loop (module + datamodule of ``src.train``) vs a minimal
   hand-written loop on the same model and data, and where the step time goes;
4. whole-grid time at the paper's budget, projected from 2 and 3, shown beside the runs whose
   records are in reports/cells/.

Needs kornia (``pip install -e ".[test]"``) and the data of ``dvc repro distort@r`` for 3 and 4.
Writes reports/benchmarks.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.data.warps import distort_batch, recipe, warp_of  # noqa: E402
from src.models.module import sgd_step  # noqa: E402
from src.runinfo import UserError, device_name, git_commit, versions, write_atomic  # noqa: E402
from src.config import compose_config, model_config  # noqa: E402
from src.report.aggregate import PAPER_STEPS, baseline, paper_order  # noqa: E402
from src.stn.transformer import SpatialTransformer  # noqa: E402

SIZES = (28, 42, 60)
GRID = yaml.safe_load((REPO / "params.yaml").read_text())  # the pipeline's grid: its models and distortions
DISTORTIONS = tuple(GRID["distortions"])
# the FCN family, then the CNN family, each in the paper's row order (params.yaml lists them cheapest first)
MODELS = tuple(sorted(paper_order(GRID["models"]), key=lambda m: model_config(m).family == "cnn"))
BATCH = 256


# ------------------------------------------------------------------ timing

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def race(fns: dict, dev: torch.device, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds after one warm-up round."""
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(dev)
            if r:
                times[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(fn, *leaves):
    """A closure running fn(*leaves).sum().backward() (gradients on every leaf)."""
    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).sum().backward()
    return run


# ------------------------------------------------------------------ 1. transformer

def sampler_only(transform: str, hw: int, align_corners: bool) -> SpatialTransformer:
    """Our transformer with a dummy localisation net: ``warp(x, θ)`` is the grid + sampler."""
    return SpatialTransformer(nn.Identity(), 1, transform, (hw, hw), align_corners=align_corners)


def near_identity(st: SpatialTransformer, b: int, dev, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    theta = st.grid.identity() + scale * torch.randn(b, st.grid.n_params, generator=g)
    return theta.to(dev).requires_grad_()


def pixel_homography(theta: torch.Tensor, hw: int) -> torch.Tensor:
    """kornia's M (input pixel → output pixel) for our θ (output → input, normalised, align_corners=True)."""
    b = theta.shape[0]
    h = torch.cat([theta, theta.new_ones(b, 1)], 1).view(b, 3, 3)
    s = (hw - 1) / 2
    n = theta.new_tensor([[1 / s, 0, -1], [0, 1 / s, -1], [0, 0, 1]])  # pixel → normalised
    return torch.linalg.inv(torch.linalg.inv(n) @ h @ n)


class TutorialSTN(nn.Module):
    """The STN of the PyTorch tutorial (spatial_transformer_tutorial.py), for any square input size."""

    def __init__(self, hw: int):
        super().__init__()
        self.localization = nn.Sequential(nn.Conv2d(1, 8, 7), nn.MaxPool2d(2, 2), nn.ReLU(True),
                                          nn.Conv2d(8, 10, 5), nn.MaxPool2d(2, 2), nn.ReLU(True))
        self.flat = self.localization(torch.zeros(1, 1, hw, hw)).numel()
        self.fc_loc = nn.Sequential(nn.Linear(self.flat, 32), nn.ReLU(True), nn.Linear(32, 6))
        self.fc_loc[2].weight.data.zero_()
        self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    def forward(self, x):
        theta = self.fc_loc(self.localization(x).view(-1, self.flat)).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


def ours_like_tutorial(tut: TutorialSTN, hw: int) -> SpatialTransformer:
    """Our SpatialTransformer around the tutorial's localisation layers (same parameters, same work)."""
    loc = nn.Sequential(tut.localization, nn.Flatten(), tut.fc_loc[0], tut.fc_loc[1])
    return SpatialTransformer(loc, 32, "aff", (hw, hw), align_corners=False)


def bench_transformer(dev, rounds: int, calls: int) -> pd.DataFrame:
    from kornia.geometry.transform import get_tps_transform, warp_image_tps, warp_perspective

    rows = []
    for hw in SIZES:
        g = torch.Generator().manual_seed(hw)
        x = torch.rand(BATCH, 1, hw, hw, generator=g).to(dev).requires_grad_()
        # affine: vs the bare pair
        st = sampler_only("aff", hw, False).to(dev)
        th = near_identity(st, BATCH, dev)
        bare = fwd_bwd(lambda x, t: F.grid_sample(
            x, F.affine_grid(t.view(-1, 2, 3), [BATCH, 1, hw, hw], align_corners=False), align_corners=False), x, th)
        t = race({"ours": fwd_bwd(st.warp, x, th), "other": bare}, dev, rounds, calls)
        rows.append(("aff", hw, "affine_grid + grid_sample", t, "≤ 1.1×", t["ours"] <= 1.1 * t["other"], float("nan")))
        # projective: vs kornia.warp_perspective (align_corners=True on both sides, so the outputs agree)
        st = sampler_only("proj", hw, True).to(dev)
        th = near_identity(st, BATCH, dev, scale=0.02)
        m = pixel_homography(th.detach().double(), hw).float().requires_grad_()
        kor = fwd_bwd(lambda x, m: warp_perspective(x, m, (hw, hw), align_corners=True), x, m)
        with torch.no_grad():
            diff = (st.warp(x, th) - warp_perspective(x, m, (hw, hw), align_corners=True)).abs().max().item()
        t = race({"ours": fwd_bwd(st.warp, x, th), "other": kor}, dev, rounds, calls)
        rows.append(("proj", hw, "kornia warp_perspective", t, "≤ 1×", t["ours"] <= t["other"], diff))
        # TPS: vs the bare affine pair (its grid costs one addmm more than affine_grid)
        st = sampler_only("tps", hw, False).to(dev)
        th = near_identity(st, BATCH, dev, scale=0.05)
        t = race({"ours": fwd_bwd(st.warp, x, th), "other": bare}, dev, rounds, calls)
        rows.append(("tps", hw, "affine_grid + grid_sample", t, "≤ 1.3×", t["ours"] <= 1.3 * t["other"], float("nan")))
        # TPS: vs kornia, which solves the spline system on every call
        st = sampler_only("tps", hw, True).to(dev)
        th = near_identity(st, BATCH, dev, scale=0.05)
        ctrl = st.grid.ctrl.float().expand(BATCH, -1, -1)

        def kornia_tps(x, th):
            dst = ctrl + th.view(BATCH, -1, 2)
            kw, aw = get_tps_transform(ctrl, dst)
            return warp_image_tps(x, dst, kw, aw, align_corners=True)

        t = race({"ours": fwd_bwd(st.warp, x, th), "other": fwd_bwd(kornia_tps, x, th)}, dev, rounds, calls)
        rows.append(("tps", hw, "kornia get_tps_transform + warp_image_tps", t, "≥ 2× faster",
                     2 * t["ours"] <= t["other"], float("nan")))
        # a whole STN: the tutorial's module vs ours around the same localisation layers
        tut = TutorialSTN(hw).to(dev)
        ours = ours_like_tutorial(tut, hw).to(dev)
        xin = x.detach()
        t = race({"ours": fwd_bwd(lambda x: ours(x)[0], xin), "other": fwd_bwd(tut, xin)}, dev, rounds, calls)
        rows.append(("aff (whole STN)", hw, "PyTorch-tutorial STN", t, "≤ 1.1×", t["ours"] <= 1.1 * t["other"], float("nan")))
    return pd.DataFrame([{
        "transform": tr, "size": f"{hw}×{hw}", "compared with": other, "ours (ms)": 1e3 * t["ours"],
        "theirs (ms)": 1e3 * t["other"], "theirs / ours": t["other"] / t["ours"], "target": target,
        "met": "yes" if ok else "no", "max |Δ output|": diff} for tr, hw, other, t, target, ok, diff in rows])


# ------------------------------------------------------------------ 2. cost of the transformer

def build(model: str, data: str):
    from src.models.build import build_model

    cfg = compose_config([f"model={model}", f"data={data}"])
    return cfg, build_model(cfg)[0]


def step_fn(net: nn.Module, hw: int, dev, bf16: bool = False):
    """One SGD step (the paper's optimiser) on a fixed random batch; under ``bf16`` the forward and backward
    run in autocast, as Lightning's ``bf16-mixed`` runs our manual-optimisation training step."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 1, hw, hw, generator=g).to(dev)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    return lambda: sgd_step(opt, lambda: F.cross_entropy(net(x), y), bf16=dev.type if bf16 else None)


class BareAffine(nn.Module):
    """A bare ``F.affine_grid`` in place of a transform's grid generator: the reference sampler cost."""

    def __init__(self, out_hw, align_corners: bool):
        super().__init__()
        self.out_hw, self.align_corners = out_hw, align_corners

    def forward(self, theta):
        return F.affine_grid(theta.view(-1, 2, 3), [len(theta), 1, *self.out_hw], align_corners=self.align_corners)


def bare_twin(net: nn.Module) -> nn.Module:
    """The same network with its transformer's grid generator replaced by a bare affine pair
    (regression layer with 6 outputs, ``F.affine_grid`` + ``F.grid_sample``)."""
    import copy

    twin = copy.deepcopy(net)
    st = twin.st
    st.head = nn.Linear(st.head.in_features, 6)
    nn.init.zeros_(st.head.weight)
    with torch.no_grad():
        st.head.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))
    st.grid = BareAffine(st.grid.out_hw, st.align_corners)
    return twin


def baseline_of(model: str) -> str | None:
    """The plain network of a model's family (its config's ``family``, no ``transform``), if the grid has one."""
    fam = model_config(model).family
    return next((m for m in MODELS if model_config(m).family == fam and baseline(m)), None)


def bench_overhead(dev, rounds: int, calls: int, distortions, models=None) -> pd.DataFrame:
    """Every network's SGD step, beside its plain baseline and its bare-affine twin (the same network
    whose transformer samples through a bare ``F.affine_grid`` + ``F.grid_sample``), in one race."""
    rows = []
    for d in distortions:
        fns, hw = {}, None
        for m in models or MODELS:
            cfg, net = build(m, d)
            hw = int(cfg.data.canvas)
            fns[m] = step_fn(net.to(dev), hw, dev)
            if net.st is not None:
                fns[f"{m}/bare"] = step_fn(bare_twin(net).to(dev), hw, dev)
        t = race(fns, dev, rounds, calls)
        for m in models or MODELS:
            base = t.get(baseline_of(m), float("nan"))
            twin = t.get(f"{m}/bare")
            rows.append({"distortion": d.upper(), "model": m, "step (ms)": 1e3 * t[m], "× baseline": t[m] / base,
                         "× bare-affine twin": t[m] / twin if twin else float("nan")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ 3. training loop

def bench_loop(dev, steps: int, rounds: int, extra: list[str], model: str = "st_fcn",
               data: str = "r") -> tuple[pd.DataFrame, dict]:
    """``src.train``'s own Trainer (make_trainer: checkpointing, progress log, curve recorder; validation
    off) vs a hand-written loop over the same datamodule batches (fresh distortions), with the same
    optimiser groups and step schedule (configure_optimizers)."""
    import tempfile

    import pytorch_lightning as pl

    from src.run.callbacks import CurveRecorder
    from src.data.datamodule import DistortedMNIST
    from src.models.module import Classifier
    from src.models.build import build_model
    from src.train import make_trainer, quiet_lightning

    run_dir = tempfile.mkdtemp(prefix="bench-loop-")
    cfg = compose_config([*extra, f"model={model}", f"data={data}", "quiet=true", f"paths.run_dir={run_dir}",
                          f"trainer.accelerator={'gpu' if dev.type == 'cuda' else 'cpu'}"])
    # the loop alone, no validation: values no run may have (the schema refuses them), set after its check
    cfg.trainer.max_steps, cfg.trainer.limit_val_batches = steps + 1, 0
    net = build_model(cfg)[0]
    init = {k: v.clone() for k, v in net.state_dict().items()}
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, cfg.stn.align_corners, cfg.seed)

    class Clock(pl.Callback):
        """Times steps 1..steps (step 0 pays for setup and warm-up)."""
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == 1:
                sync(dev)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *_):
            sync(dev)
            self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - 1)

    def lightning() -> float:
        net.load_state_dict(init)
        module = Classifier(net, OmegaConf.to_container(cfg.optim, resolve=True), steps + 1)
        clock = Clock()
        make_trainer(cfg, Path(run_dir) / "checkpoints", [CurveRecorder(), clock], "bench").fit(module, datamodule=dm)
        return clock.per_step

    def plain(split: bool = False) -> tuple[float, float, float]:
        """Seconds per step; with ``split``, synchronised after the batch and after the update to
        give (per step, of which batch making, of which model fwd+bwd+update)."""
        net.load_state_dict(init)
        model_ = net.to(dev)
        dm.train_images, dm.train_labels = dm.train_images.to(dev), dm.train_labels.to(dev)
        opt_cfg = Classifier(model_, OmegaConf.to_container(cfg.optim, resolve=True), steps + 1).configure_optimizers()
        opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]  # the same SGD groups and schedule
        t_data = t_model = 0.0
        x, y = dm.train_batch(0)  # warm-up step, not timed
        F.cross_entropy(model_(x), y).backward()
        sync(dev)
        t_start = time.perf_counter()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            x, y = dm.train_batch(step)
            if split:
                sync(dev)
            t1 = time.perf_counter()
            sgd_step(opt, lambda: F.cross_entropy(model_(x), y), sched)
            if split:
                sync(dev)
            t2 = time.perf_counter()
            t_data, t_model = t_data + t1 - t0, t_model + t2 - t1
        sync(dev)
        return (time.perf_counter() - t_start) / steps, t_data / steps, t_model / steps

    quiet_lightning(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dm.trainer = None
        dm.setup("fit")
        res = {"lightning": [], "plain": []}
        for _ in range(rounds):
            res["lightning"].append(lightning())
            res["plain"].append(plain()[0])
        _, t_data, t_model = plain(split=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    med.update(t_data=t_data, t_model=t_model)
    table = pd.DataFrame([
        {"loop": "Lightning (src.train's Trainer, module and datamodule)", "ms / step": 1e3 * med["lightning"],
         "steps / s": 1 / med["lightning"]},
        {"loop": "hand-written loop, same model, batches and optimiser", "ms / step": 1e3 * med["plain"], "steps / s": 1 / med["plain"]},
        {"loop": "  split (a separate, synchronised pass): making the batch", "ms / step": 1e3 * t_data,
         "steps / s": float("nan")},
        {"loop": "  split: model forward + backward + update", "ms / step": 1e3 * t_model, "steps / s": float("nan")},
    ])
    med.update(model_name=model, data=data, steps=steps, rounds=rounds)
    return table, med


# ------------------------------------------------------------------ 4. whole grid

def data_time(dev, rounds: int, calls: int, distortions, extra: list[str]) -> dict[str, float]:
    """Seconds to draw one fresh training batch per distortion (the `fresh` loader's extra work)."""
    from src.data.mnist import load_raw

    raw_cpu = load_raw(Path(compose_config(extra).paths.raw_file))["train"]["images"][: 4 * BATCH]
    raw = raw_cpu.to(dev)
    x = raw[:BATCH].float() / 255
    fns = {}
    for d in distortions:
        cfg = compose_config([*extra, f"data={d}"])
        r, g = recipe(cfg.data), torch.Generator().manual_seed(0)  # parameters are drawn on the CPU on every device
        table = warp_of(r).digit_table  # as the datamodule: computed once for its digits, sliced per batch
        table = table(raw_cpu) if table else None
        fns[d] = (lambda r=r, g=g, table=table: distort_batch(
            x, r, g, align_corners=False, clutter_pool=raw if warp_of(r).needs_pool else None, x_cpu=raw_cpu[:BATCH],
            digit_table=None if table is None else {k: v[:BATCH] for k, v in table.items()}))
    return race(fns, dev, rounds, calls)


def measured_cells() -> pd.DataFrame:
    """Runs recorded by the pipeline (any profile), with their wall time per step including evaluation."""
    rows = []
    for p in sorted((REPO / "reports" / "cells").glob("*/provenance.json")):
        try:
            prov = json.loads(p.read_text())
            fit_s, steps = float(prov["fit_seconds"]), int(prov["steps"])  # every segment of a resumed run
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record from an older format
        if not steps:
            continue
        rows.append({"cell": p.parent.name, "steps": steps, "device": prov.get("device", "?"),
                     "fit (min)": fit_s / 60, "ms / step": 1e3 * fit_s / steps})
    return pd.DataFrame(rows)


def project_grid(overhead: pd.DataFrame, data_s: dict, loop: dict, seeds: int = 3) -> pd.DataFrame:
    """Per-cell time at 150k steps = (model step + fresh batch) × framework factor from 3."""
    factor = loop["lightning"] / loop["plain"]
    rows = []
    for _, r in overhead.iterrows():
        d = r["distortion"].lower()
        per_step = (r["step (ms)"] / 1e3 + data_s[d]) * factor
        rows.append({"distortion": r["distortion"], "model": r["model"], "s / step": per_step,
                     "one cell (h)": per_step * PAPER_STEPS / 3600})
    df = pd.DataFrame(rows)
    fam = df.assign(family=df["model"].map(lambda m: f"{model_config(m).family.upper()} family"))
    summary = fam.groupby("family")["one cell (h)"].agg(["mean", "sum"]).reset_index()
    summary["grid, 3 seeds (h)"] = summary["sum"] * seeds
    return df, summary.rename(columns={"mean": "mean cell (h)", "sum": "one seed (h)"})


# ------------------------------------------------------------------ report

def fmt(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".3g")


SECTION1_INTRO = (
    "Gradients w.r.t. the input and θ, θ near the identity; the whole-STN rows run the localisation "
    "net too, with gradients w.r.t. its parameters. `theirs / ours` > 1 means ours is faster; a target "
    "`≤ k×` bounds ours / theirs. "
    "Projective runs with align_corners=True on both sides so that the outputs can be compared "
    "(`max |Δ output|`); TPS is compared with the bare affine pair (same align_corners=False) and with "
    "kornia, whose TPS is a different interpolant (kernel centres on the targets), so only its cost is compared."
)


def command_line(a: argparse.Namespace) -> str:
    return (f"python bench/bench_stn.py --device {a.device}" + (f" --threads {a.threads}" if a.threads else "")
            + (" --transformer-only" if a.transformer_only else ""))


def run_transformer_only(a: argparse.Namespace, dev: torch.device) -> None:
    """Section 1 alone, spliced into the existing report: sections 2–4 are kept as they were."""
    import kornia

    out = Path(a.out)
    if not out.exists() or "## 1. " not in out.read_text() or "## 2. " not in out.read_text():
        raise UserError(f"{out} has no earlier full report to update; run without --transformer-only first")
    load_before = os.getloadavg()[0]
    t_start = time.time()
    print("1/1 transformer forward+backward …", flush=True)
    t1 = bench_transformer(dev, a.rounds, a.calls)
    v = versions()
    v["kornia"] = kornia.__version__
    note = (f"Regenerated alone by `{command_line(a)}` in {time.time() - t_start:.0f} s (commit "
            f"{git_commit()[:10]}; 1-minute load average before it {load_before:.1f}; {a.rounds} rounds × "
            f"{a.calls} calls; " + ", ".join(f"{k} {val}" for k, val in v.items()) + "). Sections 2–4 come from "
            "the run described at the top.")
    old = out.read_text()
    head, rest = old.split("## 1. ", 1)
    tail = rest.split("## 2. ", 1)[1]
    section = "\n".join(["## 1. Transformer forward + backward (grid generator + bilinear sampler)", "", note, "",
                         SECTION1_INTRO, "", fmt(t1), "", ""])
    write_atomic(out, head + section + "## 2. " + tail)
    print(f"bench: updated section 1 of {a.out}")


def run(a: argparse.Namespace) -> None:
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dists = [d for d in a.distortions.split(",") if d]
    torch.manual_seed(0)
    import kornia  # a test-only dependency: fail early, before any timing

    if a.transformer_only:
        return run_transformer_only(a, dev)

    from src.data.distort import load_split
    from src.data.mnist import load_raw

    paths = compose_config(a.set).paths  # the data of 3 and 4, checked before any timing
    load_raw(Path(paths.raw_file))
    load_split(Path(paths.data_dir) / "r", "val")

    load_before = os.getloadavg()[0]  # other jobs: the benchmark itself adds about its thread count
    t_start = time.time()
    print("1/4 transformer forward+backward …", flush=True)
    t1 = bench_transformer(dev, a.rounds, a.calls)
    print("2/4 training step, ST vs baseline …", flush=True)
    t2 = bench_overhead(dev, a.rounds, max(1, a.calls // 2), dists)
    print("3/4 Lightning vs hand-written loop …", flush=True)
    t3, loop = bench_loop(dev, a.loop_steps, a.rounds, a.set)
    print("4/4 whole grid …", flush=True)
    data_s = data_time(dev, a.rounds, a.calls, dists, a.set)
    per_cell, grid = project_grid(t2, data_s, loop)
    cells = measured_cells()

    v = versions()
    v["kornia"] = kornia.__version__
    ratio = loop["plain"] / loop["lightning"]
    outside = 1 - loop["t_model"] / loop["lightning"]
    st, family = ~t2["model"].map(baseline), t2["model"].map(lambda m: model_config(m).family)
    st_cnn = t2[st & (family == "cnn")]["× baseline"]
    st_fcn = t2[st & (family == "fcn")]["× baseline"]
    twin = t2[st & (family == "fcn")]["× bare-affine twin"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command_line(a)}` in {time.time() - t_start:.0f} s. "
        f"Machine: {device_name(dev)}; 1-minute load average before the run {load_before:.1f} (other jobs; "
        "near 0 on an idle machine). Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + f". Commit {git_commit()[:10]}. Batch {BATCH}, "
        f"float32; every ratio comes from interleaved rounds of the two sides in this one run, as the "
        f"median over rounds (sections 1 and 4: {a.rounds} rounds × {a.calls} calls; section 2: {a.rounds} "
        f"rounds × {max(1, a.calls // 2)} steps; section 3: {a.rounds} loops of {a.loop_steps} steps each).",
        "",
        "## 1. Transformer forward + backward (grid generator + bilinear sampler)",
        "",
        SECTION1_INTRO,
        "",
        fmt(t1),
        "",
        "## 2. Cost of the transformer in a training step",
        "",
        f"One SGD step (forward, backward, update) of each network of the study at its distortion's input size "
        f"and parameter budget, beside its plain baseline and its bare-affine twin (the same network, its "
        f"transformer sampling through a bare `F.affine_grid` + `F.grid_sample` with a 6-output regressor). "
        f"ST-FCN family / bare-affine twin: {twin.min():.2f}–{twin.max():.2f}× (target ≤ 1.25×: "
        f"{'met' if twin.max() <= 1.25 else 'not met'}). ST-FCN / FCN: {st_fcn.min():.2f}–{st_fcn.max():.2f}×; "
        f"ST-CNN / CNN: {st_cnn.min():.2f}–{st_cnn.max():.2f}× (target ≤ 1.25×: "
        f"{'met' if st_cnn.max() <= 1.25 else 'not met'}).",
        "",
        fmt(t2),
        "",
        "## 3. Training-loop efficiency",
        "",
        f"{loop['model_name']} on {loop['data'].upper()}, fresh distortions, {loop['steps']} steps per loop, "
        f"median of {loop['rounds']} rounds. Lightning reaches {ratio:.2f} of the hand-written loop's throughput "
        f"(target ≥ 0.95: {'met' if ratio >= 0.95 else 'not met'}). Measured in the synchronised split pass, the "
        f"model's forward/backward/update takes {1e3 * loop['t_model']:.2f} ms per step, so {100 * outside:.0f} % of a "
        f"Lightning step is spent outside the model: {1e3 * loop['t_data']:.2f} ms drawing the fresh distortions, "
        f"the rest loop and framework. Validation is off in both loops.",
        "",
        fmt(t3),
        "",
        "## 4. Whole-grid time at the paper's budget (150k steps per cell)",
        "",
        "Projected per cell from section 2's step time plus a fresh batch of that distortion "
        f"({', '.join(f'{d.upper()} {1e3 * s:.1f} ms' for d, s in data_s.items())}), times the Lightning/plain "
        "factor of section 3. The projection leaves out evaluation (75 validations of 10k images per "
        "cell); the recorded runs at the end include it.",
        "",
        fmt(grid),
        "",
        "<details><summary>per cell</summary>",
        "",
        fmt(per_cell),
        "",
        "</details>",
        "",
        "Runs recorded by the pipeline (reports/cells/*/provenance.json; resumed runs left out), "
        "training and evaluation together, on the hardware named in each row:",
        "",
        fmt(cells) if len(cells) else "(none yet)",
        "",
    ]
    write_atomic(Path(a.out), "\n".join(lines))
    print(f"bench: wrote {a.out}")
    if a.json:  # the measured step times for `python -m src.ops.window --plan`
        write_atomic(Path(a.json), json.dumps({"device": device_name(dev), "commit": git_commit(),
                                               "per_cell": per_cell.to_dict("records"),
                                               "grid": grid.to_dict("records"), "loop": loop}, indent=2) + "\n")
        print(f"bench: wrote {a.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per round in 1, 2 and 4")
    ap.add_argument("--loop-steps", type=int, default=300)
    ap.add_argument("--transformer-only", action="store_true",
                    help="run section 1 alone and update it in --out, keeping sections 2-4 (needs no data)")
    ap.add_argument("--distortions", default=",".join(DISTORTIONS))
    ap.add_argument("--out", default=str(REPO / "reports" / "benchmarks.md"))
    ap.add_argument("--json", help="also write the projected step time of every cell here (for src.ops.window --plan)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the data of 3 and 4, e.g. paths.data_dir=... (repeatable)")
    try:
        run(ap.parse_args())
    except ImportError as e:
        sys.exit(f"error: {e.name or e} is needed by the benchmark; install it with: pip install -e \".[test]\"")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
