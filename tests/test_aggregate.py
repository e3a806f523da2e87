"""The pipeline's definition and the aggregate stage on fabricated per-cell records."""

from __future__ import annotations

import json
import shutil
import subprocess

import matplotlib.pyplot
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

import src.report.aggregate
from src.report.aggregate import aggregate
from src.cell import Cell
from src.runinfo import REPO, sha256_file
from src.config import compose_config

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def cell_name(model: str, data: str, seed: int) -> str:
    return Cell(seed, model, data).name


def test_params_name_only_existing_conf_options():
    for grid in (PARAMS, PARAMS["short"]):
        for model in grid["models"]:
            assert (REPO / "conf/model" / f"{model}.yaml").is_file(), model
        for data in grid["distortions"]:
            assert (REPO / "conf/data" / f"{data}.yaml").is_file(), data
    assert (REPO / "conf/trainer" / f"{PARAMS['profile']}.yaml").is_file()
    sens = PARAMS["sensitivity"]
    for model in sens["models"] + sens["rts_models"]:
        assert (REPO / "conf/model" / f"{model}.yaml").is_file(), model
    assert set(PARAMS) == {"models", "distortions", "seeds", "profile", "short", "sensitivity"}  # grids only


def test_dvc_stage_list_is_the_grid_seed_zero_first():
    r = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=REPO, capture_output=True, text=True, check=True)
    stages = r.stdout.split()
    train = [s for s in stages if s.startswith("train@")]
    cells = {f"train@{cell_name(m, d, s)}" for m in PARAMS["models"] for d in PARAMS["distortions"] for s in PARAMS["seeds"]}
    assert set(train) == cells and len(train) == len(cells)
    seeds = [int(s.split("@")[1].split("-")[0]) for s in train]
    assert seeds == sorted(seeds)  # `dvc repro` runs the matrix in this order: every seed-0 cell first
    short = PARAMS["short"]
    assert {s for s in stages if s.startswith("short@")} == {
        f"short@{cell_name(m, d, s)}" for m in short["models"] for d in short["distortions"] for s in short["seeds"]}
    assert {s for s in stages if s.startswith("distort@")} == {f"distort@{d}" for d in PARAMS["distortions"]}
    assert {"prepare", "aggregate"} <= set(stages)
    sens = PARAMS["sensitivity"]  # the sensitivity cells: seed × model × variant, as params.yaml lists them
    assert [s for s in stages if s.startswith("sens_p@")] == [
        f"sens_p@{cell_name(m, v, s)}" for s in sens["seeds"] for m in sens["models"] for v in sens["p"]]
    assert {s for s in stages if s.startswith("sens_rts@")} == {
        f"sens_rts@{cell_name(m, v, s)}" for s in sens["seeds"] for m in sens["rts_models"] for v in sens["rts"]}


N_TEST = 60


def fake_split(root, data: str) -> dict:
    """A test split with the recorded parameters the report bins by."""
    g = torch.Generator().manual_seed(len(data))
    size = 42 if data == "rts" else 28
    split = {"images": (255 * torch.rand(N_TEST, 1, size, size, generator=g)).to(torch.uint8),
             "labels": torch.arange(N_TEST) % 10,
             "params": {"angle": 90 * (2 * torch.rand(N_TEST, generator=g) - 1),
                        "scale": 0.7 + 0.5 * torch.rand(N_TEST, generator=g)}}
    d = root / "data/distorted" / data
    d.mkdir(parents=True, exist_ok=True)
    torch.save(split, d / "test.pt")
    (d / "manifest.json").write_text(json.dumps({"files": {"test.pt": {"sha256": sha256_file(d / "test.pt")}}}))
    return split


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cell(root, model: str, data: str, seed: int, err: float, steps: int = 150_000, reports: str = "reports",
              commits: tuple[str, ...] = (COMMIT,)):
    """A complete record: metrics, provenance with its config and one segment per commit in `commits`, raw
    outcomes with `err` % wrong predictions."""
    key = cell_name(model, data, seed)
    metrics = {"test": {"err": err, "err_last": err, "err_best": err + 0.1, "loss_last": 0.1},
               "val": {"err_last": err - 0.05, "err_best": err - 0.1}, "params": {"n": 118_000, "classifier": 0, "st": 0,
                                                                          "budget": 118_282}, "steps": steps}
    base = root / reports
    (base / "metrics").mkdir(parents=True, exist_ok=True)
    (base / "metrics" / f"{key}.json").write_text(json.dumps(metrics))
    (base / "curves").mkdir(exist_ok=True)
    (base / "curves" / f"{key}.csv").write_text(f"step,train_loss,val_loss,val_err\n1000,1.0,1.0,{err + 5}\n"
                                                f"{steps},0.1,0.1,{err - 0.05}\n")
    cell = base / "cells" / key
    cell.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.to_container(compose_config([f"model={model}", f"data={data}"]), resolve=True)
    (cell / "provenance.json").write_text(json.dumps({"device": "test cpu", "commit": commits[0], "fit_seconds": 3600,
                                                      "segments": [{"commit": c} for c in commits], "config": cfg}))
    labels = torch.arange(N_TEST) % 10
    wrong = torch.arange(N_TEST) < round(err * N_TEST / 100)
    rec = {"pred": torch.where(wrong, (labels + 1) % 10, labels).to(torch.uint8), "test_sha256": "x"}
    if cfg["model"]["transform"]:
        k = {"aff": 6, "proj": 8, "tps": 32}[cfg["model"]["transform"]]
        ident = {"aff": [1, 0, 0, 0, 1, 0], "proj": [1, 0, 0, 0, 1, 0, 0, 0], "tps": [0] * 32}[cfg["model"]["transform"]]
        rec["theta"] = (torch.tensor(ident, dtype=torch.float32) + 0.05 * torch.randn(N_TEST, k)).half()
    torch.save(rec, cell / "outcomes.pt")


