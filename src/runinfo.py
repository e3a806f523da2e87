"""What every run records and checks: one-line user errors, verified loads, provenance, atomic writes."""

from __future__ import annotations

import contextlib
import copyreg
import errno
import functools
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _by_import(module):
    return importlib.import_module, (module.__name__,)


# torch swaps some submodules for module subclasses (torch.backends.cudnn) that pickle refuses; a Hydra launcher
# that pickles the app (`-m hydra/launcher=submitit_local`) would fail on them. They travel as imports.
for _t in {type(m) for m in list(sys.modules.values()) if isinstance(m, type(sys)) and type(m) is not type(sys)}:
    copyreg.pickle(_t, _by_import)


class UserError(Exception):
    """An expected failure: printed as one line, exit code ``exit_code`` (1), no traceback."""

    exit_code = 1


class DiskFull(UserError):
    """No space (or quota) left while writing ``path``: one line naming it and the free space there, measured
    when the line is printed, after the partial files are gone."""

    def __init__(self, path: Path, size: int | None, reason: str):
        super().__init__(reason)
        self.path, self.size, self.reason = Path(path), size, reason

    def __str__(self) -> str:
        where = next(p for p in (self.path, *self.path.parents) if p.exists())
        need = f"{_human(self.size)} to write, " if self.size is not None else ""
        return (f"{self.reason} writing {self.path} ({need}{_human(shutil.disk_usage(where).free)} free there); "
                f"free some space and rerun the same command")


