"""In-memory distorted MNIST for Lightning: whole splits as tensors, batches sliced by index.

No per-sample ``__getitem__`` and no worker processes: the splits (a few MB of uint8) live on
the accelerator and every training batch is a function of (seed, step) alone. That makes a
resumed run replay exactly the batches an uninterrupted run would have seen.

``loader.mode``:
- ``fixed``: the distorted training set written by the ``distort`` stage;
- ``fresh``: every batch draws new distortions of the 50k training digits with the stage's own
  recipe (``distort_batch``), so training sees ~150k × 256 distinct samples. Every random
  parameter comes from a CPU generator keyed by (seed, step), in float64, and only the warp runs
  on the accelerator: a CPU and a GPU run of one cell see the same distortions.
Validation and test always use the stage's fixed sets. The stored sets must have been generated
under the run's ``data`` config and ``stn.align_corners`` (checked against their manifest) and hold
uint8 canvas × canvas images with labels in 0..9 (checked as ``setup`` loads each split, so a bad
split fails before anything is written).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from src.data import distort
from src.data.warps import distort_batch, recipe, warp_of
from src.data.mnist import load_raw
from src.runinfo import UserError




class TrainBatches:
    """Endless iterable of training batches; batch ``s`` depends only on (seed, s)."""

    def __init__(self, n_batches_per_epoch: int, make_batch, start_step):
        self.per_epoch = n_batches_per_epoch
        self.make_batch = make_batch
        self.start_step = start_step  # callable: the trainer's global step when iteration (re)starts

    def __iter__(self):
        step = self.start_step()
        while True:
            yield self.make_batch(step)
            step += 1


class EvalBatches:
    """Consecutive slices of a fixed split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            yield to_float(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [0, 1] (the stage stores round(255·x))."""
    return images.float().div_(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round fresh draws to the 8-bit grid of the stored sets, so both modes see the same kind of pixels."""
    return images.mul(255.0).round_().div_(255.0)


def step_seed(seed: int, step: int) -> int:
    """The seed of fresh batch ``step`` of a run seeded ``seed``."""
    return int(seed) * 1_000_003 + 7919 * int(step) + 1


class DistortedMNIST(pl.LightningDataModule):
    def __init__(self, data_cfg, loader_cfg, paths_cfg, align_corners: bool, seed: int):
        super().__init__()
        self.data_cfg, self.loader_cfg, self.paths_cfg = data_cfg, loader_cfg, paths_cfg
        # what every batch reads, read once (OmegaConf's checked access costs ~1 ms a step)
        try:
            self.recipe, self.warp = recipe(data_cfg), warp_of(data_cfg)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.batch_size, self.fresh = int(loader_cfg.batch_size), loader_cfg.mode == "fresh"
        # train: the 50k training digits; train+val: with the 10k validation digits, whose curve then measures
        # nothing held out (conf/experiment/sensitivity/rts_60k.yaml; an absent key is train). Values: src.config
        self.train_digits = str(loader_cfg.get("train_digits", "train"))
        self.align_corners, self.seed = align_corners, int(seed)
        self.split_dir = Path(paths_cfg.data_dir) / data_cfg.name
        self._epoch_perm: tuple[int, torch.Tensor] | None = None
        self._loaded: tuple | None = None  # (stage, device) of the last setup: a second one is a no-op

    # ------------------------------------------------------------------ loading
    def _device(self) -> torch.device:
        if self.loader_cfg.on_device and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def load_split(self, split: str) -> dict:
        return distort.load_split(self.split_dir, split, int(self.data_cfg.canvas))

    def setup(self, stage: str | None = None) -> None:
        dev = self._device()
        if self._loaded == (stage, dev):  # the runner checks the data before fit, which sets up again
            return
        distort.check_generation_config(self.split_dir, self.data_cfg, self.align_corners)
        for split in ("val", "test"):
            d = self.load_split(split)
            setattr(self, split, (d["images"].to(dev), d["labels"].to(dev), d.get("params", {})))
        if stage in ("fit", None):
            if not self.fresh:
                d = self.load_split("train")
            else:
                raw = load_raw(Path(self.paths_cfg.raw_file))
                d = raw["train"]
                if self.train_digits == "train+val":  # the 60k training digits of MNIST (a sensitivity variant)
                    d = {k: torch.cat([raw["train"][k], raw["val"][k]]) for k in ("images", "labels")}
            self.set_train(d["images"], d["labels"], dev)
        self._loaded = (stage, dev)

    def set_train(self, images: torch.Tensor, labels: torch.Tensor, device=torch.device("cpu")) -> None:
        """The training digits (uint8, CPU) and labels; fresh draws also keep the digits on the CPU for
        their acceptance tests (P) and the warp's per-digit table, computed once here."""
        images, labels = images.cpu(), labels.cpu()
        self.train_images_cpu = images
        self.train_images, self.train_labels = images.to(device), labels.to(device)
        table = self.warp.digit_table
        self.train_digit_table = table(images) if table and self.fresh else None

    # ------------------------------------------------------------------ batches
    def _perm(self, epoch: int) -> torch.Tensor:
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.train_labels), generator=g)  # stays on the CPU
            self._epoch_perm = (epoch, perm)
        return self._epoch_perm[1]

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``, in float32 whatever the model's precision: the training step that pulls it
        runs under autocast, and a mixed-precision cell must see the same data as a float32 one."""
        with torch.autocast(self.train_labels.device.type, enabled=False):
            return self._train_batch(step)

    def _train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.batch_size
        per_epoch = len(self.train_labels) // bs
        epoch, k = divmod(step, per_epoch)
        idx_cpu = self._perm(epoch)[k * bs:(k + 1) * bs]
        idx = idx_cpu.to(self.train_labels.device)
        x, y = to_float(self.train_images[idx]), self.train_labels[idx]
        if self.fresh:
            g = torch.Generator().manual_seed(step_seed(self.seed, step))  # CPU: the same stream on every device
            pool = self.train_images if self.warp.needs_pool else None
            table = None if self.train_digit_table is None else {k: v[idx_cpu] for k, v in self.train_digit_table.items()}
            x, _ = distort_batch(x, self.recipe, g, align_corners=self.align_corners, clutter_pool=pool,
                                 x_cpu=self.train_images_cpu[idx_cpu], clamp=False,  # quantize absorbs the clamp
                                 digit_table=table)
            x = quantize(x)
        return x, y

    def train_dataloader(self):
        per_epoch = len(self.train_labels) // self.batch_size
        if per_epoch < 1:
            raise UserError(f"training set of {len(self.train_labels)} images is smaller than one batch")
        return TrainBatches(per_epoch, self.train_batch, lambda: self.trainer.global_step if self.trainer else 0)

    def val_dataloader(self):
        return EvalBatches(self.val[0], self.val[1], self.loader_cfg.eval_batch_size)

    def test_dataloader(self):
        return EvalBatches(self.test[0], self.test[1], self.loader_cfg.eval_batch_size)
