"""The sensitivity study in the report: how Table 1's P, E and RTS cells move with the recipe numbers that no
source pins down (params.yaml ``sensitivity``, dvc.yaml's ``sens_*`` stages: 40k steps, seed 0).

A variant is ``conf/experiment/sensitivity/<name>.yaml``: config overrides of the main recipe and a
``sensitivity`` block (its family, the line it lies on and its x) that names the cell and places it in the
table and the figure; the main recipes are variants too, so every point is measured on one footing. Its
records live under ``reports/sensitivity/`` and never enter Table 1. A record is refused (one line) unless
its data config is the variant's and its test set is the one the variant's data directory holds now.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import yaml
from omegaconf import OmegaConf

from src.cell import Cell
from src.report.records import segment_commits
from src.report.records import load_record
from src.runinfo import REPO, UserError
from src.config import compose_config

# family → the params.yaml ``sensitivity`` key of its models and its x axis label (conf/report/sensitivity.yaml)
FAMILIES = yaml.safe_load((REPO / "conf/report/sensitivity.yaml").read_text(encoding="utf-8"))
COLUMNS = ["family", "line", "x", "variant", "main", "model", "key", "run", "test_err", "val_err", "wrong", "n_test",
           "steps", "precision", "hours", "device", "commits"]


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # the distortion of Table 1 it varies: p, e or rts
    line: str  # the curve it lies on in the figure (e.g. "frame corners")
    x: float
    data: dict  # its data config, as its runs must have recorded it
    held_out_val: bool  # false when the validation digits are trained on (its validation error measures nothing)

    @property
    def main(self) -> bool:
        return self.name == self.family


def variant(name: str) -> Variant:
    """A variant as Hydra composes it (``+experiment=sensitivity/<name>``)."""
    cfg = compose_config([f"+experiment=sensitivity/{name}"])
    s = cfg.sensitivity
    if s.variant != name:
        raise UserError(f"conf/experiment/sensitivity/{name}.yaml names itself {s.variant!r}")
    return Variant(name, str(s.family).lower(), str(s.line), float(s.x), OmegaConf.to_container(cfg.data, resolve=True),
                   OmegaConf.select(cfg, "loader.train_digits", default="train") == "train")


def grid(params: dict) -> list[tuple[Variant, str, int]]:
    """Every cell of the study: (variant, model, seed), in params.yaml's order."""
    s = params.get("sensitivity") or {}
    variants = {v: variant(v) for family in FAMILIES for v in s.get(family, [])}  # composed once each
    return [(variants[v], model, seed) for family, f in FAMILIES.items() for v in s.get(family, [])
            for model in s.get(f["models"], []) for seed in s.get("seeds", [])]


