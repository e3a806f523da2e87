"""LightningModule: one network of the study, SGD on the paper's step schedule, error in %."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.models.nets import Net
from src.stn.stats import theta_stats

NAN_CHECK_EVERY = 50  # steps between non-finite-loss checks (a check syncs the device)


class NonFiniteLoss(RuntimeError):
    pass


class Classifier(pl.LightningModule):
    def __init__(self, net: Net, optim_cfg: dict, max_steps: int):
        super().__init__()
        self.net = net
        self.optim_cfg = dict(optim_cfg)
        self.max_steps = int(max_steps)
        self._loss_sum = torch.zeros(())
        self._loss_n = 0
        self.last_train_loss = float("nan")

    def forward(self, x):
        return self.net(x)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_n += 1
        if (self.global_step + 1) % NAN_CHECK_EVERY == 0:
            self._check_finite()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _check_finite(self) -> None:
        if self._loss_n and not math.isfinite(float(self._loss_sum)):
            lo = self.global_step + 1 - self._loss_n
            raise NonFiniteLoss(
                f"non-finite training loss between steps {lo} and {self.global_step + 1}; "
                f"try a lower optim.lr or optim.loc_lr_mult")

    def on_validation_epoch_start(self):
        self._check_finite()
        self.last_train_loss = float(self._loss_sum) / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = torch.zeros((), device=self._loss_sum.device), 0

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, batch, prefix: str, batch_idx: int):
        x, y = batch
        logits, theta, _ = self.net.forward_st(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        wrong = (logits.argmax(1) != y).sum()
        self._eval_acc[0] += loss.detach()
        self._eval_acc[1] += wrong
        self._eval_acc[2] += len(y)
        if batch_idx == 0 and theta is not None and prefix == "val":
            self._stats = theta_stats(self.net.st, theta.detach())

    def _eval_start(self):
        self._eval_acc = [torch.zeros((), device=self.device), torch.zeros((), device=self.device, dtype=torch.long), 0]
        self._stats = {}

    def _eval_end(self, prefix: str):
        loss_sum, wrong, n = self._eval_acc
        self.log(f"{prefix}/loss", loss_sum / max(n, 1))
        self.log(f"{prefix}/err", 100.0 * wrong.double() / max(n, 1), prog_bar=prefix == "val")
        for k, v in self._stats.items():
            self.log(f"stn/{k}", v)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self._eval_start()
        self._eval_step(batch, "val", batch_idx)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        if batch_idx == 0:
            self._eval_start()
        self._eval_step(batch, "test", batch_idx)

    def on_test_epoch_end(self):
        self._eval_end("test")

    # ---------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict]:
        """Base group and localisation group (lr × loc_lr_mult); together they partition the parameters."""
        loc = [p for n, p in self.net.named_parameters() if n.startswith("st.")]
        base = [p for n, p in self.net.named_parameters() if not n.startswith("st.")]
        lr = self.optim_cfg["lr"]
        groups = [{"params": base, "lr": lr, "name": "base"}]
        if loc:
            groups.append({"params": loc, "lr": lr * self.optim_cfg["loc_lr_mult"], "name": "loc"})
        return groups

    def milestones(self) -> list[int]:
        """Schedule milestones in steps: fractions of max_steps (values < 1) or absolute steps."""
        return sorted(int(round(m * self.max_steps)) if m < 1 else int(m) for m in self.optim_cfg["milestones"])

    def configure_optimizers(self):
        o = self.optim_cfg
        opt = torch.optim.SGD(self.param_groups(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones(), gamma=o["gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
