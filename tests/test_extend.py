"""Adding a transform, a model family and a distortion goes through exactly the path docs/extending.md describes.

A toy 'translation' transform (2 parameters) and a toy 'mlp_tanh' family are registered at runtime,
built into a budget-matched ST network by ``build_net``, and checked like the study's own: identity
at initialisation, statistics, caption, drawing lattice, config keys and closed-form count; then through
the report, with a toy distortion: row label, θ summary and test error binned by its recorded shift.
Every registration is undone afterwards.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from src.models.nets import FAMILIES, N_CLASSES, Family, build_net, classifier_params, count_params
from src.stn.grids import GRIDS, GridGenerator, base_grid, register_transform
from src.stn.stats import theta_stats
from src.report.figures import frame_corners, frame_lattice
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import budget, config, digit_batch


class TranslationGrid(GridGenerator):
    """θ = (tx, ty), scaled by ``scale`` (the ``stn.translation_scale`` key): x_in = x + scale·tx."""

    n_params = 2
    label = "Translation"
    config_keys = {"translation_scale": "scale"}

    def __init__(self, out_hw, align_corners: bool, scale: float = 1.0):
        super().__init__(out_hw, align_corners)
        self.scale = float(scale)
        self.register_buffer("base", base_grid(*self.out_hw, align_corners, dtype=torch.float64), persistent=False)

    def options(self) -> dict:
        return {"scale": self.scale}

    def identity(self) -> torch.Tensor:
        return torch.zeros(2)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        self._check(theta)
        return self.base.to(theta.dtype) + self.scale * theta[:, None, None, :]

    @torch.no_grad()
    def stats(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().stats(theta)
        out["shift"] = self.scale * theta.norm(dim=1).mean()
        return out

    def describe(self, theta: torch.Tensor) -> str:
        tx, ty = (self.scale * theta.reshape(-1)).tolist()
        return f"shift ({tx:+.2f}, {ty:+.2f})"


def mlp_tanh(in_hw, widths, ceil_mode=True) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_hw[0] * in_hw[1], widths[0]), nn.Tanh(),
                         nn.Linear(widths[0], N_CLASSES))


def mlp_tanh_params(in_hw, widths, ceil_mode=True) -> int:
    return (in_hw[0] * in_hw[1] + 1) * widths[0] + (widths[0] + 1) * N_CLASSES


@pytest.fixture
def registered(monkeypatch):
    """The toy transform and family, registered as docs/extending.md says, and removed again afterwards."""
    before = (dict(GRIDS), dict(FAMILIES))
    register_transform("translation")(TranslationGrid)
    monkeypatch.setitem(FAMILIES, "mlp_tanh", Family(mlp_tanh, mlp_tanh_params))
    yield
    del GRIDS["translation"]
    monkeypatch.undo()
    assert (GRIDS, FAMILIES) == before


MODEL = {"name": "st_mlp_translation", "family": "mlp_tanh", "widths": [64], "transform": "translation",
         "loc": "fcn", "loc_widths": [16]}


def stn_cfg(**extra):
    return OmegaConf.merge(config().stn, extra)


def test_toy_transform_and_family_build_an_identity_st_model(registered):
    torch.manual_seed(0)
    net = build_net(OmegaConf.create(MODEL), (28, 28), budget(28), stn_cfg(translation_scale=0.5), 1).double()
    assert isinstance(net.st.grid, TranslationGrid) and net.st.grid.options() == {"scale": 0.5}
    assert abs(count_params(net) - budget(28)) <= config().budget.tol * budget(28)
    widths = [net.classifier[1].out_features]
    assert count_params(net.classifier) == classifier_params("mlp_tanh", (28, 28), widths)

    x, _ = digit_batch(3, 28, dtype=torch.float64)
    y, theta = net.st(x)
    assert torch.equal(theta, torch.zeros(3, 2, dtype=torch.float64))
    assert (y - x).abs().max() <= 1e-12
    assert (net(x) - net.classifier(x)).abs().max() <= 1e-12

    stats = theta_stats(net.st, theta)
    assert set(stats) == {"theta_dev", "outside", "shift"} and all(v.item() == 0 for v in stats.values())


def test_toy_transform_stats_caption_and_lattice(registered):
    gen = GRIDS["translation"].from_config((6, 9), False, stn_cfg(translation_scale=0.5)).double()
    theta = torch.tensor([[0.4, -0.2]], dtype=torch.float64)  # moves the frame by (0.2, -0.1)
    stats = gen.stats(theta)
    assert stats["shift"].item() == pytest.approx(0.5 * (0.4**2 + 0.2**2) ** 0.5)
    assert stats["theta_dev"].item() == pytest.approx(0.3) and stats["outside"].item() > 0
    assert gen.describe(theta[0]) == "shift (+0.20, -0.10)"
    assert (gen.lattice_lines, gen.lattice_sub) == (2, 1)  # the base-class defaults: a straight frame

    st = nn.Module()  # what the figures need of a transformer: its generator
    st.grid = gen
    corners = frame_corners(frame_lattice(st, theta, gen.lattice_lines, gen.lattice_sub), (6, 9), False)[0]
    # the image border (pixel edges at -0.5 and W - 0.5), moved by (0.2·9/2, -0.1·6/2) pixels
    expected = torch.tensor([[-0.5, -0.5], [8.5, -0.5], [8.5, 5.5], [-0.5, 5.5]], dtype=torch.float64)
    torch.testing.assert_close(corners, expected + torch.tensor([0.9, -0.3], dtype=torch.float64), rtol=0, atol=1e-12)


def test_unregistered_names_are_refused():
    with pytest.raises(ValueError, match="unknown transform 'translation'"):
        build_net(OmegaConf.create({**MODEL, "family": "fcn", "widths": [8, 8]}), (28, 28), None, stn_cfg(), 1)
    with pytest.raises(ValueError, match="unknown classifier family 'mlp_tanh'"):
        build_net(OmegaConf.create({**MODEL, "transform": None}), (28, 28), None, stn_cfg(), 1)
    with pytest.raises(ValueError, match="unknown localisation net 'rnn'"):
        build_net(OmegaConf.create({**MODEL, "family": "fcn", "widths": [8, 8], "transform": "aff", "loc": "rnn"}),
                  (28, 28), None, stn_cfg(), 1)
    with pytest.raises(ValueError, match="already registered"):
        register_transform("aff")(TranslationGrid)


def test_a_toy_distortion_through_the_documented_path():
    """A 'shift' warp registered in WARPS and chosen by a data config's `warp` key: the stage's generator
    and the datamodule's fresh draws both use it, with parameters from the CPU generator."""
    import torch.nn.functional as F

    from src.data.distort import generate_split
    from src.data.warps import WARPS, Warp, distort_batch

    def draw(x_cpu, cfg, g, align_corners, pool_len=None):
        return {"dx": torch.randint(-int(cfg.max_shift), int(cfg.max_shift) + 1, (len(x_cpu),), generator=g)}

    def apply(x, params, cfg, align_corners, pool=None):
        pad = int(cfg.max_shift)
        wide = F.pad(x, (pad, pad))
        cols = pad - params["dx"][:, None] + torch.arange(x.shape[-1], device=x.device)  # shifted right by dx
        return wide.gather(3, cols[:, None, None, :].expand(*x.shape))

    WARPS["shift"] = Warp(draw, apply)
    try:
        cfg = OmegaConf.create({"name": "toy", "warp": "shift", "canvas": 28, "st_downsample": 1, "gen_seed": 9,
                                "max_shift": 3})
        digits = digit_batch(6, 28)[0].mul(255).round().to(torch.uint8)
        images, params = generate_split(digits, cfg, 1, False)
        assert images.shape == digits.shape and set(params) == {"dx"}
        for i, dx in enumerate(params["dx"].long().tolist()):
            assert torch.equal(images[i, 0, :, max(dx, 0):28 + min(dx, 0)], digits[i, 0, :, max(-dx, 0):28 - max(dx, 0)])
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a, pa = distort_batch(digits.float() / 255, cfg, g1)
        b, pb = distort_batch(digits.double() / 255, cfg, g2)
        assert torch.equal(pa["dx"], pb["dx"]) and torch.allclose(a.double(), b)
    finally:
        del WARPS["shift"]


