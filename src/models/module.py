"""LightningModule: one network of the study, SGD on the paper's step schedule, error in %.

No per-step logging or host synchronisation: the training loss is summed on the device and read
once per validation (which also checks it is finite). The optimisation step is written out once,
in :func:`sgd_step` (what Lightning's automatic optimisation does, without its per-step closure
machinery), for this module, the result fingerprint and the benchmarks; the step pulls its own
batch, so that Lightning fetches none ahead of it. Evaluation goes through ``self.log``
(batch-size-weighted epoch means); the test pass also keeps every image's prediction and, for ST
models, its θ: the raw outcomes from which the report derives its tables and figures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.models.nets import Net
from src.runinfo import UserError
from src.stn.stats import theta_stats


def sgd_step(opt: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor], sched=None, *,
             backward: Callable[[torch.Tensor], None] = torch.Tensor.backward, bf16: str | None = None) -> torch.Tensor:
    """One optimisation step in the order of Lightning's automatic optimisation: zero the gradients, the loss
    ``loss_of()`` and its backward, the SGD step, the schedule step; returns the loss. ``bf16`` (a device type)
    runs the loss and backward in bfloat16 autocast, as Lightning's ``bf16-mixed`` runs the module's step (inside
    Lightning, which opens that autocast itself, it stays None)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(bf16, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = loss_of()
        backward(loss)
    opt.step()
    if sched is not None:
        sched.step()
    return loss


class NonFiniteLoss(UserError):
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
        self.first_loss = float("nan")  # the loss of step 0, the reference of the divergence guard
        self._first_loss: torch.Tensor | None = None
        self.outcomes: dict[str, torch.Tensor] = {}
        self.automatic_optimization = False

    def forward(self, x):
        return self.net(x)

    # ---------------------------------------------------------------- training
    def loss(self, batch) -> torch.Tensor:
        """The training objective of one batch (src.run.fingerprint runs the same step outside Lightning)."""
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, dataloader_iter):
        """One SGD step on the batch this step pulls itself: given ``dataloader_iter``, Lightning fetches no
        batch ahead of the step, which cost about 1 ms of an 11 ms CPU step (bench section 3). The
        batch is made where the model is; the precision conversion and device move that Lightning
        would otherwise apply happen here."""
        batch, _, _ = next(dataloader_iter)
        batch = self.trainer.precision_plugin.convert_input(batch)
        if batch[0].device != self.device:
            batch = self.trainer.strategy.batch_to_device(batch)
        loss = sgd_step(self.optimizers(), lambda: self.loss(batch), self.lr_schedulers(),
                        backward=self.manual_backward)
        if self.global_step == 1:  # counted by opt.step()
            self._first_loss = loss.detach()
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_n += 1

    def on_validation_epoch_start(self):
        if self.trainer.sanity_checking:
            return
        total = float(self._loss_sum)  # the one host sync of a validation interval
        if self._loss_n and not math.isfinite(total):
            lo = self.global_step + 1 - self._loss_n
            raise NonFiniteLoss(f"non-finite training loss between steps {lo} and {self.global_step}; "
                                f"try a lower optim.lr or optim.loc_lr_mult")
        self.last_train_loss = total / self._loss_n if self._loss_n else float("nan")
        if self._first_loss is not None:
            self.first_loss, self._first_loss = float(self._first_loss), None
        self._loss_sum, self._loss_n = torch.zeros((), device=self._loss_sum.device), 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The running loss sum travels with a checkpoint written between validations (on a signal)."""
        first = float(self._first_loss) if self._first_loss is not None else self.first_loss
        checkpoint["train_loss_sum"] = [float(self._loss_sum), self._loss_n, first]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        total, n, self.first_loss = checkpoint["train_loss_sum"]
        self._loss_sum, self._loss_n = torch.tensor(total, dtype=torch.float32), int(n)

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, batch, prefix: str):
        x, y = batch
        logits, theta, _ = self.net.forward_st(x)
        pred = logits.argmax(1)
        n = len(y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), batch_size=n, on_epoch=True)
        self.log(f"{prefix}/err", 100.0 * (pred != y).float().mean(), batch_size=n, on_epoch=True,
                 prog_bar=prefix == "val")
        return pred, theta

    def validation_step(self, batch, batch_idx):
        _, theta = self._eval_step(batch, "val")
        if batch_idx == 0 and theta is not None:
            for k, v in theta_stats(self.net.st, theta.detach()).items():
                self.log(f"stn/{k}", v, batch_size=len(theta), on_epoch=True)

    def on_test_epoch_start(self):
        self._outcomes: dict[str, list[torch.Tensor]] = {"pred": [], "theta": []}

    def test_step(self, batch, batch_idx):
        pred, theta = self._eval_step(batch, "test")
        self._outcomes["pred"].append(pred.to(torch.uint8))
        if theta is not None:
            self._outcomes["theta"].append(theta.detach().float())

    def on_test_epoch_end(self):
        self.outcomes = {k: torch.cat(v).cpu() for k, v in self._outcomes.items() if v}

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
