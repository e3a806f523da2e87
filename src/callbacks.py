"""Small Lightning callbacks: the learning curve (one row per validation) and plain-text progress."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl

CURVE_KEYS = ["step", "train_loss", "val_loss", "val_err", "lr"]


class CurveRecorder(pl.Callback):
    """Keeps one row per validation: step, train_loss, val_loss, val_err, lr and the stn/* θ statistics.

    The rows travel in the checkpoint (plain floats), so a resumed run keeps its whole curve.
    """

    def __init__(self):
        self.rows: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        row = {
            "step": int(trainer.global_step),
            "train_loss": float(pl_module.last_train_loss),
            "val_loss": float(m["val/loss"]),
            "val_err": float(m["val/err"]),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        }
        row.update({k.split("/", 1)[1]: float(v) for k, v in sorted(m.items()) if k.startswith("stn/")})
        self.rows = [r for r in self.rows if r["step"] != row["step"]] + [row]

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state_dict):
        self.rows = list(state_dict["rows"])

    def to_csv(self) -> str:
        keys = CURVE_KEYS + sorted({k for r in self.rows for k in r} - set(CURVE_KEYS))
        lines = [",".join(keys)]
        for r in self.rows:
            lines.append(",".join("" if k not in r else (str(r[k]) if k == "step" else f"{r[k]:.6g}") for k in keys))
        return "\n".join(lines) + "\n"


class LinePrinter(pl.Callback):
    """One line per validation for logs that are not a terminal (e.g. under `dvc repro`)."""

    def __init__(self, label: str, max_steps: int):
        self.label, self.max_steps = label, max_steps
        self.t0 = self.step0 = None

    def on_train_start(self, trainer, pl_module):
        self.t0, self.step0 = time.time(), trainer.global_step

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.t0 is None:
            return
        step = trainer.global_step
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (self.max_steps - step) / rate if rate > 0 else float("nan")
        err = float(trainer.callback_metrics["val/err"])
        print(f"[{self.label}] step {step}/{self.max_steps}  val err {err:.2f} %  "
              f"{rate:.0f} it/s  eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
