"""Data checked on load: a split whose checksum was rewritten after an edit is still refused, in one line
(exit code 2) naming the file, the first bad index and what is wrong, before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from src.data.datamodule import DistortedMNIST
from src.data.mnist import DataError, load_raw, save_raw
from src.runinfo import sha256_file
from src.config import compose_config
from src.train import REPO, train


def _nan_pixel(d):
    d["images"] = d["images"].float() / 255
    d["images"][17, 0, 5, 5] = float("nan")


def _bright_pixel(d):
    d["images"] = d["images"].float() / 255
    d["images"][4, 0, 5, 5] = 5.0


def _labels(i, v):
    def poison(d):
        d["labels"][i] = v
        d["labels"][i + 5] = 11  # a later bad label: the first one is named
    return poison


POISONS = {  # name → (edit of the split's dict, what the error says)
    "nan pixel": (_nan_pixel, r"images are float32, expected uint8"),
    "pixel of 5.0": (_bright_pixel, r"images are float32, expected uint8"),
    "smaller canvas": (lambda d: d.update(images=d["images"][:, :, 1:, 1:].clone()),
                       r"images have shape \(\d+, 1, 27, 27\), expected \(N, 1, 28, 28\)"),
    "three channels": (lambda d: d.update(images=d["images"].expand(-1, 3, -1, -1).clone()),
                       r"images have shape \(\d+, 3, 28, 28\), expected \(N, 1, 28, 28\)"),
    "label 10": (_labels(3, 10), r"label 3 is 10, outside 0\.\.9"),
    "label -1": (_labels(0, -1), r"label 0 is -1, outside 0\.\.9"),
    "float labels": (lambda d: d.update(labels=d["labels"].float()), r"labels are float32 of shape \(\d+,\), expected int64"),
    "a label short": (lambda d: d.update(labels=d["labels"][:-1].clone()), r"\d+ images but \d+ labels"),
    "no labels": (lambda d: d.pop("labels"), r"not a dict of 'images' and 'labels' tensors"),
}


def poisoned(synthetic_data, tmp_path, split: str, poison) -> dict:
    """A copy of the synthetic data with ``split`` edited by ``poison`` and its manifest checksum rewritten."""
    data_dir = tmp_path / "distorted"
    shutil.copytree(synthetic_data["data_dir"], data_dir)
    f = data_dir / "r" / f"{split}.pt"
    d = torch.load(f, weights_only=True)
    poison(d)
    torch.save(d, f)
    manifest = json.loads((data_dir / "r" / "manifest.json").read_text())
    manifest["files"][f"{split}.pt"]["sha256"] = sha256_file(f)
    (data_dir / "r" / "manifest.json").write_text(json.dumps(manifest))
    return {**synthetic_data, "data_dir": data_dir}


def overrides(data: dict, tmp_path) -> list[str]:
    return ["trainer=smoke", "quiet=true", "model=fcn", "loader.mode=fixed", "loader.on_device=false",
            f"paths.data_dir={data['data_dir']}", f"paths.raw_file={data['raw_file']}", f"paths.run_dir={tmp_path / 'run'}",
            f"paths.metrics_file={tmp_path / 'metrics.json'}", f"paths.curve_file={tmp_path / 'curve.csv'}"]


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_bad_split_is_refused_when_set_up_for_fit(synthetic_data, tmp_path, split, poison):
    edit, says = POISONS[poison]
    data = poisoned(synthetic_data, tmp_path, split, edit)
    cfg = compose_config(overrides(data, tmp_path))
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, bool(cfg.stn.align_corners), cfg.seed)
    with pytest.raises(DataError, match=says) as e:
        dm.setup("fit")  # what train() calls: every split is loaded and checked here
    msg = str(e.value)
    assert msg.startswith(f"{data['data_dir'] / 'r' / split}.pt: ") and "\n" not in msg, msg
    assert msg.endswith("run `dvc repro distort@r` again") and e.value.exit_code == 2


def test_the_raw_file_is_checked_the_same_way(synthetic_raw, tmp_path):
    raw = {s: dict(d) for s, d in synthetic_raw.items()}
    raw["val"]["labels"] = raw["val"]["labels"].clone()
    raw["val"]["labels"][7] = 10
    save_raw(raw, tmp_path / "mnist.pt")  # with its sidecar: the checksum matches
    with pytest.raises(DataError, match=r"mnist\.pt \(val\): label 7 is 10, outside 0\.\.9; run `dvc repro prepare` again"):
        load_raw(tmp_path / "mnist.pt")
    raw["val"] = dict(synthetic_raw["val"])
    raw["test"]["images"] = raw["test"]["images"].float()
    save_raw(raw, tmp_path / "mnist.pt")
    with pytest.raises(DataError, match=r"mnist\.pt \(test\): images are float32, expected uint8"):
        load_raw(tmp_path / "mnist.pt")


def test_a_bad_val_split_stops_training_before_anything_is_written(synthetic_data, tmp_path):
    data = poisoned(synthetic_data, tmp_path, "val", _nan_pixel)
    with pytest.raises(DataError, match=r"val\.pt: images are float32, expected uint8"):
        train(compose_config(overrides(data, tmp_path)))
    assert not (tmp_path / "run").exists() and not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "curve.csv").exists()


def test_a_bad_test_label_is_one_line_and_exit_code_2_from_the_command_line(synthetic_data, tmp_path):
    data = poisoned(synthetic_data, tmp_path, "test", _labels(3, 10))
    r = subprocess.run([sys.executable, "-m", "src.train", *overrides(data, tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {data['data_dir'] / 'r' / 'test.pt'}: label 3 is 10, outside 0..9; "
                                             f"run `dvc repro distort@r` again"], r.stderr
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {".hydra", "train.log"}  # Hydra's own, written before train()
    assert not (tmp_path / "metrics.json").exists()