def test_aggregate_builds_table_and_figures_from_records_and_ignores_stale(tmp_path, monkeypatch):
    root = tmp_path
    curves = {}  # figure -> cells drawn in it
    plot = src.report.aggregate.plot_curves
    monkeypatch.setattr(src.report.aggregate, "plot_curves", lambda *a: curves.setdefault(a[3].name, plot(*a)))
    shutil.copytree(REPO / "conf", root / "conf")
    grid = {"models": ["fcn", "st_fcn", "st_fcn_tps"], "distortions": ["r", "rts"], "seeds": [0, 1], "profile": "full",
            "short": {"models": ["cnn", "st_cnn"], "distortions": ["r"], "seeds": [0]}}
    (root / "params.yaml").write_text(yaml.safe_dump(grid))
    for d in ("r", "rts"):
        fake_split(root, d)
    fake_cell(root, "fcn", "r", 0, 2.0)
    fake_cell(root, "fcn", "r", 1, 4.0, commits=(COMMIT[::-1] + "-dirty", COMMIT))  # resumed at another commit
    fake_cell(root, "st_fcn", "r", 0, 1.0)
    fake_cell(root, "st_fcn_tps", "r", 0, 5.0)
    (root / "reports/metrics" / f"{cell_name('st_fcn_tps', 'r', 0)}.json").unlink()  # unfinished: no metrics
    fake_cell(root, "fcn", "rts", 0, 20.0, steps=40_000)  # reduced budget: shown, but not compared with the paper
    fake_cell(root, "st_fcn", "rts", 9, 50.0)  # a seed no longer in the grid: stale, must be ignored
    fake_cell(root, "cnn", "r", 0, 60.0)  # a model no longer in the main grid
    fake_cell(root, "st_cnn", "r", 0, 3.5, steps=40_000, reports="reports/short")  # the reduced-budget grid
    (root / "reports/metrics" / f"{cell_name('st_fcn', 'rts', 0)}.json").write_text("{truncated")  # not a result

    (root / "reports/err/short").mkdir(parents=True)
    (root / "reports/err/short/0-cnn.json").write_text("{}")  # a cell no longer committed: its row goes
    df = aggregate(root)

    assert int(df.run.sum()) == 4 and len(df) == 12
    md = (root / "reports/results.md").read_text()
    table = md.split("## Test error %")[1].split("Binomial standard error")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    assert rows["FCN"][0].startswith("**3.00** ± 1.41 (n=2) · 2.1 ·")  # mean ± sample std over the two seeds
    assert rows["ST-FCN Aff"][0].startswith("**1.00** (n=1) · 1.2 ·")
    assert rows["FCN"][1].startswith("**20.00** (n=1)") and rows["ST-FCN Aff"][1].startswith("not run")
    assert "sample standard deviation over seeds (ddof = 1" in md.split("## Test error %")[1].split("|")[0]
    # the binomial SE of one run, from the records' test-set size (60 predictions here, not 10,000)
    se = md.split("Binomial standard error")[1].split("## Reduced budget")[0]
    assert "from the records' predictions: 60 images" in se
    se_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
               for line in se.splitlines() if line.startswith("| ") and not line.startswith("|  ")}
    assert se_rows["FCN"] == ["2.20", "5.16"]  # √(.03 × .97 / 60), √(.2 × .8 / 60)
    assert se_rows["ST-FCN Aff"] == ["1.28", "–"] and se_rows["ST-FCN TPS"] == ["–", "–"]
    assert rows["ST-FCN TPS"][0].startswith("not run")
    assert "CNN" not in rows and "50.00" not in md and "60.00" not in md
    assert "**Reduced budget:** cells trained for 40,000 steps" in md
    short = md.split("## Reduced budget")[1].split("## Parameters")[0]
    assert "| ST-CNN Aff | **3.50** (n=1) · 3.37" in short and "| CNN        | not run · 4.41" in short
    assert "| ST-CNN Aff |" in short.split("Binomial standard error")[1].split("Paired check")[0]  # its own SEs
    short_bins = short.split("**R**")[1].split("θ on the test set")[0]  # by angle, the ST-CNN's 3.5 % spread over bins
    assert [c.strip() for c in short_bins.splitlines()[2].split("|")[3:-1]] == ["ST-CNN Aff (n=1)"]  # the CNN: not run
    assert f"| {cell_name('st_cnn', 'r', 0)} |" in short.split("below):")[-1]  # its θ statistics
    flagged = md.split("## Cells off the paper by more than a factor 1.3, worse or better")[1].split("What we found")[0]
    assert "more than 1.3× the paper's, **better** when it is less than the paper's / 1.3" in flagged  # the rule
    assert "- **worse**: FCN on R: 3.00 % vs the paper's 2.1 % (1.4× the paper's)" in flagged
    assert "ST-FCN" not in flagged and "RTS" not in flagged

    csv = pd.read_csv(root / "reports/results.csv")
    assert set(csv[csv.run].key) == {cell_name(*c) for c in [("fcn", "r", 0), ("fcn", "r", 1), ("st_fcn", "r", 0),
                                                              ("fcn", "rts", 0), ("st_cnn", "r", 0)]}
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary == {"cells_run": 4, "cells_total": 12, "short_run": 1, "short_total": 2}
    err = {p.relative_to(root / "reports/err").as_posix(): json.loads(p.read_text())
           for p in (root / "reports/err").rglob("*.json")}  # the metrics: a row per seed and model, a column per data
    assert err == {"0-fcn.json": {"r": 2.0, "rts": 20.0}, "1-fcn.json": {"r": 4.0}, "0-st_fcn.json": {"r": 1.0},
                   "mean-fcn.json": {"r": 3.0, "rts": 20.0}, "mean-st_fcn.json": {"r": 1.0}, "mean-st_fcn_tps.json": {},
                   "short/0-st_cnn.json": {"r": 3.5}}
    assert curves == {"curves.png": [cell_name("fcn", "r", 0), cell_name("fcn", "r", 1), cell_name("st_fcn", "r", 0),
                                     cell_name("fcn", "rts", 0)],  # every seed
                      "short_curves.png": [cell_name("st_cnn", "r", 0)]}  # each budget from its own records
    for name in ("curves.png", "short_curves.png", "invariance.png", f"transforms/{cell_name('st_fcn', 'r', 0)}.png"):
        assert (root / "reports/figures" / name).stat().st_size > 1000, name
    drawn = sorted(p.stem for p in (root / "reports/figures/transforms").glob("*.png"))
    assert drawn == sorted([cell_name("st_fcn", "r", 0), "short-" + cell_name("st_cnn", "r", 0)])
    figures = md.split("## Figures")[1].split("## Test error by")[0]
    assert cell_name("st_fcn", "r", 0) in figures and "short-" not in figures  # each budget lists its own transforms
    assert f"figures/transforms/short-{cell_name('st_cnn', 'r', 0)}.png" in short
    inv = md.split("## Test error by distortion strength")[1].split("## θ on")[0]
    r_rows = [line.split("|") for line in inv.split("**R**")[1].split("**RTS**")[0].splitlines()
              if line.startswith("| ") and "images" not in line]
    assert len(r_rows) == 1 and int(r_rows[0][2]) == N_TEST  # 60 images: every bin under 100, all merged in one
    head = inv.split("**R**")[1].splitlines()[2]
    assert "FCN (n=2)" in head and "ST-FCN Aff (n=1)" in head and "ST-FCN TPS" not in head  # unfinished: not shown
    # the FCN's two seeds (1 and 2 of the 60 test images wrong) pooled: 3 of 120, with its Wilson interval
    assert r_rows[0][3].strip() == "2.50 [0.85, 7.09]"
    assert "95 % Wilson score interval" in inv and "fewer than 100 test images is merged" in inv
    cells = md.split("## Every cell that was run")[1]
    head, row = [[c.strip() for c in line.split("|")[1:-1]] for line in cells.splitlines()
                 if line.startswith("| cell") or line.startswith(f"| {cell_name('fcn', 'r', 0)} ")]
    assert dict(zip(head, row))["val err % (last)"] == "1.95" and dict(zip(head, row))["best val err %"] == "1.9"
    assert dict(zip(head, row))["commit"] == COMMIT  # in full
    resumed = next(line for line in cells.splitlines() if line.startswith(f"| {cell_name('fcn', 'r', 1)} "))
    assert f"| {COMMIT[::-1]} **dirty** → {COMMIT} |" in resumed  # every segment's commit, the dirty one marked
    assert csv.set_index("key").commit[cell_name("fcn", "r", 1)] == COMMIT[::-1] + "-dirty"
    assert set(csv[csv.run].n_test) == {N_TEST}
    thetas = md.split("## θ on the test set")[1].split("## Cells more")[0]
    assert cell_name("st_fcn", "r", 0) in thetas and "r(rotation, angle)" in thetas
    gap = md.split("## Test against validation")[1].split("## θ on")[0]
    fcn_r = next(line for line in gap.splitlines() if line.startswith("| R ") and "| FCN " in line)
    # seeds 0 and 1: validation 1.95 and 3.95 (err − 0.05), test 2 and 4; 60 test images: no MNIST halves
    assert [c.strip() for c in fcn_r.split("|")[3:-1]] == ["2", "2.95", "3.00", "+0.05", "2.21", "1.02", "–", "–"]


