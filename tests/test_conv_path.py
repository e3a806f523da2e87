"""The CNN family's CPU path: the one-channel convolution's input gradient, max-pool before ReLU,
channels_last, and bf16-mixed with the transformer and the training data in float32."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import src.train as train_mod
from src.config import ConfigError, compose_config, validate
from src.data.datamodule import DistortedMNIST
from src.run.fingerprint import synthetic_digits
from src.models.bf16 import Bf16ViaFloat32
from src.models.build import build_model
from src.models.conv import OneChannelConv2d, _OneChannelConv, col2im
from src.runinfo import REPO
from src.train import train

sys.path.insert(0, str(REPO / "bench"))
from bench_conv import before_twin  # noqa: E402  (the benchmark's "before" network, the twin these tests compare)


def _conv_pair(k=5, c_out=6, dtype=torch.float64):
    torch.manual_seed(0)
    ours = OneChannelConv2d(c_out, k).to(dtype)
    ref = nn.Conv2d(1, c_out, k).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_one_channel_conv_gradients_pass_gradcheck():
    ours, _ = _conv_pair()
    x = torch.rand(3, 1, 11, 9, dtype=torch.float64, requires_grad=True)
    w = ours.weight.detach().clone().requires_grad_(True)
    b = ours.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(_OneChannelConv.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: ours(x), (x,))


def test_one_channel_conv_equals_nn_conv2d_in_float32_channels_last():
    ours, ref = _conv_pair(k=9, c_out=32, dtype=torch.float32)
    ours, ref = ours.to(memory_format=torch.channels_last), ref
    x = torch.rand(16, 1, 28, 28)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(16, 32, 20, 20)
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_one_channel_conv_under_bf16_autocast_matches_autocast_nn_conv2d():
    ours, ref = _conv_pair(k=9, c_out=32, dtype=torch.float32)
    x = torch.rand(8, 1, 28, 28)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ours(xa), ref(xb)
        assert ya.dtype == yb.dtype == torch.bfloat16
        torch.testing.assert_close(ya, yb)
        ya.float().sum().backward()
        yb.float().sum().backward()
    assert xa.grad.dtype == ours.weight.grad.dtype == torch.float32  # gradients in the leaves' dtype
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("b", "size", "k"), [(256, (28, 28), (9, 9)), (7, (20, 17), (5, 3)), (1, (6, 6), (1, 1))])
def test_col2im_is_atens_fold_bit_for_bit(dtype, b, size, k):
    """The same additions in the same order as ATen's CPU col2im, each rounded in the tensor's dtype."""
    g = torch.Generator().manual_seed(0)
    n = (size[0] - k[0] + 1) * (size[1] - k[1] + 1)
    cols = (torch.randn(b, k[0] * k[1], n, generator=g) * torch.rand(b, 1, n, generator=g) * 50).to(dtype)
    ours, ref = col2im(cols, size, *k), F.fold(cols, size, k)
    assert ours.dtype == dtype and ours.shape == ref.shape and ours.is_contiguous() and torch.equal(ours, ref)


@pytest.mark.parametrize("mode", [contextlib.nullcontext, Bf16ViaFloat32])
def test_one_channel_input_gradient_is_one_bf16_gemm_then_col2im_under_autocast(mode):
    """Under bf16 autocast the input gradient is wᵀ·g with both operands in bfloat16, rounded once, then a
    bfloat16 col2im: bit for bit what autocast makes of the float32 formula (the trained cells' arithmetic)."""
    ours, _ = _conv_pair(k=9, c_out=32, dtype=torch.float32)
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 28, 28, requires_grad=True)
    g = torch.randn(16, 32, 20, 20).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), mode():
        ours(x).backward(g)
        with torch.no_grad():  # as a backward runs
            w = ours.weight.to(torch.bfloat16).float().reshape(32, 81)
            cols = (w.t() @ g.to(torch.float32, memory_format=torch.contiguous_format).view(16, 32, -1)).contiguous()
            expected = F.fold(cols, (28, 28), (9, 9))
    assert expected.dtype == torch.bfloat16 and torch.equal(x.grad, expected.float())


def test_without_an_input_gradient_it_is_nn_conv2d():
    ours, ref = _conv_pair(k=9, c_out=8, dtype=torch.float32)
    x = torch.rand(4, 1, 28, 28)
    ours(x).sum().backward()
    ref(x).sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("data", ["r", "rts"])
