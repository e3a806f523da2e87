"""Train many cells at once on one accelerator for a fixed wall-clock window, then pack what came of it.

    python -m src.ops.window --device cuda --minutes 10 [--cells 0-cnn-r,0-st_cnn-r|@plan.json] [--profile full]
                         [--jobs N] [--out DIR] [--set key=value ...]
    python -m src.ops.window --plan bench.json --minutes 7 [--cells ...]   # cost order and what fits, → plan.json
    python -m src.ops.window --unpack DIR [--commit]                       # bring packed results into place here
    python -m src.ops.window --prepare [--cells ...]                       # what the next window carries (.window/)

Why: an accelerator is lent for minutes at a time, and the CNN family needs it. Each cell runs as the
dvc.yaml train stage's own command (read from dvc.yaml, so its records land exactly where
``dvc commit -f train@<cell>`` expects them), one process per cell, ``--jobs`` at once. At the limit
every running cell gets SIGTERM, checkpoints and exits 143; rerunning the same window (with the
packed runs put back) resumes each cell exactly where it stopped.

What a window leaves in ``--out`` fits the device tool's return limits (at most 8 files, 16 MiB each,
64 MiB in all): ``summary.json``, ``records.tar.gz`` (finished cells' reports/{metrics,curves,cells}),
``runs.tar.gz`` [+ ``runs-2.tar.gz`` …] (unfinished cells' newest checkpoints) and ``logs.tar.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from src.cell import Cell
from src.config import model_config
from src.run.checkpoints import checkpoint_dir, checkpoint_step, resumes_at
from src.runinfo import REPO, UserError, write_atomic, write_json

MIB = 1 << 20
MAX_RETURN_FILES = 8          # the device tool's return limits
RUN_CHUNK_BYTES = 15 * MIB    # one runs tarball, uncompressed (gzip barely shrinks weights)
RUN_TOTAL_BYTES = 52 * MIB    # every runs tarball together: the rest of the 64 MiB is records, logs, summary
MAX_RUN_CHUNKS = MAX_RETURN_FILES - 4  # summary, records, logs and one transcript of the calling script
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+)")
RECORD_DIRS = ("reports/metrics/", "reports/curves/", "reports/cells/")


@dataclass
class Outcome:
    cell: str
    status: str = "not started"   # finished | stopped | failed | killed | not started
    step: int | None = None       # steps done when it ended (its checkpoint's, for a stopped cell)
    from_step: int = 0            # where this window started it (0, or a resumed checkpoint's step)
    seconds: float = 0.0
    s_per_step: float | None = None
    returncode: int | None = None
    message: str = ""
    packed: bool = False
    command: str = ""


# ------------------------------------------------------------------ cells and their command

def parse_cells(spec: str | None, root: Path) -> list[Cell]:
    """``a,b,c``, ``@plan.json`` (its ``cells``), or None: every seed-0 cell of params.yaml whose model config
    has ``family: cnn``."""
    import yaml

    if spec is None:
        grid = yaml.safe_load((REPO / "params.yaml").read_text())
        cnn = [m for m in grid["models"] if model_config(m).family == "cnn"]
        names = [Cell(0, m, d).name for d in grid["distortions"] for m in cnn]
    elif spec.startswith("@"):
        path = root / spec[1:]
        try:
            names = list(json.loads(path.read_text())["cells"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a plan (a JSON file with a 'cells' list); write one with --plan") from None
    else:
        names = [c for c in spec.split(",") if c]
    models = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    datas = {p.stem for p in (REPO / "conf" / "data").glob("*.yaml")}
    cells = []
    for n in names:
        try:
            cell = Cell.parse(n)
        except ValueError:
            cell = None
        if cell is None or cell.model not in models or cell.data not in datas:
            raise UserError(f"cell '{n}' is not <seed>-<model>-<data> (models: {', '.join(sorted(models))}; "
                            f"data: {', '.join(sorted(datas))})")
        cells.append(cell)
    if len({c.name for c in cells}) != len(cells):
        raise UserError("a cell is named twice in --cells")
    if not cells:
        raise UserError("no cells given")
    return cells


def stage_args(cell: Cell, profile: str) -> list[str]:
    """The train stage's command line from dvc.yaml, filled in for one cell (without ``python -m src.train``)."""
    import yaml

    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    for key, value in {"${item.model}": cell.model, "${item.data}": cell.data, "${item.seed}": str(cell.seed),
                       "${key}": cell.name, "${profile}": profile}.items():
        cmd = cmd.replace(key, value)
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "src.train"], cmd
    return args[3:]


