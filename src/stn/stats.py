"""θ diagnostics, so a collapsing transformer (zoom-out, blank output, runaway scale) shows in the numbers.

Each grid generator owns its statistics (``GridGenerator.stats``); this module keeps the function
the training module calls.
"""

from __future__ import annotations

import torch

from .grids import rotation_deg  # noqa: F401  (re-exported: figures and tests import it from here)
from .transformer import SpatialTransformer


@torch.no_grad()
def theta_stats(st: SpatialTransformer, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch statistics of θ; tensors on θ's device (no sync). All are 0 / 1 at the identity."""
    return st.grid.stats(theta)
