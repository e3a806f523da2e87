"""A signal to the dvc process alone ends the cell it runs: checkpoint, hint, no orphan, lock free, exact resume.

dvc runs the stage's command through $SHELL: bash execs it (dvc is the trainer's parent), dash stays
between them (dvc is the grandparent); both are signalled here."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from src.runinfo import REPO

pytestmark = [pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux only")]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def wait_for(what, timeout: float = 120):
    end = time.time() + timeout
    while time.time() < end:
        if out := what():
            return out
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what.__doc__}")


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def project(tmp_path, synthetic_data):
    """A DVC project (no git: a cell starts from any tree) with one cell that trains until it is stopped."""
    proj = tmp_path / "proj"
    for d in ("src", "conf"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = (f"python -m src.train model=fcn data=r seed=0 trainer=smoke trainer.max_steps=1000000 "
           f"trainer.val_check_interval=50 loader.batch_size=16 quiet=true paths.data_dir={synthetic_data['data_dir']} "
           f"paths.raw_file={synthetic_data['raw_file']} paths.run_dir=runs/cell paths.metrics_file=out/metrics.json "
           f"paths.curve_file=out/curve.csv paths.cell_dir=out/cell")
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"cell": {"cmd": cmd}}}))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, env=ENV, check=True)
    return proj


def stop_dvc_mid_run(proj, shell: str, after: str) -> tuple[int, str]:
    """`dvc repro` until the cell's log shows a step after ``after``; SIGTERM to dvc only. (step stopped at, log)"""
    log, out = proj / "runs/cell/train.log", proj / f"repro-{os.path.basename(shell)}.out"
    with open(out, "w") as fh:
        dvc = subprocess.Popen(["dvc", "repro"], cwd=proj, env={**ENV, "SHELL": shell}, stdout=fh,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def training():
            """a training step in the cell's log"""
            text = log.read_text() if log.exists() else ""
            return after in text and re.search(r"\] step \d+/", text.split(after, 1)[1] if after else text)

        wait_for(training)
        procs = psutil.Process(dvc.pid).children(recursive=True)
        assert any("src.train" in " ".join(p.cmdline()) for p in procs), procs
        os.kill(dvc.pid, signal.SIGTERM)
        assert dvc.wait(timeout=30) == -signal.SIGTERM
        end = time.time() + 60
        while not all(gone(p) for p in procs) and time.time() < end:
            time.sleep(0.2)
        assert all(gone(p) for p in procs), f"the cell outlived dvc: {procs}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)  # the session this test started, should anything be left
    text = out.read_text()
    m = re.search(r"error: stopped by SIGTERM at step (\d+); rerun the same command to resume", text)
    assert m, text[-3000:]
    with open(proj / "runs/cell/.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    return int(m.group(1)), log.read_text()


def test_sigterm_to_dvc_stops_the_cell_which_resumes_where_it_stopped(project):
    step, _ = stop_dvc_mid_run(project, "/bin/bash", after="")
    assert step > 0
    again, log = stop_dvc_mid_run(project, "/bin/sh", after=f"resuming 0-fcn-r from step {step} ")
    assert again > step
    assert re.findall(r"resuming 0-fcn-r from step (\d+)", log) == [str(step)]