def test_aggregate_with_no_cell_run_yet(tmp_path):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    df = aggregate(tmp_path)
    assert not df.run.any() and len(df) == len(PARAMS["models"]) * len(PARAMS["distortions"]) * len(PARAMS["seeds"])
    md = (tmp_path / "reports/results.md").read_text()
    assert "Cells run: 0 of" in md and "_no ST cell run yet_" in md
    assert "_none run yet_" in md.split("## Reduced budget")[1].split("## Parameters")[0]
    assert (tmp_path / "reports/figures/short_curves.png").is_file()  # a declared out of the stage, also when empty
    assert json.loads((tmp_path / "reports/summary.json").read_text())["cells_run"] == 0
    # a declared out of the stage, also when empty: a row per model, no error yet
    assert sorted(p.name for p in (tmp_path / "reports/err").iterdir()) == sorted(f"mean-{m}.json" for m in PARAMS["models"])
    assert json.loads((tmp_path / "reports/err/mean-fcn.json").read_text()) == {}


def test_dvc_metrics_show_fits_an_80_column_terminal():
    r = subprocess.run(["dvc", "metrics", "show"], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "DVC_NO_ANALYTICS": "1", "COLUMNS": "80"})
    lines = r.stdout.splitlines()
    assert len(lines) > 1 and lines[0].split() == ["Path", "e", "p", "r", "rts", "tc"], r.stdout
    assert max(map(len, lines)) <= 80, r.stdout
    assert "reports/err/mean-fcn.json" in r.stdout and not r.stderr.strip(), r.stderr


