"""Training: composition of every cell, a smoke run that learns, resume == straight run, clear failures, no kernel
reading memory it never wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.run.callbacks import Stopped
from src.models.module import Classifier, sgd_step
from src.config import compose_config
from src.models.build import build_model
from src.run.checkpoints import run_fingerprint
from src.train import CONF_DIR, REPO, train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def cfg_for(*overrides: str):
    return compose_config(list(overrides))


@pytest.fixture
def smoke(synthetic_data, tmp_path):
    """Overrides for a smoke run on the synthetic 'r' data, writing under tmp_path."""
    return ["trainer=smoke", "quiet=true", f"paths.data_dir={synthetic_data['data_dir']}",
            f"paths.raw_file={synthetic_data['raw_file']}", f"paths.run_dir={tmp_path / 'run'}",
            f"paths.metrics_file={tmp_path / 'metrics.json'}", f"paths.curve_file={tmp_path / 'curve.csv'}"]


def test_every_config_names_registered_parts():
    """Each model and data config composes into names its registries know (so every cell below can build),
    and each config names itself by its file."""
    from src.data.warps import WARPS
    from src.models.nets import FAMILIES, LOC_NETS
    from src.stn.grids import GRIDS

    for model in MODELS:
        m = cfg_for(f"model={model}").model
        assert m.name == model and m.family in FAMILIES, model
        assert m.transform is None or (m.transform in GRIDS and m.loc in LOC_NETS), model
    for data in DATASETS:
        d = cfg_for(f"data={data}").data
        assert d.name == data and d.warp in WARPS, data


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_cell_composes_and_backpropagates(model, data):
    cfg = cfg_for(f"model={model}", f"data={data}")
    net, budget = build_model(cfg)
    x = torch.rand(3, 1, cfg.data.canvas, cfg.data.canvas)
    loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert abs(net.param_counts()["total"] / budget - 1) <= cfg.budget.tol


def test_param_groups_partition_and_follow_the_schedule():
    cfg = cfg_for("model=st_cnn", "optim.loc_lr_mult=0.1")
    net, _ = build_model(cfg)
    module = Classifier(net, dict(cfg.optim), max_steps=300)
    groups = module.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(ids) == len(set(ids))
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    assert module.milestones() == [100, 200]
    lrs = []
    for _ in range(300):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.01, 0.001]) and lrs[99] == pytest.approx([0.01, 0.001])
    assert lrs[100] == pytest.approx([0.001, 0.0001]) and lrs[200] == pytest.approx([0.0001, 0.00001])


@pytest.mark.parametrize("mode", ["fixed", "fresh"])
def test_smoke_run_learns_and_writes_the_record(smoke, tmp_path, mode):
    cfg = cfg_for("model=st_fcn", *smoke, f"loader.mode={mode}", "loader.batch_size=64",
                  "trainer.max_steps=120", "trainer.val_check_interval=40", "trainer.limit_val_batches=null",
                  "optim.gamma=1.0")
    m = train(cfg)
    assert m["test"]["err"] < 30, m  # chance is 90 %
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == m
    assert set(saved) == {"test", "val", "params", "steps"} and saved["steps"] == 120
    assert set(saved["test"]) == {"err", "err_last", "err_best", "loss_last"}
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:5] == ["step", "train_loss", "val_loss", "val_err", "lr"]
    assert {"theta_dev", "outside", "det", "scale"} <= set(header)
    assert [int(r.split(",")[0]) for r in lines[1:]] == [40, 80, 120]
    prov = json.loads((tmp_path / "run" / "cell" / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["commit"] and prov["device"] and prov["config"]["loader"]["mode"] == mode
    assert [(s["from_step"], s["to_step"]) for s in prov["segments"]] == [(0, 120)] and not prov["resumed"]
    assert "cpu_flags" in prov["segments"][0]  # the CPU's generation, which its model name hides (tests/test_plan.py)
    rec = torch.load(tmp_path / "run" / "cell" / "outcomes.pt", weights_only=True)
    assert rec["pred"].dtype == torch.uint8 and rec["theta"].shape == (len(rec["pred"]), 6)
    assert 100 * (rec["pred"] != stored_test_labels(smoke)).double().mean().item() == pytest.approx(m["test"]["err"], abs=1e-3)


class _Crash(pl.Callback):
    """At step 25 (between two validations), raise (a kill) or send the process a signal."""

    def __init__(self, how: str, at: int = 25):
        self.how, self.at = how, at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at and not getattr(self, "done", False):
            self.done = True
            if self.how == "kill":
                raise RuntimeError("simulated kill")
            os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[self.how])


def test_last_checkpoint_follows_every_validation_not_only_a_better_one(smoke, tmp_path):
    """A run whose validation error never improves (lr ≈ 0) still rewrites last.ckpt at each validation, so a
    crash resumes from the latest validation; best.ckpt stays at the first."""
    cfg = cfg_for(*smoke, "model=fcn", "trainer.max_steps=40", "trainer.val_check_interval=20", "optim.lr=1e-12",
                  f"paths.cell_dir={tmp_path / 'cell'}")
    train(cfg)
    ckpts = next((tmp_path / "run").glob("*/checkpoints"))
    step = {p.name: torch.load(p, weights_only=True)["global_step"] for p in ckpts.iterdir()}
    assert step == {"last.ckpt": 40, "best.ckpt": 20}


@pytest.mark.parametrize("how, at", [("kill", 25), ("sigterm", 25), ("sigint", 25), ("sigterm", 5)])
def test_resume_after_an_interruption_equals_a_straight_run(smoke, tmp_path, how, at):
    base = [*smoke, "model=st_fcn_tps", "trainer.max_steps=40"]

    def cfg(tag):
        return cfg_for(*base, f"paths.run_dir={tmp_path / tag}", f"paths.metrics_file={tmp_path / tag}.json",
                       f"paths.curve_file={tmp_path / tag}.csv", f"paths.cell_dir={tmp_path / tag / 'cell'}")

    straight = train(cfg("a"))
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup or a background job
    if how == "kill":
        with pytest.raises(RuntimeError, match="simulated kill"):
            train(cfg("b"), extra_callbacks=(_Crash(how, at),))
    else:
        with pytest.raises(Stopped, match="rerun the same command") as e:
            train(cfg("b"), extra_callbacks=(_Crash(how, at),))
        assert e.value.exit_code == {"sigterm": 143, "sigint": 130}[how]
        assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b" / "cell").exists()
    resumed = train(cfg("b"))
    assert resumed == straight
    prov = json.loads((tmp_path / "b" / "cell" / "provenance.json").read_text())
    (a0, k), (k2, end) = [(s["from_step"], s["to_step"]) for s in prov["segments"]]
    assert prov["resumed"] and (a0, k2, end) == (0, k, 40)
    assert k == 20 if how == "kill" else k in (at, at + 1)  # a signal writes a checkpoint after the step it arrives in
    ckpts = next((tmp_path / "b").glob("*/checkpoints"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt beside a stale one
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 40
    assert all(s["commit"] and s["seconds"] >= 0 for s in prov["segments"])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a" / "cell" / "outcomes.pt").read_bytes() == (tmp_path / "b" / "cell" / "outcomes.pt").read_bytes()


def test_a_changed_config_neither_resumes_nor_deletes_another_configs_checkpoints(smoke, tmp_path):
    train(cfg_for(*smoke, "model=fcn"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*.ckpt"))
    m = train(cfg_for(*smoke, "model=fcn", "optim.lr=0.02"))
    prov = json.loads((tmp_path / "run" / "cell" / "provenance.json").read_text())
    assert not prov["resumed"] and prov["segments"][0]["from_step"] == 0 and m["steps"] == 20
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*.ckpt"))
    assert set(before) < set(after) and len(after) == 2 * len(before)


def test_resume_needs_the_same_result_config_and_result_fingerprint(tmp_path, monkeypatch):
    """Where a run writes, how it talks and result-neutral code edits keep a checkpoint resumable; a
    result-defining key or a new result fingerprint (src/run/fingerprint.json) does not."""
    from src.run import checkpoints

    base = run_fingerprint(cfg_for())
    assert run_fingerprint(cfg_for("quiet=true", "paths.run_dir=elsewhere", "resume=false")) == base
    assert run_fingerprint(cfg_for("optim.lr=0.02")) != base
    moved = tmp_path / "fingerprint.json"
    moved.write_text(checkpoints.FINGERPRINT.read_text().replace('"', "'", 1))
    monkeypatch.setattr(checkpoints, "FINGERPRINT", moved)
    assert run_fingerprint(cfg_for()) != base


def stored_test_labels(smoke: list[str]) -> torch.Tensor:
    data_dir = next(o.split("=", 1)[1] for o in smoke if o.startswith("paths.data_dir="))
    return torch.load(f"{data_dir}/r/test.pt", weights_only=True)["labels"]


def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_only_a_smoke_runs_final_line_says_it_is_no_result():
    from src.train import final_line

    m = {"test": {"err": 89.5, "err_last": 89.5, "err_best": 88.0}, "params": {"n": 1000}, "steps": 20}
    cfg = cfg_for("model=fcn", "trainer=smoke", "paths.metrics_file=m.json")
    smoke = final_line(cfg, m, "smoke")
    assert smoke == ("0-fcn-r (smoke run, trainer=smoke: 20 steps that check the code runs, not a result): "
                     "test error 89.50 % (last 89.50, best-val 88.00), 1000 parameters, 20 steps -> m.json")
    for profile in ("full", "short", "quick", None):
        line = final_line(cfg, m, profile)
        assert line.startswith("0-fcn-r: test error 89.50 %") and "smoke" not in line and "not a result" not in line


def test_unknown_choice_is_one_line_listing_the_choices():
    r = run_cli("model=st_mlp")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "st_mlp" in lines[0] and "st_fcn_tps" in lines[0] and "cnn" in lines[0], r.stderr


def test_bad_key_is_one_line():
    r = run_cli("optim.lrr=0.1")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "lrr" in r.stderr, r.stderr


def test_missing_data_names_the_stage(tmp_path):
    r = run_cli("data=rts", "trainer=smoke", f"paths.data_dir={tmp_path}", f"paths.run_dir={tmp_path / 'run'}",
                "quiet=true")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "dvc repro distort@rts" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_non_finite_loss_stops_without_touching_previous_metrics(smoke, tmp_path):
    (tmp_path / "metrics.json").write_text('{"previous": 1}\n')
    r = run_cli(*smoke, "model=fcn", "optim.lr=1e12", "trainer.max_steps=100", "trainer.val_check_interval=50")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "step" in last and "optim.lr" in last, r.stderr
    assert (tmp_path / "metrics.json").read_text() == '{"previous": 1}\n'


def test_tampered_data_is_refused_by_checksum(synthetic_data, tmp_path):
    import shutil

    data_dir = tmp_path / "distorted"
    shutil.copytree(synthetic_data["data_dir"], data_dir)
    with open(data_dir / "r" / "val.pt", "r+b") as f:  # flip one byte: still a readable file, wrong content
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 1]))
    r = run_cli("model=fcn", "trainer=smoke", f"paths.data_dir={data_dir}", f"paths.raw_file={synthetic_data['raw_file']}",
                f"paths.run_dir={tmp_path / 'run'}", "quiet=true")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "val.pt" in last and "sha256" in last and "dvc repro distort@r" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_literal_reading_is_one_override_away():
    literal, default = cfg_for("+experiment=literal"), cfg_for()
    assert (literal.optim.momentum, literal.loader.mode) == (0.0, "fixed")
    assert (default.optim.momentum, default.loader.mode) != (0.0, "fixed")
    # nothing else differs: the two keys set, the whole config equal
    literal.optim.momentum, literal.loader.mode = default.optim.momentum, default.loader.mode
    assert literal == default


def test_the_lightning_loop_computes_exactly_the_written_out_step(smoke, tmp_path):
    """Lightning's loop around the module adds nothing to the arithmetic: its weights after crossing an
    epoch boundary and two validations equal those of the plain loop the result fingerprint runs."""
    from src.data.datamodule import DistortedMNIST
    from src.train import make_trainer, quiet_lightning

    cfg = cfg_for(*smoke, "model=st_fcn", "loader.batch_size=64", "trainer.max_steps=40",
                  "trainer.val_check_interval=20")  # 2000 digits: an epoch of 31 steps
    torch.manual_seed(cfg.seed)
    net, _ = build_model(cfg)
    plain_net = build_model(cfg)[0]
    plain_net.load_state_dict(net.state_dict())
    optim = dict(cfg.optim)

    quiet_lightning(True)
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, bool(cfg.stn.align_corners), cfg.seed)
    trainer = make_trainer(cfg, tmp_path / "ckpt", [], "loop")
    trainer.fit(Classifier(net, optim, 40), datamodule=dm)
    assert trainer.global_step == 40

    plain = Classifier(plain_net, optim, 40)
    opt_cfg = plain.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    dm2 = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, bool(cfg.stn.align_corners), cfg.seed)
    dm2.setup("fit")
    for step in range(40):
        sgd_step(opt, lambda: plain.loss(dm2.train_batch(step)), sched)
    a, b = net.state_dict(), plain_net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def deterministic_flags():
    """Restores torch's deterministic mode, its NaN fill of uninitialised tensors and the global RNG."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
    torch.set_rng_state(rng)


