"""The data_stats stage: image statistics, P's frame cost from the recorded draws, the raw digits by split,
one-line errors."""

from __future__ import annotations

import re

import pytest
import torch

from src.data import distort
from src.report import data_stats as stats
from src.data.distort import load_split
from src.runinfo import UserError
from src.config import compose_config


def distort_into(tmp_path, name: str, raw, *overrides: str):
    distort.main([f"data={name}", f"paths.raw_file={raw}", f"paths.data_dir={tmp_path / 'distorted'}", *overrides])
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
    previews = tmp_path / "previews"
    argv = [f"paths.raw_file={raw_file}", f"paths.data_dir={data}", f"paths.preview_dir={previews}"]
    previews.mkdir()
    (previews / "gone.png").write_bytes(b"")  # a dataset no longer in the grid: its preview goes too
    params.write_text("distortions: [r]\nsensitivity: {p_data: [p], e_data: []}\n")  # p as a variant's data
    stats.main(argv)
    assert sorted(p.name for p in previews.iterdir()) == ["p.png", "r.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in previews.iterdir())
    params.write_text("distortions: [r, p]\n")
    stats.main(argv)
    text = out.read_text()
    assert re.search(r"\| R +\| 28×28", text) and re.search(r"\| P +\| 28×28", text)
    assert "## P: what the frame costs" in text and "every draw lies whole" in text
    raw_part = text.split("## The raw digits: test against validation")[1]
    assert "## P: what the frame costs" not in raw_part  # the raw digits come last
    rows = [line.split("|")[1].strip() for line in raw_part.splitlines() if line.startswith("| ")][1:]
    assert rows == ["training (40)", "validation (20)", "test (20)", "test − validation"]  # no halves: not MNIST's test set
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


def bars(widths: list[int], length: int = 20, canvas: int = 28) -> torch.Tensor:
    """Upright bars, ``w`` px wide and ``length`` px high, one image each (uint8)."""
    x = torch.zeros(len(widths), 1, canvas, canvas, dtype=torch.uint8)
    for i, w in enumerate(widths):
        x[i, 0, 4:4 + length, 12:12 + w] = 255
    return x


def test_digit_stats_of_known_shapes():
    """A bar w px wide and L long: stroke width 2·A/P = w·L/(w + L), bounding box L × w, no slant."""
    s = stats.digit_stats(bars([1, 2, 3]))
    assert s["stroke"].tolist() == pytest.approx([20 / 21, 40 / 22, 60 / 23])
    assert s["height"].tolist() == [20, 20, 20] and s["width"].tolist() == [1, 2, 3]
    assert s["ink"].tolist() == pytest.approx([20, 40, 60]) and s["ink_px"].tolist() == pytest.approx([20 / 784, 40 / 784, 60 / 784])
    assert s["slant"].tolist() == pytest.approx([0, 0, 0], abs=1e-9)
    lean = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    for r in range(4, 24):  # one px to the right per px up: a 45° slant, the top to the right
        lean[0, 0, r, 4 + (23 - r):4 + (23 - r) + 2] = 255
    lean[1] = lean[0].flip(-1)  # its mirror image leans left
    s = stats.digit_stats(lean)
    assert s["slant"].tolist() == pytest.approx([45, -45]) and s["width"].tolist() == [21, 21]
    edge = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    edge[0, 0, :2, :] = 255  # two full rows on the border: the image edge is background, P = 2·28 + 2·2
    edge[1, 0, 5, 5] = 100  # below INK: ink mass but no ink pixel, so no stroke, box or width
    s = stats.digit_stats(edge)
    assert s["stroke"].tolist() == pytest.approx([2 * 56 / 60, 0]) and s["height"].tolist() == [2, 0]
    assert s["ink"][1].item() == pytest.approx(100 / 255) and s["ink_px"][1].item() == 0 and s["width"][1].item() == 0
    blank = stats.digit_stats(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert all(v.item() == 0 for v in blank.values())


def test_split_stats_are_means_with_standard_errors_whatever_the_chunk(monkeypatch):
    x = bars([2, 2, 3, 3])
    s = stats.split_stats(x)
    widths = torch.tensor([40 / 22, 40 / 22, 60 / 23, 60 / 23], dtype=torch.float64)
    assert s["stroke"] == pytest.approx((widths.mean().item(), (widths.std() / 2).item()))
    assert s["height"] == (20, 0)
    monkeypatch.setattr(stats, "CHUNK", 3)
    assert stats.split_stats(x) == pytest.approx(s)


def test_the_test_halves_are_mnist_first_and_last_5000():
    first, last = stats.nist_halves(10_000)
    assert (first.start, first.stop, last.start, last.stop) == (0, 5_000, 5_000, 10_000)
    assert stats.nist_halves(60) is None and stats.nist_halves(5_000) is None


def test_raw_section_compares_the_splits_and_the_test_halves():
    """Test digits 2 px wide in the first 5,000, 3 px in the last: each half reads its own width exactly."""
    raw = {"train": {"images": bars([2, 3]), "labels": torch.zeros(2, dtype=torch.int64)},
           "val": {"images": bars([2, 2]), "labels": torch.zeros(2, dtype=torch.int64)},
           "test": {"images": bars([2] * 5_000 + [3] * 5_000), "labels": torch.zeros(10_000, dtype=torch.int64)}}
    lines = stats._raw_section(raw)
    assert lines[0] == "## The raw digits: test against validation"
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in "\n".join(lines).splitlines() if line.startswith("| ")]
    col = table[0].index("stroke width (px)")
    rows = {r[0]: r[col] for r in table[1:]}
    two, three = 40 / 22, 60 / 23
    mixed = torch.tensor([two] * 5_000 + [three] * 5_000, dtype=torch.float64)
    assert rows == {"training (2)": f"{(two + three) / 2:.3f} ± {(three - two) / 2:.3f}",  # std of two = |a − b|/√2
                    "validation (2)": f"{two:.3f} ± 0.000", "test (10,000)": f"{mixed.mean():.3f} ± {mixed.std() / 100:.3f}",
                    "test 1–5,000 (SD-3)": f"{two:.3f} ± 0.000", "test 5,001–10,000 (SD-1)": f"{three:.3f} ± 0.000",
                    "test − validation": f"+{(three - two) / 2:.3f} ± {mixed.std() / 100:.3f}",
                    "last − first test half": f"+{three - two:.3f} ± 0.000"}
    assert table[0][1:] == ["ink mass", "ink pixels %", "stroke width (px)", "height (px)", "width (px)", "slant (°)"]