def test_an_interrupted_aggregate_keeps_the_committed_report(tmp_path):
    """`persist`: DVC deletes no output of the stage before its command runs (a kill -9 would leave none
    until the next run), and the command replaces each file atomically."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = [next(iter(o.items())) for o in pipeline["stages"]["aggregate"]["outs"]]
    assert outs and all(opts.get("persist") is True and opts.get("cache") is False for _, opts in outs), outs
    assert set(pipeline["metrics"]) <= {path for path, _ in outs}  # the metrics are the stage's own files

    class Killed(Exception):
        pass

    class HalfWritten:  # a figure whose rendering dies after its first bytes
        def savefig(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise Killed

    png = tmp_path / "curves.png"
    png.write_bytes(b"committed")
    with pytest.raises(Killed):
        src.report.aggregate.save_figure(HalfWritten(), png)
    assert png.read_bytes() == b"committed" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_an_edit_of_report_code_restales_no_train_cell(tmp_path):
    """Figure and report code is no dependency of a train stage (dvc.yaml), so editing it keeps every cell."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    train_deps = set(deps["train"]["deps"]) | set(deps["short"]["deps"])
    for report_code in ("src/report/aggregate.py", "src/report/records.py", "src/report/figures.py", "src/report/decide.py"):
        assert report_code not in train_deps and report_code in deps["aggregate"]["deps"] + ["src/report/decide.py"]
    assert not any(d.startswith(("src/aggregate", "src/viz", "src/records")) for d in train_deps)


def test_decision_table_replaces_its_own_block_only(tmp_path, monkeypatch):
    from src.report import decide

    page = tmp_path / "decisions.md"
    page.write_text("# Decisions\n\nprose\n")
    monkeypatch.setattr(decide, "PAGE", page)

    def rows(model, errs):
        return [{"model": model, "data": "r", "steps": 40000, "seed": 0, "momentum": m, "loader.mode": mode,
                 "val err % (last)": e, "val err % (best)": e, "device": "cpu", "commit": "abc"}
                for (m, mode), e in zip([(0.0, "fixed"), (0.0, "fresh"), (0.9, "fixed"), (0.9, "fresh")], errs)]

    decide.write_table(rows("fcn", [7.0, 5.0, 3.0, 2.5]), ["model=fcn"])
    decide.write_table(rows("st_fcn", [4.0, 3.0, 1.0, 2.0]), ["model=st_fcn"])
    decide.write_table(rows("fcn", [7.0, 5.0, 2.0, 2.5]), ["model=fcn"])  # rerun: replaces the fcn block
    text = page.read_text()
    assert text.startswith("# Decisions\n\nprose\n")
    assert text.count("### fcn on R") == 1 and text.count("### st_fcn on R") == 1
    fcn_block = text.split("### fcn on R")[1].split("###")[0]
    assert "momentum 0.9, `loader.mode=fixed`" in fcn_block and "python -m src.report.decide model=fcn" in fcn_block


