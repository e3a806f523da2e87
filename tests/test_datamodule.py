"""The datamodule: stored sets must match the run's data config; fresh batches depend on (seed, step) only."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from src.data.datamodule import DistortedMNIST
from src.runinfo import UserError
from src.config import compose_config


def module(synthetic_data, *overrides, mode="fresh", seed=0):
    cfg = compose_config([f"paths.data_dir={synthetic_data['data_dir']}", f"paths.raw_file={synthetic_data['raw_file']}",
                          f"loader.mode={mode}", "loader.on_device=false", *overrides])
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, bool(cfg.stn.align_corners), seed)
    return dm


def test_data_of_another_config_is_refused_in_one_line(synthetic_data):
    module(synthetic_data).setup("fit")  # the fixture's manifest records conf/data/r.yaml: accepted
    with pytest.raises(UserError) as e:
        module(synthetic_data, "data.angle=[-45.0,45.0]").setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and "data.angle=[-90.0, 90.0]" in msg and "data.angle=[-45.0, 45.0]" in msg
    assert "dvc repro distort@r" in msg
    with pytest.raises(UserError, match=r"stn.align_corners=false, this run has stn.align_corners=true"):
        module(synthetic_data, "stn.align_corners=true").setup("fit")
    with pytest.raises(UserError, match=r"data.placement=\"<missing>\", this run has data.placement=\"square\""):
        module(synthetic_data, "+data.placement=square").setup("fit")


def test_a_fresh_batch_is_a_function_of_seed_and_step(synthetic_data):
    a = module(synthetic_data)
    a.setup("fit")
    first = a.train_batch(3)
    torch.manual_seed(123)  # the global RNG and the batches drawn before must not matter
    a.train_batch(0), a.train_batch(7)
    again = a.train_batch(3)
    b = module(synthetic_data)  # a new process-like instance
    b.setup("fit")
    other = b.train_batch(3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    assert not torch.equal(first[0], a.train_batch(4)[0])
    c = module(synthetic_data, seed=1)
    c.setup("fit")
    assert not torch.equal(first[0], c.train_batch(3)[0])


def test_a_second_setup_on_the_same_device_loads_nothing(synthetic_data, monkeypatch):
    """The runner checks the data before fit, and fit sets the datamodule up again: once is enough."""
    dm = module(synthetic_data)
    dm.setup("fit")
    first = dm.train_batch(2)
    load_split = dm.load_split
    monkeypatch.setattr(dm, "load_split", lambda split: pytest.fail(f"{split} loaded twice"))
    dm.setup("fit")
    assert torch.equal(first[0], dm.train_batch(2)[0])
    loaded = []
    monkeypatch.setattr(dm, "load_split", lambda split: loaded.append(split) or load_split(split))
    dm.setup("test")  # another stage loads again
    assert loaded == ["val", "test"]


def test_fresh_batches_are_quantised_like_the_stored_sets(synthetic_data):
    dm = module(synthetic_data)
    dm.setup("fit")
    x, _ = dm.train_batch(0)
    assert torch.equal(x, (x * 255).round() / 255) and x.min() >= 0 and x.max() <= 1
    assert OmegaConf.select(dm.data_cfg, "warp") == "similarity"
