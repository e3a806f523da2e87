"""The result fingerprint: a hash of what the training code computes, per model and distortion.

``python -m src.run.fingerprint`` trains every model of the grid for a few hundred steps on a small
synthetic digit set under every distortion, through the same pieces a cell uses (the stage's
generator, fresh draws of the datamodule, the network builder, ``Classifier.loss``, its optimiser
and schedule, stepped as ``Classifier.training_step`` steps them; tests/test_train.py shows that
Lightning's loop computes exactly this), and hashes the final weights and the logits of a fixed
distorted batch.
``src/run/fingerprint.json`` holds the committed hashes; ``tests/test_fingerprint.py`` compares.

A change that keeps every hash leaves every result bit-identical, so committed cells may be
re-locked with ``python -m src.run.relock`` (say so in the commit message); a change that moves a hash
retrains the cells it touches. The hashes must not depend on the machine: the computation runs in
child processes pinned to portable kernels (ATen's default capability, MKL's compatible code path,
oneDNN off, one thread each; one child per core, each taking the next cell when done), which is what
``python -m src.run.fingerprint`` does by default.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "DNNL_MAX_CPU_ISA": "SSE41"}
FILE = Path(__file__).resolve().with_suffix(".json")  # src/run/fingerprint.json, a dependency of every train cell
STEPS, BATCH, N_DIGITS, N_EVAL = 200, 8, 64, 32
TIMEOUT = 1800  # seconds for the whole computation: a hung child is killed, not waited for
SMALL_CANVAS = 42  # TC's 60×60 canvas shrunk to RTS's: the smallest on which every network of the grid builds


def synthetic_digits(n: int, seed: int):
    """Digit-like uint8 images (N, 1, 28, 28): three Gaussian blobs in the central 20×20, black border
    (float64, exact on any CPU). The test fixtures use them too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = 8 + 12 * torch.rand(n, 3, 2, generator=g, dtype=torch.float64)
    sigma = 1.2 + 1.2 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
    ax = torch.arange(28, dtype=torch.float64)
    dx = ax[None, None, None, :] - centres[..., 0, None, None]
    dy = ax[None, None, :, None] - centres[..., 1, None, None]
    img = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)).sum(1).clamp(max=1)
    img = torch.where(img < 0.05, torch.zeros_like(img), img)  # a black background, as MNIST's
    return (img * 255).round().to(torch.uint8)[:, None]


def cell_hash(model: str, data: str) -> str:
    """Train ``model`` on ``data`` for STEPS steps of BATCH fresh draws; hash weights and eval logits."""
    import torch
    from omegaconf import OmegaConf

    from src.data.datamodule import DistortedMNIST, to_float
    from src.data.distort import generate_split
    from src.models.build import build_model
    from src.models.module import Classifier, sgd_step
    from src.config import compose_config

    small = [f"data.canvas={SMALL_CANVAS}"] if compose_config([f"data={data}"]).data.canvas > SMALL_CANVAS else []
    cfg = compose_config([f"model={model}", f"data={data}", *small, "trainer=smoke", f"trainer.max_steps={STEPS}",
                          f"trainer.val_check_interval={STEPS}", f"loader.batch_size={BATCH}", "loader.mode=fresh"])
    torch.manual_seed(cfg.seed)
    net, _ = build_model(cfg)
    module = Classifier(net, OmegaConf.to_container(cfg.optim, resolve=True), STEPS)
    dm = DistortedMNIST(cfg.data, cfg.loader, cfg.paths, cfg.stn.align_corners, cfg.seed)
    dm.set_train(synthetic_digits(N_DIGITS, 1), torch.arange(N_DIGITS) % 10)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    bf16 = "cpu" if cfg.model.precision == "bf16-mixed" else None  # Lightning's bf16-mixed: the step in autocast
    for step in range(STEPS):
        sgd_step(opt, lambda: module.loss(dm.train_batch(step)), sched, bf16=bf16)
    eval_u8, _ = generate_split(synthetic_digits(N_EVAL, 2), cfg.data, 7, bool(cfg.stn.align_corners),
                                pool=synthetic_digits(N_EVAL, 3))
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    with torch.no_grad():
        h.update(net.eval()(to_float(eval_u8)).numpy().tobytes())
    return h.hexdigest()[:16]


def grid_cells() -> dict[str, tuple[str, str]]:
    """Every (model, distortion) of conf/, by the name of its seed-0 cell."""
    from src.cell import Cell

    root = FILE.parents[2]
    models = sorted(p.stem for p in (root / "conf/model").glob("*.yaml"))
    distortions = sorted(p.stem for p in (root / "conf/data").glob("*.yaml"))
    return {Cell(0, m, d).name: (m, d) for d in distortions for m in models}


def portable_here() -> None:
    """This process on the portable path as far as it can set it itself (oneDNN off, one thread); the
    environment of PORTABLE_ENV does the rest before torch loads."""
    import torch

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)


def all_hashes(only: list[str] | None = None) -> dict[str, str]:
    """Hashes of every (model, distortion) of conf/, or of the cells named in ``only``."""
    portable_here()
    return {k: cell_hash(*md) for k, md in grid_cells().items() if only is None or k in only}


