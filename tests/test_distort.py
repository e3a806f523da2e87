"""The distort stage: outputs, manifest, determinism of the files, atomicity, one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.data import distort as stage
from src.runinfo import UserError

REPO = Path(__file__).resolve().parents[1]
CANVAS = {"r": 28, "rts": 42, "p": 28, "e": 28, "tc": 60}
DISTORTIONS = tuple(sorted(p.stem for p in (REPO / "conf/data").glob("*.yaml")))


def args(name: str, raw: Path, tmp: Path) -> list[str]:
    return [f"data={name}", f"paths.raw_file={raw}", f"paths.data_dir={tmp / 'distorted'}"]


@pytest.mark.parametrize("name", DISTORTIONS)
def test_stage_writes_the_dataset(name, raw_file, synthetic_raw, tmp_path):
    stage.main(args(name, raw_file, tmp_path))
    out = tmp_path / "distorted" / name
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.pt", "train.pt", "val.pt"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directories left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == name and manifest["config"]["name"] == name
    for split in ("train", "val", "test"):
        f = out / f"{split}.pt"
        assert manifest["files"][f"{split}.pt"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        d = torch.load(f, weights_only=True)
        n = len(synthetic_raw[split]["labels"])
        assert d["images"].dtype == torch.uint8 and d["images"].shape == (n, 1, CANVAS[name], CANVAS[name])
        assert torch.equal(d["labels"], synthetic_raw[split]["labels"])  # labels untouched, so histograms equal
        assert torch.equal(torch.bincount(d["labels"], minlength=10),
                           torch.bincount(synthetic_raw[split]["labels"], minlength=10))
        assert all(v.dtype == torch.float32 and v.shape[0] == n for v in d["params"].values())
        assert stage.load_split(out, split)["images"].shape == d["images"].shape


def test_rerun_gives_identical_files_and_tampering_is_detected(raw_file, tmp_path):
    stage.main(args("rts", raw_file, tmp_path))
    out = tmp_path / "distorted" / "rts"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    stage.main(args("rts", raw_file, tmp_path))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    data = bytearray(first["val.pt"])
    data[-50] ^= 1
    (out / "val.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="dvc repro distort@rts"):
        stage.load_split(out, "val")


def test_interrupted_write_leaves_no_output(raw_file, tmp_path, monkeypatch):
    orig, calls = Path.write_bytes, []

    def fail_on_second(self, data):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        stage.main(args("r", raw_file, tmp_path))
    assert len(calls) == 2
    assert not any((tmp_path / "distorted").iterdir())  # neither the dataset nor its temporary directory


def _run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.data.distort", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_missing_raw_file_is_a_one_line_error(tmp_path):
    r = _run_cli(*args("r", tmp_path / "raw" / "mnist.pt", tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "run `dvc repro prepare`" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "distorted").exists()


def test_tampered_raw_file_is_refused(raw_file, tmp_path):
    data = bytearray(raw_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    raw_file.write_bytes(bytes(data))
    r = _run_cli(*args("p", raw_file, tmp_path))
    assert r.returncode == 1
    expected = Path(f"{raw_file}.sha256").read_text().split()[0]
    assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0
    assert expected[:16] in r.stderr and "dvc repro prepare" in r.stderr
    assert not (tmp_path / "distorted").exists()


def test_bad_override_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        stage.main(["data=nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.strip().count("\n") == 0
