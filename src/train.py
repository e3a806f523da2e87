"""Train and test one cell of Table 1: ``python -m src.train model=st_fcn data=r [trainer=quick] [seed=1]``.

``train(cfg)`` is pure (tests call it); ``main`` is the thin Hydra app around it. Expected failures
(a bad value, missing or mismatched data, an unwritable output, a full disk, a diverging run, a second
run of the same cell) are one line on stderr and a non-zero exit; SIGTERM / Ctrl-C write a checkpoint and
exit 143 / 130; so does the end of the ``dvc`` process running a pipeline cell (``follow_dvc``).
Rerunning the same command resumes from the last checkpoint, under the code that wrote it or a change of
it that keeps the result fingerprint (``check_same_code``).

A run directory holds one cell under any number of configs: ``<run_dir>/<fingerprint>/`` keeps the
checkpoints of one (config, training code) pair, so nothing of another config is ever deleted.
The record (metrics, curve, provenance, raw outcomes of the test set) is written only when the run
is complete, each file atomically and the metrics file last.

A pipeline cell is a run that DVC started (``dvc repro`` sets ``DVC_STAGE`` for a stage's command). It
refuses to start while anything its record depends on in git differs from HEAD (its stage's code in
dvc.yaml, conf/, params.yaml, dvc.yaml): one line naming the files, exit 2, nothing written, so a
committed record always names a commit that reproduces it. An exploratory run (any other) may run from
a changed tree; its provenance records the commit as ``<commit>-dirty+<hash of the difference>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import select
import signal
import sys
import threading
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises (deterministic cuBLAS)

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from pytorch_lightning.utilities.exceptions import SIGTERMException  # noqa: E402

from src.cell import Cell  # noqa: E402
from src.config import ConfigError, added_keys, check_added_keys, compose_config, validate  # noqa: E402
from src.data.datamodule import DistortedMNIST  # noqa: E402
from src.models.bf16 import Bf16ViaFloat32Precision  # noqa: E402
from src.models.build import build_model  # noqa: E402
from src.models.module import Classifier  # noqa: E402
from src.run.callbacks import (CodeStamp, CurveRecorder, DivergenceGuard, NoNanFill, ProgressLog, Segments,  # noqa: E402
                               SignalStop, curve_csv)
from src.run.checkpoints import checkpoint_dir, resume_point, run_fingerprint  # noqa: E402
from src.runinfo import (REPO, UserError, atomic_dir, check_dvc_lock, native_bf16, sha256_file,  # noqa: E402
                         uncommitted, versions, write_atomic, write_json)

CONF_DIR = REPO / "conf"
log = logging.getLogger("src.train")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning(quiet: bool) -> None:
    """Drop Lightning's advertising line; in quiet mode also its device banner."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING if quiet else logging.INFO)
        for h in lg.handlers:
            h.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*(does not have many workers|ended before the epoch ended"
                                              "|is smaller than the logging interval|Checkpoint directory"
                                              "|Experiment logs directory|`training_step` returns `None`"
                                              "|configured with multiple `ModelCheckpoint`).*")  # best.ckpt's is the first
    # the module's step pulls exactly one batch (no accumulation), the case these warnings call safe;
    # tests/test_train.py checks that the loop computes exactly the written-out step
    warnings.filterwarnings("ignore", message=".*(`dataloader_iter` step flavor|`dataloader_iter` argument in the "
                                              "`training_step`).*")


def check_writable(cfg: DictConfig) -> None:
    """Every place a run writes is writable before anything is written, so that an unwritable one is one line
    (exit 2) at the start, not Hydra's traceback or a PermissionError after the whole run. The run directory
    (Hydra's log, the lock) and the checkpoints are written into: itself or, missing, its nearest existing
    ancestor; the metrics and curve files and the cell directory are replaced by a rename of a sibling:
    their directory, and themselves where they exist."""
    places = [("paths.run_dir", Path(cfg.paths.run_dir), False), ("paths.run_dir", checkpoint_dir(cfg), False),
              ("paths.metrics_file", Path(cfg.paths.metrics_file), True),
              ("paths.curve_file", Path(cfg.paths.curve_file), True), ("paths.cell_dir", Path(cfg.paths.cell_dir), True)]
    for key, path, replaced in places:
        where = path.parent if replaced else path
        base = next(p for p in (where, *where.parents) if p.exists())
        for p in ([path] if replaced and path.exists() else []) + [base]:
            if not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
                to = "" if p == path else f" (to write {path})"
                raise ConfigError(f"{key}: {p} is not writable{to}; make it writable or choose another {key}")


