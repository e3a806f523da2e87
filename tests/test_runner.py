"""A cell run cannot lose work or mislead: bad values, a second run, a corrupt checkpoint, a diverging
run, Hydra's own flags, a pipeline cell from uncommitted sources, a full disk, unwritable outputs and a resume
under changed code, each as a user meets them on the command line."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from src.run.callbacks import CurveRecorder, Diverged, DivergenceGuard
from src.runinfo import REPO


def run_cli(*args: str, timeout: int = 300, cwd=REPO, env=None):
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def smoke(synthetic_data, tmp_path):
    return ["trainer=smoke", "quiet=true", "model=fcn", f"paths.data_dir={synthetic_data['data_dir']}",
            f"paths.raw_file={synthetic_data['raw_file']}", f"paths.run_dir={tmp_path / 'run'}",
            f"paths.metrics_file={tmp_path / 'metrics.json'}", f"paths.curve_file={tmp_path / 'curve.csv'}",
            f"paths.cell_dir={tmp_path / 'cell'}"]


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("override, key", [
    ("optim.lr=abc", "optim.lr"), ("trainer.max_steps=-10", "trainer.max_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("loader.batch_size=0", "loader.batch_size"),
    ("loader.batch_size=-5", "loader.batch_size"), ("seed=-1", "seed"), ("seed=abc", "seed"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"), ("optim.momentum=1.5", "optim.momentum"),
    ("trainer.max_steps=25", "trainer.val_check_interval"), ("model.transform=xyz", "model.transform"),
    ("loader.batch_size=100000000", "loader.batch_size"),  # above the 50,000 training images
])
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(smoke, tmp_path, override, key):
    r = run_cli(*smoke, override)
    assert r.returncode == 2
    line = one_error_line(r)
    assert key in line and override.split("=", 1)[1].lstrip("-") in line, line
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())


def test_what_a_bad_transform_or_batch_size_line_says():
    from src.config import ConfigError, compose_config, validate
    from src.stn.grids import GRIDS

    with pytest.raises(ConfigError, match="model.transform='xyz'.*null or one of " + ", ".join(sorted(GRIDS)) + "$"):
        validate(compose_config(["model=st_fcn", "model.transform=xyz"]))
    validate(compose_config(["model=fcn", "model.transform=null"]))
    for name in GRIDS:
        validate(compose_config(["model=st_fcn", f"model.transform={name}"]))
    validate(compose_config(["loader.batch_size=50000"]))  # one batch: the whole training set
    with pytest.raises(ConfigError, match=r"loader.batch_size=50001 .* at most the training set size, 50,000"):
        validate(compose_config(["loader.batch_size=50001"]))
    with pytest.raises(ConfigError, match="loader.batch_size=101 .* 100 images"):  # read from the data config
        validate(compose_config(["loader.batch_size=101", "mnist.sizes=[100,10,10]"]))


@pytest.mark.parametrize("args, key", [
    (["+trainer.max_step=10"], "trainer.max_step"), (["++trainer.max_step=10"], "trainer.max_step"),
    (["+optim.lrr=0.1"], "optim.lrr"), (["+foo=1"], "foo"),
    (["-m", "+trainer.max_step=10,20"], "trainer.max_step"), (["--cfg", "job", "+trainer.max_step=10"], "trainer.max_step"),
])
def test_a_key_added_with_plus_that_the_config_lacks_is_refused(args, key):
    from src.config import ConfigError
    from src.train import check_overrides

    with pytest.raises(ConfigError, match=rf"^\+*{key}=\S+: unknown key {key} "):
        check_overrides(args)


def test_plus_still_adds_a_config_group_and_double_plus_sets_a_known_key():
    from src.train import check_overrides

    check_overrides(["+experiment=literal"])
    check_overrides(["++trainer.max_steps=40", "trainer=smoke"])
    check_overrides(["-m", "seed=0,1", "+experiment=literal", "hydra/launcher=basic"])


def test_a_misspelt_added_key_is_one_line_exit_2_before_anything_runs(smoke, tmp_path):
    r = run_cli(*smoke, "+trainer.max_step=10")
    assert r.returncode == 2
    assert one_error_line(r) == ("error: +trainer.max_step=10: unknown key trainer.max_step (the config has no such "
                                 "key and nothing would read it); did you mean trainer.max_steps?")
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())


def test_a_second_run_of_the_same_cell_refuses_at_once(smoke, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # another process holds the cell
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        r = run_cli(*smoke, timeout=120)
    assert r.returncode == 1
    line = one_error_line(r)
    assert "already running" in line and "4242" in line
    assert not (tmp_path / "metrics.json").exists()
    r = run_cli(*smoke)  # the holder is gone: no stuck lock
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "metrics.json").is_file()
    last = r.stdout.strip().splitlines()[-1]  # a smoke run's error is near chance by design: it says so
    assert last.startswith("0-fcn-r (smoke run, trainer=smoke: 20 steps") and "not a result): test error" in last, last


def test_a_corrupt_last_checkpoint_falls_back_to_best_or_says_what_to_do(smoke, tmp_path):
    crash = [*smoke, "trainer.max_steps=40", "trainer.val_check_interval=10"]
    assert run_cli(*crash).returncode == 0
    ckpt_dir = next((tmp_path / "run").glob("*/checkpoints"))
    straight = json.loads((tmp_path / "metrics.json").read_text())
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated mid-write
    (tmp_path / "metrics.json").unlink()
    r = run_cli(*crash)
    assert r.returncode == 0, r.stderr
    assert "last.ckpt is unreadable; resuming from" in r.stderr and "best.ckpt" in r.stderr
    assert json.loads((tmp_path / "metrics.json").read_text()) == straight  # batches are keyed by step: exact replay
    for name in ("last.ckpt", "best.ckpt"):
        (ckpt_dir / name).write_bytes(b"not a checkpoint")
    r = run_cli(*crash)
    assert r.returncode == 1
    line = one_error_line(r)
    assert str(ckpt_dir / "last.ckpt") in line and "delete" in line and "resume=false" in line


def _guard_at(rows: list[dict], first_loss: float = 2.3, milestone: int = 2000):
    curve = CurveRecorder()
    curve.rows = rows
    guard = DivergenceGuard(curve, milestone, loss_factor=10.0, patience=2, chance_err=85.0, min_phase_steps=1000)
    guard.on_validation_end(SimpleNamespace(sanity_checking=False), SimpleNamespace(first_loss=first_loss))


def test_the_divergence_guard_stops_a_run_outside_the_band_and_only_then():
    row = lambda step, loss, err: {"step": step, "train_loss": loss, "val_err": err}  # noqa: E731
    _guard_at([row(500, 1.0, 40.0), row(1000, 30.0, 80.0)])  # one validation above the band: not yet
    with pytest.raises(Diverged, match="above 10× the first step's"):
        _guard_at([row(500, 1.0, 40.0), row(1000, 30.0, 80.0), row(1500, 1.5e17, 90.0)])
    _guard_at([row(1500, 2.0, 89.0)])  # at chance, still in the first phase
    with pytest.raises(Diverged, match="still at chance after the first learning-rate phase"):
        _guard_at([row(1500, 2.0, 89.0), row(2000, 2.3, 88.0)])
    _guard_at([row(1500, 2.0, 89.0), row(2000, 2.3, 50.0)])  # learning: no stop


def test_a_diverging_run_exits_non_zero_without_a_record(smoke, tmp_path):
    (tmp_path / "metrics.json").write_text('{"previous": 1}\n')
    r = run_cli(*smoke, "optim.lr=1e4", "trainer.max_steps=60", "trainer.val_check_interval=10")
    assert r.returncode == 1
    line = one_error_line(r)
    assert "diverged" in line or "non-finite" in line, line
    assert (tmp_path / "metrics.json").read_text() == '{"previous": 1}\n' and not (tmp_path / "cell").exists()


def test_hydra_flags_behave_as_in_any_hydra_app(tmp_path):
    r = run_cli("model=st_fcn", "data=r", "--cfg", "job")
    assert r.returncode == 0 and "transform: aff" in r.stdout and "lr: 0.01" in r.stdout, r.stderr
    r = run_cli("--help")
    assert r.returncode == 0
    assert "== Configuration groups ==" in r.stdout and "trainer: full, quick, short, smoke" in r.stdout
    assert "Profiles" in r.stdout
    # the footer follows the config it speaks of
    assert r.stdout.index("== Config ==") < r.stdout.index("Every key of the config above can be overridden")
    assert "below" not in r.stdout.split("== Config ==")[1] and "+experiment=literal" in r.stdout
    r = run_cli("--info", "defaults")
    assert r.returncode == 0 and "Defaults List" in r.stdout, r.stderr
    r = run_cli("--cfg", "job", "optim.lrr=0.1")
    assert r.returncode != 0 and "lrr" in r.stderr


def test_multirun_runs_each_cell_as_its_own_job(smoke, tmp_path):
    args = [a for a in smoke if not a.startswith("paths.")]
    data = [a for a in smoke if a.startswith(("paths.data_dir", "paths.raw_file"))]
    r = run_cli("-m", *args, *data, "seed=0,1", f"paths.run_dir={tmp_path}/runs/s${{seed}}",
                f"hydra.sweep.dir={tmp_path}/sweep", timeout=600)
    assert r.returncode == 0, r.stderr
    for s in (0, 1):
        m = json.loads(Path(f"{tmp_path}/runs/s{s}/metrics.json").read_text())
        assert m["steps"] == 20


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clone(tmp_path):
    """A git repository holding this tree's sources and pipeline files, committed."""
    repo = tmp_path / "repo"
    for f in git(REPO, "ls-files", "src", "conf", "dvc.yaml", "params.yaml", ".gitignore").split():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, repo / f)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "sources")
    return repo


