"""The CNN family's training step on the CPU against the core's own GEMM peak:
``OMP_NUM_THREADS=1 python bench/bench_conv.py [--models ...] [--distortions ...]``.

For every CNN-family network of the grid (sized by the budget rule, batch 256, one SGD step with
momentum: forward, backward, update), timed interleaved in one race with a 2048² matmul of each
precision on the same thread (512² for bf16 on a CPU without native bfloat16, where it is emulated):

- ``before``: the network as it was built before the convolution path (float32, NCHW, ReLU before
  max-pool, the library's own input gradient for the first convolution);
- ``fp32`` and ``bf16-mixed``: the network as ``src.models`` builds it (channels_last, pool before
  ReLU, ``OneChannelConv2d``), in float32 and under Lightning's ``bf16-mixed`` autocast (on a CPU without
  native bfloat16, as training runs it there: on float32 kernels, ``src.models.bf16``);
- ``bf16 NaN fill``: the ``bf16-mixed`` step with deterministic mode's NaN fill of uninitialised tensors, against
  the step as training runs it on the CPU, without the fill (src.run.callbacks.NoNanFill);
- FLOPs per step from torch's FlopCounterMode (on the ``before`` network, forward + backward) and
  the fraction of the GEMM peak of the same precision that each step reaches (of the fp32 peak for an
  emulated bf16 step: the emulated bf16 matmul times the emulation, not what the core can do).

The projection is step time × 150k steps, leaving out data, evaluation and the loop (docs/operations.md
"How long it takes" has whole cells). Writes reports/bench/conv.md (or ``--out``).

``--compile`` adds a side, the ``bf16-mixed`` network with its forward under ``torch.compile`` (inductor,
default mode; compiled and warmed before the race), to see whether the compiler beats oneDNN's eager kernels:
``python bench/bench_conv.py --compile --distortions r --out reports/bench/compile.md``. It needs native
bfloat16: without it the eager side runs on float32 kernels through a dispatch mode that the compiler does not
trace, and a compiled side would time ATen's slow bfloat16 kernels instead, no like-for-like race.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stn import BATCH, DISTORTIONS, MODELS, PAPER_STEPS, REPO, build, fmt, race, step_fn  # noqa: E402

from src.config import model_config  # noqa: E402
from src.models.bf16 import Bf16ViaFloat32  # noqa: E402
from src.models.conv import OneChannelConv2d  # noqa: E402
from src.runinfo import device_name, git_commit, native_bf16, versions, write_atomic  # noqa: E402

CNN_MODELS = tuple(m for m in MODELS if model_config(m).family == "cnn")
PEAK_N = 2048
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_NATIVE = ("none (bf16-mixed is emulated here: its convolutions and matrix products run on float32 kernels, "
             "src.models.bf16)")
EMULATED_PEAK_N = 512  # the bf16 matmul without native bfloat16: emulated at ~1 GFLOP/s, 2048² would take ~20 s a call


def before_twin(net: nn.Module) -> nn.Module:
    """The same network (same weights) as built before the convolution path: NCHW, ReLU → max-pool,
    a plain ``nn.Conv2d`` for the first convolution."""
    twin = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    for seq in [m for m in twin.modules() if isinstance(m, nn.Sequential)]:
        layers = list(seq)
        for i, m in enumerate(layers):
            if isinstance(m, OneChannelConv2d):
                conv = nn.Conv2d(1, m.out_channels, m.kernel_size)
                conv.load_state_dict(m.state_dict())
                layers[i] = conv
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
        for i, m in enumerate(layers):
            seq[i] = m
    return twin


def step_flops(net: nn.Module, hw: int) -> int:
    x, y = torch.rand(BATCH, 1, hw, hw), torch.randint(0, 10, (BATCH,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def matmul(dtype, n: int = PEAK_N):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return lambda: a @ b


def peak_sizes() -> dict[str, int]:
    """The matmul size of each precision's peak on this CPU."""
    return {"fp32": PEAK_N, "bf16": PEAK_N if native_bf16() else EMULATED_PEAK_N}