@contextlib.contextmanager
def cell_lock(run_dir: Path, label: str):
    """One process per run directory. The OS drops the lock when the process dies, so none is ever stuck."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UserError(f"{label} is already running in {run_dir} (pid {pid}); wait for it or stop it first") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class CodeChanged(UserError):
    exit_code = 2


def code_hashes() -> dict[str, str]:
    """The training code, file by file (path → start of its sha256): the train stage's deps in dvc.yaml but
    the data, the one list of the code that defines a cell's results. Every checkpoint carries it (CodeStamp)."""
    out = {}
    for dep in stage_deps("train"):
        if dep.startswith("data/"):
            continue
        path = REPO / dep
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        out.update({f.relative_to(REPO).as_posix(): sha256_file(f)[:16] for f in files})
    return out


def check_same_code(ckpt: Path, cfg: DictConfig, label: str, code: dict[str, str]) -> None:
    """A run resumes only under the training code that wrote its checkpoint, or a result-neutral change of it.

    Where a file differs from the hashes the checkpoint carries, the result fingerprint of the cell's model
    and distortion decides (src.run.fingerprint, pinned, as the full check): unchanged, the change keeps results
    and the run resumes, saying so in one line (the checkpoints it writes carry the new hashes); moved, one line
    naming the changed files, exit 2. A checkpoint of older code, without the hashes, resumes unchecked."""
    from src.run.fingerprint import holds

    stamp = torch.load(ckpt, map_location="cpu", weights_only=True).get("callbacks", {}).get(CodeStamp.__qualname__)
    if stamp is None:
        log.info(f"{label}: {ckpt} does not record the training code that wrote it (older code); "
                 f"resuming without checking it")
        return
    changed = sorted(f for f in stamp["code"].keys() | code.keys() if stamp["code"].get(f) != code.get(f))
    if not changed:
        return
    files = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    # the fingerprint's cells are the main recipes: a sensitivity variant is checked on its family's
    model, data = str(cfg.model.name), str(OmegaConf.select(cfg, "sensitivity.family") or cfg.data.name).lower()
    if holds(Cell(0, model, data).name, float32_kernels=emulated_bf16(cfg) is not None):
        log.info(f"{label}: the training code changed since {ckpt.name} was written ({files}); the result "
                 f"fingerprint of {model} on {data} holds, so the change keeps results: resuming")
        return
    raise CodeChanged(f"{label}: the training code changed since {ckpt} was written ({files}) and the result "
                      f"fingerprint of {model} on {data} does not hold; resuming would mix two codes in one record: "
                      f"restore the code, or pass resume=false to train this cell from step 0")


def emulated_bf16(cfg: DictConfig) -> str | None:
    """One line when a bf16-mixed cell runs on a CPU without native bfloat16: the same precision (the
    config decides it, never the machine), on float32 kernels (src.models.bf16)."""
    on_cpu = cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if cfg.model.precision == "bf16-mixed" and on_cpu and not native_bf16():
        return ("note: model.precision=bf16-mixed on a CPU without native bfloat16 (no AMX or AVX512-BF16): "
                "the same precision, its convolutions and matrix products on float32 kernels, rounded once to bfloat16")
    return None


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Every checkpoint (best.ckpt, last.ckpt, the one a signal writes) is written as ``write_atomic`` writes:
    a temp file beside it, fsync, rename. A full disk or a kill mid-write leaves the previous checkpoint for a
    resume to read, and a full disk is one line naming the path and the free space (``DiskFull``)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        write_atomic(Path(path), buf.getvalue())


def make_trainer(cfg: DictConfig, ckpt_dir: Path, callbacks: list, label: str) -> pl.Trainer:
    t = cfg.trainer
    # best.ckpt at a new lowest validation error, then last.ckpt at every validation (with the best's updated
    # state): Lightning's save_last rewrites last.ckpt only when it has just saved a best one, so a crash would
    # resume from the best step, not the latest. No version counter: always the two files a resume reads.
    best = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/err", mode="min",
                                        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    last = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                        auto_insert_metric_name=False, enable_version_counter=False)
    bar = [] if cfg.quiet or not sys.stderr.isatty() else [pl.callbacks.RichProgressBar()]
    # Lightning takes the precision by name, or as a plugin: bf16-mixed without native bfloat16 is the latter
    emulated = emulated_bf16(cfg) is not None
    if t.get("tf32") and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, deterministic=t.deterministic,
        precision=None if emulated else cfg.model.precision,
        logger=False, callbacks=[best, last, *callbacks, ProgressLog(label, t.max_steps), NoNanFill(), *bar],
        enable_progress_bar=bool(bar), enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=ckpt_dir.parent,
        plugins=[AtomicCheckpointIO(), *([Bf16ViaFloat32Precision()] if emulated else [])],
    )