def append(path: Path, text: str = "# edited\n") -> None:
    path.write_text(path.read_text() + text)


def test_a_pipeline_cell_refuses_uncommitted_sources_an_exploratory_run_records_them(smoke, tmp_path, clone):
    for f in ("conf/optim/sgd.yaml", "dvc.yaml", "params.yaml", "src/config.py", "src/run/callbacks.py", "src/train.py",
              "src/report/aggregate.py"):  # the last is report code, no dependency of a cell
        append(clone / f)
    (clone / "src/models/extra.py").write_text("")  # untracked, where the cell's code lives
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    r = run_cli(*smoke, cwd=clone, env={**env, "DVC_STAGE": "train@0-fcn-r"})
    assert r.returncode == 2
    assert one_error_line(r).startswith("error: train@0-fcn-r: uncommitted changes to conf/optim/sgd.yaml, dvc.yaml, "
                                        "params.yaml, src/config.py, src/models/extra.py and 2 more;"), r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["repo"] and not (clone / "outputs").exists()

    r = run_cli(*smoke, cwd=clone, env=env)  # the same run outside the pipeline
    assert r.returncode == 0, r.stderr
    diff = subprocess.run(["git", "diff", "HEAD", "--binary", "--", "src", "conf"], cwd=clone,
                          capture_output=True).stdout
    dirty = f"{git(clone, 'rev-parse', 'HEAD').strip()}-dirty+{hashlib.sha256(diff).hexdigest()[:12]}"
    prov = json.loads((tmp_path / "cell" / "provenance.json").read_text())
    assert prov["commit"] == dirty and [s["commit"] for s in prov["segments"]] == [dirty]


