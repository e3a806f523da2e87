"""Re-lock the cells that only training code made stale, once the result fingerprint shows that the code
still computes every committed result bit for bit (docs/pipeline.md "Changing the code").

    python -m src.run.relock          # check the fingerprint, then re-lock those stages in one write of dvc.lock
    python -m src.run.relock --dry    # only name them

It does what ``dvc commit -f <stage> …`` does, through DVC's own save, commit and lock-file dump of each
stage, but writes dvc.lock once: the command line rewrites the whole lock file (18,000 lines) once per
stage, about 20 s each on our CPUs, an hour of a core for the committed grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from src.runinfo import REPO, UserError, check_dvc_lock


def code_only_stages(root: Path = REPO) -> list[str]:
    """The training stages (``plan.TRAIN_CMD``) that ``dvc status`` reports stale through training code only."""
    from src.run.plan import TRAIN_CMD, repro_stages, staleness

    stages, outs = repro_stages(root)
    prefix = " ".join(TRAIN_CMD)
    return [s["stage"] for s in stages if str(s["cmd"]).startswith(prefix) and staleness(s["changes"], outs)[1]]


def fingerprint_moved() -> list[str]:
    """The cells whose fingerprint this tree no longer computes (empty: every result holds)."""
    from src.run.fingerprint import FILE, pinned

    committed = json.loads(FILE.read_text())
    now = pinned()
    return sorted(k for k in committed.keys() | now.keys() if now.get(k) != committed.get(k))


def relock(names: list[str], root: Path = REPO) -> None:
    """``dvc commit -f`` of every stage in ``names``, with one dump of dvc.lock."""
    from dvc.repo import Repo, lock_repo

    with Repo(str(root)) as repo, lock_repo(repo):
        stages = [s for s in repo.index.stages if s.addressing in set(names)]  # one parse of dvc.yaml and dvc.lock
        if missing := set(names) - {s.addressing for s in stages}:
            raise UserError(f"no such stage: {', '.join(sorted(missing))}")
        for stage in stages:
            stage.save()
            stage.commit()
        if stages:
            stages[0].dvcfile.dump_stages(stages, update_pipeline=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.run.relock", description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="name the stages, check and change nothing")
    a = ap.parse_args(argv)
    try:
        check_dvc_lock(REPO)
        names = code_only_stages(REPO)
        print(f"{len(names)} stages stale through training code only" + (f": {', '.join(names)}" if a.dry and names else ""))
        if a.dry or not names:
            return
        print("checking the result fingerprint (minutes) ...", flush=True)
        if moved := fingerprint_moved():
            raise UserError(f"the fingerprint moved for {', '.join(moved)}: results change, retrain (dvc repro)")
        relock(names, REPO)
        print(f"re-locked {len(names)} stages; say so in the commit message")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
