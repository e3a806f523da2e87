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


def test_a_truncated_dvc_lock_is_one_line_saying_how_to_restore_it(tmp_path):
    """kill -9 during `dvc commit -f` leaves dvc.lock empty or cut off; the plan, a pipeline cell and a stage say so."""
    import os
    import shutil
    import sys

    from src.runinfo import UserError, check_dvc_lock

    lock = tmp_path / "dvc.lock"
    check_dvc_lock(tmp_path)  # none yet: a fresh pipeline
    whole = (REPO / "dvc.lock").read_bytes() if (REPO / "dvc.lock").exists() else b"schema: '2.0'\nstages: {}\n"
    lock.write_bytes(whole)
    check_dvc_lock(tmp_path)
    restore = "as a dvc command killed while writing it leaves it; restore it with `git checkout dvc.lock`"
    for cut, what in [(b"", "is empty"), (whole[:len(whole) // 2].rstrip(b"\n") + b"x", "is truncated or corrupt"),
                      (b"schema: '2.0'\n", "is truncated or corrupt"), (b"stages: [\n", "is truncated or corrupt")]:
        lock.write_bytes(cut)
        with pytest.raises(UserError, match=f"^{lock} {what}.*{restore}") as e:
            check_dvc_lock(tmp_path)
        assert "\n" not in str(e.value)

    # cut at a line's end: it parses, but its last entry lacks what dvc writes last (an output's size, its outputs)
    lines = whole.splitlines(keepends=True)
    last_out = max(i for i, line in enumerate(lines) if line.lstrip().startswith(b"size:"))
    for n in (last_out, last_out - 1):
        lock.write_bytes(b"".join(lines[:n]))
        with pytest.raises(UserError, match=f"^{lock} is cut short .*{restore}"):
            check_dvc_lock(tmp_path)
    # cut between two entries: whole entries, but stages locked at the last commit are gone
    import yaml

    stages = yaml.safe_load(whole)["stages"]
    if len(stages) >= 2:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        lock.write_bytes(whole)
        subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "lock"], cwd=tmp_path,
                       check=True)
        check_dvc_lock(tmp_path)
        first = yaml.safe_dump({"schema": "2.0", "stages": dict(list(stages.items())[:1])}).encode()
        lock.write_bytes(first)
        with pytest.raises(UserError, match=f"^{lock} lacks {len(stages) - 1} stage"):
            check_dvc_lock(tmp_path)
        lock.write_bytes(b"".join(lines[:last_out - 3]))  # between the last two outputs of the last entry
        with pytest.raises(UserError, match=f"^{lock} lacks 1 stage.*{list(stages)[-1]}"):
            check_dvc_lock(tmp_path)
        # a stage added since the last commit (dvc appends it), cut between its outputs: fewer than dvc.yaml gives it
        *before, last = stages
        declared = len(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][last.split("@")[0]]["outs"])
        if declared >= 2:
            shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
            lock.write_bytes(yaml.safe_dump({"schema": "2.0", "stages": {k: stages[k] for k in before}},
                                            sort_keys=False).encode())
            subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "lock"],
                           cwd=tmp_path, check=True)
            cut = {**stages, last: {**stages[last], "outs": stages[last]["outs"][:-1]}}
            lock.write_bytes(yaml.safe_dump({"schema": "2.0", "stages": cut}, sort_keys=False).encode())
            with pytest.raises(UserError, match=f"^{lock} is cut short \\(the entry of {last} has {declared - 1} of "
                                                f"the {declared} outputs"):
                check_dvc_lock(tmp_path)
            lock.write_bytes(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False).encode())
            check_dvc_lock(tmp_path)  # whole, it passes
            (tmp_path / "dvc.yaml").unlink()
        shutil.rmtree(tmp_path / ".git")

    for d in ("src", "conf"):
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    lock.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    for args, extra in [(["src.run.plan"], {}), (["src.train", "trainer=smoke"], {"DVC_STAGE": "train@0-fcn-r"}),
                        (["src.data.distort", "data=r"], {"DVC_STAGE": "distort@r"})]:
        r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == [f"error: {lock} is empty, {restore} (then `dvc commit -f` any stage "
                                                 f"locked since that commit)"], (args, r.stderr)