def test_theta_summary_reads_the_perspective_of_projective_theta():
    from src.report.records import Record, theta_summary

    cfg = OmegaConf.to_container(compose_config(["model=st_fcn_proj", "data=p"]), resolve=True)
    corners = torch.rand(N_TEST, 4, 2) * 8  # the largest corner displacement is what the report bins P by
    moved = corners.norm(dim=-1).amax(-1)
    theta = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]).repeat(N_TEST, 1)
    theta[:, 6], theta[:, 7] = 0.01 * moved, -0.005 * moved  # |h31| + |h32| = 0.015 × displacement
    rec = Record("p", {}, {"config": cfg}, {"pred": torch.zeros(N_TEST, dtype=torch.uint8), "theta": theta.half()})
    out = theta_summary(rec, {"params": {"corners": corners}})
    assert abs(out["perspective"] - 0.015 * float(moved.mean())) < 1e-3
    assert out["r(perspective, corners)"] > 0.999 and out["det"] == 1.0 and out["clamped"] == 0.0
    assert out["horizon"] == 0.0  # |h31| + |h32| ≤ 0.17: w stays positive over the whole frame
    theta[: N_TEST // 4, 6] = 1.5  # a quarter of the images: w = 1.5·x + 1 is zero at x = −2/3
    steep = theta_summary(Record("p", {}, {"config": cfg}, {"pred": rec.outcomes["pred"], "theta": theta.half()}),
                          {"params": {"corners": corners}})
    assert steep["horizon"] == 0.25
    affine = theta_summary(Record("a", {}, {"config": {**cfg, "model": {**cfg["model"], "transform": "aff"}}},
                                  {"pred": rec.outcomes["pred"], "theta": theta[:, :6].half()}), {"params": {}})
    assert "perspective" not in affine


def test_paired_check_reads_the_reference_from_git_and_applies_the_rule(tmp_path):
    """The float32 side comes from the named commit; the verdict follows decisions.md's rule and waits
    for every cell; float32 rows are the reference, not part of the check."""
    from src.report.aggregate import paired_check

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    metrics = tmp_path / "reports/short/metrics"
    metrics.mkdir(parents=True)
    for key, err in (("0-a-r", 1.00), ("0-b-r", 2.00)):
        (metrics / f"{key}.json").write_text(json.dumps({"test": {"err": err}, "val": {"err_last": err}}))
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "fp32"], check=True)
    ref = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    def df(*rows):
        return pd.DataFrame([{"key": k, "run": True, "precision": p, "test_err": e, "val_err_last": e} for k, p, e in rows])

    assert "No cell" in paired_check(df(("0-a-r", "32-true", 1.0), ("0-b-r", "32-true", 2.0)), ref, tmp_path)[0]
    pending = "\n".join(paired_check(df(("0-a-r", "bf16-mixed", 1.05), ("0-b-r", "32-true", 2.0)), ref, tmp_path))
    assert "pending (1 of 2 cells)" in pending
    ok = "\n".join(paired_check(df(("0-a-r", "bf16-mixed", 1.05), ("0-b-r", "bf16-mixed", 2.05)), ref, tmp_path))
    assert "**passes**" in ok and "+0.05" in ok
    # 2 SE at 1 % on 10k images is 0.20: a 0.25 difference fails the cell, and the mean rule too
    bad = "\n".join(paired_check(df(("0-a-r", "bf16-mixed", 1.25), ("0-b-r", "bf16-mixed", 2.0)), ref, tmp_path))
    assert "**fails**" in bad and "False" in bad
    assert "not in this checkout" in paired_check(df(("0-a-r", "bf16-mixed", 1.0)), "0000000", tmp_path)[0]


def test_ours_shows_the_sample_std_from_two_seeds_and_the_mean_alone_for_one():
    from src.report.aggregate import ours

    df = pd.DataFrame([{"model": "fcn", "distortion": d, "run": run, "test_err": e}
                       for d, run, e in [("r", True, 1.0), ("r", True, 2.0), ("r", True, 6.0), ("p", True, 2.0),
                                         ("p", True, 4.0), ("e", True, 3.0), ("e", False, float("nan")),
                                         ("tc", False, float("nan"))]])
    assert ours(df, "fcn", "r") == "**3.00** ± 2.65 (n=3)"  # √7 (ddof=1); the population std would be 2.16
    assert ours(df, "fcn", "p") == "**3.00** ± 1.41 (n=2)"  # the difference / √2, not 1.00
    assert ours(df, "fcn", "e") == "**3.00** (n=1)" and ours(df, "fcn", "tc") == "not run"


def test_binomial_se_of_one_run():
    from src.report.aggregate import binomial_se

    assert abs(binomial_se(2.0, 10_000) - 0.14) < 1e-12  # √(0.02 × 0.98 / 10,000) = 0.0014
    assert abs(binomial_se(50.0, 100) - 5.0) < 1e-12 and binomial_se(0.0, 10_000) == 0.0
    assert binomial_se(1.0, 2_500) == 2 * binomial_se(1.0, 10_000)  # ∝ 1/√n_test


def test_deviations_are_flagged_both_ways_by_the_same_factor():
    from src.report.aggregate import DEVIATION, deviations

    assert DEVIATION == 1.3
    paper = {"fcn": {"r": 2.0, "rts": 2.0, "p": 2.0, "e": 2.0, "tc": 2.0}, "st_fcn": {"r": 2.0, "e": 2.0}}
    df = pd.DataFrame([{"model": m, "distortion": d, "run": True, "test_err": e, "steps": steps}
                       for m, d, e, steps in [
                           ("fcn", "r", 2.7, 150_000),  # 1.35× the paper's: worse
                           ("fcn", "rts", 2.5, 150_000),  # 1.25×: within
                           ("fcn", "p", 1.5, 150_000), ("fcn", "p", 1.5, 150_000),  # the paper's is 1.33× ours: better
                           ("fcn", "e", 1.6, 150_000),  # the paper's is 1.25× ours: within (but 20 % lower)
                           ("fcn", "tc", 0.5, 40_000),  # far better, at a reduced budget: not compared
                           ("st_fcn", "r", 5.0, 150_000), ("st_fcn", "r", 9.0, 40_000),  # its 150k run only: worse
                           ("st_fcn", "e", 1.0, 150_000)]])  # better by 2×
    assert deviations(df, paper) == [
        "- **worse**: FCN on R: 2.70 % vs the paper's 2.0 % (1.4× the paper's) at 150,000 steps",
        "- **worse**: ST-FCN Aff on R: 5.00 % vs the paper's 2.0 % (2.5× the paper's) at 150,000 steps",
        "- **better**: FCN on P: 1.50 % vs the paper's 2.0 % (the paper's is 1.3× ours) at 150,000 steps",
        "- **better**: ST-FCN Aff on E: 1.00 % vs the paper's 2.0 % (the paper's is 2.0× ours) at 150,000 steps"]