def pinned(only: list[str] | None = None, parent_env: dict[str, str] | None = None,
           jobs: int | None = None) -> dict[str, str]:
    """The hashes, computed in child processes pinned to portable kernels, whatever ``parent_env`` says: one
    per core (``jobs``), each on one thread, taking the next cell whenever it is done with one. A cell's hash
    depends on nothing computed before it, so how the cells are shared out leaves every hash as it is.
    Children still running after TIMEOUT are killed: subprocess.TimeoutExpired."""
    child_env = {**os.environ, **(parent_env or {}), **PORTABLE_ENV}
    todo = queue.SimpleQueue()
    for cell in only or grid_cells():
        todo.put(cell)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cmd = [sys.executable, "-m", "src.run.fingerprint", "--serve"]
    out, failed, children = {}, [], []

    def worker():
        child = subprocess.Popen(cmd, cwd=FILE.parents[2], env=child_env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(child)
        try:
            while not failed:
                try:
                    cell = todo.get_nowait()
                except queue.Empty:
                    break
                try:
                    child.stdin.write(cell + "\n")
                    child.stdin.flush()
                    line = child.stdout.readline()
                except OSError:  # the child died
                    line = ""
                if not line:
                    failed.append(f"{cell}: {child.stderr.read()[-3000:]}")
                    break
                out.update(json.loads(line))
        finally:
            with contextlib.suppress(OSError):
                child.stdin.close()
            child.wait(timeout=60)

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(jobs or cores, todo.qsize())))]
    deadline = time.monotonic() + TIMEOUT
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        failed.append("timed out")
        for child in children:
            child.kill()  # its worker's readline returns, and the worker ends
        for t in threads:
            t.join()
        raise subprocess.TimeoutExpired(cmd, TIMEOUT)
    if failed:
        raise RuntimeError("fingerprint child failed:\n" + "\n".join(failed))
    return out


# bf16-mixed on float32 kernels (src.models.bf16), where a CPU lacks native bfloat16: the fingerprint runs
# bf16-mixed on ATen's kernels and never takes that path, so one ST-CNN cell's hash under it, on the same
# portable kernels, stands for it (tests/test_bf16.py and python -m src.run.relock check it). Moved: cells
# trained on float32 kernels no longer match the code, and retrain.
FLOAT32_KERNELS = ("st_cnn", "r", "4d66ad796a48fc44")


def float32_kernels_hash() -> tuple[str, int]:
    """The hash of FLOAT32_KERNELS' cell with bf16-mixed on float32 kernels, computed in a child pinned as the
    fingerprint's, and the number of operators the path took over (0: it was never taken)."""
    model, data, _ = FLOAT32_KERNELS
    code = ("import json; from src.run.fingerprint import cell_hash, portable_here; "
            "from src.models.bf16 import Bf16ViaFloat32; portable_here(); m = Bf16ViaFloat32(); m.__enter__(); "
            f"h = cell_hash({model!r}, {data!r}); m.__exit__(None, None, None); print(json.dumps([h, m.calls]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=FILE.parents[2], capture_output=True, text=True,
                       timeout=TIMEOUT, env={**os.environ, **PORTABLE_ENV})
    if r.returncode:
        raise RuntimeError("float32-kernel fingerprint child failed:\n" + r.stderr[-3000:])
    h, calls = json.loads(r.stdout)
    return h, calls


def moved(hashes: dict[str, str]) -> list[str]:
    """The cells whose hash in ``hashes`` is not the committed one (either side missing counts)."""
    committed = json.loads(FILE.read_text()) if FILE.is_file() else {}
    return sorted(k for k in committed.keys() | hashes.keys() if hashes.get(k) != committed.get(k))


def float32_kernels_hold() -> bool:
    """Whether this tree computes FLOAT32_KERNELS' hash, through the float32-kernel path."""
    h, calls = float32_kernels_hash()
    return calls > 0 and h == FLOAT32_KERNELS[2]


def holds(cell: str, float32_kernels: bool = False) -> bool:
    """Whether this tree computes the committed hash of ``cell`` (``0-fcn-r``: a model on a distortion),
    pinned as the full check, and, for a cell trained in bf16-mixed on float32 kernels, FLOAT32_KERNELS' hash:
    a code change that keeps them keeps that cell's results."""
    committed = json.loads(FILE.read_text()).get(cell) if FILE.is_file() else None
    try:
        if committed is None or pinned([cell]).get(cell) != committed:
            return False
        return not float32_kernels or float32_kernels_hold()
    except (RuntimeError, subprocess.SubprocessError):  # the changed code does not even run
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description="result fingerprint of the training code")
    parser.add_argument("--write", action="store_true", help=f"write the hashes to {FILE.name}")
    parser.add_argument("--here", action="store_true", help="compute in this process (no pinning), print JSON")
    parser.add_argument("--only", help="comma-separated cells (default: all)")
    parser.add_argument("--serve", action="store_true", help="hash each cell named on stdin, a JSON line each")
    a = parser.parse_args()
    if a.serve:
        portable_here()
        cells = grid_cells()
        for line in sys.stdin:
            print(json.dumps({line.strip(): cell_hash(*cells[line.strip()])}), flush=True)
        return
    if a.here:
        print(json.dumps(all_hashes(a.only.split(",") if a.only else None), indent=1, sort_keys=True))
        return
    hashes = pinned()
    if a.write:
        FILE.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"fingerprint: {len(hashes)} hashes -> {FILE}")
        return
    changed = moved(hashes)
    print("fingerprint: unchanged" if not changed else f"fingerprint: {len(changed)} changed: {', '.join(changed)}")
    sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