def test_a_clean_tree_records_its_commit_and_starts_a_pipeline_cell(tmp_path, clone, monkeypatch):
    from src import runinfo, train

    for module in (runinfo, train):
        monkeypatch.setattr(module, "REPO", clone)
    monkeypatch.setenv("DVC_STAGE", "short@0-fcn-r")
    head = git(clone, "rev-parse", "HEAD").strip()
    train.check_committed()
    assert runinfo.git_commit() == head
    append(clone / "src/report/figures.py")  # report code: the record is marked, the cell still starts
    train.check_committed()
    assert runinfo.git_commit().startswith(head + "-dirty+")
    (clone / "conf/model/new.yaml").write_text("")
    with pytest.raises(runinfo.UserError, match=r"short@0-fcn-r: uncommitted changes to conf/model/new\.yaml; commit"):
        train.check_committed()
    monkeypatch.setattr(runinfo, "REPO", tmp_path)  # no git history to compare with (a GPU window's copy)
    train.check_committed()


# ------------------------------------------------------------------ a full disk, unwritable outputs

def test_a_full_disk_mid_write_leaves_the_previous_file_and_is_one_line(tmp_path, monkeypatch):
    """ENOSPC after part of a file is written (a record file, a checkpoint): the previous file stays whole at its
    path, no temporary file is left, and the error is one line naming the path and the free space."""
    import errno

    import torch

    from src import runinfo
    from src.train import AtomicCheckpointIO

    real_fdopen = os.fdopen

    class Filling:  # writes half of what it is given, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    metrics, ckpt = tmp_path / "record" / "metrics.json", tmp_path / "checkpoints" / "last.ckpt"
    runinfo.write_json(metrics, {"previous": 1})
    AtomicCheckpointIO().save_checkpoint({"global_step": 10}, ckpt)
    before = {p: p.read_bytes() for p in (metrics, ckpt)}
    monkeypatch.setattr(runinfo.os, "fdopen", lambda *a, **k: Filling(real_fdopen(*a, **k)))
    for write, path in [(lambda: runinfo.write_json(metrics, {"new": 2}), metrics),
                        (lambda: AtomicCheckpointIO().save_checkpoint({"global_step": 20, "w": torch.ones(1000)}, ckpt),
                         ckpt)]:
        with pytest.raises(runinfo.DiskFull) as e:
            write()
        line = str(e.value)
        assert "\n" not in line and e.value.exit_code != 0
        assert line.startswith(f"No space left on device writing {path} (") and " free there); free some space" in line
        assert path.read_bytes() == before[path]
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file beside it
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)["global_step"] == 10  # what a resume reads


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")
def test_a_full_disk_at_a_checkpoint_or_the_record_is_one_line_and_the_run_resumes_once_space_is_freed(smoke, tmp_path):
    """Real full disks: small tmpfs mounts (in a user namespace) under the run directory, then under the record's
    directory; each run stops with one line, and after the mount grows the same command resumes and finishes."""
    import shlex

    (tmp_path / "run").mkdir()
    (tmp_path / "rec").mkdir()
    args = [a.replace(f"{tmp_path}/cell", f"{tmp_path}/rec/cell") for a in smoke]
    cmd = shlex.join([sys.executable, "-m", "src.train", *args])
    out = lambda n: f"> {tmp_path}/out{n} 2> {tmp_path}/err{n}; echo $? > {tmp_path}/rc{n}"  # noqa: E731
    script = "\n".join([
        f"mount -t tmpfs -o size=2500k tmpfs {tmp_path}/run",  # two checkpoints (~1 MB each) fit, not a third
        f"{cmd} {out(1)}",
        f"ls -a {tmp_path}/run/*/checkpoints > {tmp_path}/listing",
        f"mount -o remount,size=20m {tmp_path}/run",
        f"mount -t tmpfs -o size=4k tmpfs {tmp_path}/rec",  # the record's cell directory does not fit
        f"{cmd} {out(2)}",
        f"mount -o remount,size=1m {tmp_path}/rec",
        f"{cmd} {out(3)}",
        f"cp -r {tmp_path}/rec/cell {tmp_path}/cell",
    ])
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, timeout=600, check=True)
    text = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert text("rc1").strip() == "1", text("err1")
    line = one_error_line(SimpleNamespace(stderr=text("err1")))
    assert re.fullmatch(rf"error: No space left on device writing {tmp_path}/run/\w+/checkpoints/(best|last)\.ckpt "
                        r"\(\d+\.\d kB to write, \d+\.\d kB free there\); free some space and rerun the same command",
                        line), line
    assert text("listing").split() == [".", "..", "best.ckpt", "last.ckpt"]  # no partial file
    assert text("rc2").strip() == "1", text("err2")
    assert re.match(rf"error: No space left on device writing {tmp_path}/rec/cell/\S+ \(",
                    one_error_line(SimpleNamespace(stderr=text("err2"))))
    assert "resuming 0-fcn-r from step 10 " in text("out2")
    assert text("rc3").strip() == "0", text("err3")
    assert "resuming 0-fcn-r from step 20 " in text("out3")
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 20
    assert sorted(p.name for p in (tmp_path / "cell").iterdir()) == ["outcomes.pt", "provenance.json"]


