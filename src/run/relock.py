"""Re-lock the cells that only training code made stale, once the result fingerprint shows that the code
still computes every committed result bit for bit (docs/pipeline.md "Changing the code").

    python -m src.run.relock          # check the fingerprints, then re-lock those stages in one write of dvc.lock
    python -m src.run.relock --dry    # only name them

It does what ``dvc commit -f <stage> …`` does, through DVC's own save, commit and lock-file dump of each
stage, but writes dvc.lock once: the command line rewrites the whole lock file (18,000 lines) once per
stage, about 20 s each on our CPUs, an hour of a core for the committed grid. The fingerprints are the
portable one of every network (``python -m src.run.fingerprint``) and that of bf16-mixed on float32 kernels
(``FLOAT32_KERNELS``); what they do not run (the Lightning loop around the step, deterministic mode) has its
own tests in tests/test_train.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import sys
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from src.runinfo import REPO, UserError


@contextlib.contextmanager
def _in(root: Path) -> Iterator[None]:
    """DVC names stages relative to the working directory: work from the project's root."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)


def code_only_stages(root: Path = REPO) -> list[str]:
    """The training stages (``plan.TRAIN_CMD``) that ``dvc status`` reports stale through training code only."""
    from src.run.plan import TRAIN_CMD, repro_stages, staleness

    with _in(root):
        stages, outs = repro_stages(root)
    return [s["stage"] for s in stages
            if shlex.split(s["cmd"])[:len(TRAIN_CMD)] == TRAIN_CMD and staleness(s["changes"], outs)[1]]


def source_state(root: Path = REPO) -> str:
    """A hash of every file under src/: the code the fingerprints were computed on."""
    h = hashlib.sha256()
    for p in sorted((root / "src").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fingerprint_moved() -> list[str]:
    """The cells whose fingerprint this tree no longer computes (empty: every result holds), the float32-kernel
    path's included."""
    from src.run.fingerprint import float32_kernels_hold, moved, pinned

    return moved(pinned()) + ([] if float32_kernels_hold() else ["bf16-mixed on float32 kernels"])


def relock(names: list[str], root: Path = REPO, source: str | None = None) -> None:
    """``dvc commit -f`` of every stage in ``names``, with one dump of each pipeline's lock file. Refused, with
    nothing written, where an output or a stage's definition changed (only code may have), or where the
    code under src/ is no longer ``source`` (the state the fingerprints were computed on)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo

    wanted = set(names)
    try:
        with _in(root), Repo(str(root)) as repo, lock_repo(repo):
            if source is not None and source_state(root) != source:
                raise UserError("src/ changed while the fingerprints were computed: run it again")
            stages = [s for s in repo.index.stages if s.addressing in wanted]  # one parse of dvc.yaml and dvc.lock
            if missing := wanted - {s.addressing for s in stages}:
                raise UserError(f"no such stage: {', '.join(sorted(missing))}")
            for stage in stages:
                _, outs, definition = stage.changed_entries()
                if outs or definition:
                    raise UserError(f"{stage.addressing}: {'its outputs' if outs else 'its definition'} changed, "
                                    "not only code: a re-lock would record results the pipeline did not make")
            for stage in stages:
                stage.save()
                stage.commit()
            for dvcfile, group in groupby(stages, key=lambda s: s.dvcfile):
                dvcfile.dump_stages(list(group), update_pipeline=False)
    except DvcException as e:
        raise UserError(f"dvc: {e}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.run.relock", description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="name the stages, check and change nothing")
    a = ap.parse_args(argv)
    try:
        names = code_only_stages(REPO)  # plan.repro_stages checks dvc.lock first
        print(f"{len(names)} stages stale through training code only"
              + (f": {', '.join(names)}" if a.dry and names else ""))
        if a.dry or not names:
            return
        source = source_state(REPO)
        print("checking the result fingerprints (minutes) ...", flush=True)
        if moved := fingerprint_moved():
            raise UserError(f"the fingerprint moved for {', '.join(moved)}: results change, retrain (dvc repro)")
        relock(names, REPO, source)
        print(f"re-locked {len(names)} stages; say so in the commit message")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
