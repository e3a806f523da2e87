"""Train and test one cell of Table 1: ``python -m src.train model=st_fcn data=r [trainer=quick] [seed=1]``.

``train(cfg)`` is pure (tests call it); ``main`` is the thin Hydra app around it that turns expected
failures (bad override, missing data, non-finite loss) into one line on stderr and exit code 1.
Rerunning the same command after an interruption resumes from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises (deterministic cuBLAS)

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.callbacks import CurveRecorder, LinePrinter  # noqa: E402
from src.data.datamodule import DistortedMNIST  # noqa: E402
from src.models.module import Classifier, NonFiniteLoss  # noqa: E402
from src.models.nets import Net, build_net, classifier_params  # noqa: E402
from src.runinfo import (REPO, UserError, code_fingerprint, compose_config, device_name, git_commit, versions,  # noqa: E402
                         write_atomic, write_json)

CONF_DIR = REPO / "conf"
# Keys that change where a run writes or how it talks, not what it computes.
NON_RESULT_KEYS = ("paths", "quiet", "resume", "hydra")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning(quiet: bool) -> None:
    """Drop Lightning's advertising line; in quiet mode also its device banner."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING if quiet else logging.INFO)
        for h in lg.handlers:
            h.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def build_model(cfg: DictConfig) -> tuple[Net, int | None]:
    """The network of ``cfg.model`` sized to the distortion's parameter budget; returns (net, budget)."""
    in_hw = (int(cfg.data.canvas), int(cfg.data.canvas))
    budget = None
    if cfg.budget.rule == "match":
        budget = classifier_params(cfg.budget.family, in_hw, list(cfg.budget.widths))
    elif cfg.budget.rule != "none":
        raise UserError(f"budget.rule must be 'match' or 'none', got {cfg.budget.rule!r}")
    net = build_net(cfg.model, in_hw, budget, cfg.stn, int(cfg.data.st_downsample))
    n = net.param_counts()["total"]
    if budget is not None and abs(n / budget - 1) > cfg.budget.tol:
        raise UserError(f"{cfg.model.name} on {cfg.data.name}: {n} parameters, budget {budget} ± {cfg.budget.tol:.0%}")
    return net, budget