@contextlib.contextmanager
def unwritable(path: Path):
    """``path`` unwritable for this process: read-only for a user, immutable (chattr +i) for root."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root, and no chattr +i here: nothing is unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("place, key", [("run", "paths.run_dir"), ("checkpoints", "paths.run_dir"),
                                        ("m", "paths.metrics_file"), ("c", "paths.curve_file"),
                                        ("cells", "paths.cell_dir")])
def test_an_unwritable_output_is_one_line_exit_2_before_anything_is_written(smoke, tmp_path, place, key):
    from src.config import compose_config
    from src.run.checkpoints import checkpoint_dir

    args = [a for a in smoke if not a.startswith(("paths.metrics_file", "paths.curve_file", "paths.cell_dir"))]
    args += [f"paths.metrics_file={tmp_path}/m/metrics.json", f"paths.curve_file={tmp_path}/c/curve.csv",
             f"paths.cell_dir={tmp_path}/cells/cell"]
    ckpts = checkpoint_dir(compose_config(args))
    for d in ("m", "c", "cells"):
        (tmp_path / d).mkdir()
    ckpts.mkdir(parents=True)  # a run of the same config that stopped before its first checkpoint
    target = ckpts if place == "checkpoints" else tmp_path / place
    before = sorted(tmp_path.rglob("*"))
    with unwritable(target):
        r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    written = {"m": "metrics.json", "c": "curve.csv", "cells": "cell"}.get(place)
    to = f" (to write {target / written})" if written else ""
    assert one_error_line(r) == f"error: {key}: {target} is not writable{to}; make it writable or choose another {key}"
    assert sorted(tmp_path.rglob("*")) == before  # not even Hydra's log


# ------------------------------------------------------------------ resume only into the same code

LOSS = "return F.cross_entropy(self.net(x), y)"


def test_a_run_resumes_only_under_the_code_that_wrote_its_checkpoint(smoke, tmp_path, clone):
    """Stop a run, change its loss: the rerun refuses in one line naming the file (exit 2). A comment-only edit
    keeps the result fingerprint: the rerun resumes, says why, and its checkpoints carry the new code."""
    import signal
    import time

    import torch

    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    args = [*smoke, "trainer.max_steps=1000000", "trainer.val_check_interval=10"]
    log = tmp_path / "run" / "train.log"

    def run_until(text: str) -> None:
        """the cell's log shows ``text`` after the start of this run; then SIGTERM (checkpoint, exit 143)"""
        start = log.read_text().count("steps on ") if log.exists() else 0
        p = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=clone, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            end = time.time() + 180
            while time.time() < end and p.poll() is None:
                runs = log.read_text().split("steps on ") if log.exists() else []
                this = runs[-1] if len(runs) > start + 1 else ""
                if text in this and "] step " in this[this.index(text) + len(text):]:
                    break
                time.sleep(0.2)
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=60) == 143, p.stderr.read()
        finally:
            p.kill()

    run_until("")
    module = clone / "src" / "models" / "module.py"
    source = module.read_text()
    assert LOSS in source
    module.write_text(source.replace(LOSS, LOSS[:-1] + ", label_smoothing=0.1)"))
    r = run_cli(*args, cwd=clone, env=env)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert re.fullmatch(r"error: 0-fcn-r: the training code changed since \S+/checkpoints/last\.ckpt was written "
                        r"\(src/models/module\.py\) and the result fingerprint of fcn on r does not hold; .*"
                        r"pass resume=false to train this cell from step 0", line), line

    module.write_text(source + "# a comment: no result changes\n")
    run_until("the change keeps results: resuming")
    assert ("0-fcn-r: the training code changed since last.ckpt was written (src/models/module.py); the result "
            "fingerprint of fcn on r holds, so the change keeps results: resuming") in log.read_text()
    last = next((tmp_path / "run").glob("*/checkpoints/last.ckpt"))
    stamp = torch.load(last, weights_only=True)["callbacks"]["CodeStamp"]["code"]
    assert stamp["src/models/module.py"] == hashlib.sha256(module.read_bytes()).hexdigest()[:16]


