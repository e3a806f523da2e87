"""``bf16-mixed`` on a CPU without native bfloat16 (no AMX or AVX512-BF16): the same arithmetic on
float32 kernels.

Under bfloat16 autocast a native kernel (oneDNN on AMX or AVX512-BF16) multiplies bfloat16
operands, sums the products in float32 and rounds the sum once to bfloat16. The product of two
bfloat16 numbers is exact in float32, so a float32 convolution or matrix product of the same
operands, rounded once, is that arithmetic too, up to the order of summation (which differs between
native kernels as well). Without native bfloat16, ATen's own bfloat16 convolution is no such path:
it is 4–11× slower than float32 here, and its backward sums in bfloat16, far off the once-rounded
result (tests/test_bf16.py measures both against a float64 oracle).

:class:`Bf16ViaFloat32` runs the heavy operators (convolution, its backward, the matrix products)
that way whenever all their tensors are bfloat16; everything else (pooling, ReLU, the col2im of
``src.models.conv``) stays ATen's own, the same kernels on every CPU, in the dtypes autocast gives
it. :class:`Bf16ViaFloat32Precision` is Lightning's ``bf16-mixed`` with it around every step
(training, validation, test) and every backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

_aten = torch.ops.aten
HEAVY = frozenset({_aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default,
                   _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


def _up(a):
    return a.float() if isinstance(a, torch.Tensor) else a


def _down(a):
    return a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a


class Bf16ViaFloat32(TorchDispatchMode):
    """A heavy operator whose tensors are all bfloat16 computed in float32, its results rounded once to
    bfloat16; every other operator as it is (a mixed-dtype call gets ATen's own error). ``calls`` counts the
    operators it took over."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func not in HEAVY or not tensors or any(t.dtype != torch.bfloat16 for t in tensors):
            return func(*args, **kwargs)
        self.calls += 1
        out = func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
        return type(out)(map(_down, out)) if isinstance(out, (tuple, list)) else _down(out)


class Bf16ViaFloat32Precision(MixedPrecision):
    """Lightning's ``bf16-mixed`` on the CPU, its heavy operators on float32 kernels (:class:`Bf16ViaFloat32`)."""

    def __init__(self):
        super().__init__("bf16-mixed", "cpu")

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        with super().forward_context(), Bf16ViaFloat32():
            yield

    def backward(self, *args, **kwargs):
        """Lightning's automatic optimisation calls the backward outside the step's context, so it gets a mode of
        its own; manual optimisation, ours, calls it inside, where a second mode would only add a Python
        dispatch to every operator (a few per cent of a step)."""
        inside = any(isinstance(m, Bf16ViaFloat32) for m in _get_current_dispatch_mode_stack())
        with contextlib.nullcontext() if inside else Bf16ViaFloat32():
            return super().backward(*args, **kwargs)