def test_a_cpu_run_turns_the_nan_fill_off_for_its_fit_and_restores_it(deterministic_flags, smoke, tmp_path):
    from src.run.callbacks import NoNanFill
    from src.train import make_trainer

    torch.utils.deterministic.fill_uninitialized_memory = True
    trainer = make_trainer(cfg_for(*smoke), tmp_path / "ckpt", [], "flags")
    assert torch.are_deterministic_algorithms_enabled()  # smoke: trainer.deterministic=true
    cb = next(c for c in trainer.callbacks if isinstance(c, NoNanFill))
    cb.setup(trainer, None, "fit")
    assert not torch.utils.deterministic.fill_uninitialized_memory
    cb.teardown(trainer, None, "fit")
    assert torch.utils.deterministic.fill_uninitialized_memory


@pytest.mark.parametrize("data", ["r", "tc"])  # the 28 and the 60 px canvas
@pytest.mark.parametrize("model", MODELS)
def test_no_cpu_kernel_of_a_network_reads_memory_it_never_wrote(model, data, deterministic_flags):
    """Each network at its own precision, as this CPU trains it (bf16-mixed on float32 kernels where bfloat16 is
    not native): three SGD steps and an evaluation in deterministic mode, with the NaN fill of uninitialised
    tensors and without, give equal weights and logits. A kernel reading memory it never wrote reads NaN (or an
    integer's maximum) with the fill, and the two runs differ or turn non-finite."""
    from src.models.bf16 import Bf16ViaFloat32
    from src.train import emulated_bf16

    cfg = cfg_for(f"model={model}", f"data={data}", "trainer.accelerator=cpu")
    bf16 = "cpu" if cfg.model.precision == "bf16-mixed" else None
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, int(cfg.data.canvas), int(cfg.data.canvas), generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    torch.use_deterministic_algorithms(True, warn_only=True)
    runs = []
    for fill in (True, False):
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.manual_seed(0)
        module = Classifier(build_model(cfg)[0], dict(cfg.optim), 10)
        opt = module.configure_optimizers()["optimizer"]
        with Bf16ViaFloat32() if emulated_bf16(cfg) else contextlib.nullcontext():
            for _ in range(3):
                sgd_step(opt, lambda: module.loss((x, y)), bf16=bf16)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bool(bf16)):
                logits = module.net.eval()(x)
        runs.append({**module.state_dict(), "logits": logits})
    a, b = runs
    assert all(torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]) for k in a)