def cell_args(cell: Cell, profile: str, cuda: bool, sets: list[str]) -> list[str]:
    """The stage's command + the device's keys: the GPU with TF32 on CUDA, the CPU without."""
    device = ["trainer.accelerator=gpu", "trainer.tf32=true"] if cuda else ["trainer.accelerator=cpu", "trainer.tf32=false"]
    return [*stage_args(cell, profile), *device, *sets]


def arg_value(args: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in reversed(args) if a.startswith(key + "="))


def command_checkpoints(args: list[str], root: Path) -> Path:
    """``<run_dir>/<fingerprint12>/checkpoints`` of this exact command: the one ``src.train`` resumes from."""
    from src.config import compose_config

    return root / checkpoint_dir(compose_config(args))


def last_step(ckpt_dir: Path) -> int | None:
    """The step of a cell's ``last.ckpt``: where it stopped; None where there is none it can read."""
    return checkpoint_step(ckpt_dir / "last.ckpt")


def record_paths(args: list[str]) -> list[str]:
    return [arg_value(args, k) for k in ("paths.metrics_file", "paths.curve_file", "paths.cell_dir")]


# ------------------------------------------------------------------ the window

class Window:
    """Runs the cells ``jobs`` at a time until each ends or the deadline; then SIGTERM, grace, SIGKILL."""

    def __init__(self, a: argparse.Namespace, cells: list[Cell], root: Path):
        self.a, self.cells, self.root = a, cells, root
        self.cuda = a.device == "cuda"
        self.logs = root / a.logs
        self.args = {c.name: cell_args(c, a.profile, self.cuda, a.set) for c in cells}
        self.out = {c.name: Outcome(c.name, command=shlex.join(["python", "-m", "src.train", *self.args[c.name]]))
                    for c in cells}
        self.deadline = 0.0

    def _on_signal(self, signum, frame) -> None:  # the caller's own limit: stop the cells now, still pack
        print(f"window: {signal.Signals(signum).name}; stopping every cell now", file=sys.stderr, flush=True)
        self.deadline = 0.0

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in [env.get("PYTHONPATH")] if p]])
        threads = self.a.threads or max(1, (os.cpu_count() or 1) // self.a.jobs)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env

    def start(self, name: str, env: dict) -> tuple[subprocess.Popen, float, object, object]:
        o = self.out[name]
        o.from_step = resumes_at(self.args[name], self.root)  # as src.train resumes: resume=false, best.ckpt
        (self.logs / "cells").mkdir(parents=True, exist_ok=True)
        fo = open(self.logs / "cells" / f"{name}.out", "a")
        fe = open(self.logs / "cells" / f"{name}.err", "a")
        p = subprocess.Popen([sys.executable, "-m", "src.train", *self.args[name]], cwd=self.root, env=env,
                             stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        print(f"window: started {name} (from step {o.from_step})", flush=True)
        return p, time.time(), fo, fe

    def finish(self, name: str, rc: int, t0: float, killed: bool) -> None:
        o = self.out[name]
        o.returncode, o.seconds = rc, round(time.time() - t0, 1)
        err = [ln for ln in (self.logs / "cells" / f"{name}.err").read_text(errors="replace").splitlines() if ln.strip()]
        last = err[-1].strip() if err else ""
        m = STOPPED.search(last)
        if rc == 0:
            o.status, o.message = "finished", last
            try:
                o.step = int(json.loads((self.root / arg_value(self.args[name], "paths.metrics_file")).read_text())["steps"])
            except (OSError, ValueError, KeyError):
                o.status, o.message = "failed", "exit 0 but no metrics file"
        elif m:
            o.status, o.step, o.message = "stopped", int(m.group(2)), last
        elif rc == -signal.SIGTERM and not killed:  # before its handler was in place: nothing but start-up lost
            o.status, o.step = "stopped", last_step(self.ckpt[name])
            o.message = "stopped by SIGTERM before training started"
        else:
            o.status = "killed" if killed or rc == -signal.SIGKILL else "failed"
            o.step = last_step(self.ckpt[name])
            o.message = last or f"exit {rc}"
        if o.step is not None and o.step > o.from_step and o.seconds > 0:
            o.s_per_step = round(o.seconds / (o.step - o.from_step), 6)
        print(f"window: {name} {o.status}" + (f" at step {o.step}" if o.step is not None else "")
              + f" after {o.seconds:.0f} s", flush=True)

    def run(self) -> None:
        self.ckpt = {c.name: command_checkpoints(self.args[c.name], self.root) for c in self.cells}
        env = self.env()
        queue = [c.name for c in self.cells]
        running: dict[str, tuple] = {}
        self.t0 = time.time()
        self.deadline = self.t0 + 60 * self.a.minutes
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (queue or running) and time.time() < self.deadline:
                while queue and len(running) < self.a.jobs and time.time() < self.deadline:
                    name = queue.pop(0)
                    running[name] = self.start(name, env)
                for name, (p, t0, fo, fe) in list(running.items()):
                    if p.poll() is not None:
                        fo.close(), fe.close()
                        self.finish(name, p.returncode, t0, killed=False)
                        del running[name]
                time.sleep(0.2)
            if running:
                print(f"window: time limit; SIGTERM to {', '.join(running)}", flush=True)
            for p, *_ in running.values():
                p.send_signal(signal.SIGTERM)
            grace_end = time.time() + self.a.grace
            for name, (p, t0, fo, fe) in running.items():
                try:
                    p.wait(timeout=max(0.1, grace_end - time.time()))
                    killed = False
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    killed = True
                fo.close(), fe.close()
                self.finish(name, p.returncode, t0, killed)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self.seconds = round(time.time() - self.t0, 1)


# ------------------------------------------------------------------ packing

def _add_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = tar.gettarinfo(str(path), arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def write_tar(path: Path, files: list[tuple[Path, str]]) -> int:
    """A gzipped tarball of (file, name in the archive); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for f, arc in files:
            _add_file(tar, f, arc)
    os.replace(tmp, path)
    return path.stat().st_size


def run_files(root: Path, ckpt_dir: Path) -> list[tuple[Path, str]]:
    """The newest state of an unfinished cell: last.ckpt, best.ckpt and the fingerprint beside them."""
    files = [ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt", ckpt_dir.parent / "fingerprint.txt"]
    return [(f, f.relative_to(root).as_posix()) for f in files if f.is_file()]


def pack_runs(out: Path, root: Path, unfinished: list[tuple[str, Path]]) -> tuple[list[str], list[str]]:
    """Unfinished cells' runs in tarballs of at most RUN_CHUNK_BYTES each (cells in the given order, never
    split); returns (packed cells, cells left out because the return limits are reached)."""
    chunks: list[list[tuple[Path, str]]] = []
    sizes: list[int] = []
    packed, left = [], []
    for name, ckpt_dir in unfinished:
        if not (ckpt_dir / "last.ckpt").is_file():
            continue  # stopped before its first checkpoint: it starts afresh anyway
        files = run_files(root, ckpt_dir)
        n = sum(f.stat().st_size for f, _ in files)
        if n > RUN_CHUNK_BYTES or sum(sizes) + n > RUN_TOTAL_BYTES:
            left.append(name)
            continue
        if not chunks or sizes[-1] + n > RUN_CHUNK_BYTES:
            if len(chunks) == MAX_RUN_CHUNKS:
                left.append(name)
                continue
            chunks.append([])
            sizes.append(0)
        chunks[-1].extend(files)
        sizes[-1] += n
        packed.append(name)
    for i, files in enumerate(chunks):
        write_tar(out / ("runs.tar.gz" if i == 0 else f"runs-{i + 1}.tar.gz"), files)
    return packed, left


def record_files(root: Path, args: list[str]) -> list[tuple[Path, str]]:
    files = []
    for rel in record_paths(args):
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                files.append((f, f.relative_to(root).as_posix()))
    return files


def pack(w: Window, out: Path) -> dict:
    """summary.json, records.tar.gz, runs*.tar.gz and logs.tar.gz into ``out`` (emptied of earlier packs first)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("runs*.tar.gz"), out / "records.tar.gz", out / "logs.tar.gz", out / "summary.json"]:
        old.unlink(missing_ok=True)
    finished = [c.name for c in w.cells if w.out[c.name].status == "finished"]
    if finished:
        write_tar(out / "records.tar.gz", [f for n in finished for f in record_files(w.root, w.args[n])])
    unfinished = [(c.name, w.ckpt[c.name]) for c in w.cells if w.out[c.name].status in ("stopped", "killed", "failed")]
    packed, left = pack_runs(out, w.root, unfinished)
    for n in packed:
        w.out[n].packed = True
    logs = sorted(f for f in w.logs.rglob("*") if f.is_file() and out not in f.parents)
    write_tar(out / "logs.tar.gz", [(f, f.relative_to(w.logs).as_posix()) for f in logs])
    summary = {
        "device": w.a.device, "device_name": device_label(w.cuda), "profile": w.a.profile, "jobs": w.a.jobs,
        "minutes": w.a.minutes, "seconds": w.seconds, "root": str(w.root), "sets": w.a.set,
        "cells": [asdict(w.out[c.name]) for c in w.cells], "left_out_of_runs": left,
        "commit": [f"dvc commit -f train@{n}" for n in finished],
    }
    write_json(out / "summary.json", summary)
    return summary


def device_label(cuda: bool) -> str:
    import torch

    from src.runinfo import device_name

    return device_name(torch.device("cuda" if cuda else "cpu"))


def print_summary(summary: dict, out: Path) -> None:
    rows = [(c["cell"], c["status"], "" if c["step"] is None else str(c["step"]), f"{c['seconds']:.0f}",
             "" if c["s_per_step"] is None else f"{1e3 * c['s_per_step']:.2f}",
             c["message"] if c["status"] in ("failed", "killed") else "") for c in summary["cells"]]
    head = ("cell", "status", "step", "s", "ms/step", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(v.ljust(wd) for v, wd in zip(r, widths)).rstrip())
    counts = {}
    for c in summary["cells"]:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"window: {', '.join(f'{n} {s}' for s, n in counts.items())} in {summary['seconds']:.0f} s; "
          f"{out}: {', '.join(f'{f} ({(out / f).stat().st_size / MIB:.1f} MiB)' for f in files)}")
    if summary["left_out_of_runs"]:
        print(f"warning: no room to return the checkpoints of {', '.join(summary['left_out_of_runs'])}; "
              f"they restart from their previous checkpoint", file=sys.stderr)
    too_big = [f for f in files if (out / f).stat().st_size > 16 * MIB]
    if too_big or len(files) > MAX_RETURN_FILES or sum((out / f).stat().st_size for f in files) > 64 * MIB:
        print(f"warning: {out} exceeds the return limits (8 files, 16 MiB each, 64 MiB in all)", file=sys.stderr)