def check_record(rec, v: Variant, data_dir: Path) -> None:
    """Refuse a record made on other data than the variant's: its recorded data config and its test set."""
    recorded = rec.provenance["config"].get("data")
    if recorded != v.data:
        diff = sorted(k for k in set(recorded or {}) | set(v.data) if (recorded or {}).get(k) != v.data.get(k))
        raise UserError(f"reports/sensitivity/{rec.key}: made on other data than variant {v.name} "
                        f"(data.{', data.'.join(diff)} differ); retrain it: dvc repro -f -s sens_{v.family}@{rec.key}")
    manifest = data_dir / v.data["name"] / "manifest.json"
    try:
        want = json.loads(manifest.read_text())["files"]["test.pt"]["sha256"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{manifest} is missing; run `dvc repro` for variant {v.name}'s data") from None
    if rec.outcomes.get("test_sha256") != want:
        raise UserError(f"reports/sensitivity/{rec.key}: tested on another test set than {manifest} holds; "
                        f"retrain it: dvc repro -f -s sens_{v.family}@{rec.key}")


def collect(params: dict, reports: Path, data_dir: Path) -> pd.DataFrame:
    """One row per cell of the study: its numbers where its record is complete (and checked), else not run."""
    rows = []
    for v, model, seed in grid(params):
        key = Cell(seed, model, v.name, "sensitivity").name
        row = {"family": v.family, "line": v.line, "x": v.x, "variant": v.name, "main": v.main, "model": model,
               "key": key, "run": False}
        rec = load_record(reports, key)
        if rec is not None:
            check_record(rec, v, data_dir)
            m, p = rec.metrics, rec.provenance
            n_test = len(rec.outcomes["pred"])
            row.update(run=True, test_err=m["test"]["err"], val_err=m["val"]["err_last"] if v.held_out_val else math.nan,
                       wrong=round(m["test"]["err"] * n_test / 100), n_test=n_test, steps=m["steps"],
                       precision=rec.precision, hours=round(p.get("fit_seconds", math.nan) / 3600, 2),
                       device=p.get("device", "?"), commits=segment_commits(p))
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def projection(df: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """Each variant cell × (its model's full-budget mean on the main recipe / its 40k main-recipe cell): a
    projection to the paper's budget, on the assumption that a variant gains what the main recipe gains."""
    full = table[table.run].groupby(["model", "distortion"]).test_err.mean()
    main = df[df.main & df.run].set_index(["model", "family"]).test_err
    ratio = {k: full[k] / main[k] for k in main.index if k in full.index}
    return df.apply(lambda r: r.test_err * ratio[(r.model, r.family)] if r.run and (r.model, r.family) in ratio
                    else math.nan, axis=1)


def tables(df: pd.DataFrame, table: pd.DataFrame, paper: dict, row_label, se) -> list[str]:
    """A table per family: a row per variant, a column per model, each cell 'test ± 2 SE (val …)', then the
    paper's number, our full-budget mean on the main recipe and each variant projected to it."""
    out = []
    df = df.assign(projected=projection(df, table))
    for family, g in df.groupby("family", sort=False):
        models = list(dict.fromkeys(g.model))

        def cell(r) -> str:
            if not r.run:
                return "not run"
            val = "–" if math.isnan(r.val_err) else f"{r.val_err:.2f}"
            return f"{r.test_err:.2f} ± {2 * se(r.test_err, r.n_test):.2f} (val {val})"

        rows = {}
        for name, v in g.groupby("variant", sort=False):
            label = f"{v.line.iloc[0]}, {v.x.iloc[0]:g}" + (" **(main)**" if v.main.iloc[0] else "")
            rows[f"{name}: {label}"] = {row_label(m): cell(v[v.model == m].iloc[0]) for m in models}
        full = table[table.run & (table.distortion == family)].groupby("model").test_err
        rows["paper (150k steps)"] = {row_label(m): f"{paper.get(m, {}).get(family, math.nan):.1f}" for m in models}
        rows["ours, main recipe, 150k steps"] = {
            row_label(m): (f"{full.mean()[m]:.2f} (n={full.count()[m]})" if m in full.count() else "not run")
            for m in models}
        proj = {f"{name} projected to 150k": {row_label(m): ("–" if math.isnan(p) else f"{p:.2f}")
                                             for m, p in zip(v.model, v.projected)}
                for name, v in g.groupby("variant", sort=False) if not v.main.iloc[0]}
        out += [f"**{family.upper()}** ({FAMILIES[family]['x_label']}):", "",
                pd.DataFrame({**rows, **proj}).T.to_markdown(disable_numparse=True), ""]
    return out


def plot(df: pd.DataFrame, paper: dict, row_label, colors: dict, wilson, log_axis, path: Path, save) -> None:
    """Test error against the variant's x, a panel per family, a colour per model and a marker per line; the
    95 % Wilson interval of each test error, validation error beside it (hollow), the paper's number as a
    dashed line, the main recipe ringed."""
    families = list(dict.fromkeys(df.family)) or ["none"]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(4.6 * max(len(families), 1), 4.2), squeeze=False)
    markers = "osD^v<>"
    for ax, family in zip(axes[0], families):
        g = df[df.family == family]
        if not g.run.any():
            ax.text(0.5, 0.5, "no cell run yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        lines = list(dict.fromkeys(g.line))
        models = list(dict.fromkeys(g.model))
        for mi, model in enumerate(models):
            c = colors.get(model, "k")
            shift = (mi - (len(models) - 1) / 2) * 0.04 * (g.x.max() - g.x.min() or 1)
            for li, line in enumerate(lines):
                r = g[(g.model == model) & (g.line == line) & g.run].sort_values("x")
                if r.empty:
                    continue
                lo, hi = wilson(r.wrong, r.n_test)
                x = r.x + shift
                ax.errorbar(x, r.test_err, yerr=[r.test_err - lo, hi - r.test_err], color=c, marker=markers[li % 7],
                            ms=5, lw=1, capsize=2, label=f"{row_label(model)}, {line}")
                ax.plot(x + shift / 2, r.val_err, ls="none", marker=markers[li % 7], mfc="none", mec=c, ms=5, alpha=0.7)
                main = r[r.main]
                ax.plot(main.x + shift, main.test_err, ls="none", marker="o", ms=12, mfc="none", mec="k", lw=0.8)
            ref = paper.get(model, {}).get(family)
            if ref is not None:
                ax.axhline(ref, color=c, ls="--", lw=0.8)
        log_axis(ax)
        ax.set_xticks(sorted(set(g.x)))
        ax.set_title(f"{family.upper()}: 40k steps, seed 0", fontsize=10)
        ax.set_xlabel(FAMILIES[family]["x_label"])
        ax.set_ylabel("test error % (hollow: validation)")
        ax.legend(fontsize=6.5, loc="upper left", frameon=False)
    fig.suptitle("Sensitivity to the recipe: dashed = the paper (150k steps), ringed = our main recipe", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)
