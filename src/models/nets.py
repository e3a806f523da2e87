"""The four model families of the distorted-MNIST study (paper Sect. 4.1 / shared paper.md §2).

FCN:    FC(h1) → ReLU → FC(h2) → ReLU → FC(10)
CNN:    conv9×9(c1) → ReLU → maxpool2 → conv7×7(c2) → ReLU → maxpool2 → FC(10)
ST-FCN: spatial transformer (FC 32-32-32 localisation net) → FCN
ST-CNN: spatial transformer (2× downsample → conv5×5(20) → maxpool2 → conv5×5(20) → FC20) → CNN

Each ReLU before a max pool is applied after it: relu(max(S)) = max(relu(S)), and the pool picks
the same element, so values and gradients are the same, on a quarter of the elements. The
convolutional networks run in channels_last (the memory format oneDNN's convolutions are fastest
in, bench/bench_conv.py); a convolution's result does not depend on it beyond summation order.

Every network of one distortion gets about the same number of parameters (the paper's rule):
``build_net`` sizes each classifier so that localisation net + classifier lands on the
distortion's budget, by scaling the configured base widths by one common factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from src.models.conv import OneChannelConv2d
from src.stn.transformer import SpatialTransformer

N_CLASSES = 10


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def fcn(in_hw: tuple[int, int], widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_hw[0] * in_hw[1]
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, N_CLASSES))


def _pooled(n: int, ceil_mode: bool) -> int:
    return -(-n // 2) if ceil_mode else n // 2


def cnn_feature_size(in_hw: tuple[int, int], ceil_mode: bool) -> tuple[int, int]:
    """Spatial size after conv9 → pool → conv7 → pool (raises if a map would be empty)."""
    out = []
    for n in in_hw:
        n = _pooled(n - 8, ceil_mode)
        n = _pooled(n - 6, ceil_mode) if n >= 7 else 0
        if n < 1:
            raise ValueError(f"CNN input {in_hw} is too small for conv9-pool-conv7-pool (ceil_mode={ceil_mode})")
        out.append(n)
    return out[0], out[1]


def cnn(in_hw: tuple[int, int], widths: list[int], ceil_mode: bool = True) -> nn.Sequential:
    c1, c2 = widths
    h, w = cnn_feature_size(in_hw, ceil_mode)
    return nn.Sequential(
        OneChannelConv2d(c1, 9), nn.MaxPool2d(2, ceil_mode=ceil_mode), nn.ReLU(),
        nn.Conv2d(c1, c2, 7), nn.MaxPool2d(2, ceil_mode=ceil_mode), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * h * w, N_CLASSES),
    ).to(memory_format=torch.channels_last)


def fcn_loc(in_hw: tuple[int, int], widths: list[int]) -> tuple[nn.Sequential, int]:
    """ST-FCN localisation net: FC layers with ReLU (paper: 3 × 32)."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_hw[0] * in_hw[1]
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers), d


