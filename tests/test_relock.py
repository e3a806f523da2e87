"""src/run/relock.py: the cells stale through training code only are re-locked as `dvc commit -f` re-locks them,
in one write of dvc.lock, and nothing is written when the fingerprint moved or more than code changed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from dvc.dvcfile import ProjectFile

import src.run.relock as relock_mod
from src.runinfo import UserError

CELL_CMD = "python -m src.train model=fcn data=r seed={s}"
DUMP = ProjectFile.dump_stages


def dvc(proj, *args):
    return subprocess.run(["dvc", *args], cwd=proj, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def proj(tmp_path):
    """A DVC project with two committed cells and one other stage, all depending on src/code.py."""
    p = tmp_path / "proj"
    (p / "src").mkdir(parents=True)
    (p / "src/code.py").write_text("x = 1\n")
    stages = {f"cell{s}": {"cmd": CELL_CMD.format(s=s), "deps": ["src/code.py"], "outs": [f"out{s}.txt"]}
              for s in (0, 1)}
    stages["report"] = {"cmd": "python report.py", "deps": ["src/code.py"], "outs": ["report.txt"]}
    (p / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for out in ("out0.txt", "out1.txt", "report.txt"):
        (p / out).write_text(out)
    dvc(p, "init", "--no-scm", "-q")
    dvc(p, "commit", "-f", "-q", "cell0", "cell1", "report")
    return p


def test_code_only_cells_are_relocked_as_dvc_commit_would_in_one_write(proj, tmp_path, monkeypatch):
    (proj / "src/code.py").write_text("x = 2  # same results\n")
    twin = tmp_path / "twin"
    shutil.copytree(proj, twin)
    names = relock_mod.code_only_stages(proj)
    assert names == ["cell0", "cell1"]  # the report stage is no cell: the fingerprint says nothing of it
    dumps = []
    monkeypatch.setattr(ProjectFile, "dump_stages", lambda self, stages, **kw: dumps.append(stages) or
                        DUMP(self, stages, **kw))
    relock_mod.relock(names, proj, relock_mod.source_state(proj))
    assert len(dumps) == 1
    assert set(yaml.safe_load(dvc(proj, "status", "--json"))) == {"report"}
    dvc(twin, "commit", "-f", "-q", "cell0", "cell1")
    assert (proj / "dvc.lock").read_text() == (twin / "dvc.lock").read_text()


def test_changed_outputs_or_code_changed_meanwhile_relock_nothing(proj):
    (proj / "src/code.py").write_text("x = 2\n")
    source = relock_mod.source_state(proj)
    before = (proj / "dvc.lock").read_text()
    (proj / "out1.txt").write_text("another result")
    with pytest.raises(UserError, match="cell1: its outputs changed"):
        relock_mod.relock(["cell0", "cell1"], proj, source)
    (proj / "out1.txt").write_text("out1.txt")
    (proj / "src/code.py").write_text("x = 3  # edited while the fingerprint ran\n")
    with pytest.raises(UserError, match="src/ changed"):
        relock_mod.relock(["cell0", "cell1"], proj, source)
    assert (proj / "dvc.lock").read_text() == before


def test_a_moved_fingerprint_relocks_nothing(proj, monkeypatch, capsys):
    (proj / "src/code.py").write_text("x = 3  # other results\n")
    monkeypatch.setattr(relock_mod, "REPO", proj)
    monkeypatch.setattr(relock_mod, "fingerprint_moved", lambda: ["0-fcn-r"])
    before = (proj / "dvc.lock").read_text()
    with pytest.raises(SystemExit) as e:
        relock_mod.main([])
    assert e.value.code == 1
    assert "fingerprint moved for 0-fcn-r" in capsys.readouterr().err
    assert (proj / "dvc.lock").read_text() == before
