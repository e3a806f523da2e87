"""The sensitivity study: its variants, their data, and the report's refusal of a record made on other data."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import synthetic_digits

from src.report import sensitivity
from src.cell import Cell
from src.config import ConfigError, compose_config, result_config
from src.data.distort import generate_split
from src.data.warps import FRAME
from src.runinfo import REPO, UserError

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())["sensitivity"]
VARIANTS = sorted({v for family in sensitivity.FAMILIES for v in PARAMS[family]})


def dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_params_list_every_variant_file_and_its_data():
    files = sorted(p.stem for p in (REPO / "conf/experiment/sensitivity").glob("*.yaml"))
    assert VARIANTS == files
    for family in ("p", "e"):  # the data variants: all but the main recipe, which is Table 1's own data
        assert PARAMS[f"{family}_data"] == [v for v in PARAMS[family] if v != family]


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_differs_from_its_main_recipe_only_in_the_keys_it_overrides(name):
    v = sensitivity.variant(name)
    ours = dotted(result_config(compose_config([f"+experiment=sensitivity/{name}", "model=fcn"])))
    main = dotted(result_config(compose_config([f"data={v.family}", "model=fcn"])))
    differ = {k for k in ours.keys() | main.keys() if ours.get(k, "absent") != main.get(k, "absent")}
    written = yaml.safe_load((REPO / f"conf/experiment/sensitivity/{name}.yaml").read_text())
    overridden = {k for k in dotted({k: v for k, v in written.items() if k not in ("defaults",)})}
    assert differ == overridden, name
    assert (v.data["name"] == name) == (v.family in ("p", "e") or v.main), "a data variant has its own data directory"
    assert v.main == (name == v.family)
    cell = Cell.of(compose_config([f"+experiment=sensitivity/{name}", "model=fcn", "seed=2"]))
    assert cell.name == f"2-fcn-{name}" and cell.key == f"sensitivity-2-fcn-{name}"


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.startswith(("p", "e"))])
def test_variant_data_generate_deterministically(name):
    cfg = compose_config([f"+experiment=sensitivity/{name}"])
    x = synthetic_digits(48, 5)
    a, pa = generate_split(x, cfg.data, 123, cfg.stn.align_corners)
    b, pb = generate_split(x, cfg.data, 123, cfg.stn.align_corners)
    assert torch.equal(a, b) and all(torch.equal(pa[k], pb[k]) for k in pa)
    main = compose_config([f"data={name[0]}"])
    m, _ = generate_split(x, main.data, 123, main.stn.align_corners)
    assert torch.equal(a, m) == (name in ("p", "e")), "a variant's data differ from the main recipe's"


def test_the_outward_reading_moves_each_corner_out_along_its_diagonal():
    cfg = compose_config(["+experiment=sensitivity/p_outward"])
    _, params = generate_split(synthetic_digits(64, 1), cfg.data, 7, cfg.stn.align_corners)
    moves = params["corners"].double()  # (N, 4, 2) px, corners TL, TR, BR, BL
    out = torch.tensor(FRAME, dtype=torch.float64)  # each corner's outward direction (±1, ±1)
    assert (moves * out >= 0).all(), "every move points away from the centre"
    assert torch.allclose(moves[..., 0].abs(), moves[..., 1].abs()), "along the diagonal"
    reach = moves.norm(dim=-1)
    assert 3.0 < float(reach.mean()) < 5.0  # E|N(0, 5²)| = 5·√(2/π) ≈ 3.99


def test_the_60k_variant_trains_on_the_validation_digits_too(synthetic_data):
    from src.data.datamodule import DistortedMNIST

    assert sensitivity.variant("rts_60k").held_out_val is False
    cfg = compose_config([f"paths.data_dir={synthetic_data['data_dir']}", f"paths.raw_file={synthetic_data['raw_file']}",
                          "loader.on_device=false", "+loader.train_digits=train"])
    for digits, n in (("train", 2000), ("train+val", 2400)):
        cfg.loader.train_digits = digits
        dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, False, 0)
        dm.setup("fit")
        assert len(dm.train_labels) == n
    for bad in (["+loader.train_digits=val"], ["+loader.train_digits=train+val", "loader.mode=fixed"]):
        with pytest.raises(ConfigError, match="loader.train_digits"):  # the config refuses them, before any data
            compose_config(bad)


# ------------------------------------------------------------------ the report


def write_record(reports: Path, key: str, data: dict, test_sha: str, err: float = 2.5) -> None:
    (reports / "metrics").mkdir(parents=True, exist_ok=True)
    (reports / "cells" / key).mkdir(parents=True, exist_ok=True)
    (reports / "metrics" / f"{key}.json").write_text(json.dumps(
        {"test": {"err": err, "err_last": err, "err_best": err}, "val": {"err_last": err - 0.2, "err_best": err - 0.3},
         "params": {"n": 1}, "steps": 40000}))
    (reports / "cells" / key / "provenance.json").write_text(json.dumps(
        {"commit": "a" * 40, "device": "cpu", "fit_seconds": 60, "config": {"data": data, "model": {}}}))
    buf = io.BytesIO()
    torch.save({"pred": torch.zeros(10_000, dtype=torch.uint8), "test_sha256": test_sha}, buf)
    (reports / "cells" / key / "outcomes.pt").write_bytes(buf.getvalue())


def one_cell_grid(tmp_path, variant: str = "p_sigma2"):
    params = {"sensitivity": {"seeds": [0], "models": ["fcn"], "p": [variant], "e": [], "rts_models": [], "rts": []}}
    v = sensitivity.variant(variant)
    data_dir = tmp_path / "data"
    (data_dir / v.data["name"]).mkdir(parents=True)
    (data_dir / v.data["name"] / "manifest.json").write_text(json.dumps({"files": {"test.pt": {"sha256": "good"}}}))
    return params, v, data_dir, tmp_path / "reports"


def test_the_report_reads_a_variant_record_made_on_its_data(tmp_path):
    params, v, data_dir, reports = one_cell_grid(tmp_path)
    write_record(reports, "0-fcn-p_sigma2", v.data, "good")
    df = sensitivity.collect(params, reports, data_dir)
    assert df.run.tolist() == [True] and df.test_err.tolist() == [2.5] and df.wrong.tolist() == [250]


def test_the_report_refuses_a_variant_record_made_on_other_data(tmp_path):
    params, v, data_dir, reports = one_cell_grid(tmp_path)
    write_record(reports, "0-fcn-p_sigma2", {**v.data, "corner_sigma_px": 5.0}, "good")
    with pytest.raises(UserError, match=r"other data than variant p_sigma2 \(data.corner_sigma_px differ\)"):
        sensitivity.collect(params, reports, data_dir)
    write_record(reports, "0-fcn-p_sigma2", v.data, "stale")  # its config, another test set
    with pytest.raises(UserError, match="tested on another test set"):
        sensitivity.collect(params, reports, data_dir)


def test_projection_scales_a_variant_by_its_main_recipes_full_budget_gain():
    import pandas as pd

    sens = pd.DataFrame([
        {"family": "p", "variant": "p", "main": True, "model": "fcn", "run": True, "test_err": 10.0},
        {"family": "p", "variant": "p_sigma2", "main": False, "model": "fcn", "run": True, "test_err": 4.0},
        {"family": "p", "variant": "p_sigma3", "main": False, "model": "fcn", "run": False, "test_err": float("nan")},
    ])
    table = pd.DataFrame([{"model": "fcn", "distortion": "p", "run": True, "test_err": e} for e in (8.0, 9.0)])
    proj = sensitivity.projection(sens, table)
    assert proj[0] == pytest.approx(8.5) and proj[1] == pytest.approx(3.4) and np.isnan(proj[2])


@pytest.mark.slow
def test_adding_the_study_restales_no_committed_table_cell():
    """dvc status over Table 1's committed cells: nothing but data a fresh clone has not generated yet."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    committed = [s for s, st in lock.items() if s.startswith(("train@", "short@"))  # those with a record in git
                 and all((REPO / o["path"]).exists() for o in st.get("outs", []))]
    # one status of every stage, then the committed ones: naming 70 targets makes dvc resolve the file 70 times
    out = subprocess.run(["dvc", "status", "--json"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    stale = {}
    for stage, changes in json.loads(out.stdout or "{}").items():
        if stage not in committed:
            continue
        for change in changes:
            for kind, what in (change.items() if isinstance(change, dict) else []):
                bad = {p: s for p, s in (what.items() if isinstance(what, dict) else [])
                       if not (kind == "changed deps" and p.startswith("data/") and s in ("deleted", "not in cache"))}
                if bad or not isinstance(what, dict):
                    stale.setdefault(stage, []).append((kind, bad or what))
    assert not stale, stale