def test_commit_cell_names_every_commit_in_full_and_marks_a_dirty_one():
    from src.report.aggregate import commit_cell, segment_commits

    a, b = "a" * 40, "b" * 40
    prov = {"commit": a, "segments": [{"commit": a}, {"commit": b + "-dirty"}, {"commit": b + "-dirty"}]}
    assert segment_commits(prov) == f"{a} → {b}-dirty"  # distinct, in order, the first is the start
    assert commit_cell(segment_commits(prov)) == f"{a} → {b} **dirty**"
    assert commit_cell(a) == a and commit_cell(segment_commits({"commit": a + "-dirty"})) == f"{a} **dirty**"
    assert commit_cell(f"{a}-dirty+0123456789ab") == f"{a} **dirty** +0123456789ab"  # the hash of the difference


def test_time_tables_give_each_machine_its_cells_hours_and_leave_reduced_budgets_out():
    from src.report.aggregate import segment_devices, time_tables

    amd, intel = "AMD EPYC (2 cores, 1 threads)", "Intel Xeon (2 cores, 1 threads)"
    df = pd.DataFrame([{"model": m, "distortion": d, "run": run, "hours": h, "steps": steps, "device": dev}
                       for m, d, run, h, steps, dev in [
                           ("fcn", "r", True, 0.46, 150_000, amd), ("fcn", "r", True, 0.38, 150_000, amd),
                           ("fcn", "r", True, 0.15, 150_000, intel),
                           ("fcn", "p", True, 0.5, 150_000, amd), ("fcn", "p", True, 0.5, 150_000, amd),
                           ("st_fcn", "r", True, 9.0, 40_000, amd),  # a reduced budget: not a cell of this table
                           ("st_fcn", "p", False, float("nan"), float("nan"), float("nan"))]])
    lines = "\n".join(time_tables(df, {"models": ["fcn", "st_fcn"], "distortions": ["r", "p"]}))
    amd_part, intel_part = lines.split(f"**{intel}**")
    assert f"**{amd}**" in amd_part and "0.38–0.46 (n=2)" in amd_part and "0.50 (n=2)" in amd_part
    assert "9.00" not in lines and "0.15" in intel_part and "0.15" not in amd_part
    assert time_tables(df[~df.run], {"models": ["fcn"], "distortions": ["r"]}) == ["_none yet_", ""]
    moved = {"device": "b", "segments": [{"device": "a"}, {"device": "b"}, {"device": "b"}]}
    assert segment_devices(moved) == "a + b" and segment_devices({"device": "a"}) == "a"
    generations = {"segments": [{"device": "a", "cpu_flags": ["avx512_bf16", "avx512f", "avx2"]},
                                {"device": "a", "cpu_flags": ["avx2"]}, {"device": "a", "cpu_flags": []},
                                {"device": "a", "cpu_flags": None}, {"device": "g"}]}  # unknown, and a GPU
    assert segment_devices(generations) == "a [avx512_bf16] + a [avx2] + a [below avx2] + a + g"
    emulated = {"segments": [{"device": "a", "cpu_flags": ["avx512_bf16"]},
                             {"device": "a", "cpu_flags": ["avx2"], "bf16_kernels": "float32"}]}
    assert segment_devices(emulated) == "a [avx512_bf16] + a [avx2; bf16 on float32 kernels]"


def test_wilson_interval_of_known_cases():
    from src.report.aggregate import wilson

    lo, hi = wilson(5, 10)
    assert abs(lo - 23.66) < 0.005 and abs(hi - 76.34) < 0.005  # the textbook 95 % interval of 5 in 10
    assert wilson(0, 10) == (0.0, pytest.approx(100 * 1.96**2 / (10 + 1.96**2), abs=0.01))  # z²/(n + z²): 27.75 %
    lo, hi = wilson([1, 9, 3], [10, 10, 120])  # arrays too; k and n − k mirror each other
    assert lo[0] == pytest.approx(100 - hi[1]) and hi[0] == pytest.approx(100 - lo[1])
    assert (lo[2], hi[2]) == (pytest.approx(0.854, abs=1e-3), pytest.approx(7.093, abs=1e-3))  # 3 in 120: 2.5 %


def sparse_values() -> torch.Tensor:
    """Strengths in 5 equal-width bins of [0, 5] holding 51, 300, 40, 300 and 31 images."""
    return torch.cat([torch.tensor([0.0]), torch.full((50,), 0.5), torch.full((300,), 1.5), torch.full((40,), 2.5),
                      torch.full((300,), 3.5), torch.full((30,), 4.5), torch.tensor([5.0])])