def result_fingerprint(cfg: DictConfig) -> str:
    """Config (minus paths and verbosity) + source code: checkpoints resume only under the same pair."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in NON_RESULT_KEYS:
        c.pop(k, None)
    return hashlib.sha256((json.dumps(c, sort_keys=True) + code_fingerprint()).encode()).hexdigest()


def prepare_run_dir(cfg: DictConfig) -> Path | None:
    """Create the run dir; return the checkpoint to resume from, or None (stale checkpoints are removed)."""
    run_dir = Path(cfg.paths.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    fp_file = run_dir / "fingerprint.txt"
    fp = result_fingerprint(cfg)
    last = ckpt_dir / "last.ckpt"
    if cfg.resume and last.is_file() and fp_file.is_file() and fp_file.read_text().strip() == fp:
        return last
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    write_atomic(fp_file, fp + "\n")
    return None


def make_trainer(cfg: DictConfig, callbacks: list, label: str) -> pl.Trainer:
    t = cfg.trainer
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=Path(cfg.paths.run_dir) / "checkpoints", filename="best", monitor="val/err", mode="min",
        save_top_k=1, save_last=True, auto_insert_metric_name=False)
    if cfg.quiet:
        bar = []
    elif sys.stderr.isatty():
        bar = [pl.callbacks.RichProgressBar()]
    else:
        bar = [LinePrinter(label, t.max_steps)]
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, deterministic=t.deterministic, precision=t.precision,
        logger=pl.loggers.CSVLogger(cfg.paths.run_dir, name="csv", version=0),
        callbacks=[ckpt, *callbacks, *bar], enable_progress_bar=bool(bar) and not isinstance(bar[0], LinePrinter),
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=50,
        default_root_dir=cfg.paths.run_dir,
    )


@torch.no_grad()
def test_correct(module: Classifier, dm: DistortedMNIST) -> torch.Tensor:
    """Per-image correctness on the test split (bool, CPU), for the error-by-distortion analysis."""
    module.eval()
    out = [(module.net(x.to(module.device)).argmax(1) == y.to(module.device)).cpu() for x, y in dm.test_dataloader()]
    return torch.cat(out)


def binned_errors(correct: torch.Tensor, params: dict, n_bins: int = 12) -> str:
    """CSV of test error % in equal-width bins of every scalar per-image distortion parameter."""
    lines = ["param,lo,hi,n,err"]
    for name, v in sorted(params.items()):
        if v.dim() != 1 or len(v) != len(correct) or v.min() == v.max():
            continue
        v = v.double()
        edges = torch.linspace(float(v.min()), float(v.max()), n_bins + 1, dtype=torch.float64)
        idx = torch.bucketize(v, edges[1:-1], right=True)
        for b in range(n_bins):
            sel = idx == b
            n = int(sel.sum())
            if n:
                err = 100.0 * (1 - correct[sel].double().mean().item())
                lines.append(f"{name},{edges[b]:.6g},{edges[b + 1]:.6g},{n},{err:.4f}")
    return "\n".join(lines) + "\n"


def evaluate(trainer: pl.Trainer, module: Classifier, dm: DistortedMNIST) -> tuple[float, float]:
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    return float(out["test/err"]), float(out["test/loss"])


def train(cfg: DictConfig, extra_callbacks: tuple = ()) -> dict:
    """Fit, test the last and the best-validation checkpoints, write metrics, curve and provenance."""
    if cfg.trainer.max_steps % cfg.trainer.val_check_interval:
        raise UserError("trainer.max_steps must be a multiple of trainer.val_check_interval")
    label = f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"
    quiet_lightning(cfg.quiet)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    net, budget = build_model(cfg)
    module = Classifier(net, OmegaConf.to_container(cfg.optim, resolve=True), cfg.trainer.max_steps)
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, cfg.stn.align_corners, cfg.seed)
    resume_from = prepare_run_dir(cfg)
    resumed_step = _ckpt_step(resume_from)
    curve = CurveRecorder()
    trainer = make_trainer(cfg, [curve, *extra_callbacks], label)

    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|ended before the epoch ended"
                                                  "|is smaller than the logging interval|Checkpoint directory|Experiment logs directory).*")
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
        fit_s = time.time() - t0
        if trainer.interrupted or trainer.global_step < cfg.trainer.max_steps:
            raise UserError(f"training stopped at step {trainer.global_step} of {cfg.trainer.max_steps}; "
                            f"rerun the same command to resume from the last checkpoint")
        err_last, loss_last = evaluate(trainer, module, dm)
        correct_last = test_correct(module, dm)
        best_path = trainer.checkpoint_callback.best_model_path
        state = torch.load(best_path, map_location=module.device, weights_only=True)["state_dict"]
        last_state = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(state)
        err_best, _ = evaluate(trainer, module, dm)
        module.load_state_dict(last_state)

    counts = net.param_counts()
    val_errs = [r["val_err"] for r in curve.rows]
    metrics = {
        "test": {"err": _r(err_last if cfg.eval.table_ckpt == "last" else err_best),
                 "err_last": _r(err_last), "err_best": _r(err_best), "loss_last": _r(loss_last)},
        "val": {"err_last": _r(val_errs[-1]), "err_best": _r(min(val_errs))},
        "params": {"n": counts["total"], "classifier": counts["classifier"], "st": counts["st"],
                   "budget": budget or 0},
        "steps": int(trainer.global_step),
    }
    if not all(torch.isfinite(torch.tensor(v)) for v in (err_last, err_best, loss_last)):
        raise NonFiniteLoss("non-finite test metrics; the network diverged")

    device = trainer.strategy.root_device
    provenance = {
        "cell": label, "seed": int(cfg.seed), "steps": int(trainer.global_step), "profile_max_steps": int(cfg.trainer.max_steps),
        "commit": git_commit(), "device": device_name(device), "accelerator": device.type,
        "versions": versions(), "deterministic": str(cfg.trainer.deterministic),
        "fit_seconds_this_process": round(fit_s, 1), "resumed_from_step": resumed_step,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    cell_dir = Path(cfg.paths.cell_dir)
    write_json(cell_dir / "provenance.json", provenance)
    write_atomic(cell_dir / "bins.csv", binned_errors(correct_last, dm.test[2]))
    if net.st is not None:  # what the transformer learned, on a fixed set of test digits (Table 1, right)
        from src.viz import draw_transforms

        x, y = dm.test[0][:8], dm.test[1][:8]
        module.eval()
        draw_transforms(net, x.float().div(255.0), cell_dir / "transforms.png", labels=y.cpu())
    write_atomic(Path(cfg.paths.curve_file), curve.to_csv())
    write_json(Path(cfg.paths.metrics_file), metrics)  # last: its presence marks a complete run
    return metrics


def _r(x: float) -> float:
    return round(float(x), 4)


def _ckpt_step(path: Path | None) -> int:
    return 0 if path is None else int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def check_overrides(overrides: list[str]) -> None:
    """Compose once before Hydra does, to turn a bad override into one line naming the valid choices."""
    compose_config(overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        m = train(cfg)
    except (UserError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{cfg.model.name} on {cfg.data.name} (seed {cfg.seed}): test error {m['test']['err']:.2f} % "
          f"(last {m['test']['err_last']:.2f}, best-val {m['test']['err_best']:.2f}), "
          f"{m['params']['n']} parameters, {m['steps']} steps -> {cfg.paths.metrics_file}")


def main() -> None:
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info") for a in sys.argv[1:]):
        try:
            check_overrides(overrides)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
