"""The ``distort`` stage: ``python -m src.data.distort data=<r|rts|p|e|tc> [key=value …]``.

Composes conf/config.yaml with Hydra's compose API (no ``outputs/`` directory), reads the raw file
(checked against its sidecar), distorts every split with :func:`src.data.warps.distort_batch` in
float64 on the CPU, rounds to uint8 and writes ``<paths.data_dir>/<d>/``:

- ``train.pt``, ``val.pt``, ``test.pt``: ``{"images": uint8 (N,1,S,S), "labels": int64 (N,),
  "params": {name: float32 (N, …)}}``, loadable with ``torch.load(weights_only=True)``;
  pixel = round(255·x) (half to even), read back as uint8/255;
- ``manifest.json``: sha256, shapes and parameter names of each file, the generation config, the
  seeds and the raw file's sha256. It holds nothing machine-dependent (no versions, no times), so
  the directory hashes the same wherever it is regenerated.

The output appears by one rename of a finished temporary directory, so an interrupted run leaves
no valid-looking output.

Determinism: split ``s`` is generated from ``torch.Generator().manual_seed(split_seed(gen_seed, s))``
in chunks of ``CHUNK`` images, in order, with float64 arithmetic whose per-element order does not
depend on the thread count (tested), then rounded to uint8, which absorbs last-bit differences
between CPUs unless a value lies within ~1e-13 of a rounding boundary. The stage uses torch's
default thread count; on a heavily shared machine OMP_NUM_THREADS=1 is faster
(reports/bench/data.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from src.data.mnist import SPLITS, check_digits, load_raw, sidecar
from src.data.warps import distort_batch, warp_of
from src.runinfo import UserError, atomic_dir, load_checked
from src.config import stage_main

CHUNK = 1000  # images per distort_batch call: part of the recipe (the random stream is drawn per chunk)


def split_seed(gen_seed: int, split: str) -> int:
    """A 63-bit seed for (gen_seed, split): independent streams for train, val and test."""
    return int.from_bytes(hashlib.sha256(f"{int(gen_seed)}/{split}".encode()).digest()[:8], "little") >> 1


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → uint8 round(255·x), ties to even."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def generate_split(images_u8: torch.Tensor, data_cfg, seed: int, align_corners: bool,
                   pool: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distort one split (uint8 (N,1,28,28)) → uint8 images and float32 parameters.

    Results go into tensors allocated once for the whole split: keeping many small per-chunk
    tensors alive between the large temporary ones fragments the heap (4× the memory on RTS).
    """
    g = torch.Generator().manual_seed(int(seed))
    n = images_u8.shape[0]
    images, params = None, {}
    for i in range(0, n, CHUNK):
        x = images_u8[i:i + CHUNK].to(torch.float64) / 255
        y, p = distort_batch(x, data_cfg, g, align_corners=align_corners, clutter_pool=pool)
        if images is None:
            images = torch.empty((n, *y.shape[1:]), dtype=torch.uint8)
            params = {k: torch.empty((n, *v.shape[1:]), dtype=torch.float32) for k, v in p.items()}
        images[i:i + len(y)] = quantize(y)
        for k, v in p.items():
            params[k][i:i + len(y)] = v
    if images is None:
        raise UserError("cannot distort an empty split")
    return images, params


def _clutter_pool(raw: dict, split: str, data_cfg) -> torch.Tensor | None:
    if not warp_of(data_cfg).needs_pool:
        return None
    source = str(data_cfg.get("patch_source", "same_split"))
    if source == "same_split":
        return raw[split]["images"]
    if source == "any_split":
        return torch.cat([raw[s]["images"] for s in SPLITS])
    raise UserError(f"data.patch_source must be 'same_split' or 'any_split', got {source!r}")


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)  # to memory: the archive's internal name is then fixed ("archive")
    return buf.getvalue()


def distort(cfg) -> Path:
    """Generate and write the dataset of ``cfg.data``; returns its directory."""
    d = cfg.data
    try:
        warp_of(d)
    except ValueError as e:
        raise UserError(str(e)) from None
    raw_path = Path(cfg.paths.raw_file)
    raw = load_raw(raw_path)
    ac = bool(cfg.stn.align_corners)
    out_dir = Path(cfg.paths.data_dir) / str(d.name)
    files, seeds = {}, {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            seeds[split] = split_seed(d.gen_seed, split)
            images, params = generate_split(raw[split]["images"], d, seeds[split], ac, _clutter_pool(raw, split, d))
            labels = raw[split]["labels"].clone()
            data = _to_bytes({"images": images, "labels": labels, "params": params})
            (tmp / f"{split}.pt").write_bytes(data)
            files[f"{split}.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "images": list(images.shape),
                                    "labels": list(labels.shape), "params": {k: list(v.shape) for k, v in params.items()}}
            del images, params, labels, data
        manifest = {
            "name": str(d.name), "files": files, "config": OmegaConf.to_container(d, resolve=True),
            "align_corners": ac, "seeds": seeds, "chunk": CHUNK, "pixels": "uint8 = round(255 * x), ties to even",
            "raw": {"file": raw_path.name, "sha256": sidecar(raw_path).read_text().split()[0]},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_split(split_dir: Path, split: str, canvas: int | None = None) -> dict:
    """One split of a distorted dataset, checked against its manifest's sha256 and then for what training
    reads (:func:`src.data.mnist.check_digits`; images ``canvas`` × ``canvas`` when given)."""
    split_dir = Path(split_dir)
    hint = f"dvc repro distort@{split_dir.name}"
    try:
        expected = json.loads((split_dir / "manifest.json").read_text())["files"][f"{split}.pt"]["sha256"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{split_dir / 'manifest.json'} is missing or unreadable; run `{hint}`") from None
    path = split_dir / f"{split}.pt"
    d = load_checked(path, hint=hint, expected_sha256=expected)
    check_digits(str(path), d, canvas, hint)
    return d


def _first_difference(stored, wanted, prefix: str = "data"):
    """(key, stored value, wanted value) of the first key where two configs differ, else None."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for k in list(wanted) + [k for k in stored if k not in wanted]:
            diff = _first_difference(stored.get(k, MISSING), wanted.get(k, MISSING), f"{prefix}.{k}")
            if diff is not None:
                return diff
        return None
    return None if stored == wanted else (prefix, stored, wanted)


MISSING = "<missing>"


def check_generation_config(split_dir: Path, data_cfg, align_corners: bool) -> None:
    """Refuse data generated under another config than the run's (fresh draws and stored sets must
    come from one recipe): a one-line UserError naming the first differing key and both values."""
    split_dir = Path(split_dir)
    hint = f"dvc repro distort@{data_cfg.name}"
    try:
        manifest = json.loads((split_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{split_dir / 'manifest.json'} is missing or unreadable; run `{hint}`") from None
    stored = {"data": manifest.get("config", MISSING), "stn.align_corners": manifest.get("align_corners", MISSING)}
    wanted = {"data": OmegaConf.to_container(data_cfg, resolve=True), "stn.align_corners": bool(align_corners)}
    for key in stored:
        diff = _first_difference(stored[key], wanted[key], key)
        if diff is not None:
            k, theirs, ours = diff
            raise UserError(f"{split_dir} was generated with {k}={json.dumps(theirs)}, this run has "
                            f"{k}={json.dumps(ours)}; run `{hint}` (or drop the override)")


def main(argv: list[str] | None = None) -> None:
    def work(cfg) -> str:
        out = distort(cfg)
        return f"distort: {out}/{{train,val,test}}.pt + manifest.json"

    stage_main(argv, work)


if __name__ == "__main__":
    main()
