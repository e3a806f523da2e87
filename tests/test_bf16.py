"""bf16-mixed on a CPU without native bfloat16 (src.models.bf16): the heavy operators on float32 kernels give
the arithmetic of a native kernel (bfloat16 operands, float32 sums, one rounding), checked against a float64
oracle on the same operands, through the forward and the backward of a training step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision

import src.train as train_mod
from src.config import compose_config
from src.models.bf16 import HEAVY, Bf16ViaFloat32, Bf16ViaFloat32Precision
from src.models.build import build_model
from src.run.fingerprint import FLOAT32_KERNELS, float32_kernels_hash

aten = torch.ops.aten


def _conv_ops(x, w, b, g):
    """A convolution with bias and its three gradients (input, weight, bias)."""
    return (F.conv2d(x, w, b), *aten.convolution_backward(g, x, w, [len(b)], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                         [True, True, True]))


def _linear_ops(a, w, b, g):
    """A linear layer (addmm) and its two matrix-product gradients (mm)."""
    return F.linear(a, w, b), g @ w, g.t() @ a


def _within_one_rounding(got, ops, operands) -> float:
    """The worst error of ``got`` against ``ops`` in float64 on the same bfloat16 operands, in units of one
    bfloat16 rounding (2⁻⁸ |exact|, twice the half-ulp) plus float32 summation (2⁻¹⁶ Σ|terms|, from the
    same ops on the operands' absolute values): ≤ 1 holds for a native kernel's arithmetic."""
    exact = ops(*(t.double() for t in operands))
    scale = ops(*(t.double().abs() for t in operands))
    worst = torch.stack([((o.double() - e).abs() / (2 ** -8 * e.abs() + 2 ** -16 * s)).max()
                         for o, e, s in zip(got, exact, scale)]).max().item()
    assert math.isfinite(worst), worst
    return worst


CASES = {
    "conv": (_conv_ops, [(64, 20, 14, 14), (40, 20, 7, 7), (40,), (64, 40, 8, 8)], 2),
    "linear": (_linear_ops, [(256, 2520), (10, 2520), (10,), (256, 10)], 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_heavy_operators_round_once_as_a_native_kernel(case):
    ops, shapes, calls = CASES[case]
    g = torch.Generator().manual_seed(0)
    operands = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    with Bf16ViaFloat32() as mode:
        got = ops(*operands)
    assert mode.calls == calls and all(t.dtype == torch.bfloat16 for t in got)
    assert _within_one_rounding(got, ops, operands) <= 1


def test_atens_own_bfloat16_convolution_backward_fails_the_bound(monkeypatch):
    """The negative control: ATen's bfloat16 convolution (oneDNN off, as on a CPU without native bfloat16) sums
    its gradients in bfloat16, dozens of times the bound of one rounding."""
    ops, shapes, _ = CASES["conv"]
    g = torch.Generator().manual_seed(0)
    operands = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    got = ops(*operands)
    assert _within_one_rounding(got, ops, operands) > 10


def test_the_mode_takes_every_heavy_operator_of_a_training_step_forward_and_backward():
    """An ST-CNN step under autocast: every convolution and matrix product, the backward's too, runs on float32
    kernels (the float32 ones seen are those: ATen never sees a bfloat16 one)."""
    cfg = compose_config(["model=st_cnn", "data=r"])
    torch.manual_seed(0)
    net, _ = build_model(cfg)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    seen: list[str] = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):  # under the mode: what reaches ATen
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in HEAVY:
                seen.append(f"{func.__name__}:{args[0].dtype}")
            return func(*args, **(kwargs or {}))

    with Spy(), torch.autocast("cpu", dtype=torch.bfloat16), Bf16ViaFloat32() as mode:
        F.cross_entropy(net(x), y).backward()
    assert mode.calls >= 12  # 4 convolutions, 2 linear layers, with their backward
    assert not [s for s in seen if s.endswith("bfloat16")]  # no bfloat16 convolution or product left to ATen
    assert any(s.startswith("convolution_backward") for s in seen)


def test_a_cpu_without_native_bf16_trains_bf16_mixed_on_float32_kernels(monkeypatch, tmp_path):
    cfg = compose_config(["model=cnn", "model.precision=bf16-mixed", "trainer.accelerator=cpu", "trainer=smoke"])
    plugin = lambda: train_mod.make_trainer(cfg, tmp_path / "ckpt", [], "cell").precision_plugin  # noqa: E731
    monkeypatch.setattr(train_mod, "native_bf16", lambda: [])
    assert isinstance(plugin(), Bf16ViaFloat32Precision)
    monkeypatch.setattr(train_mod, "native_bf16", lambda: ["amx_bf16"])
    assert type(plugin()) is MixedPrecision and plugin().precision == "bf16-mixed"
    cfg = compose_config(["model=cnn", "model.precision=32-true", "trainer.accelerator=cpu", "trainer=smoke"])
    monkeypatch.setattr(train_mod, "native_bf16", lambda: [])
    assert not isinstance(plugin(), MixedPrecision)


def test_the_backward_takes_the_steps_mode_inside_it_and_its_own_outside(monkeypatch):
    """Manual optimisation (ours) runs the backward inside the step's context, whose mode serves it (a second one
    would only add a Python dispatch to every operator); automatic optimisation runs it outside, with its own."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    depth = []
    monkeypatch.setattr(MixedPrecision, "backward", lambda self, *a, **k: depth.append(
        sum(isinstance(m, Bf16ViaFloat32) for m in _get_current_dispatch_mode_stack())))
    plugin = Bf16ViaFloat32Precision()
    with plugin.forward_context():
        plugin.backward(None, None, None)
    plugin.backward(None, None, None)
    assert depth == [1, 1]


def test_other_dtypes_and_operators_pass_through_untouched():
    a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with Bf16ViaFloat32() as mode:
        outs = [a @ b, a.float() @ b.float(), a.bfloat16() + 1]
    assert mode.calls == 0 and [o.dtype for o in outs] == [torch.float64, torch.float32, torch.bfloat16]
    assert torch.equal(outs[0], a @ b) and torch.equal(outs[1], a.float() @ b.float())
    with Bf16ViaFloat32() as mode, pytest.raises(RuntimeError):  # a mixed-dtype product stays ATen's error
        a.bfloat16() @ b.float()
    assert mode.calls == 0


def test_the_float32_kernel_path_keeps_its_result_hash():
    """src.run.fingerprint's stand-in for the path (FLOAT32_KERNELS): a change to its arithmetic shows here."""
    h, calls = float32_kernels_hash()
    assert calls > 0 and h == FLOAT32_KERNELS[2]