def test_pool_before_relu_is_exact(data):
    """relu(max(S)) = max(relu(S)) and the pool routes the gradient to the same element: the plain CNN's
    step is bit-identical either way (RTS: ceil_mode windows at the border too)."""
    torch.backends.mkldnn.enabled = False  # the portable kernels, as the fingerprint runs them
    try:
        cfg = compose_config(["model=cnn", f"data={data}"])
        torch.manual_seed(0)
        net, _ = build_model(cfg)
        net = net.to(memory_format=torch.contiguous_format)
        twin = before_twin(net)  # ReLU → max-pool, NCHW, nn.Conv2d: the network as built before the path
        x, y = torch.rand(8, 1, cfg.data.canvas, cfg.data.canvas), torch.arange(8) % 10
        la, lb = F.cross_entropy(net(x), y), F.cross_entropy(twin(x), y)
        la.backward()
        lb.backward()
        assert torch.equal(la, lb)
        for (n, p), q in zip(net.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), n
    finally:
        torch.backends.mkldnn.enabled = True


def test_cnn_family_runs_channels_last():
    net, _ = build_model(compose_config(["model=st_cnn", "data=r"]))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert isinstance(net.classifier[0], OneChannelConv2d)


@pytest.mark.parametrize("model", ["st_cnn", "st_cnn_proj", "st_cnn_tps"])
def test_transformer_stays_float32_under_bf16_autocast(model):
    """Only the localisation net runs in bfloat16: θ, the grid and the sampled image are float32, and
    the sampler given θ is the float32 sampler exactly."""
    net, _ = build_model(compose_config([f"model={model}", "data=r"]))
    x = torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, theta = net.st(x)
        logits = net.classifier(y)
    assert theta.dtype == y.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert torch.equal(y, net.st.warp(x, theta))


def test_training_batches_are_float32_whatever_the_autocast(synthetic_data):
    cfg = compose_config(["data=r", f"paths.data_dir={synthetic_data['data_dir']}",
                          f"paths.raw_file={synthetic_data['raw_file']}"])
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, cfg.stn.align_corners, 0)
    dm.set_train(synthetic_digits(300, 1), torch.arange(300) % 10)
    plain = dm.train_batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dm.train_batch(3)
    assert mixed[0].dtype == torch.float32 and torch.equal(plain[0], mixed[0]) and torch.equal(plain[1], mixed[1])


def test_precision_is_a_validated_model_key():
    with pytest.raises(ConfigError, match=r"model.precision='16-mixed'"):
        validate(compose_config(["model=cnn", "model.precision=16-mixed"]))
    validate(compose_config(["model=cnn", "model.precision=bf16-mixed"]))
    with pytest.raises(Exception):  # the one key: Lightning's trainer.precision is not a second one
        compose_config(["trainer.precision=bf16-mixed"])


def test_bf16_on_a_cpu_without_native_bf16_is_named_in_one_line(monkeypatch):
    cfg = compose_config(["model=cnn", "model.precision=bf16-mixed", "trainer.accelerator=cpu"])
    monkeypatch.setattr(train_mod, "native_bf16", lambda: [])
    note = train_mod.emulated_bf16(cfg)
    assert note and "\n" not in note and "bf16-mixed" in note
    monkeypatch.setattr(train_mod, "native_bf16", lambda: ["avx512_bf16"])
    assert train_mod.emulated_bf16(cfg) is None
    assert train_mod.emulated_bf16(compose_config(["model=cnn", "trainer.accelerator=cpu"])) is None


def test_bf16_smoke_run_of_an_st_cnn_records_its_precision(synthetic_data, tmp_path, monkeypatch):
    """A CI-sized run of the path, on a CPU said to have no native bf16: it runs on float32 kernels in training
    (with gradients) and in evaluation (without), and says so."""
    monkeypatch.setattr(train_mod, "native_bf16", lambda: [])
    taken, dispatch = [], Bf16ViaFloat32.__torch_dispatch__

    def counted(self, func, types, args=(), kwargs=None):
        calls = self.calls
        out = dispatch(self, func, types, args, kwargs)
        if self.calls > calls:
            taken.append(torch.is_grad_enabled())
        return out

    monkeypatch.setattr(Bf16ViaFloat32, "__torch_dispatch__", counted)
    cfg = compose_config([
        "model=st_cnn", "data=r", "model.precision=bf16-mixed", "trainer=smoke", "quiet=true",
        f"paths.data_dir={synthetic_data['data_dir']}", f"paths.raw_file={synthetic_data['raw_file']}",
        f"paths.run_dir={tmp_path / 'run'}", f"paths.metrics_file={tmp_path / 'metrics.json'}",
        f"paths.curve_file={tmp_path / 'curve.csv'}", f"paths.cell_dir={tmp_path / 'cell'}"])
    m = train(cfg)
    assert m["steps"] == cfg.trainer.max_steps
    prov = json.loads((tmp_path / "cell" / "provenance.json").read_text())
    assert prov["precision"] == "bf16-mixed" and prov["config"]["model"]["precision"] == "bf16-mixed"
    assert [s["bf16_kernels"] for s in prov["segments"]] == ["float32"]  # src.models.bf16, named in the record
    assert True in taken and False in taken
