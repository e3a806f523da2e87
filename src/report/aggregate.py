"""Collect every cell of the grid into Table 1 beside the paper and the seed report.

``python -m src.report.aggregate`` reads params.yaml's grids (never globs, so files of removed cells are
ignored), each cell's record (``src.report.records``), the regenerated test sets and the reference numbers
in conf/reference/, and writes reports/results.{csv,md}, the metrics files reports/err/ (``metric_files``),
reports/summary.json and the figures: learning curves, error by distortion strength, and the learned
transforms drawn from the recorded θ. Every file is written atomically (the stage's outputs are
``persist``ent), so an interrupted run leaves the committed ones in place.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from src.report import sensitivity  # noqa: E402
from src.cell import Cell  # noqa: E402
from src.report.data_stats import nist_halves  # noqa: E402
from src.report.records import (INVARIANCE, MIN_BIN_IMAGES, N_BINS, binned_error, correct, load_record,  # noqa: E402
                         segment_commits, segment_devices, test_split, theta_summary, transformer)
from src.runinfo import REPO, UserError, check_dvc_lock, write_atomic, write_json  # noqa: E402
from src.config import compose_config, model_config  # noqa: E402


def reference(name: str, root: Path = REPO) -> dict:
    """A table of conf/reference/ (``paper``: the paper's Table 1; ``seed_report``): one reader for the report and
    the tests that check its prose."""
    return yaml.safe_load((root / "conf" / "reference" / f"{name}.yaml").read_text())


# the paper's Table 1 rows, in its order: the report's row order and one colour per model
PAPER_ROWS = list(reference("paper")["err"])
COLORS = {model: f"C{i}" for i, model in enumerate(PAPER_ROWS)}  # in every figure


def baseline(model: str) -> bool:
    """A model without a spatial transformer."""
    return model_config(model).transform is None


def row_label(model: str) -> str:
    """A model's name in the report, from its config: its family ('FCN'), or 'ST-<family> <the transform's
    label>' (``GridGenerator.label``) for an ST model, as the paper's rows read."""
    from src.stn.grids import GRIDS

    cfg = model_config(model)
    family = str(cfg.family).upper()
    return family if cfg.transform is None else f"ST-{family} {GRIDS[cfg.transform].label}"


def paper_order(models: list[str]) -> list[str]:
    """The models in the paper's row order (PAPER_ROWS), any other after them: params.yaml lists them in the
    order the pipeline trains them (cheapest first), which is no order of the report."""
    rank = {m: i for i, m in enumerate(PAPER_ROWS)}
    return sorted(models, key=lambda m: (rank.get(m, len(rank)), models.index(m)))


DEVIATION = 1.3  # flag cells off the paper by more than this factor: worse (> 1.3 × paper) or better (< paper / 1.3)
PAPER_STEPS = 150_000  # only cells trained at the paper's budget are compared with its numbers


COLUMNS = ["model", "distortion", "seed", "key", "run", "test_err", "test_err_last", "test_err_best", "val_err_last",
           "val_err_best", "n_params", "steps", "precision", "device", "hours", "n_test", "commit", "commits"]


def collect(grid: dict, reports: Path) -> tuple[pd.DataFrame, dict]:
    """One row per cell of the grid (its metrics if its record is complete, else 'not run'), and the records."""
    rows, records = [], {}
    for model in grid["models"]:
        for data in grid["distortions"]:
            for seed in grid["seeds"]:
                key = Cell(seed, model, data).name
                rec = load_record(reports, key)
                row = {"model": model, "distortion": data, "seed": seed, "key": key, "run": rec is not None}
                if rec is not None:
                    m, p = rec.metrics, rec.provenance
                    records[key] = rec
                    row.update(test_err=m["test"]["err"], test_err_last=m["test"]["err_last"],
                               test_err_best=m["test"]["err_best"], val_err_last=m["val"]["err_last"],
                               val_err_best=m["val"]["err_best"],
                               n_params=m["params"]["n"], steps=m["steps"], precision=rec.precision,
                               device=segment_devices(p),
                               hours=round(p.get("fit_seconds", float("nan")) / 3600, 2),
                               n_test=len(rec.outcomes["pred"]),  # the size of the test set it was scored on
                               commit=str(p.get("commit", "?")), commits=segment_commits(p))
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS), records


def param_counts(grid: dict) -> pd.DataFrame:
    """Parameter count of every (model, distortion) as built by the code (also for cells not run)."""
    from src.models.build import build_model

    counts = {(model, data): build_model(compose_config([f"model={model}", f"data={data}"]))[0].param_counts()["total"]
              for model in grid["models"] for data in grid["distortions"]}
    s = pd.Series(counts)
    return s.unstack().reindex(index=grid["models"], columns=grid["distortions"])


def fmt(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def runs(df: pd.DataFrame, model: str, data: str) -> pd.DataFrame:
    """The completed runs (seeds) of one table cell."""
    return df[(df.model == model) & (df.distortion == data) & df.run]


def ours(df: pd.DataFrame, model: str, data: str) -> str:
    """Our test error of one table cell: '**mean** ± std (n=…)' over its seeds run (the sample standard
    deviation, ddof=1, where n ≥ 2; the mean alone where n = 1), or 'not run'."""
    errs = runs(df, model, data).test_err.astype(float)
    if not len(errs):
        return "not run"
    return f"**{errs.mean():.2f}**" + (f" ± {errs.std(ddof=1):.2f}" if len(errs) > 1 else "") + f" (n={len(errs)})"


def binomial_se(err: float, n_test: int) -> float:
    """The binomial standard error of one run's test error, in percentage points: √(p(1−p)/n_test) with
    p = err / 100, the spread of the error measured on another test set of n_test images drawn alike."""
    p = err / 100
    return 100 * math.sqrt(p * (1 - p) / n_test)


def se_table(df: pd.DataFrame, grid: dict) -> pd.DataFrame:
    """Rows = models, columns = distortions: ``binomial_se`` of each cell's mean test error over its seeds,
    with the test-set size of its records (the smallest, should they differ); '–' where not run."""
    def se(model: str, data: str) -> str:
        g = runs(df, model, data)
        return fmt(binomial_se(float(g.test_err.mean()), int(g.n_test.min()))) if len(g) else "–"
    return pd.DataFrame({row_label(model): {data.upper(): se(model, data) for data in grid["distortions"]}
                         for model in grid["models"]}).T


def test_sizes(df: pd.DataFrame) -> str:
    """The test-set sizes of the records run, e.g. '10,000' (read from each record's predictions)."""
    sizes = sorted({int(n) for n in df[df.run].n_test})
    return " / ".join(f"{n:,}" for n in sizes) or "–"


def se_section(df: pd.DataFrame, grid: dict) -> list[str]:
    """The binomial standard errors of a table's cells, with their caption."""
    if not df.run.any():
        return []
    return [
        "Binomial standard error of one run, in percentage points: √(p(1−p)/n_test), p the cell's mean test "
        f"error and n_test its test-set size (from the records' predictions: {test_sizes(df)} images). It is how "
        "far one run's number would move on another test set drawn alike; the ± above is the spread over "
        "training seeds on this one test set.",
        "",
        se_table(df, grid).to_markdown(disable_numparse=True),
        "",
    ]


def table1(df: pd.DataFrame, grid: dict, refs: list[tuple[dict, int]]) -> pd.DataFrame:
    """Rows = models, columns = distortions; each cell 'ours mean ± std (n)', then each reference's number
    (``refs``: its {model: {distortion: err}} and the digits it is quoted with)."""
    return pd.DataFrame({
        row_label(model): {
            data.upper(): " · ".join([ours(df, model, data)] + [
                fmt(ref.get(model, {}).get(data, float("nan")), digits) for ref, digits in refs])
            for data in grid["distortions"]}
        for model in grid["models"]}).T


def save_figure(fig, path: Path, **kwargs) -> None:
    """Render to memory, then write atomically: an interrupted run never leaves a truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, **kwargs)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def completed(df: pd.DataFrame) -> set[str]:
    """Keys of the cells with a metrics file: curves and pictures of unfinished runs are not shown."""
    return set(df.key[df.run])


def lr_drops(cfg: dict) -> list[int]:
    """The steps at which a run's schedule multiplies the learning rate by ``optim.gamma``, from its config:
    ``Classifier.milestones`` (milestones are fractions of max_steps, or absolute steps)."""
    from src.models.module import Classifier

    return Classifier.milestones(SimpleNamespace(optim_cfg=cfg["optim"], max_steps=cfg["trainer"]["max_steps"]))


def step_axis(ax) -> None:
    """Steps on the x axis as 0, 50k, 100k …: a few ticks that do not run together."""
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))


def log_error_axis(ax) -> None:
    """A log scale of error %, ticked 1, 2, 3, 5, 10, 20 …"""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # rather than 2×10⁰
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")


def legend_below(ax, ncol: int = 2) -> None:
    """The panel's legend under its x label, off the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=8, frameon=False)


def plot_curves(grid: dict, df: pd.DataFrame, reports: Path, path: Path, steps: int, records: dict) -> list[str]:
    """Validation error against step, a panel per distortion, from ``reports/curves/``: per model the mean over
    its seeds (solid; at the steps every seed logged) and each seed faint, with the learning-rate drops of the
    runs' schedules (``lr_drops`` of their recorded configs) dotted; returns the cells drawn."""
    ds, done, drawn = grid["distortions"], completed(df), []
    fig, axes = plt.subplots(1, max(len(ds), 1), figsize=(4 * max(len(ds), 1), 4.2), squeeze=False)
    for ax, data in zip(axes[0], ds):
        drops, gammas = set(), set()
        for model in grid["models"]:
            seeds = {}
            for seed in grid["seeds"]:
                key = Cell(seed, model, data).name
                f = reports / "curves" / f"{key}.csv"
                if key in done and f.is_file():
                    seeds[seed] = pd.read_csv(f).drop_duplicates("step", keep="last").set_index("step").val_err
                    drawn.append(key)
                    if key in records:
                        cfg = records[key].provenance["config"]
                        drops.update(lr_drops(cfg))
                        gammas.add(cfg["optim"]["gamma"])
            if not seeds:
                continue
            color, label = COLORS.get(model), row_label(model)
            if len(seeds) > 1:
                for c in seeds.values():
                    ax.plot(c.index, c.values, color=color, lw=0.7, alpha=0.3)
            mean = pd.concat(seeds, axis=1).dropna().mean(axis=1)
            ax.plot(mean.index, mean.values, color=color, lw=1.5, label=f"{label} (n={len(seeds)})")
        for i, step in enumerate(sorted(drops)):
            ax.axvline(step, color="0.35", ls=":", lw=1,
                       label=f"lr × {' / '.join(f'{g:g}' for g in sorted(gammas))}" if i == 0 else None)
        ax.set_title(f"{data.upper()} ({steps // 1000}k steps)")
        ax.set_xlabel("step")
        step_axis(ax)
        log_error_axis(ax)
        if ax.get_legend_handles_labels()[0]:
            legend_below(ax)
    axes[0][0].set_ylabel("validation error %")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return drawn


Z95 = 1.959963984540054  # the standard normal quantile of a two-sided 95 % interval


def wilson(wrong, trials, z: float = Z95):
    """The Wilson score interval of a binomial proportion, in %: ``wrong`` of ``trials``; (lo, hi) as floats
    for numbers, as arrays for sequences."""
    k = pd.Series(wrong, dtype=float).to_numpy()
    n = pd.Series(trials, dtype=float).to_numpy()
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    lo, hi = 100 * (centre - half).clip(0, 1), 100 * (centre + half).clip(0, 1)
    return (float(lo[0]), float(hi[0])) if pd.api.types.is_scalar(wrong) else (lo, hi)


INVARIANCE_COLUMNS = ["data", "model", "lo", "hi", "mid", "n", "seeds", "trials", "wrong", "err", "ci_lo", "ci_hi"]


def invariance(grid: dict, records: dict, data_dir: Path, min_images: int = MIN_BIN_IMAGES) -> pd.DataFrame:
    """Test error binned by the recorded distortion strength (conf/report/invariance.yaml: R angle, RTS scale,
    P corner displacement, E control-point move, TC distance from the centre; ``strength_bins``: N_BINS
    equal-width bins, those under ``min_images`` test images merged), every model with a record, the seeds of a
    cell pooled (wrong predictions and predictions summed over them): columns data, model, lo, hi, mid, n (test
    images per bin), seeds, trials (n × seeds), wrong, err and its 95 % Wilson interval ci_lo, ci_hi (%)."""
    frames = []
    for data in (d for d in INVARIANCE if d in grid["distortions"]):
        for model in grid["models"]:
            recs = [records[k] for s in grid["seeds"] if (k := Cell(s, model, data).name) in records]
            if recs:
                split = test_split(str(data_dir), data)  # cached
                ok = torch.stack([correct(r, split) for r in recs])
                b = binned_error(ok, INVARIANCE[data].values(split), min_images=min_images)
                lo, hi = wilson(b.wrong, b.trials)
                frames.append(b.assign(data=data, model=model, seeds=len(recs), ci_lo=lo, ci_hi=hi))
    return (pd.concat(frames, ignore_index=True)[INVARIANCE_COLUMNS] if frames
            else pd.DataFrame(columns=INVARIANCE_COLUMNS))


def plot_invariance(grid: dict, inv: pd.DataFrame, path: Path) -> None:
    """``invariance`` of every model run, one panel per distortion: the pooled error of each bin with its 95 %
    Wilson interval, on a log scale fitted to the intervals (sparse bins are merged before, so none sets it);
    baselines dashed, ST models solid, the models of a panel drawn a little apart along x."""
    panels = [d for d in INVARIANCE if d in grid["distortions"]]
    n = max(len(panels), 1)
    cols = n if n <= 3 else -(-n // 2)  # 1-3 in a row, then two rows
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:  # five panels on a 2 × 3 grid
        ax.set_visible(False)
    for ax, data in zip(axes.flat, panels):
        label = INVARIANCE[data].label
        d = inv[inv.data == data]
        models = [m for m in grid["models"] if (d.model == m).any()]
        for i, model in enumerate(models):
            b = d[d.model == model]
            shift = (i - (len(models) - 1) / 2) * 0.4 * float((b.hi - b.lo).min()) / max(len(models), 1)
            yerr = [(b.err - b.ci_lo).clip(lower=0), (b.ci_hi - b.err).clip(lower=0)]
            ax.errorbar(b.mid + shift, b.err, yerr=yerr, color=COLORS.get(model), marker="o",
                        ms=3.5, lw=1.2, elinewidth=0.9, capsize=2, ls="--" if baseline(model) else "-",
                        label=f"{row_label(model)} (n={int(b.seeds.iloc[0])})")
        ax.set_title(f"{data.upper()}: test error by {label.split(' (')[0]}")
        ax.set_xlabel(label)
        ax.set_ylabel("test error % (95 % Wilson interval)")
        if models:
            log_error_axis(ax)
            low = d.ci_lo[d.ci_lo > 0] if (d.ci_lo > 0).any() else d.err[d.err > 0]
            if len(low):
                ax.set_ylim(0.8 * float(low.min()), 1.25 * float(d.ci_hi.max()))
            legend_below(ax)
        else:
            ax.grid(alpha=0.3)
            ax.text(0.5, 0.5, "no cell run yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def invariance_tables(inv: pd.DataFrame) -> list[str]:
    """One markdown table per distortion, the data of its figure panel: a row per bin (merged as there), a
    column per model headed with its seeds n: the pooled test error % [95 % Wilson interval]."""
    out = []
    for data, d in inv.groupby("data", sort=False):
        d = d.assign(cell=[f"{e:.2f} [{lo:.2f}, {hi:.2f}]" for e, lo, hi in zip(d.err, d.ci_lo, d.ci_hi)])
        wide = d.pivot(index=["lo", "hi", "n"], columns="model", values="cell").reset_index()
        seeds = d.groupby("model").seeds.first()
        width = float((wide.hi - wide.lo).min())
        digits = 0 if width >= 5 else 1 if width >= 0.5 else 2

        def edge(v: float) -> str:
            return f"{round(v, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0"
        table = pd.DataFrame({
            INVARIANCE[data].label: [f"{edge(lo)} – {edge(hi)}" for lo, hi in zip(wide.lo, wide.hi)],
            "images": wide.n.astype(int),
            **{f"{row_label(m)} (n={int(seeds[m])})": wide[m] for m in d.model.unique()}})
        aligned = table.to_markdown(index=False, disable_numparse=True,
                                    colalign=["left"] + ["right"] * (table.shape[1] - 1))
        out += [f"**{data.upper()}**", "", aligned, ""]
    return out


def invariance_caption() -> str:
    """How the figure and the tables of test error by distortion strength are made."""
    return (f"Test error % in {N_BINS} equal-width bins of the recorded test-set parameter, for every model run. "
            "Seeds pooled: a cell's wrong predictions and its predictions (test images × n seeds, n beside each "
            f"model) are summed over its seeds. A bin with fewer than {MIN_BIN_IMAGES} test images is merged with "
            "its neighbour (walking up from the smallest values, a sparse bin is joined by the next until the "
            "group holds that many; a sparse group left at the top joins the one below), so no bin is that sparse "
            "and none sets the figure's scale. Brackets and error bars: the 95 % Wilson score interval of the "
            "pooled proportion. It counts every prediction as an independent trial, while a cell's seeds are "
            "scored on the same images: it shows the test-set sampling error, not the spread over training seeds "
            "(the ± of the tables above).")


def half_errors(ok: torch.Tensor) -> tuple[float, float] | None:
    """Test error % on the first and on the last half of MNIST's test set (``nist_halves``) from one run's
    per-image correctness, or None for a test set of another size. Equal halves: their mean is the run's error."""
    halves = nist_halves(len(ok))
    return None if halves is None else tuple(100 * (~ok[h]).double().mean().item() for h in halves)


VS_VAL_COLUMNS = ["data", "model", "seeds", "val", "test", "diff", "se", "ratio", "first", "last"]


def validation_gap(grid: dict, records: dict, data_dir: Path) -> pd.DataFrame:
    """Per distortion and model run, the seeds' mean validation error (of the checkpoint each record's table
    reports, ``eval.table_ckpt``), test error, their difference, its standard error √(p_t(1−p_t)/n_t +
    p_v(1−p_v)/n_v) (of one run: the seeds share both image sets, so averaging them does not shrink the part the
    choice of images contributes), the ratio test / validation and the test error on the two halves of MNIST's
    test set (NaN unless the records scored its 10,000 images)."""
    rows = []
    for data in grid["distortions"]:
        for model in grid["models"]:
            recs = [records[k] for s in grid["seeds"] if (k := Cell(s, model, data).name) in records]
            if not recs:
                continue
            split = test_split(str(data_dir), data)  # cached
            oks = [correct(r, split) for r in recs]
            val = sum(r.metrics["val"][f"err_{r.config.eval.table_ckpt}"] for r in recs) / len(recs)
            test = sum(r.metrics["test"]["err"] for r in recs) / len(recs)
            n_val, n_test = int(recs[0].config.mnist.sizes[1]), min(len(ok) for ok in oks)
            halves = [half_errors(ok) for ok in oks]
            first, last = ((float("nan"),) * 2 if any(h is None for h in halves) else
                           (sum(h[i] for h in halves) / len(halves) for i in (0, 1)))
            rows.append({"data": data, "model": model, "seeds": len(recs), "val": val, "test": test,
                         "diff": test - val, "se": math.hypot(binomial_se(test, n_test), binomial_se(val, n_val)),
                         "ratio": test / val if val else float("nan"), "first": first, "last": last})
    return pd.DataFrame(rows, columns=VS_VAL_COLUMNS)


def vs_val_section(t: pd.DataFrame | None) -> list[str]:
    """The table of results.md's section "Test against validation" (``validation_gap``)."""
    if t is None or not len(t):
        return ["_no cell run yet_", ""]
    table = pd.DataFrame({
        "distortion": t.data.str.upper(), "model": [row_label(m) for m in t.model], "seeds": t.seeds,
        "validation err %": t.val.map(fmt), "test err %": t.test.map(fmt),
        "test − validation": [f"{d:+.2f}" for d in t["diff"]], "SE": t.se.map(fmt),
        "test / validation": t.ratio.map(fmt),
        "test 1–5,000 (SD-3)": t["first"].map(fmt), "test 5,001–10,000 (SD-1)": t["last"].map(fmt)})
    return [table.to_markdown(index=False, disable_numparse=True,
                              colalign=["left", "left"] + ["right"] * (table.shape[1] - 2)), ""]


N_DRAWN = 8  # test images per learned-transform figure (the first ones of the test set)


def draw_learned_transforms(records: dict, data_dir: Path, out_dir: Path) -> list[str]:
    """One figure per ST cell from its record: input, frame of the recorded θ, transformer output
    (``src.report.figures.draw_warps``). Figures of cells no longer in the grid are removed; returns the keys drawn."""
    from src.report.figures import draw_warps

    drawn = []
    for key, rec in records.items():
        if rec.theta is None:
            continue
        split = test_split(str(data_dir), rec.config.data.name)
        x = split["images"][:N_DRAWN].float() / 255
        draw_warps(transformer(rec), x, rec.theta[:N_DRAWN], out_dir / f"{key}.png",
                   labels=split["labels"][:N_DRAWN], preds=rec.outcomes["pred"][:N_DRAWN])
        drawn.append(key)
    for stale in out_dir.glob("*.png") if out_dir.is_dir() else []:
        if stale.stem not in drawn:
            stale.unlink()
    return drawn


def transform_links(drawn: list[str]) -> list[str]:
    return [f"[{k}](figures/transforms/{k}.png)" for k in drawn]


def theta_table(grid: dict, records: dict, data_dir: Path) -> pd.DataFrame:
    """θ statistics of every ST cell's whole test set, from its record, every seed: seeds of one cell can
    reach a similar error with different transforms."""
    rows = []
    for data in grid["distortions"]:
        for model in grid["models"]:
            for seed in grid["seeds"]:
                rec = records.get(Cell(seed, model, data).name)
                if rec is None or rec.theta is None:
                    continue
                stats = theta_summary(rec, test_split(str(data_dir), data))
                rows.append({"cell": rec.key, **{k: round(v, 3) for k, v in stats.items()}})
    return pd.DataFrame(rows)


def deviations(df: pd.DataFrame, paper: dict) -> list[str]:
    """Cells at the paper's budget whose mean test error is off the paper's by more than a factor DEVIATION,
    either way: **worse** (ours > DEVIATION × paper) first, then **better** (ours < paper / DEVIATION);
    explained in reports/analysis.md. Cells trained for fewer steps are not compared."""
    worse, better = [], []
    full = df[df.run & (df.steps >= PAPER_STEPS)] if df.run.any() else df[df.run]
    for (model, data), g in full.groupby(["model", "distortion"]):
        ref = paper.get(model, {}).get(data)
        ours = float(g.test_err.mean())
        steps = ", ".join(f"{int(s):,}" for s in sorted(set(g.steps)))

        def line(direction: str, ratio: str) -> str:
            return (f"- **{direction}**: {row_label(model)} on {data.upper()}: {ours:.2f} % vs the paper's "
                    f"{ref} % ({ratio}) at {steps} steps")
        if ref and ours > DEVIATION * ref:
            worse.append(line("worse", f"{ours / ref:.1f}× the paper's"))
        elif ref and ours * DEVIATION < ref:
            better.append(line("better", f"the paper's is {ref / ours:.1f}× ours" if ours > 0 else "ours is 0"))
    return worse + better


def summary(df: pd.DataFrame, short_df: pd.DataFrame) -> dict:
    """reports/summary.json: how many cells of each grid are committed (``dvc metrics show reports/summary.json``);
    their errors are the metrics files of ``metric_files``."""
    return {"cells_run": int(df.run.sum()), "cells_total": int(len(df)),
            "short_run": int(short_df.run.sum()), "short_total": int(len(short_df))}


def _by_distortion(g: pd.DataFrame) -> dict:
    return {str(d): float(e) for d, e in zip(g.distortion, g.test_err)}


def metric_files(df: pd.DataFrame, short_df: pd.DataFrame, models: list[str]) -> dict[str, dict]:
    """The files of reports/err/, the metrics of `dvc metrics show/diff`: one row each, a column per distortion,
    so the table fits a terminal. ``<seed>-<model>.json``: the test error % of every committed cell of that seed
    and model; ``mean-<model>.json``: the table's mean over the committed seeds, for every model of the grid
    (``{}`` before its first cell); ``short/<seed>-<model>.json``: the reduced-budget cells."""
    files = {}
    for prefix, grid_df in (("", df), ("short/", short_df)):
        done = grid_df[grid_df.run]
        for (seed, model), g in done.groupby(["seed", "model"], sort=False):
            files[f"{prefix}{seed}-{model}.json"] = _by_distortion(g)
    done = df[df.run]
    for model in models:
        means = done[done.model == model].groupby("distortion", sort=False).test_err.mean()
        files[f"mean-{model}.json"] = {str(d): round(float(e), 4) for d, e in means.items()}
    return files


def write_metric_files(out_dir: Path, files: dict[str, dict]) -> None:
    """Each file atomically, then those of cells no longer committed or in the grid removed: the folder is never
    absent, and every file in it is whole."""
    for name, errs in files.items():
        write_json(out_dir / name, errs)
    for stale in sorted(out_dir.rglob("*.json")):
        if stale.relative_to(out_dir).as_posix() not in files:
            stale.unlink()


DIRTY = "-dirty"  # a provenance commit whose src/ or conf/ had uncommitted changes: <commit>-dirty[+<diff hash>]


def commit_cell(commits: str) -> str:
    """A record's segment commits for the cell table, a dirty one marked **dirty** (with its diff hash, if any)."""
    return " → ".join(c.replace(DIRTY, " **dirty** ").rstrip() for c in str(commits).split(" → "))


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    done = df[df.run].copy()
    done["commits"] = done.commits.map(commit_cell)
    cols = ["key", "test_err", "test_err_last", "test_err_best", "val_err_last", "val_err_best", "n_params", "steps",
            "precision", "hours", "device", "commits"]
    return done[cols].rename(columns={"key": "cell", "test_err": "test err %", "test_err_last": "last",
                                      "test_err_best": "best-val ckpt", "val_err_last": "val err % (last)",
                                      "val_err_best": "best val err %",
                                      "n_params": "params", "hours": "fit hours", "commits": "commit"})


def span(hours: pd.Series) -> str:
    """One cell's fit hours over its seeds: the single number, or min–max with n."""
    h = hours.dropna().sort_values()
    if h.empty:
        return "–"
    lo, hi = f"{h.iloc[0]:.2f}", f"{h.iloc[-1]:.2f}"
    return lo if len(h) == 1 else f"{lo if lo == hi else f'{lo}–{hi}'} (n={len(h)})"


def time_tables(df: pd.DataFrame, grid: dict) -> list[str]:
    """Fit hours of the paper-budget cells, a table per machine: what a cell of `dvc repro` costs, from the
    records themselves rather than copied into the docs."""
    done = df[df.run & (df.steps == PAPER_STEPS)]
    labels = {m: row_label(m) for m in grid["models"]}
    out = []
    for device, g in done.groupby("device", sort=True):
        table = pd.DataFrame({data.upper(): {labels[m]: span(g[(g.model == m) & (g.distortion == data)].hours)
                                             for m in grid["models"]} for data in grid["distortions"]})
        out += [f"**{device}**", "", table.to_markdown(), ""]
    return out or ["_none yet_", ""]


def theta_markdown(thetas: pd.DataFrame) -> str:
    """The θ table, with "–" where a transform has no such statistic."""
    return (thetas.astype(object).where(thetas.notna(), None).to_markdown(index=False, missingval="–")
            if len(thetas) else "_no ST cell run yet_")


def paired_check(short_df: pd.DataFrame, ref_commit: str, root: Path, n_test: int = 10_000) -> list[str]:
    """The paired check of reports/decisions.md: each reduced-budget cell against its float32 record as
    committed at ``ref_commit`` (read from git), with the rule's verdict."""
    rows = []
    retrained = short_df[short_df.run & (short_df.precision != "32-true")]  # the float32 records are the reference
    for r in retrained.itertuples():
        try:
            ref = json.loads(subprocess.run(
                ["git", "show", f"{ref_commit}:reports/short/metrics/{r.key}.json"], cwd=root, capture_output=True,
                text=True, check=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            return [f"_The float32 records at {ref_commit} are not in this checkout's git history._"]
        p = ref["test"]["err"] / 100
        bound = 200 * math.sqrt(p * (1 - p) / n_test)
        diff = r.test_err - ref["test"]["err"]
        rows.append({"cell": r.key, "precision": r.precision, f"float32 test err % ({ref_commit})": ref["test"]["err"],
                     "test err %": r.test_err, "difference": round(diff, 2), "2 SE": round(bound, 2),
                     "within 2 SE": abs(diff) <= bound, f"float32 val err % ({ref_commit})": ref["val"]["err_last"],
                     "val err %": r.val_err_last})
    if not rows:
        return ["_No cell of the check is recorded yet: each row below is still its float32 record._"]
    df = pd.DataFrame(rows)
    mean = df["difference"].mean()
    complete = len(df) == len(short_df)
    passed = complete and bool(df["within 2 SE"].all()) and abs(mean) < 0.1
    verdict = ("**passes**" if passed else "**fails**") if complete else f"pending ({len(df)} of {len(short_df)} cells)"
    return [df.to_markdown(index=False), "",
            f"Mean difference {mean:+.2f} points over {len(df)} cell(s); the rule (each within 2 SE, |mean| < 0.1): "
            f"{verdict}."]


@dataclass
class Budget:
    """The cells of one grid at one training budget, and what the report derives from their records."""
    grid: dict
    steps: int
    df: pd.DataFrame
    inv: pd.DataFrame  # test error by distortion strength
    thetas: pd.DataFrame  # θ statistics of the ST cells
    drawn: list[str]  # cells whose learned transforms are drawn (file stems under figures/transforms/)
    vs_val: pd.DataFrame | None = None  # test against validation error, and on the test set's halves


def sensitivity_section(sens: pd.DataFrame, full: pd.DataFrame, paper: dict) -> list[str]:
    """The sensitivity study's section of results.md (src/report/sensitivity.py), its figure linked."""
    if sens.empty:
        return []
    lines = [
        "## Sensitivity: P, E and RTS against the recipe numbers no source pins down",
        "",
        "Cells of params.yaml's `sensitivity` grid (dvc.yaml `sens_*`; a variant is "
        "`conf/experiment/sensitivity/<name>.yaml`), each trained like Table 1's cells at the reduced budget "
        "(`trainer=short`, 40k steps, seed 0) and kept apart from it. The main recipes are among them, so every "
        "variant is measured on one footing. They explain the table, they choose nothing: a main recipe changes "
        "only on a source ([decisions.md](decisions.md)). Each cell: test error ± 2 binomial SE (one run), the last "
        "checkpoint's validation error beside it (`–` where the validation digits were trained on). Projected to "
        "150k: the variant × our main recipe's 150k mean / its 40k cell, per model, a projection and no result.",
        "",
    ]
    if not sens.run.any():
        return lines + ["_none run yet_", ""]
    return lines + [*sensitivity.tables(sens, full, paper, row_label, binomial_se),
                    "![sensitivity](figures/sensitivity.png)", "",
                    "Every sensitivity cell that was run (the commits as in Table 1's cell table):", "",
                    sens[sens.run].assign(commits=sens.commits.map(commit_cell))[
                        ["key", "test_err", "val_err", "steps", "precision", "hours", "device", "commits"]].rename(
                        columns={"key": "cell", "test_err": "test err %", "val_err": "val err % (last)",
                                 "hours": "fit hours", "commits": "commit"}).to_markdown(index=False, missingval="–"),
                    ""]


def render(full: Budget, short: Budget, counts: pd.DataFrame, refs: dict, table_ckpt: str, root: Path = REPO,
           sens: list[str] = ()) -> str:
    """reports/results.md: the full-budget table beside the paper, the reduced-budget cells and the sensitivity
    study apart."""
    df, grid = full.df, full.grid
    steps_run = sorted({int(s) for s in df[df.run].steps}) if df.run.any() else []
    budget_note = ", ".join(f"{s:,}" for s in steps_run) or "none yet"
    reduced = [s for s in steps_run if s < PAPER_STEPS]
    lines = [
        "# Results: distorted MNIST (Table 1)",
        "",
        "Generated by `python -m src.report.aggregate` (the `aggregate` stage of `dvc repro`) from the per-cell "
        "records in `reports/metrics/`, `reports/curves/` and `reports/cells/` and the regenerated test sets; "
        "do not edit by hand.",
        "",
        f"Grid: {len(grid['models'])} models × {len(grid['distortions'])} distortions × seeds {grid['seeds']}, "
        f"profile `{grid['profile']}` ({full.steps:,} steps). Cells run: {int(df.run.sum())} of {len(df)}. "
        f"Training steps of the cells shown: {budget_note} (the paper: 150,000).",
        "",
    ]
    if reduced:
        lines += [f"**Reduced budget:** cells trained for {', '.join(f'{s:,}' for s in reduced)} steps are below the "
                  "paper's 150k iterations; compare them with the seed report (40k) rather than the paper.", ""]
    lines += [
        "## Test error %",
        "",
        "Each cell: **ours** · paper · seed report (Sun & Lin 2016, 40k iterations, 1 run, affine only). Ours: "
        "the mean test error over the n seeds run (n=…), ± the sample standard deviation over seeds (ddof = 1; "
        "for n = 2 it is the two runs' difference / √2) where n ≥ 2, the single run's number where n = 1; "
        f"the {table_ckpt} checkpoint (conf/config.yaml `eval.table_ckpt`); "
        "both the last and the best-validation checkpoint are in the per-cell table below. `not run`: no completed "
        "run of this cell; `–`: no reference number. The paper gives TC only in its text (no transform type); "
        "we place it on the affine rows.",
        "",
        table1(df, grid, [(refs["paper"], 1), (refs["seed"], 2)]).to_markdown(),
        "",
        f"References: {refs['sources']}",
        "",
        *se_section(df, grid),
    ]
    lines += [
        f"## Reduced budget: {short.steps:,} steps (the seed report's budget)",
        "",
        f"Cells of params.yaml's `short` grid, trained with `trainer=short` ({short.steps:,} steps, the same "
        "schedule shape), beside the seed report's single 40k-iteration runs (affine only). They are not "
        "compared with the paper's 150k-step numbers. Each cell: **ours** · seed report, ours as in Table 1 (mean, "
        "± sample std over seeds where n ≥ 2, n=…). The precision "
        "of each cell (params.yaml `short.precision`) is in its row of the cell table below; the paired check of "
        "bf16-mixed against these cells' float32 records is in [decisions.md](decisions.md).",
        "",
        table1(short.df, short.grid, [(refs["seed"], 2)]).to_markdown(),  # beside the same budget only
        "",
        *se_section(short.df, short.grid),
    ]
    if short.grid.get("reference"):
        lines += [f"Paired check of `model.precision` ([decisions.md](decisions.md)): these cells against their "
                  f"float32 records at {short.grid['reference']}.", "",
                  *paired_check(short.df, short.grid["reference"], root), ""]
    if short.df.run.any():
        lines += [
            cell_table(short.df).to_markdown(index=False),
            "",
            "Validation error during training: [figures/short_curves.png](figures/short_curves.png). Learned "
            "transforms: " + (", ".join(transform_links(short.drawn)) or "_no ST cell run yet_") + ". Test error "
            "by distortion strength (bins, pooling and intervals as in the section \"Test error by distortion "
            "strength\" below):",
            "",
            *(invariance_tables(short.inv) or ["_no cell of a binned distortion run yet_", ""]),
            "θ on the test set (the statistics of the section \"θ on the test set\" below):",
            "",
            theta_markdown(short.thetas),
            "",
        ]
    else:
        lines += ["_none run yet_", ""]
    lines += [*sens,
        "## Parameters per network",
        "",
        "The paper's rule: all networks of one distortion have about the same number of parameters. Counts of "
        "the networks as built by this code (conf/config.yaml `budget`: every network within ±2 % of the "
        "FCN 128-128 count at the distortion's input size).",
        "",
        counts.rename(index=row_label, columns=str.upper).to_markdown(),
        "",
        "## Figures",
        "",
        "![learning curves](figures/curves.png)",
        "",
        "Validation error during training, a panel per distortion: per model the mean over its n seeds (solid, "
        "at the steps every seed logged) and each seed (faint); dotted: the learning-rate drops of the schedule "
        "(conf/optim `milestones`, read from the runs' recorded configs).",
        "",
        "![error by distortion strength](figures/invariance.png)",
        "",
        "Test error by distortion strength, every model run, its n seeds pooled (legend), on a log scale; error "
        "bars: 95 % Wilson score intervals; bins under "
        f"{MIN_BIN_IMAGES} test images merged with a neighbour. The data and the rule: the section below.",
        "",
        "Learned transforms, drawn from each cell's recorded θ on the first test images (input, the sampled "
        "frame on the input, the transformer's output; caption: label, prediction): "
        + (", ".join(transform_links(full.drawn)) or "_no ST cell run yet_") + ".",
        "",
        "## Test error by distortion strength",
        "",
        "The data of the figure above. " + invariance_caption() + " `images`: test images per bin (each seed "
        "scores every one).",
        "",
        *(invariance_tables(full.inv) or ["_no cell of a binned distortion run yet_", ""]),
        "## Test against validation",
        "",
        "Per model and distortion, the mean over its seeds of the validation error (the split made from the last "
        "10,000 images of MNIST's training file) and of the test error, at the checkpoint of the table; their "
        "difference and its standard error √(p_t(1−p_t)/n_t + p_v(1−p_v)/n_v), that of one run (the seeds share "
        "the validation and the test images, so averaging them does not shrink the part the choice of images "
        "contributes); the ratio of the two; and the test error on the first and on the last 5,000 test images, "
        "which come from NIST's SD-3 and SD-1 (LeCun's MNIST page; the mean of the two halves is the test "
        "error). The same raw digits underlie every distortion's split, so the rows of one model are not "
        "independent measurements of the digits. The digits of each split and half: [data.md](data.md), \"The raw "
        "digits: test against validation\".",
        "",
        *vs_val_section(full.vs_val),
        "## θ on the test set",
        "",
        "From each ST cell's record, every seed run: mean |θ − identity| (`theta_dev`), the fraction of sampling "
        "points outside the input (`outside`); for aff/proj the mean determinant, zoom (√|det|), |rotation| and "
        "shift, and the Pearson r of the recovered rotation with the digit's angle and of the zoom with its "
        "scale (where the data record them); for proj the fraction of clamped perspective divides (`clamped`), "
        "the perspective |h31| + |h32| (the most the divisor w = h31·x + h32·y + 1 departs over the frame from "
        "its 1 at the centre; 0 for an affine map), with its Pearson r with P's largest corner displacement, and "
        "the fraction of images for which it exceeds 1 (`horizon`: the line w = 0 crosses the frame, and the "
        "points beyond it map through infinity to the far side of the input); for tps the mean and "
        "largest control-point offset.",
        "",
        theta_markdown(full.thetas),
        "",
        f"## Cells off the paper by more than a factor {DEVIATION:g}, worse or better",
        "",
        f"Rule: a cell is **worse** when our mean test error is more than {DEVIATION:g}× the paper's, **better** when "
        f"it is less than the paper's / {DEVIATION:g} (the same factor either way). Among the cells trained at the "
        f"paper's budget ({PAPER_STEPS:,} steps); reduced-budget cells are not compared.",
        "",
        *(deviations(df, refs["paper"]) or ["_none_"]),
        "",
        "What we found about them: [analysis.md](analysis.md).",
        "",
        f"## Time per cell ({PAPER_STEPS:,} steps)",
        "",
        "Fit hours per cell, every segment of a resumed run counted, from the records of the cell table below: "
        "one CPU thread per cell, usually beside another cell on the same 2-core machine, evaluation included. "
        "The number where one seed ran, else min–max over the n seeds. A table per machine (the record's "
        "`device`, with its CPU's widest instruction set in brackets where recorded); the precision of each "
        "model is in the cell table. A cell's time also depends on the commit it ran at (the training loop got "
        "faster over the project) and on what shared its machine, so read these as what the cells cost, not as a "
        "benchmark ([benchmarks.md](benchmarks.md) measures speed side by side).",
        "",
        *time_tables(df, grid),
        "## Every cell that was run",
        "",
        "Budget (steps), precision (`model.precision`), fit time (every segment of a resumed run), hardware (in "
        "brackets the CPU's widest vector instruction set, `cpu_flags`, where the record has it: one model name can "
        "cover CPUs with and without native bfloat16; `bf16 on float32 kernels`: a bf16-mixed segment on a CPU without "
        "it, [decisions.md](decisions.md)) and "
        "the commit of each number above, in full: the commit at its start, then (→) any other commit a resumed "
        "run continued at; **dirty**: src/ or conf/ had uncommitted changes at that commit. The full config and "
        "every segment are in `reports/cells/<cell>/provenance.json`.",
        "",
        cell_table(df).to_markdown(index=False) if df.run.any() else "_none yet_",
        "",
    ]
    return "\n".join(lines)


def aggregate(root: Path = REPO) -> pd.DataFrame:
    params = yaml.safe_load((root / "params.yaml").read_text())
    grid = {k: params[k] for k in ("models", "distortions", "seeds", "profile")}
    grid["models"] = paper_order(grid["models"])
    short_grid = {**params["short"], "models": paper_order(params["short"]["models"])}  # dvc.yaml's short@ stages
    reports, data_dir = root / "reports", root / "data" / "distorted"
    paper, seed = reference("paper", root), reference("seed_report", root)
    refs = {"paper": paper["err"], "seed": seed["err"], "sources": f"{paper['source']}; {seed['source']}."}
    steps = {p: OmegaConf.load(root / "conf/trainer" / f"{p}.yaml").max_steps for p in (grid["profile"], "short")}
    table_ckpt = OmegaConf.load(root / "conf/config.yaml").eval.table_ckpt
    df, records = collect(grid, reports)
    short_df, short_records = collect(short_grid, reports / "short")
    plot_curves(grid, df, reports, reports / "figures" / "curves.png", steps[grid["profile"]], records)
    plot_curves(short_grid, short_df, reports / "short", reports / "figures" / "short_curves.png", steps["short"],
                short_records)
    inv = invariance(grid, records, data_dir)
    plot_invariance(grid, inv, reports / "figures" / "invariance.png")
    short_keys = {Cell.parse(k, "short").key: k for k in short_records}  # one figure folder for both budgets
    drawn = draw_learned_transforms({**records, **{key: short_records[k] for key, k in short_keys.items()}}, data_dir,
                                    reports / "figures" / "transforms")
    full = Budget(grid, steps[grid["profile"]], df, inv, theta_table(grid, records, data_dir),
                  [k for k in drawn if k not in short_keys], validation_gap(grid, records, data_dir))
    short = Budget(short_grid, steps["short"], short_df, invariance(short_grid, short_records, data_dir),
                   theta_table(short_grid, short_records, data_dir), [k for k in drawn if k in short_keys])
    write_atomic(reports / "results.csv", pd.concat([df.assign(profile=grid["profile"]),
                                                     short_df.assign(profile="short")]).to_csv(index=False))
    sens = sensitivity.collect(params, reports / "sensitivity", data_dir)
    sensitivity.plot(sens, refs["paper"], row_label, COLORS, wilson, log_error_axis,
                     reports / "figures" / "sensitivity.png", save_figure)
    write_atomic(reports / "results.md", render(full, short, param_counts(grid), refs, table_ckpt, root,
                                                sensitivity_section(sens, df, refs["paper"])))
    write_metric_files(reports / "err", metric_files(df, short_df, grid["models"]))
    write_json(reports / "summary.json", summary(df, short_df))
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = parser.parse_args()
    try:
        if "DVC_STAGE" in os.environ:
            check_dvc_lock(args.root)
        df = aggregate(args.root)
    except (UserError, OSError, KeyError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"aggregate: {int(df.run.sum())} of {len(df)} cells run -> reports/results.md")


if __name__ == "__main__":
    main()