@pytest.mark.parametrize("native", [[], ["amx_bf16"]])
def test_a_bf16_cell_on_float32_kernels_resumes_only_if_that_paths_hash_holds_too(native, tmp_path, monkeypatch):
    """A cell trained in bf16-mixed on float32 kernels (no native bfloat16 here) resumes under changed code only
    if FLOAT32_KERNELS' hash holds as well as its network's; with native bfloat16 the network's is enough."""
    import torch

    import src.train as train_mod
    from src.run import fingerprint
    from src.config import compose_config
    from src.train import check_same_code, code_hashes

    asked = []
    monkeypatch.setattr(fingerprint, "holds", lambda cell, float32_kernels=False: asked.append((cell, float32_kernels))
                        or True)
    monkeypatch.setattr(train_mod, "native_bf16", lambda: native)
    cfg, code = compose_config(["model=st_cnn", "data=r", "trainer.accelerator=cpu"]), code_hashes()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 5, "callbacks": {"CodeStamp": {"code": {**code, "src/models/bf16.py": "0" * 16}}}}, ckpt)
    check_same_code(ckpt, cfg, "0-st_cnn-r", code)
    assert asked == [("0-st_cnn-r", not native)]


def test_a_checkpoint_without_a_code_stamp_resumes_unchecked(tmp_path, caplog, monkeypatch):
    """Checkpoints written before they carried their code (runs in progress today) still resume, saying so;
    the same code needs no fingerprint."""
    import logging

    import torch

    from src.run import fingerprint
    from src.config import compose_config
    from src.train import check_same_code, code_hashes

    monkeypatch.setattr(fingerprint, "holds", lambda *a, **k: pytest.fail("no fingerprint needed"))
    cfg, code = compose_config(["model=fcn"]), code_hashes()
    assert "src/models/module.py" in code and "src/train.py" in code and not any(f.startswith("data/") for f in code)
    old, same = tmp_path / "old.ckpt", tmp_path / "same.ckpt"
    torch.save({"global_step": 5, "callbacks": {}}, old)
    torch.save({"global_step": 5, "callbacks": {"CodeStamp": {"code": code}}}, same)
    with caplog.at_level(logging.INFO, logger="src.train"):
        check_same_code(old, cfg, "0-fcn-r", code)
        check_same_code(same, cfg, "0-fcn-r", code)
    assert caplog.messages == [f"0-fcn-r: {old} does not record the training code that wrote it (older code); "
                               f"resuming without checking it"]
