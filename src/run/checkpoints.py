"""Where a cell's checkpoints live and which one a rerun resumes from.

``<run_dir>/<fingerprint12>/checkpoints/`` keeps the checkpoints of one (result-defining config, training
code) pair: a rerun of the same command resumes from its ``last.ckpt`` (``best.ckpt`` where the last one is
unreadable), and a run of another config or of code that changes results never sees them. ``src.train``
resumes from here; the plan and the GPU window ask the same place how far a cell has come, so that they
project only the steps it has left.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from src.config import compose_config, result_hash
from src.run.fingerprint import FILE as FINGERPRINT
from src.runinfo import REPO, UserError


def run_fingerprint(cfg: DictConfig) -> str:
    """Result-defining config + the result fingerprint of the training code (src/run/fingerprint.json):
    checkpoints resume only under the same pair, so a change that provably keeps results (the same
    fingerprint) keeps every interrupted run resumable."""
    return result_hash(cfg, FINGERPRINT.read_text())


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.run_dir) / run_fingerprint(cfg)[:12] / "checkpoints"


def checkpoint_step(path: Path) -> int | None:
    """A checkpoint's step; None where it is missing, truncated, corrupt or foreign (not resumable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - truncated, corrupt or foreign: not resumable
        return None


def resume_point(ckpt_dir: Path) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step: ``last.ckpt``, or ``best.ckpt`` when the last one is
    unreadable; (None, 0) for a fresh start. Both unreadable: one line saying what to do."""
    last, best = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    if not last.exists():
        return None, 0
    for path in (last, best):
        if (step := checkpoint_step(path)) is not None:
            return path, step
    raise UserError(f"checkpoint {last} is unreadable and there is no readable best.ckpt beside it; "
                    f"delete {ckpt_dir} to train this cell from the start, or pass resume=false")


def resumes_at(args: list[str], root: Path = REPO) -> int:
    """The step ``python -m src.train <args>``, run in ``root``, would resume from (0: from the start), so
    that a projection counts only the steps a cell has left (src.run.plan, src.ops.window). Where the
    training code changed since the checkpoint, src.train may still refuse it (check_same_code)."""
    cfg = compose_config(args)
    if not cfg.resume:
        return 0
    try:
        return resume_point(root / checkpoint_dir(cfg))[1]
    except UserError:
        return 0