# ------------------------------------------------------------------ unpacking

def _safe_members(tar: tarfile.TarFile, allowed: tuple[str, ...]) -> list[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        name = m.name
        if not m.isfile() or name.startswith("/") or ".." in Path(name).parts or not name.startswith(allowed):
            raise UserError(f"{tar.name}: unexpected member {name!r}; not unpacking it")
        members.append(m)
    return members


def rebase_checkpoint(path: Path) -> bool:
    """Point the checkpoint's ModelCheckpoint state at where the file now lies.

    Lightning stores the checkpoint directory as an absolute path and, when it differs on resume,
    drops the best score and keeps a best_model_path that does not exist here: the resumed run would
    then save its next validation as "best" whatever its error. Rewriting the paths keeps a resume on
    another machine exact."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    new = os.path.realpath(path.parent)
    changed = False
    for key, state in ckpt.get("callbacks", {}).items():
        if not key.startswith("ModelCheckpoint") or not state.get("dirpath") or state["dirpath"] == new:
            continue
        old = state["dirpath"]

        def move(p):
            return new + p[len(old):] if isinstance(p, str) and p.startswith(old) else p
        for k in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
            if k in state:
                state[k] = move(state[k])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
        changed = True
    if changed:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        write_atomic(path, buf.getvalue())
    return changed


def check_record_data(cell_dir: Path, data_dir: Path) -> str | None:
    """Why a record cannot be committed here (trained on other test data), or None."""
    import torch

    data = Cell.parse(cell_dir.name).data
    manifest = data_dir / data / "manifest.json"
    try:
        want = json.loads(manifest.read_text())["files"]["test.pt"]["sha256"]
    except (OSError, ValueError, KeyError):
        print(f"note: {manifest} not found; the test set of {cell_dir.name}'s record is not checked", file=sys.stderr)
        return None  # dvc commit hashes the local data anyway
    got = torch.load(cell_dir / "outcomes.pt", map_location="cpu", weights_only=True).get("test_sha256")
    return None if got == want else f"its test set (sha256 {str(got)[:12]}…) is not {manifest}'s ({want[:12]}…)"


def unpack(src: Path, root: Path, data_dir: str, commit: bool) -> int:
    """records.tar.gz → reports/ (each cell's record replaced whole), runs*.tar.gz → runs/ (rebased)."""
    if not src.is_dir() or not ((src / "summary.json").is_file() or list(src.glob("runs*.tar.gz"))):
        raise UserError(f"{src} holds no packed window (summary.json, records.tar.gz, runs*.tar.gz)")
    root.mkdir(parents=True, exist_ok=True)
    done, refused = [], []
    rec = src / "records.tar.gz"
    if rec.is_file():
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp, tarfile.open(rec) as tar:
            tar.extractall(tmp, members=_safe_members(tar, RECORD_DIRS))  # noqa: S202 - members checked above
            for cell_dir in sorted((Path(tmp) / "reports" / "cells").iterdir()):
                name = cell_dir.name
                why = check_record_data(cell_dir, root / data_dir)
                if why:
                    refused.append(name)
                    print(f"error: not unpacking the record of {name}: {why}", file=sys.stderr)
                    continue
                dest = root / "reports" / "cells" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.move(str(cell_dir), dest)
                for kind, ext in (("curves", "csv"), ("metrics", "json")):  # the metrics file last
                    f = Path(tmp) / "reports" / kind / f"{name}.{ext}"
                    write_atomic(root / "reports" / kind / f.name, f.read_bytes())
                done.append(name)
    rebased = 0
    for runs in sorted(src.glob("runs*.tar.gz")):
        with tarfile.open(runs) as tar:
            members = _safe_members(tar, ("runs/",))
            tar.extractall(root, members=members)  # noqa: S202 - members checked above
        for m in members:
            if m.name.endswith(".ckpt"):
                rebased += rebase_checkpoint(root / m.name)
        print(f"window: {runs.name} → runs/ ({len(members)} files, {rebased} checkpoints rebased)")
    for name in done:
        print(f"dvc commit -f train@{name}")
    if commit and done:
        for name in done:
            r = subprocess.run(["dvc", "commit", "-f", f"train@{name}"], cwd=root)
            if r.returncode:
                raise UserError(f"dvc commit -f train@{name} failed (exit {r.returncode})")
    return 1 if refused else 0


# ------------------------------------------------------------------ plan and prepare

def plan(a: argparse.Namespace, cells: list[Cell], root: Path) -> dict:
    """Cells cheapest first by the benchmark's measured step time (bench_stn.py --json), with the time each
    is projected to end when ``jobs`` run at once, each ``contention``× slower than alone."""
    import yaml

    from src.config import compose_config

    per_step = {}
    if a.plan and (root / a.plan).is_file():
        bench = json.loads((root / a.plan).read_text())
        per_step = {(r["model"], r["distortion"].lower()): float(r["s / step"]) for r in bench["per_cell"]}
    max_steps = int(yaml.safe_load((REPO / "conf" / "trainer" / f"{a.profile}.yaml").read_text())["max_steps"])
    rows = []
    for c in cells:
        args = cell_args(c, a.profile, a.device == "cuda", a.set)
        done = resumes_at(args, root)
        left = max_steps - done
        if (c.model, c.data) in per_step:
            minutes = per_step[(c.model, c.data)] * left * a.contention / 60
            key = (0, minutes)
        else:  # not measured: after the measured ones, by input area
            minutes = None
            key = (1, int(compose_config([f"data={c.data}"]).data.canvas) ** 2 * left)
        rows.append({"cell": c.name, "from_step": done, "minutes": minutes, "_key": key})
    rows.sort(key=lambda r: r.pop("_key"))
    slots = [0.0] * a.jobs
    for r in rows:
        i = min(range(a.jobs), key=slots.__getitem__)
        start = slots[i]
        slots[i] = start + (r["minutes"] if r["minutes"] is not None else float("inf"))
        r["starts_at"] = round(start, 2) if start < a.minutes else None
        r["fits"] = slots[i] <= a.minutes
    return {"cells": [r["cell"] for r in rows], "rows": rows, "minutes": a.minutes, "jobs": a.jobs,
            "contention": a.contention, "profile": a.profile, "bench": a.plan if per_step else None}


def print_plan(p: dict) -> None:
    print(f"plan: {len(p['cells'])} cells cheapest first, {p['jobs']} at once for {p['minutes']:g} min "
          f"({'step times from ' + p['bench'] if p['bench'] else 'no benchmark: ordered by input size'}, "
          f"contention {p['contention']:g}×)")
    for r in p["rows"]:
        cost = "?" if r["minutes"] is None else f"{r['minutes']:.1f} min"
        when = "waits" if r["starts_at"] is None else "finishes" if r["fits"] else \
            "starts (cost not measured)" if r["minutes"] is None else "starts, resumes next window"
        print(f"  {r['cell']:<20} from step {r['from_step']:<7} {cost:>10}  {when}")


def prepare(a: argparse.Namespace, cells: list[Cell], root: Path) -> None:
    """Fill ``.window/`` (git-ignored; carry it): the raw digits gzipped, the data manifests to check the
    regenerated data against, this commit, and the unfinished runs of these cells (for ``--device``'s config)."""
    dest = root / a.prepare
    raw = root / "data" / "raw" / "mnist.pt"
    if not raw.is_file():
        raise UserError(f"{raw} not found; run `dvc repro prepare` first")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "manifests").mkdir(parents=True)
    with open(raw, "rb") as f, gzip.open(dest / "mnist.pt.gz", "wb", compresslevel=6) as g:
        shutil.copyfileobj(f, g, 1 << 22)
    shutil.copy(raw.with_name("mnist.pt.sha256"), dest / "mnist.pt.sha256")
    from src.runinfo import git_commit

    (dest / "commit").write_text(git_commit() + "\n")  # for the records' provenance where the copy has no git
    for d in sorted({c.data for c in cells}):
        m = root / "data" / "distorted" / d / "manifest.json"
        if m.is_file():
            shutil.copy(m, dest / "manifests" / f"{d}.json")
    unfinished = []
    for c in cells:
        args = cell_args(c, a.profile, a.device == "cuda", a.set)
        if not (root / arg_value(args, "paths.metrics_file")).is_file():
            unfinished.append((c.name, command_checkpoints(args, root)))
    packed, left = pack_runs(dest, root, unfinished)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"window: {dest} ready ({size / MIB:.1f} MiB): raw digits, {len(list((dest / 'manifests').iterdir()))} "
          f"manifests, runs of {len(packed)} unfinished cells" + (f"; no room for {', '.join(left)}" if left else ""))