def test_outcomes(trainer: pl.Trainer, module: Classifier, dm: DistortedMNIST, ckpt: str | None) -> tuple[dict, dict]:
    """Test the module as it is (``ckpt=None``) or a saved checkpoint: (metrics, per-image outcomes)."""
    out = trainer.test(module, datamodule=dm, ckpt_path=ckpt, verbose=False, weights_only=True)[0]
    return {"err": float(out["test/err"]), "loss": float(out["test/loss"])}, dict(module.outcomes)


def outcomes_bytes(outcomes: dict, test_sha256: str) -> bytes:
    """The raw-outcome record of the test set: every prediction (uint8) and, for ST models, every θ.

    θ is stored as float16 (relative precision 5e-4, well under 0.1 px on these canvases): enough for
    every figure and statistic the report derives, at a quarter of the size.
    """
    rec = {"pred": outcomes["pred"].to(torch.uint8).contiguous(), "test_sha256": test_sha256}
    if "theta" in outcomes:
        rec["theta"] = outcomes["theta"].to(torch.float16).contiguous()
    buf = io.BytesIO()
    torch.save(rec, buf)
    return buf.getvalue()


def write_record(cfg: DictConfig, files: dict[str, str | bytes], metrics: dict, curve_csv: str) -> None:
    """Replace the cell's record only once every part is ready: the cell directory by one rename of a
    finished sibling, then the curve, then the metrics file, whose presence marks a complete record."""
    with atomic_dir(Path(cfg.paths.cell_dir)) as tmp:
        for name, data in files.items():
            write_atomic(tmp / name, data)
    write_atomic(Path(cfg.paths.curve_file), curve_csv)
    write_json(Path(cfg.paths.metrics_file), metrics)


def train(cfg: DictConfig, extra_callbacks: tuple = ()) -> dict:
    """Fit, test the last and the best-validation checkpoints, write the record; returns the metrics."""
    validate(cfg)
    check_writable(cfg)
    label = Cell.of(cfg).name
    quiet_lightning(cfg.quiet)
    from src.run.plan import start_line  # logging only (cell, steps, device, precision, projected time): no result depends on it

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    net, budget = build_model(cfg)
    module = Classifier(net, OmegaConf.to_container(cfg.optim, resolve=True), cfg.trainer.max_steps)
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, cfg.stn.align_corners, cfg.seed)
    dm.setup("fit")  # missing, tampered, malformed or mismatched data (any split) fail here, before anything is written

    run_dir = Path(cfg.paths.run_dir)
    fingerprint, ckpt_dir, code = run_fingerprint(cfg), checkpoint_dir(cfg), code_hashes()
    with cell_lock(run_dir, label):
        resume_from, done = resume_point(ckpt_dir) if cfg.resume else (None, 0)
        log.info(start_line(cfg, label, done))
        if resume_from is not None and resume_from.name == "best.ckpt":
            print(f"warning: {ckpt_dir / 'last.ckpt'} is unreadable; resuming from {resume_from} (step {done}) "
                  f"instead", file=sys.stderr)
        if note := emulated_bf16(cfg):
            print(note, file=sys.stderr)
        if resume_from is not None:
            check_same_code(resume_from, cfg, label, code)
            log.info(f"resuming {label} from step {done} ({resume_from})")
        write_atomic(ckpt_dir.parent / "fingerprint.txt", fingerprint + "\n")
        curve, segments = CurveRecorder(), Segments()
        milestones = module.milestones()
        guard = DivergenceGuard(curve, milestones[0] if milestones else 0, **cfg.guard)
        stop = SignalStop(ckpt_dir / "last.ckpt")
        trainer = make_trainer(cfg, ckpt_dir, [curve, guard, segments, stop, CodeStamp(code), *extra_callbacks], label)
        stop.install()
        try:
            try:
                trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
            except SIGTERMException:
                raise stop.stopped(trainer.global_step) from None
            if stop.signum is not None and trainer.global_step < cfg.trainer.max_steps:
                raise stop.stopped(trainer.global_step)
            if trainer.interrupted or trainer.global_step < cfg.trainer.max_steps:
                raise UserError(f"training stopped at step {trainer.global_step} of {cfg.trainer.max_steps}; "
                                f"rerun the same command to resume from the last checkpoint")
            rows, segs = list(curve.rows), segments.segments()  # testing a checkpoint restores callback states
            last, out_last = test_outcomes(trainer, module, dm, None)
            best, out_best = test_outcomes(trainer, module, dm, "best")
        finally:
            stop.uninstall()
        # a signal after the last step stops nothing: the finished run is tested and its record written
        files, metrics, curve_text = make_record(cfg, net, budget, trainer, fingerprint, rows, segs,
                                                 last, out_last, best, out_best)
        write_record(cfg, files, metrics, curve_text)  # under the lock: one writer per record
    return metrics


