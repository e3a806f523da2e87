"""The GPU window rehearsed on the CPU: cells stopped by the wall-clock limit (real SIGTERM), packed, unpacked
on another "machine" (another directory), resumed and finished give the records of an uninterrupted window;
a stop at a validation step is exact too; the plan, the stage command, the submitit launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
import pytorch_lightning as pl
import torch

from src.runinfo import REPO
from src.config import compose_config
from src.cell import Cell
from src.ops.window import cell_args, main as window_main, rebase_checkpoint

CELLS = "0-fcn-r,1-fcn-r"
STEPS = 800


def window(root, *args: str, data=None, timeout: int = 300) -> subprocess.CompletedProcess:
    sets = []
    if data:
        sets = ["--set", f"paths.data_dir={data['data_dir']}", "--set", f"paths.raw_file={data['raw_file']}",
                "--set", f"trainer.max_steps={STEPS}", "--set", "trainer.val_check_interval=50",
                "--set", "trainer.limit_val_batches=null", "--set", "loader.eval_batch_size=100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "src.ops.window", "--root", str(root), *args, *sets], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def cpu_window(root, data, minutes: float) -> dict:
    r = window(root, "--device", "cpu", "--profile", "smoke", "--cells", CELLS, "--jobs", "2", "--threads", "1",
               "--minutes", f"{minutes:.4f}", "--out", str(root / "pack"), data=data)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((root / "pack" / "summary.json").read_text())


def record(root, cell: str) -> tuple:
    return (json.loads((root / "reports" / "metrics" / f"{cell}.json").read_text()),
            (root / "reports" / "curves" / f"{cell}.csv").read_bytes(),
            (root / "reports" / "cells" / cell / "outcomes.pt").read_bytes())


@pytest.fixture(scope="module")
def straight(synthetic_data, tmp_path_factory):
    """Two smoke cells at once, uninterrupted: the reference records and the time their training took."""
    root = tmp_path_factory.mktemp("straight")
    summary = cpu_window(root, synthetic_data, 5)
    return root, summary


def test_window_stopped_at_its_limit_resumes_elsewhere_to_the_same_records(straight, synthetic_data, tmp_path):
    ref, ref_summary = straight
    assert [c["status"] for c in ref_summary["cells"]] == ["finished", "finished"], ref_summary
    # stop halfway through the training part of the reference's time (after start-up, before the test)
    fit = max(json.loads((ref / "reports" / "cells" / c / "provenance.json").read_text())["fit_seconds"]
              for c in CELLS.split(","))
    limit = max(c["seconds"] for c in ref_summary["cells"]) - fit / 2 - 2
    for attempt in range(3):  # a busy machine can shift the start-up: move the limit and try again
        first, second = tmp_path / f"first{attempt}", tmp_path / "second"
        s1 = cpu_window(first, synthetic_data, limit / 60)
        if all(c["status"] == "stopped" and c["step"] for c in s1["cells"]):
            break
        limit += -fit / 3 if any(c["status"] == "finished" for c in s1["cells"]) else fit / 3
    for c in s1["cells"]:
        assert c["status"] == "stopped" and 0 < c["step"] < STEPS and c["packed"], s1
    assert not (first / "pack" / "records.tar.gz").exists() and (first / "pack" / "runs.tar.gz").is_file()
    # another machine: the packed runs unpacked under another path, then the same window again
    r = window(second, "--unpack", str(first / "pack"))
    assert r.returncode == 0 and "dvc commit" not in r.stdout, r.stdout + r.stderr
    for ckpt in second.glob("runs/*/*/checkpoints/*.ckpt"):
        state = next(v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
                     if k.startswith("ModelCheckpoint"))
        assert state["dirpath"] == os.path.realpath(ckpt.parent) and state["best_model_path"].startswith(state["dirpath"])
    s2 = cpu_window(second, synthetic_data, 5)
    for c, c1 in zip(s2["cells"], s1["cells"]):
        assert c["status"] == "finished" and c["from_step"] == c1["step"], s2
    for cell in CELLS.split(","):
        assert record(second, cell) == record(ref, cell), cell
        prov = json.loads((second / "reports" / "cells" / cell / "provenance.json").read_text())
        assert prov["resumed"] and prov["config"]["trainer"]["tf32"] is False


def test_window_records_unpack_into_place_with_their_dvc_commands(straight, tmp_path, synthetic_data):
    ref, _ = straight
    with tarfile.open(ref / "pack" / "records.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"reports/{k}/{c}{e}" for c in CELLS.split(",") for k, e in
                           (("metrics", ".json"), ("curves", ".csv"), ("cells", "/outcomes.pt"), ("cells", "/provenance.json")))
    dest = tmp_path / "here"
    data_dir = synthetic_data["data_dir"]
    r = window(dest, "--unpack", str(ref / "pack"), "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("dvc")] == [f"dvc commit -f train@{c}" for c in CELLS.split(",")]
    for cell in CELLS.split(","):
        assert record(dest, cell) == record(ref, cell)
    # records of other test data are refused, one line each
    other = tmp_path / "other"
    (other / "r").mkdir(parents=True)
    manifest = json.loads((data_dir / "r" / "manifest.json").read_text())
    manifest["files"]["test.pt"]["sha256"] = "0" * 64
    (other / "r" / "manifest.json").write_text(json.dumps(manifest))
    r = window(tmp_path / "there", "--unpack", str(ref / "pack"), "--data-dir", str(other))
    assert r.returncode == 1 and "dvc commit" not in r.stdout
    assert all(ln.startswith("error: not unpacking the record of") for ln in r.stderr.strip().splitlines()), r.stderr
    assert not (tmp_path / "there" / "reports" / "metrics").exists()


class _Term(pl.Callback):
    """SIGTERM in the batch that ends at step 20 (a validation step), or during that validation."""

    def __init__(self, when: str):
        self.when, self.sent = when, False

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, *args):
        if self.when == "before" and trainer.global_step == 19:
            self._send()

    def on_validation_batch_start(self, trainer, *args):
        if self.when == "during" and trainer.global_step == 20:
            self._send()


@pytest.mark.parametrize("when", ["before", "during"])
def test_window_stop_at_a_validation_step_resumes_exactly(synthetic_data, tmp_path, when):
    """The window's SIGTERM lands anywhere; at a validation step a checkpoint before the validation, or
    Lightning's own handler aborting it half-way, would lose that validation on resume."""
    from src.run.callbacks import Stopped
    from src.train import train

    def cfg(tag):
        return compose_config(["model=fcn", "trainer=smoke", "quiet=true", "trainer.max_steps=40",
                               "loader.eval_batch_size=100", "trainer.limit_val_batches=null",
                               f"paths.data_dir={synthetic_data['data_dir']}", f"paths.raw_file={synthetic_data['raw_file']}",
                               f"paths.run_dir={tmp_path / tag}", f"paths.metrics_file={tmp_path / tag}.json",
                               f"paths.curve_file={tmp_path / tag}.csv", f"paths.cell_dir={tmp_path / tag / 'cell'}"])

    straight = train(cfg("a"))
    with pytest.raises(Stopped, match="at step 20;"):
        train(cfg("b"), extra_callbacks=(_Term(when),))
    assert train(cfg("b")) == straight
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a" / "cell" / "outcomes.pt").read_bytes() == (tmp_path / "b" / "cell" / "outcomes.pt").read_bytes()