# ------------------------------------------------------------------ the command line

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.ops.window", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock limit of the training (default 10)")
    ap.add_argument("--cells", help="comma-separated <seed>-<model>-<data>, or @plan.json (default: seed-0 CNN family)")
    ap.add_argument("--profile", default=None, help="trainer profile (default: params.yaml's)")
    ap.add_argument("--jobs", type=int, default=0, help="cells at once (default: min(cells, cores // 2) on CUDA, "
                                                         "min(cells, cores) on the CPU)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per cell (default: cores // jobs)")
    ap.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL (default 60)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every cell")
    ap.add_argument("--force", action="store_true", help="also train cells whose record exists")
    ap.add_argument("--root", default=str(REPO), help="where runs/, reports/ and data/ are (default: the repo)")
    ap.add_argument("--out", default=None, help="where the packed results go (default: $OUT, else logs/window-out)")
    ap.add_argument("--logs", default="logs/window", help="per-cell logs, packed as logs.tar.gz")
    ap.add_argument("--unpack", metavar="DIR", help="bring a packed window's records and runs into place")
    ap.add_argument("--commit", action="store_true", help="with --unpack: run the dvc commit commands")
    ap.add_argument("--data-dir", default="data/distorted", help="with --unpack: the data the records must match")
    ap.add_argument("--plan", metavar="BENCH_JSON", help="write and print the plan (bench_stn.py --json output)")
    ap.add_argument("--contention", type=float, default=2.0, help="with --plan: slowdown of a cell among --jobs")
    ap.add_argument("--prepare", nargs="?", const=".window", metavar="DIR", help="fill DIR (.window) to carry")
    a = ap.parse_args(argv)
    try:
        root = Path(a.root).resolve()
        if a.unpack:
            sys.exit(unpack(Path(a.unpack), root, a.data_dir, a.commit))
        import yaml

        a.profile = a.profile or yaml.safe_load((REPO / "params.yaml").read_text())["profile"]
        if not (REPO / "conf" / "trainer" / f"{a.profile}.yaml").is_file():
            raise UserError(f"unknown profile '{a.profile}'; choose one of: "
                            + ", ".join(sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))))
        if a.minutes <= 0 or a.jobs < 0 or a.threads < 0 or a.grace < 0:
            raise UserError("--minutes must be > 0 and --jobs, --threads, --grace >= 0")
        bad = [s for s in a.set if "=" not in s]
        if bad:
            raise UserError(f"--set {bad[0]!r} is not KEY=VALUE")
        cells = parse_cells(a.cells, root)
        if not a.force:  # the tree carries the committed records: a finished cell is not trained again
            have = [c.name for c in cells if (root / arg_value(stage_args(c, a.profile), "paths.metrics_file")).is_file()]
            if have:
                print(f"window: skipping {', '.join(have)}: their records exist (--force trains them again)")
            cells = [c for c in cells if c.name not in have]
            if not cells:
                raise UserError("every cell given has its record already; --force trains them again")
        cores = os.cpu_count() or 1
        a.jobs = a.jobs or max(1, min(len(cells), cores // 2 if a.device == "cuda" else cores))
        if a.prepare:
            return prepare(a, cells, root)
        out = Path(a.out or os.environ.get("OUT") or root / "logs" / "window-out")
        if a.plan:
            p = plan(a, cells, root)
            write_json(out / "plan.json", p)
            print_plan(p)
            return
        if a.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda but torch sees no CUDA device; use --device cpu to rehearse")
        from src.config import compose_config

        compose_config(cell_args(cells[0], a.profile, a.device == "cuda", a.set))  # a bad --set: one line, now
        pipeline = yaml.safe_load((REPO / "params.yaml").read_text())["profile"]
        if a.profile != pipeline or a.set:
            print(f"warning: profile {a.profile}{' with --set' if a.set else ''} is not the pipeline's ({pipeline}): "
                  f"these records are not dvc.yaml's; do not dvc commit them", file=sys.stderr)
        w = Window(a, cells, root)
        print(f"window: {len(cells)} cells, {a.jobs} at once, {a.minutes:g} min on {a.device}, profile {a.profile}",
              flush=True)
        w.run()
        summary = pack(w, out)
        print_summary(summary, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
