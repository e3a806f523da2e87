"""A cell of the study, named in one place: one seed of one model on one dataset, in one part of the report.

Its name ``<seed>-<model>-<data>`` is DVC's stage key (``train@0-fcn-r``), its run directory and the stem of its
record files. Seed first, so that ``dvc repro`` (which runs a matrix in order) trains every seed-0 cell first.
``data`` is a distortion (conf/data/) or, in the sensitivity study, a variant (conf/experiment/sensitivity/), which
may change the networks or the digits rather than the data's name. Model and data names hold no ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

# budget → folder of its cells' records under reports/ and of their run dirs under runs/ (dvc.yaml's stages)
BUDGETS = {
    "full": "",                      # Table 1 (stage train): trainer=<params.yaml profile>
    "short": "short",                # the reduced-budget section (stage short): trainer=short
    "sensitivity": "sensitivity",    # the sensitivity study (stages sens_<p|e|rts>): trainer=short
}


@dataclass(frozen=True)
class Cell:
    seed: int
    model: str
    data: str
    budget: str = "full"

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ValueError(f"budget '{self.budget}' is not one of {', '.join(BUDGETS)}")

    @property
    def name(self) -> str:
        return f"{self.seed}-{self.model}-{self.data}"

    @classmethod
    def parse(cls, name: str, budget: str = "full") -> Cell:
        """The cell of a name ``<seed>-<model>-<data>``; ValueError where a name is not one."""
        parts = name.split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not all(parts):
            raise ValueError(f"cell '{name}' is not <seed>-<model>-<data>")
        return cls(int(parts[0]), parts[1], parts[2], budget)

    @classmethod
    def of(cls, cfg) -> Cell:
        """The cell a run's config trains; a sensitivity variant (its ``sensitivity.variant``) names the data and
        the budget. The name is all a run needs of it (the stage that runs it sets its paths)."""
        variant = OmegaConf.select(cfg, "sensitivity.variant", default=None)
        return cls(int(cfg.seed), str(cfg.model.name), variant or str(cfg.data.name),
                   "sensitivity" if variant else "full")

    @property
    def folder(self) -> str:
        """The cell's folder under reports/ and runs/ ("" for Table 1's cells), as dvc.yaml's stages write it."""
        return BUDGETS[self.budget]

    @property
    def key(self) -> str:
        """A name unique across budgets (one figure folder holds them all): ``short-0-cnn-r``."""
        return f"{self.folder}-{self.name}" if self.folder else self.name