def test_sparse_bins_are_merged_with_a_neighbour():
    from src.report.records import MIN_BIN_IMAGES, binned_error, strength_bins

    assert MIN_BIN_IMAGES == 100
    v = sparse_values()
    bins = [(lo, hi, int(sel.sum())) for lo, hi, sel in strength_bins(v, n_bins=5)]
    # 51 < 100 joins the next (351); 40 joins the next (340); the 31 left at the top joins the one below (371)
    assert bins == [(0.0, 2.0, 351), (2.0, 5.0, 371)]
    assert [n for *_, n in [(0, 0, int(s.sum())) for *_, s in strength_bins(v, n_bins=5, min_images=0)]] == [
        51, 300, 40, 300, 31]  # nothing merged at 0
    assert [int(s.sum()) for *_, s in strength_bins(v[:60], n_bins=5)] == [60]  # fewer images than 100 in all: one bin
    b = binned_error(torch.ones(len(v), dtype=torch.bool), v, n_bins=5)
    assert list(b.n) == [351, 371] and list(b.mid) == [1.0, 3.5] and list(b.err) == [0.0, 0.0]


def test_every_distortion_is_binned_by_a_recorded_strength():
    """E by its largest control-point move, TC by the digit's distance from the canvas centre (its top-left corner
    on a 60-px canvas: (16, 16) centres a 28-px digit); a measure applies to a split that records its parameters."""
    from src.report.records import INVARIANCE, measures

    assert list(INVARIANCE) == ["r", "rts", "p", "e", "tc"]
    e = {"images": torch.zeros(2, 1, 28, 28), "params": {
        "scale": torch.ones(2), "offsets": torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[0.0, 0.5], [-2.0, 0.0]]])}}
    assert INVARIANCE["e"].values(e).tolist() == [5.0, 2.0]
    tc = {"images": torch.zeros(3, 1, 60, 60), "params": {"x": torch.tensor([0, 16, 20]), "y": torch.tensor([0, 19, 16])}}
    assert INVARIANCE["tc"].values(tc).tolist() == pytest.approx([512 ** 0.5, 3.0, 4.0])
    assert set(measures(tc)) == {"position"} and set(measures(e)) == {"scale", "offsets"}
    assert measures({"images": torch.zeros(1, 1, 28, 28)}) == {}


def test_pooled_seeds_sum_wrong_predictions_and_images(tmp_path):
    from src.report.aggregate import invariance
    from src.report.records import binned_error, correct, load_record

    split = fake_split(tmp_path, "r")
    fake_cell(tmp_path, "fcn", "r", 0, 10.0)
    fake_cell(tmp_path, "fcn", "r", 1, 30.0)
    records = {k: load_record(tmp_path / "reports", k) for k in (cell_name("fcn", "r", 0), cell_name("fcn", "r", 1))}
    grid = {"models": ["fcn"], "distortions": ["r"], "seeds": [0, 1]}
    inv = invariance(grid, records, tmp_path / "data/distorted", min_images=0)  # 12 bins of 60 images
    one = [binned_error(correct(r, split), split["params"]["angle"], min_images=0) for r in records.values()]
    assert list(inv.wrong) == list(one[0].wrong + one[1].wrong) and inv.wrong.sum() == 6 + 18
    assert list(inv.n) == list(one[0].n) and inv.n.sum() == N_TEST  # test images, each scored by both seeds
    assert list(inv.trials) == list(2 * inv.n) and set(inv.seeds) == {2}
    assert list(inv.err) == pytest.approx(list(100 * inv.wrong / inv.trials))
    assert (inv.ci_lo <= inv.err).all() and (inv.err <= inv.ci_hi).all()
    merged = invariance(grid, records, tmp_path / "data/distorted")  # the default: under 100 images, one bin
    assert list(merged.n) == [N_TEST] and list(merged.wrong) == [24] and list(merged.trials) == [2 * N_TEST]


def test_lr_drops_follow_the_schedule_rule():
    from src.report.aggregate import lr_drops

    cfg = OmegaConf.to_container(compose_config([]), resolve=True)
    assert lr_drops(cfg) == [50_000, 100_000]  # thirds of 150k (conf/optim/sgd.yaml)
    assert lr_drops({"optim": {"milestones": [120_000, 0.5]}, "trainer": {"max_steps": 150_000}}) == [75_000, 120_000]


