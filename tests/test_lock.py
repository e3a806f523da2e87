"""The committed dvc.lock as a fresh clone reads it: no committed cell is stale there.

A dependency hashed with files that git does not carry (bytecode, an editor's backup) looks
modified in every clone, and `dvc repro` would retrain that cell.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import yaml

from src.runinfo import REPO


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {p for p in out.split("\0") if p}


def under(files, path: str) -> list[str]:
    return sorted(f for f in files if f == path or f.startswith(path.rstrip("/") + "/"))


def overlaps(a: str, b: str) -> bool:
    return bool(under([a], b) or under([b], a))


def test_committed_cells_hash_only_what_git_carries():
    lock = REPO / "dvc.lock"
    if not lock.exists():
        pytest.skip("no dvc.lock")
    files = tracked_files()
    stages = yaml.safe_load(lock.read_text())["stages"]
    committed = {name: st for name, st in stages.items()
                 if st.get("outs") and all(under(files, o["path"]) for o in st["outs"])}
    made = [o["path"] for st in stages.values() for o in st.get("outs", [])]
    problems = []
    for name, st in committed.items():
        for dep in st.get("deps", []):
            carried = under(files, dep["path"])
            if not carried or any(overlaps(dep["path"], m) for m in made):
                continue  # made by a stage (data/..., reports/...), regenerated or checked out in a clone
            if "nfiles" in dep:
                if dep["nfiles"] != len(carried):
                    problems.append(f"{name}: {dep['path']} hashed over {dep['nfiles']} files, git carries {len(carried)}")
            elif dep["md5"] != hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest():
                problems.append(f"{name}: {dep['path']} differs from the committed file")
    assert committed, "no committed stage found in dvc.lock"
    assert not problems, "\n".join(problems)