def make_record(cfg, net, budget, trainer, fingerprint, rows, segs, last, out_last, best, out_best):
    """(files of the cell directory, metrics, curve CSV) of a finished run."""
    if not all(torch.isfinite(torch.tensor(v)) for v in (last["err"], best["err"], last["loss"])):
        raise UserError("non-finite test metrics; the network diverged")
    table, outcomes = (last, out_last) if cfg.eval.table_ckpt == "last" else (best, out_best)
    counts = net.param_counts()
    val_errs = [r["val_err"] for r in rows]
    metrics = {
        "test": {"err": _r(table["err"]), "err_last": _r(last["err"]), "err_best": _r(best["err"]),
                 "loss_last": _r(last["loss"])},
        "val": {"err_last": _r(val_errs[-1]), "err_best": _r(min(val_errs))},
        "params": {"n": counts["total"], "classifier": counts["classifier"], "st": counts["st"], "budget": budget or 0},
        "steps": int(trainer.global_step),
    }
    provenance = {
        "cell": Cell.of(cfg).name, "seed": int(cfg.seed),
        "steps": int(trainer.global_step), "profile_max_steps": int(cfg.trainer.max_steps),
        "commit": segs[0]["commit"] if segs else "unknown",
        "device": segs[-1]["device"] if segs else "?", "accelerator": trainer.strategy.root_device.type,
        "versions": versions(), "deterministic": str(cfg.trainer.deterministic),
        "precision": str(cfg.model.precision),
        "fit_seconds": round(sum(s["seconds"] for s in segs), 1), "segments": segs,
        "resumed": len(segs) > 1, "fingerprint": fingerprint, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    manifest = Path(cfg.paths.data_dir) / str(cfg.data.name) / "manifest.json"
    test_sha = json.loads(manifest.read_text())["files"]["test.pt"]["sha256"]
    files = {"provenance.json": json.dumps(provenance, indent=2, sort_keys=True) + "\n",
             "outcomes.pt": outcomes_bytes(outcomes, test_sha)}
    return files, metrics, curve_csv(rows)


def _r(x: float) -> float:
    return round(float(x), 4)


# ------------------------------------------------------------------ the command line

HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name",
               "-cn", "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def _plain(overrides: list[str]) -> list[str] | None:
    """The overrides that compose one config (no sweep, no Hydra key); None where one does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports it itself
        return None
    return [o.input_line for o in parsed
            if not o.is_sweep_override() and o.key_or_group.split("/")[0].split(".")[0] != "hydra"]


def check_added(argv: list[str], flagged: bool) -> None:
    """``+key=value`` / ``++key=value`` of a key the config lacks is refused (``check_added_keys``), with or
    without Hydra's flags (a sweep is checked against its config without the swept keys)."""
    if any(a.split("=", 1)[0] in CONFIG_FLAGS for a in argv):
        return  # another config than conf/config.yaml: Hydra's alone
    overrides = [a for a in argv if "=" in a and not a.startswith("-")] if flagged else list(argv)
    added = added_keys(overrides, {p.name for p in CONF_DIR.iterdir() if p.is_dir()})
    if not added:
        return
    lines = {o.input_line for o in added}
    rest = [o for o in overrides if o not in lines]
    if flagged:
        rest = _plain(rest)
        if rest is None:
            return
        try:
            base = compose_config(rest)
        except UserError:
            return  # Hydra reports the bad override itself
    else:
        base = compose_config(rest)
    check_added_keys(added, base)


def check_overrides(argv: list[str]) -> None:
    """Compose and validate once before Hydra does, so a bad override or value is one line (exit 2).
    A key added with ``+`` that the config lacks is refused always; the rest is left to Hydra whenever a
    Hydra flag is given (``--cfg job``, ``--help``, ``-m`` …)."""
    flagged = any(a.split("=", 1)[0] in HYDRA_FLAGS for a in argv)
    check_added(argv, flagged)
    if flagged:
        return
    cfg = compose_config(argv)
    validate(cfg)
    check_writable(cfg)  # before Hydra writes its log into the run directory


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        m = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return  # one failed cell does not end the sweep's other cells
        sys.exit(e.exit_code)
    print(final_line(cfg, m, HydraConfig.get().runtime.choices.get("trainer")))


def final_line(cfg: DictConfig, m: dict, profile: str | None) -> str:
    """The run's last line: its test error and where the record went; a smoke run's says it is no result."""
    cell = Cell.of(cfg).name
    if profile == "smoke":  # a few CPU steps: its error is near chance by design
        cell += f" (smoke run, trainer=smoke: {m['steps']} steps that check the code runs, not a result)"
    return (f"{cell}: test error {m['test']['err']:.2f} % (last {m['test']['err_last']:.2f}, best-val "
            f"{m['test']['err_best']:.2f}), {m['params']['n']} parameters, {m['steps']} steps -> {cfg.paths.metrics_file}")


def stage_deps(stage: str) -> list[str]:
    """A stage's deps in dvc.yaml (``train`` for ``train@0-fcn-r``); all of src/ where dvc.yaml names none."""
    import yaml

    dvc_yaml = REPO / "dvc.yaml"
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"] if dvc_yaml.is_file() else {}
    return stages.get(stage.split(":")[-1].split("@")[0], {}).get("deps", ["src"])


def cell_sources(stage: str) -> list[str]:
    """What a pipeline cell's record depends on in git: its stage's deps in dvc.yaml but the data (DVC's),
    conf/ (composed as a whole), and the files its command comes from."""
    return sorted({d for d in stage_deps(stage) if not d.startswith("data/")} | {"conf", "params.yaml", "dvc.yaml"})


def check_committed() -> None:
    """A pipeline cell starts only from committed sources (see the module docstring)."""
    stage = os.environ.get("DVC_STAGE")
    changed = uncommitted(cell_sources(stage)) if stage else []
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"{stage}: uncommitted changes to {', '.join(changed[:5])}{more}; commit them before "
                        f"`dvc repro`, or run `python -m src.train` outside the pipeline to explore")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"


