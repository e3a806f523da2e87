"""The spatial transformer: localisation net → regression layer → grid generator → bilinear sampler."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .grids import GridGenerator, make_grid_generator


def _full_precision(x: torch.Tensor):
    """θ, the grid and the sampler in the input's dtype under mixed precision too: a bfloat16 grid
    would place samples to about 0.1 px on a 28-pixel canvas. Only the localisation net runs in
    the autocast dtype."""
    return torch.autocast(x.device.type, enabled=False)


class SpatialTransformer(nn.Module):
    """Warps its input by a θ regressed from the input itself.

    ``loc`` is any module mapping the input image to a feature vector of size ``loc_dim``.
    The regression layer starts with weights 0 and bias = the transform's identity, so at
    initialisation the transformer passes its input through unchanged. Inputs must have the
    background at the padding value (0 for MNIST in [0, 1]); normalise *after* the transformer.

    ``downsample=2`` produces an output of half the input size (RTS 42→21, TC 60→30):
    ``avgpool2`` samples at full resolution and average-pools (anti-aliased, paper Sect. 3.4),
    ``sample_half`` samples directly on the coarse grid.

    ``stn_cfg`` (the ``stn`` config block) supplies the transform's own options, e.g. ``proj_eps``
    or ``tps_grid``; each grid generator reads the keys it declares.
    """

    def __init__(self, loc: nn.Module, loc_dim: int, transform: str, in_hw: tuple[int, int], *,
                 downsample: int = 1, downsample_mode: str = "avgpool2", align_corners: bool = False,
                 padding_mode: str = "zeros", stn_cfg: Mapping | None = None):
        super().__init__()
        if downsample not in (1, 2):
            raise ValueError(f"downsample must be 1 or 2, got {downsample}")
        if downsample_mode not in ("avgpool2", "sample_half"):
            raise ValueError(f"downsample_mode must be 'avgpool2' or 'sample_half', got {downsample_mode!r}")
        self.in_hw = (int(in_hw[0]), int(in_hw[1]))
        self.downsample, self.downsample_mode = downsample, downsample_mode
        self.pool_after = downsample == 2 and downsample_mode == "avgpool2"
        sample_hw = self.in_hw if downsample == 1 or self.pool_after else (self.in_hw[0] // 2, self.in_hw[1] // 2)
        self.out_hw = sample_hw if not self.pool_after else (sample_hw[0] // 2, sample_hw[1] // 2)
        self.transform = transform
        self.align_corners, self.padding_mode = bool(align_corners), padding_mode
        self.loc = loc
        self.grid: GridGenerator = make_grid_generator(transform, sample_hw, align_corners, stn_cfg)
        self.head = nn.Linear(loc_dim, self.grid.n_params)
        self.reset_identity()

    def reset_identity(self) -> None:
        """Regression layer: weights 0, bias = identity transform."""
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(self.grid.identity())

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        features = self.loc(x)
        with _full_precision(x):
            return self.head(features.to(x.dtype))

    def warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Sample ``x`` on the grid of ``theta`` (the sampler alone, for a given θ)."""
        with _full_precision(x):
            grid = self.grid(theta.to(x.dtype))
            y = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=self.align_corners)
            return F.avg_pool2d(y, 2) if self.pool_after else y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (warped output, θ)."""
        theta = self.theta(x)
        return self.warp(x, theta), theta