def _human(n: float) -> str:
    """1234567 → '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


@contextlib.contextmanager
def space_for(path: Path, size: int | None = None):
    """A full disk or quota (ENOSPC, EDQUOT) while writing ``path`` becomes ``DiskFull``; every other error
    passes. Only complete files ever reach a final path (``write_atomic``), so a rerun after freeing space
    resumes from the last complete checkpoint."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(path, size, e.strerror or os.strerror(e.errno)) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checked(path: Path, hint: str, expected_sha256: str | None = None) -> dict:
    """torch.load(weights_only=True) with a clear error for a missing, tampered or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; run `{hint}`")
    if expected_sha256 is not None:
        got = sha256_file(path)
        if got != expected_sha256:
            raise UserError(f"{path} has sha256 {got[:16]}…, expected {expected_sha256[:16]}…; run `{hint}` again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise UserError(f"{path} is unreadable ({type(e).__name__}); run `{hint}` again") from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename: a crash or a full disk never leaves a
    half-written file at ``path`` (the previous one stays), and a full disk is one line (``space_for``)."""
    path = Path(path)
    with space_for(path, len(data.encode() if isinstance(data, str) else data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # some file systems report a full disk only here
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` with one rename.

    On any failure (or an interrupt) the temporary directory is removed and ``out_dir`` is untouched.
    """
    with space_for(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    old = None
    try:
        yield tmp
        with space_for(out_dir):
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
                os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
    except DiskFull as e:
        if tmp in e.path.parents:  # name the file as it would have been, not its temporary place
            e.path = out_dir / e.path.relative_to(tmp)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_dvc_lock(root: Path = REPO) -> None:
    """dvc.lock as a dvc command killed while writing it leaves it (``kill -9`` during ``dvc commit -f``): empty
    (every dvc command then fails), cut off mid-line or unparseable, or cut at a line's end, which parses: its
    last entry then lacks what dvc writes last (every stage here has outputs, each with its md5 and size), or, cut
    between entries or outputs, stages or outputs locked at the last commit are gone (dvc would retrain them), or
    the last entry, added since that commit (dvc appends new stages), has fewer outputs than dvc.yaml gives its
    stage. One line saying how to restore it; dvc writes it whole, ending in a newline."""
    import yaml

    load = functools.partial(yaml.load, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 280 kB: C, 10× faster
    lock = root / "dvc.lock"
    if not lock.is_file():
        return
    text = lock.read_bytes()
    try:
        stages = load(text).get("stages") if text.endswith(b"\n") else None
    except (yaml.YAMLError, AttributeError):
        stages = None
    restore = ("as a dvc command killed while writing it leaves it; restore it with `git checkout dvc.lock` (then "
               "`dvc commit -f` any stage locked since that commit)")
    if not isinstance(stages, dict):
        what = "empty" if not text.strip() else f"truncated or corrupt ({len(text)} bytes)"
        raise UserError(f"{lock} is {what}, {restore}")
    cut = next((name for name, entry in stages.items() if not _whole_entry(entry)), None)
    if cut is not None:
        raise UserError(f"{lock} is cut short (the entry of {cut} lacks its outputs), {restore}")
    committed = _git("show", "HEAD:dvc.lock", cwd=root)
    try:
        head = (load(committed).get("stages") or {}) if committed else {}
    except (yaml.YAMLError, AttributeError):
        head = {}
    outs = lambda entry: {o.get("path") for o in entry.get("outs") or [] if isinstance(o, dict)}  # noqa: E731
    gone = sorted(name for name, entry in head.items()
                  if name not in stages or not outs(entry) <= outs(stages[name]))
    if gone:
        raise UserError(f"{lock} lacks {len(gone)} stage(s) or outputs locked at the last commit ({', '.join(gone[:3])}"
                        f"{' …' if len(gone) > 3 else ''}): cut short, {restore}; if you removed those stages, "
                        f"commit dvc.lock")
    last = next(reversed(stages), None)
    if last is not None and last not in head:
        declared = _declared_outs(root, last.split("@")[0])
        if declared is not None and len(stages[last]["outs"]) < declared:
            raise UserError(f"{lock} is cut short (the entry of {last} has {len(stages[last]['outs'])} of the "
                            f"{declared} outputs dvc.yaml gives it), {restore}")


def _declared_outs(root: Path, stage: str) -> int | None:
    """How many outputs dvc.yaml gives a stage (a matrix stage's cells all have as many); None without it."""
    import yaml

    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return sum(len(spec.get(k) or []) for k in ("outs", "metrics", "plots") if isinstance(spec.get(k), list))


def _whole_entry(entry) -> bool:
    """A lock entry as dvc writes it whole: a command and outputs (written last), each with its md5 and size."""
    outs = entry.get("outs") if isinstance(entry, dict) else None
    return (isinstance(outs, list) and bool(outs) and "cmd" in entry
            and all(isinstance(o, dict) and {"path", "md5", "size"} <= set(o) and
                    ("nfiles" in o or not str(o["md5"]).endswith(".dir")) for o in outs))


def _git(*args: str, cwd: Path | None = None) -> bytes | None:
    """The output of ``git <args>`` in ``cwd`` (REPO); None without git or without history (a GPU window's copy)."""
    try:
        r = subprocess.run(["git", *args], cwd=cwd or REPO, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_commit() -> str:
    """HEAD, or ``<HEAD>-dirty+<hash>`` where src/ or conf/ differ from it: the first 12 hex digits of the sha256
    of ``git diff HEAD --binary -- src conf``, so records of two different uncommitted states never agree."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return _commit_of_copy()
    diff = _git("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--", "src", "conf")
    return head.decode().strip() + (f"-dirty+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else "")


def uncommitted(paths) -> list[str]:
    """The files of ``paths`` (git pathspecs) that differ from HEAD, untracked ones included (not ignored ones);
    none where there is no history to compare with (a GPU window's copy, a repository without commits)."""
    if _git("rev-parse", "HEAD") is None:
        return []
    changed = (_git("diff", "HEAD", "--name-only", "-z", "--", *paths) or b"") + \
        (_git("ls-files", "-z", "--others", "--exclude-standard", "--", *paths) or b"")
    return sorted(f for f in changed.decode(errors="replace").split("\0") if f)


def _commit_of_copy() -> str:
    """A copy of the tree without its git history (a GPU window's) is told its commit by STN_COMMIT."""
    return os.environ.get("STN_COMMIT") or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # widest first: what sets a CPU core's speed here
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bfloat16 arithmetic; without them bf16-mixed is emulated
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> list[str] | None:
    """This CPU's vector instruction sets among ``ISA_FLAGS``, widest first, as /proc/cpuinfo names them; None
    where it cannot say (not x86 Linux). Recorded with every CPU training segment: one model name ("AMD
    EPYC") covers CPUs with native bfloat16 and CPUs that emulate it at several times the cost."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next(ln for ln in CPUINFO.read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return [f for f in ISA_FLAGS if f in flags]


def widest_isa(flags: list[str] | None) -> str | None:
    """A CPU's generation as its widest vector instruction set ('amx_bf16' … 'avx2', 'below avx2'); None where
    its flags are unknown. The one key by which records of one CPU model name tell machines apart."""
    return None if flags is None else (flags[0] if flags else "below avx2")


def has_native_bf16(flags: list[str] | None) -> bool | None:
    """Native bfloat16 (AMX or AVX512-BF16) among ``flags``; None where they are unknown."""
    return None if flags is None else any(f in BF16_FLAGS for f in flags)


def native_bf16() -> list[str]:
    """This CPU's native bfloat16 arithmetic, as /proc/cpuinfo names it (``amx_bf16``, ``avx512_bf16``)."""
    return [f for f in cpu_flags() or [] if f in BF16_FLAGS]


def versions() -> dict[str, str]:
    import pytorch_lightning as pl

    return {"python": platform.python_version(), "torch": torch.__version__, "pytorch_lightning": pl.__version__}