def test_the_toy_model_and_distortion_reach_the_report(registered, tmp_path, monkeypatch):
    """The report names the toy model from its config and the transform's ``label``, summarises its θ by the
    transform's own ``summary``, and bins the toy distortion's test error by the measure that its line of
    conf/report/invariance.yaml names: no report code learns the new names."""
    import json

    import src.report.aggregate as aggregate
    from src.cell import Cell
    from src.report import records
    from src.config import compose_config
    from src.runinfo import sha256_file

    name = MODEL["name"]
    monkeypatch.setattr(aggregate, "model_config", lambda model: OmegaConf.create(MODEL))  # conf/model/<name>.yaml
    monkeypatch.setitem(records.MEASURES, "dx", records.Measure("shift (px)", lambda s: s["params"]["dx"], ("dx",)))
    monkeypatch.setitem(records.INVARIANCE, "toy", records.MEASURES["dx"])  # its line in conf/report/invariance.yaml
    assert aggregate.row_label(name) == "ST-MLP_TANH Translation" and not aggregate.baseline(name)

    n = 40  # the toy distortion's test split, stored as distort@toy stores it
    images, labels = digit_batch(n, 28)
    split = {"images": images.mul(255).round().to(torch.uint8), "labels": labels,
             "params": {"dx": torch.arange(n) % 7 - 3}}
    (tmp_path / "toy").mkdir()
    torch.save(split, tmp_path / "toy/test.pt")
    sha = sha256_file(tmp_path / "toy/test.pt")
    (tmp_path / "toy/manifest.json").write_text(json.dumps({"files": {"test.pt": {"sha256": sha}}}))

    cfg = OmegaConf.to_container(compose_config(["model=st_fcn", "data=r"]), resolve=True)
    cfg["model"], cfg["data"]["name"] = MODEL, "toy"
    wrong = split["params"]["dx"] > 1  # the two largest shifts are always misread
    pred = torch.where(wrong, (labels + 1) % 10, labels).to(torch.uint8)
    torch.manual_seed(0)
    rec = records.Record(Cell(0, name, "toy").name, {}, {"config": cfg},
                         {"pred": pred, "theta": (0.1 * torch.randn(n, 2)).half()})
    grid = {"models": [name], "distortions": ["toy"], "seeds": [0]}

    inv = aggregate.invariance(grid, {rec.key: rec}, tmp_path, min_images=0)
    assert set(inv.data) == {"toy"} and int(inv.wrong.sum()) == int(wrong.sum()) and inv.err.iloc[-1] == 100
    table = aggregate.invariance_tables(inv)[2]
    assert table.startswith("| shift (px)") and "ST-MLP_TANH Translation (n=1)" in table
    thetas = aggregate.theta_table(grid, {rec.key: rec}, tmp_path)
    assert list(thetas.columns) == ["cell", "theta_dev", "outside", "shift"] and thetas["shift"].iloc[0] > 0
