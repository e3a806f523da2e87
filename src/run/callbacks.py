"""Lightning callbacks of a cell run: its learning curve, its progress lines, the time and commit of
every segment of a resumed run, the guard against a diverging run, the code stamp of every checkpoint,
the stop on a signal and deterministic mode without its NaN fill on the CPU.

Every callback with state keeps it in the checkpoint (plain Python values), so a resumed run
continues its curve, its segment list and its guard exactly where the interrupted one stopped.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from src.models.bf16 import Bf16ViaFloat32Precision
from src.runinfo import UserError, cpu_flags, device_name, git_commit

CURVE_KEYS = ["step", "train_loss", "val_loss", "val_err", "lr"]
log = logging.getLogger("src.train")


class CurveRecorder(pl.Callback):
    """One row per validation: step, train_loss, val_loss, val_err, lr and the stn/* θ statistics."""

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



def curve_csv(rows: list[dict]) -> str:
    """The learning curve as CSV: the fixed columns, then the θ statistics in name order."""
    keys = CURVE_KEYS + sorted({k for r in rows for k in r} - set(CURVE_KEYS))
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join("" if k not in r else (str(r[k]) if k == "step" else f"{r[k]:.6g}") for k in keys))
    return "\n".join(lines) + "\n"


class Diverged(UserError):
    pass


class DivergenceGuard(pl.Callback):
    """Stops a run that has left the band of a working one, before it writes a normal-looking record.

    - the training loss above ``loss_factor`` × the loss of the first step at ``patience`` validations in a row;
    - the validation error still at chance (≥ ``chance_err`` %) at the first validation after the first
      learning-rate phase (``first_milestone``), if that phase has at least ``min_phase_steps`` steps.
    The thresholds are ``guard.*`` in conf/config.yaml.
    """

    def __init__(self, curve: CurveRecorder, first_milestone: int, loss_factor: float, patience: int,
                 chance_err: float, min_phase_steps: int):
        self.curve = curve
        self.first_milestone = int(first_milestone) if first_milestone >= min_phase_steps else 0
        self.factor, self.patience, self.chance_err = loss_factor, patience, chance_err

    def on_validation_end(self, trainer, pl_module):
        rows = self.curve.rows
        if trainer.sanity_checking or not rows:
            return
        first, last = pl_module.first_loss, rows[-1]
        recent = [r["train_loss"] for r in rows][-self.patience:]
        if len(recent) == self.patience and all(v > self.factor * first for v in recent):
            raise Diverged(f"training loss {recent[-1]:.3g} at step {last['step']} is above {self.factor:g}× the first "
                           f"step's {first:.3g} at {self.patience} validations in a row: the run diverged; "
                           f"try a lower optim.lr")
        if self.first_milestone and last["step"] >= self.first_milestone and last["val_err"] >= self.chance_err \
                and not any(r["step"] >= self.first_milestone for r in rows[:-1]):
            raise Diverged(f"validation error {last['val_err']:.1f} % at step {last['step']} is still at chance after "
                           f"the first learning-rate phase: the run is not learning; check optim.lr and the data")


class ProgressLog(pl.Callback):
    """One log line per validation (cell, step/total, val error, speed, ETA): the terminal and train.log."""

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
        log.info(f"[{self.label}] step {step}/{self.max_steps}  val err {err:.2f} %  {rate:.0f} it/s  "
                 f"eta {eta / 60:.1f} min")


class NoNanFill(pl.Callback):
    """Deterministic mode (``trainer.deterministic``) also fills every uninitialised tensor (``torch.empty`` and
    kin) with NaN, integers with their maximum: a guard against kernels that read memory they never wrote, at
    about 5 % of a CNN-family step on the CPU (the median network of reports/bench/conv_no_native_bf16.md).
    No CPU kernel of ours reads such memory (tests/test_train.py trains and evaluates every network
    bit-identically with and without the fill), so a CPU run turns the fill off for its fit and test and
    restores it after; a GPU run keeps it."""

    def setup(self, trainer, pl_module, stage):
        self.was = torch.utils.deterministic.fill_uninitialized_memory
        if isinstance(trainer.accelerator, pl.accelerators.CPUAccelerator):
            torch.utils.deterministic.fill_uninitialized_memory = False

    def teardown(self, trainer, pl_module, stage):
        torch.utils.deterministic.fill_uninitialized_memory = self.was


class Segments(pl.Callback):
    """Provenance of every process that worked on the run: commit at its start, device (a CPU with its vector
    instruction sets; ``bf16_kernels: float32`` where bf16-mixed ran on float32 kernels, src.models.bf16), steps,
    wall time."""

    def __init__(self):
        self.done: list[dict] = []
        self.current: dict | None = None
        self._t0, self._trainer = 0.0, None

    def on_train_start(self, trainer, pl_module):
        self._t0, self._trainer = time.time(), trainer
        device = trainer.strategy.root_device
        self.current = {"commit": git_commit(), "device": device_name(device),
                        **({"cpu_flags": cpu_flags()} if device.type == "cpu" else {}),
                        **({"bf16_kernels": "float32"} if isinstance(trainer.precision_plugin, Bf16ViaFloat32Precision)
                           else {}),
                        "from_step": int(trainer.global_step), "to_step": int(trainer.global_step), "seconds": 0.0}

    def segments(self) -> list[dict]:
        """Every segment so far, the running one updated to now."""
        if self.current is not None:
            self.current.update(to_step=int(self._trainer.global_step), seconds=round(time.time() - self._t0, 1))
        return [*self.done, *([self.current] if self.current else [])]

    def state_dict(self):
        return {"segments": self.segments()}

    def load_state_dict(self, state_dict):
        self.done = list(state_dict["segments"])


class CodeStamp(pl.Callback):
    """Every checkpoint carries the training code that wrote it (``src.train.code_hashes``), so a resume can
    tell whether it continues under the same code (``src.train.check_same_code``)."""

    def __init__(self, code: dict[str, str]):
        self.code = dict(code)

    def state_dict(self):
        return {"code": self.code}

    def load_state_dict(self, state_dict):
        pass  # the checkpoints this process writes carry its own code, not the resumed one's


class Stopped(UserError):
    """The run was stopped by a signal after writing a checkpoint; exit 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalStop(pl.Callback):
    """SIGTERM (timeout, Slurm) and SIGINT (Ctrl-C) stop the run after the current step with a checkpoint.

    ``install()`` replaces the handlers for the life of a run (Lightning would turn Ctrl-C into exit 1);
    Lightning's own SIGTERM handling, which ends the fit between two steps, lands in ``on_exception``.
    """

    def __init__(self, ckpt_path: Path):
        self.ckpt_path = Path(ckpt_path)
        self.signum: int | None = None
        self._validated: int | None = None  # the step of the last validation
        self._old: dict = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path)  # atomically (src.train.AtomicCheckpointIO)

    def stopped(self, step: int) -> Stopped:
        name = signal.Signals(self.signum).name
        return Stopped(f"stopped by {name} at step {step}; rerun the same command to resume", self.signum)

    def on_train_start(self, trainer, pl_module):
        self._take_over()

    def on_test_start(self, trainer, pl_module):
        self._take_over()

    def _take_over(self) -> None:
        """Lightning puts its own SIGTERM handler first when a fit or test starts, and that one aborts a
        validation half-way (a checkpoint there would skip the rest of it on resume): ours alone decides."""
        if self._old:
            signal.signal(signal.SIGTERM, self._handler)

    def on_validation_end(self, trainer, pl_module):
        self._validated = trainer.global_step  # ModelCheckpoint writes last.ckpt of this step in this hook too

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.signum is not None and self._validated == trainer.global_step:
            raise self.stopped(trainer.global_step)  # the validation's last.ckpt holds exactly this state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.signum is not None:
            if trainer.enable_validation and trainer.global_step % trainer.val_check_batch == 0:
                return  # a validation is due: stop after it and its checkpoint, or a resume would skip it
            self.save(trainer)
            raise self.stopped(trainer.global_step)

    def on_exception(self, trainer, pl_module, exception):
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):  # Lightning stopped between two steps: state is consistent
            self.signum = self.signum or signal.SIGTERM
            self.save(trainer)
