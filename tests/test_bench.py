"""The speed benchmark runs end to end (one tiny round) and writes every section with real numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from src.runinfo import REPO, native_bf16


@pytest.mark.slow
def test_bench_stn_writes_every_section(tmp_path, synthetic_data):
    out = tmp_path / "benchmarks.md"
    r = subprocess.run(
        [sys.executable, "bench/bench_stn.py", "--device", "cpu", "--rounds", "1", "--calls", "1", "--loop-steps", "3",
         "--distortions", "r", "--out", str(out), "--set", f"paths.raw_file={synthetic_data['raw_file']}",
         "--set", f"paths.data_dir={synthetic_data['data_dir']}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    for section in ("## 1. Transformer", "## 2. Cost of the transformer", "## 3. Training-loop", "## 4. Whole-grid"):
        assert section in md, section
    # every transform and size of section 1 was timed, with a positive ratio
    table = md.split("## 1.")[1].split("## 2.")[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if re.match(r"\| (aff|proj|tps)", line)]
    assert {(r[0], r[1]) for r in rows} == {(t, f"{n}×{n}") for t in ("aff", "proj", "tps", "aff (whole STN)")
                                            for n in (28, 42, 60)}
    assert all(float(r[5]) > 0 for r in rows)  # theirs / ours
    # the projective warp agrees with kornia's to float precision
    assert all(float(r[8]) < 1e-4 for r in rows if r[0] == "proj")


def test_bench_stn_missing_data_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "bench/bench_stn.py", "--rounds", "1", "--calls", "1", "--loop-steps", "2", "--distortions", "r",
         "--out", str(tmp_path / "b.md"), "--set", f"paths.raw_file={tmp_path}/none.pt",
         "--set", f"paths.data_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "none.pt not found" in r.stderr and "dvc repro" in r.stderr, r.stderr  # the data, not a missing package
    assert not (tmp_path / "b.md").exists()


def test_bench_conv_measures_the_path_against_the_peak(tmp_path):
    """One tiny round of the CNN family's benchmark: every column is a real, positive number, the CPU and
    its bf16 support are named, and the FLOP count is the network's (CNN on R: 3.9 GFLOP per step)."""
    out = tmp_path / "conv.md"
    r = subprocess.run([sys.executable, "bench/bench_conv.py", "--models", "cnn", "--distortions", "r", "--rounds", "1",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    assert "Native bfloat16:" in md and "GEMM peak" in md and "NaN fill ÷ as trained" in md
    # a bf16 step is measured against the bf16 peak only where bf16 is native; emulated, against the core's fp32 one
    assert ("bf16 % bf16 peak" if native_bf16() else "bf16 % fp32 peak") in md
    row = next(line for line in md.splitlines() if line.startswith("| R "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "cnn" and 3.8 < float(cells[2]) < 4.0
    assert all(float(c) > 0 for c in cells[3:])


@pytest.mark.skipif(bool(native_bf16()), reason="this CPU has native bfloat16")
def test_bench_conv_compile_without_native_bf16_is_one_line(tmp_path):
    out = tmp_path / "compile.md"
    r = subprocess.run([sys.executable, "bench/bench_conv.py", "--compile", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "native bfloat16" in r.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(), reason="--compile needs native bfloat16")
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile needs a C++ compiler")
def test_bench_conv_compile_races_the_compiled_network(tmp_path):
    """``--compile`` adds the compiled bf16-mixed network beside its eager twin: both real, positive timings."""
    out = tmp_path / "compile.md"
    r = subprocess.run([sys.executable, "bench/bench_conv.py", "--compile", "--models", "cnn", "--distortions", "r",
                        "--rounds", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = out.read_text().splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| distortion")).split("|")[1:-1]]
    row = [c.strip() for c in next(x for x in lines if x.startswith("| R ")).split("|")[1:-1]]
    compiled = dict(zip(header, row))
    assert float(compiled["bf16 compiled (ms)"]) > 0 and float(compiled["compiled × eager bf16"]) > 0
