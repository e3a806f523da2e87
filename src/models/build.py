"""The network of one cell: ``cfg.model`` sized to the distortion's parameter budget (``cfg.budget``)."""

from __future__ import annotations

from omegaconf import DictConfig

from src.models.nets import Net, build_net, classifier_params
from src.runinfo import UserError


def build_model(cfg: DictConfig) -> tuple[Net, int | None]:
    """Returns (net, budget); budget is None under ``budget.rule: none``."""
    in_hw = (int(cfg.data.canvas), int(cfg.data.canvas))
    budget = classifier_params(cfg.budget.family, in_hw, list(cfg.budget.widths)) if cfg.budget.rule == "match" else None
    net = build_net(cfg.model, in_hw, budget, cfg.stn, int(cfg.data.st_downsample))
    n = net.param_counts()["total"]
    if budget is not None and abs(n / budget - 1) > cfg.budget.tol:
        raise UserError(f"{cfg.model.name} on {cfg.data.name}: {n} parameters, budget {budget} ± {cfg.budget.tol:.0%}")
    return net, budget