def follow_dvc() -> None:
    """A pipeline cell ends with the dvc process running it, as under SIGTERM (checkpoint, hint, exit 143,
    lock released): a signal to ``dvc repro`` / ``dvc exp run`` alone (``kill``, ``timeout --foreground``, a
    scheduler stopping one process) would otherwise leave the cell training on, orphaned, holding its lock.

    dvc runs a stage's command as ``$SHELL -c <cmd>`` (``/bin/sh`` without SHELL). bash and zsh exec a
    single command, so dvc is this process's parent; dash does not, so it is the parent's parent. A daemon
    thread waits on that process (a pidfd) and, when it exits, sends this process SIGTERM; a dvc already
    gone at the start (this process reparented) sends it at once. Nothing else changes: no computation
    depends on it. Linux only and under DVC only (``DVC_STAGE`` set); elsewhere, or without pidfds
    (Linux < 5.3), a no-op. SIGINT to dvc alone is not seen: dvc ignores SIGINT while a command runs,
    leaving Ctrl-C, which a terminal sends to the whole process group, to the command; send SIGINT to the
    group (``kill -INT -- -<pgid>``) or SIGTERM to dvc.
    """
    if not sys.platform.startswith("linux") or "DVC_STAGE" not in os.environ or not hasattr(os, "pidfd_open"):
        return
    chain = [os.getpid(), os.getppid()]
    try:
        if os.path.realpath(f"/proc/{chain[1]}/exe") == os.path.realpath(os.environ.get("SHELL") or "/bin/sh"):
            chain.append(_parent(chain[1]))  # dvc's shell, still waiting for this process
        fd = os.pidfd_open(chain[-1])
        alive = all(_parent(child) == parent for child, parent in zip(chain, chain[1:]))  # the fd is dvc's
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    except OSError:  # no pidfds, or /proc unreadable
        return
    if not alive:
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def wait() -> None:
        select.select([fd], [], [])  # readable once the process has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="follow-dvc", daemon=True).start()


def main() -> None:
    follow_dvc()
    try:
        if "DVC_STAGE" in os.environ:
            check_dvc_lock()
        check_committed()
        check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
