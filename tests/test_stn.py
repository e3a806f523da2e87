"""The spatial transformer inside the study's networks: identity at initialisation, gradient flow, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.stn.transformer import SpatialTransformer
from stn_helpers import one_thread  # noqa: F401  (autouse fixture: single-threaded torch)
from stn_helpers import SIZES, ST_MODELS, TRANSFORMS, build, digit_batch, identity_theta

CELLS = [(name, hw, ds) for hw, ds in SIZES for name in ST_MODELS]


@pytest.mark.parametrize("name, hw, ds", CELLS)
def test_st_model_is_identity_at_init(name, hw, ds):
    net = build(name, hw, ds).double()
    x, _ = digit_batch(3, hw, dtype=torch.float64)
    y, theta = net.st(x)
    assert torch.equal(theta, identity_theta(net.st.transform, 3))
    expected = x if ds == 1 else F.avg_pool2d(x, 2)
    assert y.shape == expected.shape
    assert (y - expected).abs().max() <= 1e-12
    assert (net(x) - net.classifier(expected)).abs().max() <= 1e-12
    assert not torch.equal(expected, torch.zeros_like(expected))


GRADIENT_CELLS = [(name, 28, 1) for name in ST_MODELS] + [("st_cnn_tps", 42, 2), ("st_fcn", 60, 2)]


@pytest.mark.parametrize("name, hw, ds", GRADIENT_CELLS)
def test_classification_loss_reaches_every_localisation_parameter(name, hw, ds):
    """The zero-initialised regression layer gets a gradient at once; after one SGD step it passes
    gradients on to every localisation-net parameter."""
    torch.manual_seed(0)
    net = build(name, hw, ds)
    x, labels = digit_batch(16, hw)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    head, loc = net.st.head, list(net.st.loc.parameters())

    F.cross_entropy(net(x), labels).backward()
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in loc)  # blocked by the zero weights
    opt.step()
    assert head.weight.abs().sum() > 0

    opt.zero_grad()
    F.cross_entropy(net(x), labels).backward()
    for pname, p in net.st.loc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert all(p.grad.abs().sum() > 0 for p in net.classifier.parameters())


@pytest.mark.parametrize("downsample, mode", [(1, "avgpool2"), (2, "avgpool2"), (2, "sample_half")])
@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transformer_gradcheck(transform, ac, downsample, mode):
    """grid + bilinear sampler (+ pooling) w.r.t. the input and θ, θ slightly off the identity so that
    no sample point sits on a pixel centre or cell edge, where bilinear sampling has no derivative."""
    torch.manual_seed(0)
    hw = (5, 6) if downsample == 1 else (6, 8)
    st = SpatialTransformer(nn.Flatten(), hw[0] * hw[1], transform, hw, downsample=downsample,
                            downsample_mode=mode, align_corners=ac).double()
    x = torch.rand(1, 1, *hw, dtype=torch.float64, requires_grad=True)
    theta = identity_theta(transform) + 0.05 * torch.randn(1, st.grid.n_params, dtype=torch.float64)
    assert torch.autograd.gradcheck(st.warp, (x, theta.requires_grad_()))


def test_warp_out_of_frame_gives_black_image():
    """A translation that moves the whole frame off the input samples only the zero padding."""
    st = SpatialTransformer(nn.Flatten(), 64, "aff", (8, 8))
    x, _ = digit_batch(2, 8)
    y = st.warp(x, torch.tensor([[1.0, 0.0, 3.0, 0.0, 1.0, 0.0]]).repeat(2, 1))
    assert x.abs().sum() > 0 and torch.equal(y, torch.zeros_like(y))


def test_bad_downsampling_is_rejected():
    with pytest.raises(ValueError, match="downsample must be 1 or 2"):
        SpatialTransformer(nn.Flatten(), 64, "aff", (8, 8), downsample=3)
    with pytest.raises(ValueError, match="downsample_mode"):
        SpatialTransformer(nn.Flatten(), 64, "aff", (8, 8), downsample=2, downsample_mode="bicubic")
