"""Model families: the parameter budget, closed-form counts, localisation nets, CNN shapes, model configs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from src.models.nets import FAMILIES, build_net, classifier_params, cnn, cnn_feature_size, count_params
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import ALL_MODELS, SIZES, ST_MODELS, budget, build, config, model_config

# shared/paper.md §2.2: localisation net + regression layer, by transform
LOC_PARAMS = {(loc, hw): dict(zip(("aff", "proj", "tps"), counts)) for (loc, hw), counts in {
    ("fcn", 28): (27_430, 27_496, 28_288), ("cnn", 28): (11_086, 11_128, 11_632),
    ("fcn", 42): (58_790, 58_856, 59_648), ("cnn", 42): (17_086, 17_128, 17_632),
    ("fcn", 60): (117_542, 117_608, 118_400), ("cnn", 60): (43_086, 43_128, 43_632),
}.items()}
# shared/paper.md §2.1: (family, input, widths, ceil_mode) -> parameters
CLASSIFIER_PARAMS = [
    ("cnn", 28, [32, 32], False, 54_122), ("cnn", 28, [32, 64], False, 105_610),
    ("cnn", 28, [64, 64], False, 208_586), ("cnn", 42, [32, 32], False, 60_842),
    ("cnn", 60, [32, 64], False, 167_050), ("cnn", 30, [32, 32], False, 54_122),
    ("cnn", 21, [32, 32], True, 53_162), ("cnn", 30, [32, 64], True, 108_810),
    ("cnn", 42, [64, 64], True, 229_066),
    ("fcn", 28, [128, 128], None, 118_282), ("fcn", 42, [128, 256], None, 261_514),
    ("fcn", 21, [128, 128], None, 74_378), ("fcn", 60, [256, 256], None, 990_218),
    ("fcn", 30, [128, 128], None, 133_130),
]


@pytest.mark.parametrize("hw, ds", SIZES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_is_within_the_budget(name, hw, ds):
    tol = config().budget.tol
    n = count_params(build(name, hw, ds))
    assert abs(n - budget(hw)) <= tol * budget(hw), (n, budget(hw))


@pytest.mark.parametrize("data, expected", [("r", 118_282), ("rts", 243_722), ("p", 118_282), ("e", 118_282),
                                            ("tc", 478_730)])
def test_training_budget_is_the_fcn_128_128_count(data, expected):
    """The budget src.train holds every network to: FCN 128-128 at the canvas (paper.md §2.1 table)."""
    from src.config import compose_config
    from src.models.build import build_model

    cfg = compose_config(["model=fcn", f"data={data}"])
    assert cfg.budget.rule == "match" and build_model(cfg)[1] == expected == budget(cfg.data.canvas)


@pytest.mark.parametrize("family, hw, widths, ceil_mode, expected", CLASSIFIER_PARAMS)
def test_closed_form_counts_match_the_paper_table(family, hw, widths, ceil_mode, expected):
    kw = {} if ceil_mode is None else {"ceil_mode": ceil_mode}
    assert classifier_params(family, (hw, hw), widths, **kw) == expected


@pytest.mark.parametrize("family, hw, widths, ceil_mode", [
    ("fcn", (28, 28), [128, 128], True), ("fcn", (21, 21), [64, 32], True), ("fcn", (30, 30), [100], True),
    ("cnn", (28, 28), [32, 64], True), ("cnn", (21, 21), [16, 24], True), ("cnn", (42, 42), [16, 8], False),
    ("cnn", (30, 30), [8, 8], False), ("cnn", (30, 30), [8, 8], True), ("cnn", (28, 42), [4, 6], True),
])
def test_closed_form_counts_match_the_modules(family, hw, widths, ceil_mode):
    net = FAMILIES[family].build(hw, widths, ceil_mode)
    assert classifier_params(family, hw, widths, ceil_mode) == count_params(net)
    assert net(torch.zeros(2, 1, *hw)).shape == (2, 10)


@pytest.mark.parametrize("hw, ds", SIZES)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_config_builds_a_classifier_of_its_closed_form_count(name, hw, ds):
    """Whatever a model config names is registered, and its family's closed-form count is its classifier's."""
    cfg = model_config(name)
    net = build_net(cfg, (hw, hw), None, config().stn, ds)
    cls_hw = net.st.out_hw if net.st is not None else (hw, hw)
    expected = classifier_params(cfg.family, cls_hw, list(cfg.widths), cfg.get("ceil_mode", True))
    assert count_params(net.classifier) == expected and net(torch.zeros(2, 1, hw, hw)).shape == (2, 10)


@pytest.mark.parametrize("hw, ds", SIZES)
@pytest.mark.parametrize("name", ST_MODELS)
def test_localisation_net_counts_match_the_paper(name, hw, ds):
    net = build(name, hw, ds)
    family = model_config(name).loc
    expected = LOC_PARAMS[(family, hw)][net.st.transform]
    assert net.param_counts()["st"] == expected


@pytest.mark.parametrize("hw, ceil_mode, expected", [
    ((21, 21), True, (1, 1)), ((30, 30), False, (2, 2)), ((30, 30), True, (3, 3)),
    ((28, 28), True, (2, 2)), ((42, 42), False, (5, 5)), ((42, 42), True, (6, 6)), ((60, 60), True, (10, 10)),
])
def test_cnn_feature_sizes(hw, ceil_mode, expected):
    assert cnn_feature_size(hw, ceil_mode) == expected


def test_rts_cnn_needs_ceil_mode():
    """21×21 (RTS after the ST halves it): 21 → 13 → 7 → 1 → 1 with ceil pooling; floor pooling leaves
    a 6×6 map that a 7×7 convolution cannot take."""
    net = cnn((21, 21), [32, 64], ceil_mode=True)
    assert net(torch.zeros(2, 1, 21, 21)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small.*ceil_mode=False"):
        cnn((21, 21), [32, 64], ceil_mode=False)
    floor_cfg = OmegaConf.merge(model_config("st_cnn"), {"ceil_mode": False})
    with pytest.raises(ValueError, match="too small"):
        build_net(floor_cfg, (42, 42), None, config().stn, st_downsample=2)


@pytest.mark.parametrize("base, variants", [("st_fcn", ["st_fcn_proj", "st_fcn_tps"]),
                                            ("st_cnn", ["st_cnn_proj", "st_cnn_tps"])])
def test_transform_variants_differ_only_in_transform_and_name(base, variants):
    ref = OmegaConf.to_container(model_config(base))
    assert ref["transform"] == "aff"
    for name in variants:
        cfg = OmegaConf.to_container(model_config(name))
        assert cfg["name"] == name and cfg["transform"] == name.rsplit("_", 1)[1]
        strip = lambda d: {k: v for k, v in d.items() if k not in ("name", "transform")}  # noqa: E731
        assert strip(cfg) == strip(ref)


@pytest.mark.parametrize("st_name, plain", [("st_fcn", "fcn"), ("st_cnn", "cnn")])
def test_st_models_start_from_their_baseline_classifier(st_name, plain):
    st, base = model_config(st_name), model_config(plain)
    assert st.family == base.family and list(st.widths) == list(base.widths)
    assert st.get("ceil_mode") == base.get("ceil_mode")
