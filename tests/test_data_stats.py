"""The data_stats stage: image statistics, P's frame cost from the recorded draws, one-line errors."""

from __future__ import annotations

import re

import pytest
import torch

from src.data import distort
from src.data import stats
from src.data.distort import load_split
from src.runinfo import UserError, compose_config


def distort_into(tmp_path, name: str, raw, *overrides: str):
    distort.main([f"data={name}", f"paths.raw_file={raw}", f"paths.data_dir={tmp_path / 'distorted'}",
                  f"paths.preview_dir={tmp_path / 'figures'}", *overrides])
    return tmp_path / "distorted"


def test_image_stats_measure_ink_border_and_placement():
    digits = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    digits[:, 0, 10:14, 10:14] = 255
    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    images[0, 0, 0, 5] = 255  # a stroke on the top row, 8.5 px left of the centre
    images[1, 0, 20, 22] = 128  # one dimmer pixel inside, 8.5 px right of the centre
    images[2, 0, 20, 22] = 255
    s = stats.image_stats(images, digits)
    assert s["canvas"] == 28 and s["border"] == pytest.approx(1 / 3) and s["blank"] == 0
    assert s["ink_vs_raw"] == pytest.approx((1 + 128 / 255 + 1) / 3 / 16)
    assert s["spread_x"] == pytest.approx(torch.tensor([-8.5, 8.5, 8.5]).std().item())
    assert s["spread_y"] == pytest.approx(torch.tensor([-13.5, 6.5, 6.5]).std().item())
    assert stats.image_stats(torch.zeros_like(images), digits)["blank"] == 3


def test_an_unmoved_frame_costs_nothing(raw_file, synthetic_raw, tmp_path):
    data = distort_into(tmp_path, "p", raw_file, "data.corner_sigma_px=0.0", "data.scale=[1.0,1.0]")
    split, digits = load_split(data / "p", "test"), synthetic_raw["test"]["images"]
    s = stats.frame_stats(split, digits, compose_config(["data=p"]).data, False)
    assert s["cost_mean"] == pytest.approx(0, abs=1e-12) and s["cost_p90"] == pytest.approx(0, abs=1e-12)
    assert s["kept_small"] == pytest.approx(1, abs=1e-9) and s["foreshortening"] == pytest.approx(1, abs=1e-9)
    assert s["move_mean"] == 0 and s["far"] == 0 and s["scale_sq"] == 1 and s["cut_large"] == 0


def test_the_large_canvas_holds_the_stored_one_and_p_loses_ink_to_the_frame(raw_file, synthetic_raw, tmp_path):
    data = distort_into(tmp_path, "p", raw_file)
    split, digits = load_split(data / "p", "test"), synthetic_raw["test"]["images"]
    cfg = compose_config(["data=p"]).data
    small, large = (stats.render_projective(digits, split["params"], cfg, s, False) for s in (28, 56))
    assert torch.allclose(large[..., 14:42, 14:42], small, atol=1e-12)  # the same pixels, more around them
    s = stats.frame_stats(split, digits, cfg, False)
    assert s["cost_mean"] > 0 and s["kept_small"] < s["kept_large"]  # the synthetic strokes reach the border
    split["images"] = split["images"].roll(1, dims=0)  # images no longer from their recorded draws
    with pytest.raises(UserError, match="re-rendering the recorded draws"):
        stats.frame_stats(split, digits, cfg, False)


def test_stage_writes_the_report_and_refuses_bad_input_in_one_line(raw_file, tmp_path, monkeypatch, capsys):
    data = distort_into(tmp_path, "p", raw_file)
    distort_into(tmp_path, "r", raw_file)
    out, params = tmp_path / "data.md", tmp_path / "params.yaml"
    monkeypatch.setattr(stats, "OUT", out)
    monkeypatch.setattr(stats, "PARAMS", params)
    argv = [f"paths.raw_file={raw_file}", f"paths.data_dir={data}"]
    params.write_text("distortions: [r, p]\n")
    stats.main(argv)
    text = out.read_text()
    assert re.search(r"\| R +\| 28×28", text) and re.search(r"\| P +\| 28×28", text)
    assert "## P: what the frame costs" in text and "every draw lies whole" in text
    out.unlink()
    for grid, says in [("distortions: [r, e]\n", "dvc repro distort@e"), ("profile: full\n", "non-empty list"),
                       ("distortions: []\n", "non-empty list"), ("distortions: [r\n", "non-empty list")]:
        params.write_text(grid)
        with pytest.raises(SystemExit) as e:
            stats.main(argv)
        assert e.value.code == 1 and not out.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], grid


def test_data_of_other_digits_is_refused(raw_file, tmp_path):
    data = distort_into(tmp_path, "r", raw_file)
    split = load_split(data / "r", "test")
    with pytest.raises(UserError, match="not made from these raw digits"):
        stats._checked_split(data, "r", split["labels"].roll(1))
