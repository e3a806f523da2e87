"""The pipeline as a user runs it: `dvc repro` on a tiny grid, then a fresh clone that retrains nothing."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess

import pytest
import yaml
from conftest import synthetic_mnist

from src.runinfo import REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd, *cmd, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def write_idx(directory, synthetic_raw):
    """The four standard IDX files (gzipped) holding the synthetic digits."""
    def images(x):
        return struct.pack(">IIII", 0x803, len(x), 28, 28) + x.numpy().tobytes()

    def labels(y):
        return struct.pack(">II", 0x801, len(y)) + y.to(dtype=__import__("torch").uint8).numpy().tobytes()

    import torch

    tr = {k: torch.cat([synthetic_raw["train"][k], synthetic_raw["val"][k]]) for k in ("images", "labels")}
    files = {"train-images-idx3-ubyte": images(tr["images"][:, 0]), "train-labels-idx1-ubyte": labels(tr["labels"]),
             "t10k-images-idx3-ubyte": images(synthetic_raw["test"]["images"][:, 0]),
             "t10k-labels-idx1-ubyte": labels(synthetic_raw["test"]["labels"])}
    directory.mkdir()
    for name, data in files.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(data))


def test_dvc_repro_end_to_end_and_a_fresh_clone_retrains_nothing(tmp_path):
    synthetic_raw = synthetic_mnist((600, 100, 100))  # a training set larger than one batch of 256
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for f in tracked:
        if (REPO / f).is_file() and not f.startswith(("reports/metrics/", "reports/curves/", "reports/cells/")):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    (repo / "dvc.lock").unlink(missing_ok=True)
    write_idx(tmp_path / "idx", synthetic_raw)
    sizes = [len(synthetic_raw[s]["labels"]) for s in ("train", "val", "test")]
    mnist = (repo / "conf/mnist.yaml").read_text()
    mnist = mnist.replace("source: pypi", f"source: idx:{tmp_path / 'idx'}").replace("sizes: [50000, 10000, 10000]", f"sizes: {sizes}")
    (repo / "conf/mnist.yaml").write_text(mnist)
    (repo / "params.yaml").write_text(yaml.safe_dump(
        {"models": ["fcn", "st_fcn"], "distortions": ["r"], "seeds": [0], "profile": "smoke",
         "short": {"models": ["fcn"], "distortions": ["r"], "seeds": [0], "precision": "32-true"},
         "sensitivity": {"seeds": [0], "models": ["fcn"], "p": ["p_sigma2"], "e": [], "p_data": ["p_sigma2"],
                         "e_data": [], "rts_models": [], "rts": []}}))
    (repo / "conf/trainer/short.yaml").write_text((repo / "conf/trainer/smoke.yaml").read_text())

    sh(repo, "git", "init", "-q")
    assert "train@0-st_fcn-r" in sh(repo, "dvc", "stage", "list", "--name-only").split()
    out = sh(repo, "dvc", "repro")
    assert "Running stage 'train@0-st_fcn-r'" in out and "Running stage 'short@0-fcn-r'" in out
    assert "Running stage 'sens_p@0-fcn-p_sigma2'" in out  # a variant's data, then its cell
    results = (repo / "reports/results.md").read_text()
    assert "| p_sigma2: frame corners, 2 " in results  # the sensitivity section shows the variant's cell
    for label in ("FCN", "ST-FCN Aff"):  # both cells of the grid ran, and show their error
        row = next(line for line in results.splitlines() if line.startswith(f"| {label} "))
        assert row.split("|")[2].strip().startswith("**"), row  # R column: "**err** (1) · paper · …"
    metrics = sh(repo, "dvc", "metrics", "show", "--json")
    assert "reports/err/0-st_fcn.json" in metrics and "failed" not in metrics.lower()
    assert sorted(p.relative_to(repo / "reports/err").as_posix() for p in (repo / "reports/err").rglob("*.json")) == \
        ["0-fcn.json", "0-st_fcn.json", "mean-fcn.json", "mean-st_fcn.json", "short/0-fcn.json"]
    summary = json.loads((repo / "reports/summary.json").read_text())
    assert summary["cells_run"] == 2 and summary["short_run"] == 1
    assert (repo / "reports/figures/transforms/0-st_fcn-r.png").stat().st_size > 1000

    # report code is no dependency of a cell: editing it restales the aggregate only
    report_code = {f: (repo / f).read_text() for f in ("src/report/aggregate.py", "src/report/figures.py", "src/report/records.py")}
    for f, text in report_code.items():
        (repo / f).write_text(text + "# edited\n")
    status = sh(repo, "dvc", "status")
    assert "aggregate" in status and "train@" not in status and "short@" not in status, status
    for f, text in report_code.items():
        (repo / f).write_text(text)

    # a failed rerun of a cell (its data tampered) keeps the committed record
    record = (repo / "reports/metrics/0-fcn-r.json").read_bytes()
    with open(repo / "data/distorted/r/val.pt", "r+b") as fh:
        fh.seek(-100, 2)
        b = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([b[0] ^ 1]))
    r = subprocess.run(["dvc", "repro", "-f", "-s", "train@0-fcn-r"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert (repo / "reports/metrics/0-fcn-r.json").read_bytes() == record
    assert (repo / "reports/cells/0-fcn-r/outcomes.pt").is_file()
    sh(repo, "dvc", "repro", "-f", "-s", "distort@r")  # regenerated bit-identically

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    out = sh(clone, "dvc", "repro")
    assert "Running stage 'distort@r'" in out  # data regenerated (no DVC remote)...
    assert "Running stage 'sens_distort_p@p_sigma2'" in out
    assert not any(f"Running stage '{s}@" in out for s in ("train", "short", "sens_p"))  # ...so no cell retrains
    assert sh(clone, "git", "status", "--porcelain", "--", "dvc.lock").strip() == ""
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=clone, env=ENV, capture_output=True, text=True)
    assert "failed to load" not in (shown.stdout + shown.stderr).lower() and "reports/err/0-st_fcn.json" in shown.stdout