def bf16_reference() -> str:
    """The peak a bf16-mixed step is measured against: the bf16 matmul's where the CPU has native bfloat16;
    else the fp32 one, the core's real peak (the emulated bf16 matmul measures the emulation, not the core)."""
    return "bf16" if native_bf16() else "fp32"


def as_trained(bf16_step):
    """A bf16-mixed step as training runs it on this CPU: on float32 kernels without native bfloat16."""
    if native_bf16():
        return bf16_step

    def step():
        with Bf16ViaFloat32():
            return bf16_step()
    return step


def deterministic(step, fill: bool):
    """``step`` in the deterministic mode training runs in (``trainer.deterministic``), with or without its NaN
    fill of uninitialised tensors (a CPU run trains without: src.run.callbacks.NoNanFill)."""
    def run():
        flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        try:
            return step()
        finally:  # the peak matmuls run outside it, as before
            torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
            torch.utils.deterministic.fill_uninitialized_memory = flags[2]
    return run


def compiled(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose forward runs under ``torch.compile`` (the backward follows through AOTAutograd)."""
    twin = copy.deepcopy(net)
    twin.forward = torch.compile(twin.forward)
    return twin


def bench(models, distortions, rounds: int, compile_: bool = False) -> tuple[pd.DataFrame, dict]:
    peak_s: dict[str, list[float]] = {"fp32": [], "bf16": []}
    n_peak = peak_sizes()
    bf16_peak = bf16_reference()
    rows = []
    for d in distortions:
        for m in models:
            cfg, net = build(m, d)
            hw = int(cfg.data.canvas)
            before = before_twin(net)
            flops = step_flops(before, hw)
            heavy = flops > 20e9  # CNN on RTS and TC: a step takes seconds
            cpu = torch.device("cpu")
            steps = {"before": step_fn(before, hw, cpu), "fp32": step_fn(net, hw, cpu),
                     "bf16": as_trained(step_fn(copy.deepcopy(net), hw, cpu, bf16=True))}
            sides = {**{k: deterministic(f, fill=False) for k, f in steps.items()},
                     "bf16 NaN fill": deterministic(as_trained(step_fn(copy.deepcopy(net), hw, cpu, bf16=True)), True),
                     **{f"peak {p}": matmul(dtype, n_peak[p]) for p, dtype in PEAK_DTYPES.items()}}
            if compile_:
                sides["compiled"] = deterministic(step_fn(compiled(net), hw, cpu, bf16=True), fill=False)
                for _ in range(2):  # compile (forward and backward graphs) before the clock starts
                    sides["compiled"]()
            t = race(sides, cpu, rounds=2 if heavy else rounds, calls=1 if heavy else 3)
            peak = {p: 2 * n_peak[p] ** 3 / t[f"peak {p}"] for p in ("fp32", "bf16")}
            for p in peak_s:
                peak_s[p].append(peak[p])
            rows.append({
                "distortion": d.upper(), "model": m, "GFLOP/step": flops / 1e9,
                "before (ms)": 1e3 * t["before"], "fp32 (ms)": 1e3 * t["fp32"], "bf16-mixed (ms)": 1e3 * t["bf16"],
                "before % fp32 peak": 100 * flops / t["before"] / peak["fp32"],
                "fp32 % fp32 peak": 100 * flops / t["fp32"] / peak["fp32"],
                f"bf16 % {bf16_peak} peak": 100 * flops / t["bf16"] / peak[bf16_peak],
                "bf16 × before": t["before"] / t["bf16"], "NaN fill ÷ as trained": t["bf16 NaN fill"] / t["bf16"],
                **({"bf16 compiled (ms)": 1e3 * t["compiled"], "compiled × eager bf16": t["bf16"] / t["compiled"]}
                   if compile_ else {}),
                "h/cell before": t["before"] * PAPER_STEPS / 3600, "h/cell fp32": t["fp32"] * PAPER_STEPS / 3600,
                "h/cell bf16": t["bf16"] * PAPER_STEPS / 3600,
            })
            print(f"bench_conv: {m} on {d}: before {1e3 * t['before']:.0f} ms, fp32 {1e3 * t['fp32']:.0f} ms, "
                  f"bf16 {1e3 * t['bf16']:.0f} ms", file=sys.stderr, flush=True)
    med = {p: sorted(v)[len(v) // 2] / 1e9 for p, v in peak_s.items()}
    return pd.DataFrame(rows), med


def report(df: pd.DataFrame, peak: dict, a: argparse.Namespace) -> str:
    n = peak_sizes()
    seed_h = {c: df[f"h/cell {c}"].sum() for c in ("before", "fp32", "bf16")}
    full = len(df) == len(CNN_MODELS) * len(DISTORTIONS)
    return "\n".join([
        "# The CNN family's training step on the CPU", "",
        f"Generated by `{' '.join(['python bench/bench_conv.py', *sys.argv[1:]])}` (bench/bench_conv.py; do not edit "
        f"by hand). Commit {git_commit()}; {device_name(torch.device('cpu'))}; torch {versions()['torch']}; "
        f"{torch.get_num_threads()} thread(s). Native bfloat16: "
        f"{', '.join(native_bf16()) or NO_NATIVE}.", "",
        "One SGD step at batch 256 (forward, backward, momentum update), median over "
        f"{a.rounds} interleaved rounds (2 for the steps above 20 GFLOP), raced against a "
        + (f"{n['fp32']}² matmul of each precision" if n["fp32"] == n["bf16"]
           else f"{n['fp32']}² fp32 and {n['bf16']}² bf16 matmul (bf16 is emulated here, too slow for {PEAK_N}²)")
        + " on the same thread, so that a loaded machine slows both sides alike. `before`: the network as "
        "built before the convolution path (float32, NCHW, ReLU before max-pool, the library's input gradient "
        "for the first convolution); `fp32` / `bf16-mixed`: the network as `src.models` builds it now, in float32 "
        "and under the `bf16-mixed` autocast of `model.precision`. Every step runs as training runs it on the CPU: "
        "in deterministic mode, without its NaN fill of uninitialised tensors; `NaN fill ÷ as trained`: the "
        "`bf16-mixed` step with the fill, over the step without. FLOPs: FlopCounterMode, forward + backward."
        + (" `bf16 compiled`: the `bf16-mixed` network with its forward under `torch.compile` (inductor, default "
           "mode), compiled before the race; `compiled × eager bf16` > 1 means the compiler is faster."
           if a.compile else ""), "",
        f"Core GEMM peak, one thread, median over the races: fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s"
        + ("" if bf16_reference() == "bf16" else " (ATen's emulated matmul; an emulated bf16 step runs on float32 "
           "kernels and is measured against the fp32 peak, what the core can do)")
        + f". Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "cores (other work on the machine slows steps and peak alike: read the percentages and ratios; the hours "
        "are those of this load).", "",
        fmt(df), "",
        ("One seed of the CNN family (these 20 cells), step time × 150k steps: "
         f"before {seed_h['before']:.0f} h, fp32 {seed_h['fp32']:.0f} h, bf16-mixed {seed_h['bf16']:.0f} h of one core."
         if full else "Projected hours per cell: step time × 150k steps."), "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CNN_MODELS))
    p.add_argument("--distortions", nargs="+", default=list(DISTORTIONS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add the bf16-mixed network under torch.compile")
    p.add_argument("--out", default=str(REPO / "reports/bench/conv.md"))
    a = p.parse_args()
    if a.compile and not native_bf16():
        sys.exit("error: --compile needs a CPU with native bfloat16 (AMX or AVX512-BF16 in /proc/cpuinfo): "
                 "here bf16-mixed runs on float32 kernels, which torch.compile does not take over")
    torch.manual_seed(0)
    df, peak = bench(a.models, a.distortions, a.rounds, a.compile)
    write_atomic(Path(a.out), report(df, peak, a))
    print(f"bench_conv: wrote {a.out}")


if __name__ == "__main__":
    main()