def cnn_loc(in_hw: tuple[int, int], filters: int = 20, fc: int = 20, downsample: str = "avgpool2") -> tuple[nn.Sequential, int]:
    """ST-CNN localisation net on the 2× downsampled input: conv5 → pool → conv5 → FC."""
    if downsample == "avgpool2":
        down: nn.Module = nn.AvgPool2d(2)
    elif downsample == "bilinear":
        down = nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"loc_downsample must be 'avgpool2' or 'bilinear', got {downsample!r}")
    h, w = (n // 2 for n in in_hw)
    h, w = (h - 4) // 2 - 4, (w - 4) // 2 - 4
    if min(h, w) < 1:
        raise ValueError(f"ST-CNN localisation net needs a larger input than {in_hw}")
    net = nn.Sequential(
        down, nn.Conv2d(1, filters, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(filters, filters, 5), nn.ReLU(), nn.Flatten(), nn.Linear(filters * h * w, fc), nn.ReLU(),
    ).to(memory_format=torch.channels_last)
    return net, fc


class Net(nn.Module):
    """An optional spatial transformer followed by a classifier. ``forward`` returns logits."""

    def __init__(self, classifier: nn.Module, st: SpatialTransformer | None = None):
        super().__init__()
        self.st = st
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.st(x)[0] if self.st is not None else x)

    def forward_st(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits, θ, transformer output); θ and output are None for a plain network."""
        if self.st is None:
            return self.classifier(x), None, None
        y, theta = self.st(x)
        return self.classifier(y), theta, y

    def param_counts(self) -> dict[str, int]:
        st = count_params(self.st)
        return {"total": count_params(self), "classifier": count_params(self.classifier), "st": st}


def fcn_params(in_hw: tuple[int, int], widths: list[int], ceil_mode: bool = True) -> int:
    """Closed-form parameter count of ``fcn`` (``ceil_mode`` is ignored: no pooling)."""
    dims = [in_hw[0] * in_hw[1], *widths, N_CLASSES]
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def cnn_params(in_hw: tuple[int, int], widths: list[int], ceil_mode: bool = True) -> int:
    """Closed-form parameter count of ``cnn``."""
    c1, c2 = widths
    h, w = cnn_feature_size(in_hw, ceil_mode)
    return (81 * c1 + c1) + (49 * c1 * c2 + c2) + (c2 * h * w * N_CLASSES + N_CLASSES)


@dataclass(frozen=True)
class Family:
    """A classifier family (``model.family``): its builder and its closed-form parameter count.

    Both take ``(in_hw, widths, ceil_mode)``. The count is what ``fit_widths`` bisects on, so the
    budget rule never builds a network to size it; ``tests/test_models.py`` checks it against the module.
    """

    build: Callable[[tuple[int, int], list[int], bool], nn.Module]
    count: Callable[[tuple[int, int], list[int], bool], int]


FAMILIES: dict[str, Family] = {
    "fcn": Family(lambda in_hw, widths, ceil_mode: fcn(in_hw, widths), fcn_params),
    "cnn": Family(cnn, cnn_params),
}

# ``model.loc`` → builder (in_hw, model_cfg, stn_cfg) → (localisation net, its output size)
LOC_NETS: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "fcn": lambda in_hw, model_cfg, stn_cfg: fcn_loc(in_hw, list(model_cfg.loc_widths)),
    "cnn": lambda in_hw, model_cfg, stn_cfg: cnn_loc(in_hw, model_cfg.loc_filters, model_cfg.loc_fc,
                                                     stn_cfg.loc_downsample),
}


def _lookup(registry: dict, key: str, what: str):
    if key not in registry:
        raise ValueError(f"unknown {what} {key!r}; choose one of {sorted(registry)}")
    return registry[key]


def classifier_params(family: str, in_hw, widths: list[int], ceil_mode: bool = True) -> int:
    """Parameter count of a classifier, in closed form (``tests`` check it against the module)."""
    return _lookup(FAMILIES, family, "classifier family").count(in_hw, widths, ceil_mode)


def fit_widths(family: str, in_hw, base_widths: list[int], target: int, ceil_mode: bool = True) -> list[int]:
    """Widths near the base ratios whose classifier has about ``target`` parameters.

    Deterministic: scales all widths by a common factor (the first width k, found by bisection on
    the monotone count) and lets the last width move ±10 % around its scaled value, keeping the
    count closest to the target.
    """
    if target <= 0:
        raise ValueError(f"parameter budget leaves no room for the classifier (target {target})")

    def scaled(k: int) -> list[int]:
        return [max(1, round(k * w / base_widths[0])) for w in base_widths]

    lo, hi = 1, 8 * base_widths[0]
    while lo < hi:  # smallest k whose scaled classifier reaches the target
        mid = (lo + hi) // 2
        if classifier_params(family, in_hw, scaled(mid), ceil_mode) < target:
            lo = mid + 1
        else:
            hi = mid

    def candidates():
        for k in range(max(1, lo - 2), lo + 3):
            ws = scaled(k)
            r = max(1, ws[-1] // 10)
            for last in range(max(1, ws[-1] - r), ws[-1] + r + 1):
                yield [*ws[:-1], last]

    return min(candidates(), key=lambda ws: abs(classifier_params(family, in_hw, ws, ceil_mode) - target))


def build_net(model_cfg, in_hw: tuple[int, int], budget: int | None, stn_cfg, st_downsample: int = 1) -> Net:
    """Build one network of the study from its model config.

    ``model_cfg``: family (a key of ``FAMILIES``), widths, ceil_mode, transform (null or a key of
    ``src.stn.grids.GRIDS``), loc (a key of ``LOC_NETS``) and that net's keys (loc_widths /
    loc_filters / loc_fc).  ``budget``: total parameter count to match, or None to keep the configured
    widths.  ``stn_cfg``: the ``stn`` config block (align_corners, padding_mode, downsample_mode,
    loc_downsample, and each transform's own keys).
    """
    in_hw = (int(in_hw[0]), int(in_hw[1]))
    family = _lookup(FAMILIES, model_cfg.family, "classifier family")
    st = None
    if model_cfg.get("transform"):
        loc, loc_dim = _lookup(LOC_NETS, model_cfg.loc, "localisation net")(in_hw, model_cfg, stn_cfg)
        st = SpatialTransformer(
            loc, loc_dim, model_cfg.transform, in_hw, downsample=st_downsample,
            downsample_mode=stn_cfg.downsample_mode, align_corners=stn_cfg.align_corners,
            padding_mode=stn_cfg.padding_mode, stn_cfg=stn_cfg,
        )
    cls_hw = st.out_hw if st is not None else in_hw
    widths = list(model_cfg.widths)
    ceil_mode = bool(model_cfg.get("ceil_mode", True))
    if budget is not None:
        widths = fit_widths(model_cfg.family, cls_hw, widths, budget - count_params(st), ceil_mode)
    return Net(family.build(cls_hw, widths, ceil_mode), st)
