"""A convolution on a one-channel image whose input gradient is wanted (the ST-CNN's first classifier
layer, fed by the transformer's output).

oneDNN's and ATen's backward-data for one input channel run at a fraction of their forward rate
(about 3× the forward's time at batch 256 on our CPUs, bench/bench_conv.py). With one input
channel, the input gradient is one GEMM, wᵀ·g → (B, k·k, HW), and a col2im (``F.fold``'s additions,
vectorised on the CPU: :func:`col2im`) that sums the k·k shifted copies: the same sums in another
order. The weight and bias gradients and the forward stay the library's own. Under bf16-mixed the
backward runs in the autocast it was called in: the GEMM's operands are cast to bfloat16 and the
col2im sums the k·k copies in bfloat16, a coarser sum than a native kernel's float32 one, the same
on every CPU (the paired check of reports/decisions.md covers the path as it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def col2im(cols: torch.Tensor, size, kh: int, kw: int) -> torch.Tensor:
    """``F.fold(cols, size, (kh, kw))`` of one channel, stride 1, no padding: (B, kh·kw, h'·w') → (B, 1, H, W).

    ATen's CPU col2im adds the kh·kw shifted copies into each image one after another, in the tensor's dtype
    (each sum rounded, in bfloat16 too), pixel by pixel. Here the same additions in the same order, as kh·kw
    slice-adds over the whole batch with the batch innermost, where they vectorise: about half the time at
    28 px and batch 256 (bit for bit the same, tests/test_conv_path.py). Elsewhere (CUDA sums each pixel in
    float32 once) it is ``F.fold``."""
    if cols.device.type != "cpu":
        return F.fold(cols, size, (kh, kw))
    (height, width), b = size, cols.shape[0]
    h, w = height - kh + 1, width - kw + 1
    shifted = cols.view(b, kh, kw, h, w).permute(1, 2, 3, 4, 0).contiguous()  # (kh, kw, h', w', B)
    im = cols.new_zeros(height, width, b)
    for i in range(kh):
        for j in range(kw):
            im[i:i + h, j:j + w] += shifted[i, j]
    return im.permute(2, 0, 1).unsqueeze(1).contiguous()


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``; None where it is off."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _OneChannelConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        c_out, _, kh, kw = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            b, device = g.shape[0], g.device.type
            # The GEMM's operands go straight to the dtype it multiplies in (autocast's, else float32): the
            # values and layouts they would have through float32 first, without two casts of the whole gradient.
            # The weight is copied, as a cast copies it: the saved one requires grad, which makes matmul fold.
            dtype = _autocast_dtype(device) or torch.float32
            g_rows = g.to(dtype, memory_format=torch.contiguous_format).view(b, c_out, -1)
            w_rows = weight.to(dtype, copy=True).reshape(c_out, kh * kw)
            cols = (w_rows.t() @ g_rows).contiguous()  # (B, k·k, H'W') for col2im
            grad_x = col2im(cols, x.shape[-2:], kh, kw).to(x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, x.to(g.dtype), weight.to(g.dtype), [c_out] if ctx.has_bias else None,
                [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, ctx.has_bias])
        return grad_x, grad_w, grad_b


class OneChannelConv2d(nn.Conv2d):
    """``nn.Conv2d(1, c_out, k)`` (stride 1, no padding) with the input gradient above. Same
    parameters, state-dict keys and forward as ``nn.Conv2d``; without an input gradient it is
    ``nn.Conv2d``."""

    def __init__(self, out_channels: int, kernel_size: int):
        super().__init__(1, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        if (dtype := _autocast_dtype(x.device.type)) is not None:  # cast as autocast would, then run outside it
            with torch.autocast(x.device.type, enabled=False):
                bias = None if self.bias is None else self.bias.to(dtype)
                return _OneChannelConv.apply(x.to(dtype), self.weight.to(dtype), bias)
        return _OneChannelConv.apply(x, self.weight, self.bias)