def test_window_runs_the_dvc_train_stage_command():
    from dvc.repo import Repo

    stage = next(s for s in Repo(str(REPO)).stage.collect("train@0-st_cnn-rts"))
    ours = cell_args(Cell(0, "st_cnn", "rts"), "full", cuda=True, sets=[])
    assert ["python", "-m", "src.train", *ours[:-2]] == stage.cmd.split()
    assert ours[-2:] == ["trainer.accelerator=gpu", "trainer.tf32=true"]
    cfg = compose_config(ours)
    assert cfg.trainer.tf32 is True and cfg.paths.run_dir == "runs/0-st_cnn-rts"


def test_window_plan_puts_the_cheapest_cells_first(tmp_path, capsys):
    bench = {"per_cell": [{"model": "cnn", "distortion": "TC", "s / step": 0.004},
                          {"model": "st_cnn", "distortion": "R", "s / step": 0.002},
                          {"model": "cnn", "distortion": "R", "s / step": 0.001}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "0-cnn-p.json").write_text("{}")  # finished: not planned again
    window_main(["--root", str(tmp_path), "--device", "cpu", "--plan", "bench.json", "--minutes", "5.5", "--jobs", "1",
                 "--contention", "1", "--cells", "0-cnn-tc,0-st_cnn-r,0-cnn-r,0-cnn-e,0-cnn-p", "--out", str(tmp_path)])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["cells"] == ["0-cnn-r", "0-st_cnn-r", "0-cnn-tc", "0-cnn-e"]  # measured by cost, then the unmeasured
    rows = {r["cell"]: r for r in plan["rows"]}
    assert rows["0-cnn-r"]["minutes"] == pytest.approx(150_000 * 0.001 / 60) and rows["0-cnn-r"]["fits"]
    assert not rows["0-st_cnn-r"]["fits"] and rows["0-st_cnn-r"]["starts_at"] == pytest.approx(2.5)
    assert rows["0-cnn-tc"]["starts_at"] is None and rows["0-cnn-e"]["minutes"] is None
    assert "0-cnn-r" in capsys.readouterr().out


def test_window_rebase_leaves_a_checkpoint_in_place_alone(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    here = os.path.realpath(ckpt.parent)
    torch.save({"callbacks": {"ModelCheckpoint{}": {"dirpath": here, "best_model_path": here + "/best.ckpt"}}}, ckpt)
    assert not rebase_checkpoint(ckpt)
    torch.save({"callbacks": {"ModelCheckpoint{}": {"dirpath": "/elsewhere/c", "best_model_path": "/elsewhere/c/best.ckpt",
                                                    "best_k_models": {"/elsewhere/c/best.ckpt": 1.0}}}}, ckpt)
    assert rebase_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]["ModelCheckpoint{}"]
    assert state == {"dirpath": here, "best_model_path": here + "/best.ckpt", "best_k_models": {here + "/best.ckpt": 1.0}}


@pytest.mark.parametrize("args, says", [
    (["--device", "cpu", "--cells", "0-mlp-r"], "cell '0-mlp-r' is not <seed>-<model>-<data>"),
    (["--device", "cpu", "--cells", "0-fcn-r", "--set", "optim.lrr=1"], "optim.lrr"),
    (["--device", "cpu", "--cells", "0-fcn-r", "--profile", "huge"], "unknown profile 'huge'"),
    (["--device", "cpu", "--cells", "@nope.json"], "is not a plan"),
    (["--unpack", "nowhere"], "holds no packed window"),
])
def test_window_bad_input_is_one_line(tmp_path, args, says):
    r = window(tmp_path, *args, timeout=120)
    assert r.returncode != 0 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has it")
def test_window_cuda_without_a_gpu_is_one_line(tmp_path):
    r = window(tmp_path, "--device", "cuda", "--cells", "0-fcn-r", timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: --device cuda but torch sees no CUDA device; use --device cpu to rehearse"


def test_window_scale_out_submitit_local_runs_each_cell_as_a_job(synthetic_data, tmp_path):
    """`-m hydra/launcher=submitit_local`: one job per cell, each writing its record; Hydra's sweep dir as configured."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hydra/launcher=submitit_local", "model=fcn", "data=r", "seed=0,1",
         "trainer=smoke", "quiet=true", f"paths.data_dir={synthetic_data['data_dir']}",
         f"paths.raw_file={synthetic_data['raw_file']}", f"paths.run_dir={tmp_path}/runs/${{seed}}-${{model.name}}-${{data.name}}",
         f"hydra.sweep.dir={tmp_path}/multirun", "hydra.launcher.timeout_min=5"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "runs" / f"{seed}-fcn-r" / "metrics.json").read_text())
        assert metrics["steps"] == 20
        assert (tmp_path / "multirun" / str(seed) / ".hydra" / "overrides.yaml").is_file()
    jobs = [p for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()]  # job ids (pids)
    assert len(jobs) == 2 and all(list(j.glob("*_result.pkl")) for j in jobs)  # two separate submitit jobs


def test_window_packs_runs_in_chunks_within_the_return_limits(tmp_path, monkeypatch):
    """Cells are never split; a chunk stays under RUN_CHUNK_BYTES, the chunks under their count and total."""
    from src.ops import window as w

    monkeypatch.setattr(w, "RUN_CHUNK_BYTES", 3000)
    monkeypatch.setattr(w, "RUN_TOTAL_BYTES", 7000)
    monkeypatch.setattr(w, "MAX_RUN_CHUNKS", 3)
    root, unfinished = tmp_path / "root", []
    for name, size in [("a", 1000), ("b", 1000), ("c", 1500), ("big", 4000), ("d", 2500), ("e", 1000), ("f", 900)]:
        ckpt = root / "runs" / name / "0123456789ab" / "checkpoints"
        ckpt.mkdir(parents=True)
        for f in ("last.ckpt", "best.ckpt"):
            (ckpt / f).write_bytes(os.urandom(size // 2))
        unfinished.append((name, ckpt))
    (root / "runs" / "g" / "0123456789ab").mkdir(parents=True)  # stopped before its first checkpoint
    unfinished.append(("g", root / "runs" / "g" / "0123456789ab" / "checkpoints"))
    out = tmp_path / "out"
    packed, left = w.pack_runs(out, root, unfinished)
    assert packed == ["a", "b", "c", "d"] and left == ["big", "e", "f"]  # e, f: no fourth chunk
    members = {}
    for t in sorted(out.iterdir()):
        with tarfile.open(t) as tar:
            members[t.name] = sorted({m.name.split("/")[1] for m in tar.getmembers()})
    assert members == {"runs.tar.gz": ["a", "b"], "runs-2.tar.gz": ["c"], "runs-3.tar.gz": ["d"]}


def test_window_copy_without_git_history_records_the_commit_it_was_given(tmp_path, monkeypatch):
    from src import runinfo

    monkeypatch.setattr(runinfo, "REPO", tmp_path)  # no .git here
    monkeypatch.delenv("STN_COMMIT", raising=False)
    assert runinfo.git_commit() == "unknown"
    monkeypatch.setenv("STN_COMMIT", "0123abcd")
    assert runinfo.git_commit() == "0123abcd"


def test_window_prepare_fills_what_the_next_window_carries(tmp_path, synthetic_data):
    """.window/: the raw digits (gzipped, identical), the data manifests, this commit, unfinished runs only."""
    import gzip
    import shutil

    from src.ops.window import command_checkpoints

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for f in synthetic_data["raw_file"].parent.iterdir():
        shutil.copy(f, raw / f.name)
    (tmp_path / "data" / "distorted" / "r").mkdir(parents=True)
    shutil.copy(synthetic_data["data_dir"] / "r" / "manifest.json", tmp_path / "data" / "distorted" / "r")
    for name, model in (("0-cnn-r", "cnn"), ("0-st_cnn-r", "st_cnn")):  # both stopped on CUDA; st_cnn has finished
        ckpt = command_checkpoints(cell_args(Cell(0, model, "r"), "full", cuda=True, sets=[]), tmp_path)
        ckpt.mkdir(parents=True)
        (ckpt / "last.ckpt").write_bytes(b"x" * 10)
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "0-st_cnn-r.json").write_text("{}")
    window_main(["--root", str(tmp_path), "--prepare", "--force", "--cells", "0-cnn-r,0-st_cnn-r"])
    dest = tmp_path / ".window"
    assert gzip.decompress((dest / "mnist.pt.gz").read_bytes()) == (raw / "mnist.pt").read_bytes()
    assert (dest / "mnist.pt.sha256").read_bytes() == (raw / "mnist.pt.sha256").read_bytes()
    assert sorted(p.name for p in (dest / "manifests").iterdir()) == ["r.json"]
    assert (dest / "commit").read_text().strip()
    with tarfile.open(dest / "runs.tar.gz") as tar:
        assert {m.name.split("/")[1] for m in tar.getmembers()} == {"0-cnn-r"}