def test_plots_draw_every_seed_and_model_from_two_seed_records(tmp_path, monkeypatch):
    from src.report.aggregate import collect, invariance, plot_curves, plot_invariance, theta_table
    from src.report.records import binned_error

    figs = []
    monkeypatch.setattr(src.report.aggregate, "save_figure", lambda fig, path, **kw: figs.append(fig))
    fake_split(tmp_path, "r")
    grid = {"models": ["fcn", "st_fcn", "st_fcn_tps"], "distortions": ["r", "e"], "seeds": [0, 1]}
    for model, seed, err in [("fcn", 0, 10.0), ("fcn", 1, 20.0), ("st_fcn", 0, 5.0), ("st_fcn", 1, 5.0)]:
        fake_cell(tmp_path, model, "r", seed, err)
    df, records = collect(grid, tmp_path / "reports")

    drawn = plot_curves(grid, df, tmp_path / "reports", tmp_path / "curves.png", 150_000, records)
    assert drawn == [cell_name(m, "r", s) for m in ("fcn", "st_fcn") for s in (0, 1)]
    ax = figs[0].axes[0]
    figs[0].canvas.draw()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["FCN (n=2)", "ST-FCN Aff (n=2)", "lr × 0.1"]
    faint = [line for line in ax.get_lines() if line.get_alpha() == 0.3]
    assert len(faint) == 4 and all(len(line.get_xdata()) == 2 for line in faint)  # each seed of each model
    fcn_mean = next(line for line in ax.get_lines() if line.get_label() == "FCN (n=2)")
    assert list(fcn_mean.get_ydata()) == [20.0, 14.95]  # the seeds' mean at each step: (15 + 25) / 2, …
    drops = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert drops == [50_000, 100_000]  # the learning-rate drops of the records' schedule
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(ticks) <= 6 and all(t == "0" or t.endswith("k") for t in ticks) and "50k" in ticks
    assert figs[0].axes[1].get_legend() is None  # E: nothing run

    # the θ table: a row for every seed of every ST cell, in seed order
    assert list(theta_table(grid, records, tmp_path / "data/distorted").cell) == \
        [cell_name("st_fcn", "r", 0), cell_name("st_fcn", "r", 1)]

    inv = invariance(grid, records, tmp_path / "data/distorted", min_images=0)
    plot_invariance(grid, inv, tmp_path / "invariance.png")
    ax = figs[1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FCN (n=2)", "ST-FCN Aff (n=2)"]
    assert len(ax.containers) == 2  # an error-bar set per model

    # a sparse top bin, every image wrong, is merged before it is drawn: it does not set the scale
    v = sparse_values()
    ok = (torch.arange(len(v)) % 50 != 0) & (v < 4)  # 2 % wrong, and the 31 images of the top bin all wrong
    b = binned_error(torch.stack([ok, ok]), v, n_bins=5)
    assert list(b.n) == [351, 371] and b.err.max() < 15
    sparse = binned_error(torch.stack([ok, ok]), v, n_bins=5, min_images=0)
    assert sparse.err.max() == 100.0  # what an unmerged figure would have to show
    lo, hi = src.report.aggregate.wilson(b.wrong, b.trials)
    plot_invariance({"models": ["fcn"], "distortions": ["r"]},
                    b.assign(data="r", model="fcn", seeds=2, ci_lo=lo, ci_hi=hi), tmp_path / "sparse.png")
    assert figs[2].axes[0].get_ylim()[1] < 20
    for fig in figs:
        matplotlib.pyplot.close(fig)


def test_the_test_halves_average_to_the_test_error():
    from src.report.aggregate import half_errors

    ok = torch.ones(10_000, dtype=torch.bool)
    ok[torch.arange(0, 5_000, 20)] = False  # 250 wrong in the first 5,000: 5 %
    ok[torch.arange(5_000, 10_000, 100)] = False  # 50 in the last: 1 %
    first, last = half_errors(ok)
    assert (first, last) == pytest.approx((5.0, 1.0)) and (first + last) / 2 == pytest.approx(100 * (~ok).double().mean().item())
    assert half_errors(ok[:60]) is None  # not MNIST's test set: no halves


def test_validation_gap_pairs_each_cell_with_its_validation_error_and_splits_the_test_set(tmp_path, monkeypatch):
    import src.report.data_stats
    from src.report.aggregate import binomial_se, validation_gap, vs_val_section
    from src.report.records import load_record

    fake_split(tmp_path, "r")
    fake_cell(tmp_path, "fcn", "r", 0, 10.0)  # 6 of 60 wrong, the first six images
    fake_cell(tmp_path, "fcn", "r", 1, 30.0)  # 18 wrong, the first eighteen
    records = {k: load_record(tmp_path / "reports", k) for k in (cell_name("fcn", "r", 0), cell_name("fcn", "r", 1))}
    grid = {"models": ["st_fcn", "fcn"], "distortions": ["rts", "r"], "seeds": [0, 1]}
    monkeypatch.setattr(src.report.data_stats, "TEST_HALF", N_TEST // 2)  # as if these 60 images were MNIST's test set
    t = validation_gap(grid, records, tmp_path / "data/distorted")
    assert len(t) == 1 and t.iloc[0][["data", "model", "seeds"]].tolist() == ["r", "fcn", 2]  # only cells run
    row = t.iloc[0]
    assert (row.val, row.test, row["diff"]) == pytest.approx((19.95, 20.0, 0.05))  # fake val err: err − 0.05
    assert (row["first"], row["last"]) == pytest.approx((40.0, 0.0))  # (6 + 18) / 2 of 30, then none of 30
    assert (row["first"] + row["last"]) / 2 == pytest.approx(row.test)
    assert row.se == pytest.approx((binomial_se(20.0, N_TEST) ** 2 + binomial_se(19.95, 10_000) ** 2) ** 0.5)
    assert row.ratio == pytest.approx(20 / 19.95)
    line = next(x for x in vs_val_section(t)[0].splitlines() if x.startswith("| R "))
    assert [c.strip() for c in line.split("|")[1:-1]] == ["R", "FCN", "2", "19.95", "20.00", "+0.05", "5.18", "1.00",
                                                          "40.00", "0.00"]
    assert vs_val_section(None) == ["_no cell run yet_", ""]
