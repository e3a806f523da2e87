"""``bf16-mixed`` on a CPU without native bfloat16 (no AMX or AVX512-BF16): the same arithmetic on
float32 kernels.

Under bfloat16 autocast a native kernel (oneDNN on AMX or AVX512-BF16) multiplies bfloat16
operands, sums the products in float32 and rounds the sum once to bfloat16. The product of two
bfloat16 numbers is exact in float32, so a float32 convolution or matrix product of the same
operands, rounded once, is that arithmetic too, up to the order of summation (which differs between
native kernels as well). Without native bfloat16, ATen's own bfloat16 convolution is no such path:
it is 4–7× slower than float32 here, and its backward sums in bfloat16, far off the once-rounded
result (tests/test_bf16.py measures both against a float64 oracle).

:class:`Bf16ViaFloat32` runs the heavy operators (convolution, its backward, the matrix products)
that way whenever they see bfloat16 tensors; everything else stays ATen's own, in the dtypes
autocast gives it. :class:`Bf16ViaFloat32Precision` is Lightning's ``bf16-mixed`` with it around
every step (training, with its backward, validation and test).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
HEAVY = frozenset({_aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default,
                   _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


def _up(a):
    return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a


def _down(a):
    return a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a


class Bf16ViaFloat32(TorchDispatchMode):
    """A heavy operator with bfloat16 operands computed in float32 and its results rounded once to bfloat16;
    every other operator as it is. ``calls`` counts the operators it took over."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in HEAVY or not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
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
