"""src/run/relock.py: the cells stale through training code only are re-locked in one write of dvc.lock, and
only when the result fingerprint holds."""

from __future__ import annotations

import subprocess

import pytest
import yaml

import src.run.relock as relock_mod

CELL_CMD = "python -m src.train model=fcn data=r seed={s}"


def dvc(proj, *args):
    return subprocess.run(["dvc", *args], cwd=proj, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def proj(tmp_path):
    """A DVC project with two committed cells and one other stage, all depending on src/code.py."""
    p = tmp_path / "proj"
    (p / "src").mkdir(parents=True)
    (p / "src/code.py").write_text("x = 1\n")
    stages = {f"cell{s}": {"cmd": CELL_CMD.format(s=s), "deps": ["src/code.py"], "outs": [f"out{s}.txt"]} for s in (0, 1)}
    stages["report"] = {"cmd": "python report.py", "deps": ["src/code.py"], "outs": ["report.txt"]}
    (p / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for out in ("out0.txt", "out1.txt", "report.txt"):
        (p / out).write_text(out)
    dvc(p, "init", "--no-scm", "-q")
    dvc(p, "commit", "-f", "-q", "cell0", "cell1", "report")
    return p


def test_code_only_cells_are_relocked_and_nothing_else(proj, monkeypatch):
    monkeypatch.chdir(proj)  # DVC names stages relative to the working directory, as `dvc` run in the project
    (proj / "src/code.py").write_text("x = 2  # same results\n")
    names = relock_mod.code_only_stages(proj)
    assert names == ["cell0", "cell1"]  # the report stage is no cell: the fingerprint says nothing of it
    relock_mod.relock(names, proj)
    status = dvc(proj, "status", "--json")
    assert set(yaml.safe_load(status)) == {"report"}
    assert relock_mod.code_only_stages(proj) == []


def test_a_moved_fingerprint_relocks_nothing(proj, monkeypatch, capsys):
    (proj / "src/code.py").write_text("x = 3  # other results\n")
    monkeypatch.chdir(proj)
    monkeypatch.setattr(relock_mod, "REPO", proj)
    monkeypatch.setattr(relock_mod, "fingerprint_moved", lambda: ["0-fcn-r"])
    before = (proj / "dvc.lock").read_text()
    with pytest.raises(SystemExit) as e:
        relock_mod.main([])
    assert e.value.code == 1
    assert "fingerprint moved for 0-fcn-r" in capsys.readouterr().err
    assert (proj / "dvc.lock").read_text() == before
