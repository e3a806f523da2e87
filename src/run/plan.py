"""What ``dvc repro`` will train, in its order, and how long each cell takes here; run it before ``dvc repro``.

    python -m src.run.plan                # the stale cells in dvc repro's order, projected times, total
    python -m src.run.plan --hours 8      # the cheapest stale cells that finish in 8 h here, and the command for them
    python -m src.run.plan [--hours 8] --run   # the same, then run it (without --hours: plain `dvc repro`)

The cells are the stages whose command runs the training entry point (``TRAIN_CMD``) and that
``dvc status`` reports as changed, in the order ``dvc repro`` runs them (DVC's own planning). A
dependency that is missing and that another stage produces (the data of a fresh clone) is no change:
the data stages regenerate it bit-identically.

A cell's projected time comes, first, from the records of finished cells of the same model and distortion
(seconds / steps × the cell's steps, for each run of a record on one CPU and thread count, by its segments;
the median over the records of this CPU model and the cell's precision, on as many threads as this run; where
all of them are on other threads, first a benchmark table calibrated on at least ``CALIBRATION_MIN`` of this
CPU's records of other cells on as many threads (the thread count moves a step more than a cell's overhead
varies between cells), then those records; else another CPU's, then another precision's scaled by the
benchmark's bf16/fp32 ratio); else from a benchmark table (reports/bench/conv.md for the CNN family, section 4
of reports/benchmarks.md), calibrated by the records that both have (on as many threads, where there are any);
else it is unknown. A ``bf16-mixed`` cell on a CPU without native bfloat16 (no AMX or AVX512-BF16) runs
emulated on float32 kernels, slower than the records and the benchmark of a CPU with it: its time comes from
the cell's own bf16-mixed records of this machine (on as many threads, where there are any), else from the
step of a benchmark table made on such a CPU (its header says "Native bfloat16: none"), calibrated by the
records as the other tables are, else unknown. Each number says where it came from. A cell whose run was
interrupted counts only the steps it has left (``src.train`` resumes it from its checkpoint). A cell projected
beyond ``REACH_HOURS`` on a CPU is marked: train it on a GPU (docs/operations.md "GPU window") or on a cluster
(docs/operations.md "A cluster").
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from src.config import model_config, precision_of
from src.run.checkpoints import resumes_at
from src.runinfo import REPO, UserError, check_dvc_lock, cpu_flags, has_native_bf16, widest_isa

REACH_HOURS = 24.0  # a cell projected beyond this on a CPU: the GPU window or the cluster
BEYOND = "beyond a CPU's reach: GPU window or cluster"
# benchmark tables: file, the column of the step time of each precision, its unit in seconds
CONV_COLUMNS = {"32-true": "fp32 (ms)", "bf16-mixed": "bf16-mixed (ms)"}
BENCH_TABLES = (("reports/bench/conv.md", CONV_COLUMNS, 1e-3),
                ("reports/bench/conv_no_native_bf16.md", CONV_COLUMNS, 1e-3),  # bf16-mixed emulated
                ("reports/benchmarks.md", {"32-true": "s / step"}, 1.0))
BF16 = "bf16-mixed"
TRAIN_CMD = ["python", "-m", "src.train"]  # a stage whose command starts so trains a cell (train, short, sens_*)
CODE_DEPS = "src/"  # a training-code dependency; src/run/fingerprint.json is the result it must keep
CALIBRATION_MIN = 3  # records on the run's thread count that make a calibration worth more than the cell's own


# ------------------------------------------------------------------ what was measured

@dataclass
class Measured:
    """One finished cell's time per step, or one benchmark row's."""
    model: str
    data: str
    precision: str
    s_per_step: float
    device: str = ""  # the CPU model or GPU, without the core and thread counts
    key: str = ""
    cpu: bool = True
    isa: str | None = None  # its CPU's widest vector instruction set (runinfo.widest_isa); None: not recorded
    threads: int | None = None  # the threads it trained on; None: not named (a GPU, a benchmark row)
    steps: int = 0  # the steps it times: a record's run on one machine and thread count, or all of them
    of_steps: int = 0  # the record's steps
    origin: str = ""  # the record's directory, which its runs share

    def where(self) -> str:
        return self.device + (f" [{self.isa}]" if self.isa else "")


def on_machine(r: Measured, here: str, isa: str | None) -> bool:
    """Was ``r`` measured on this machine: the same CPU model (or GPU) and, where both are known, the same
    widest instruction set (one model name, 'AMD EPYC', covers CPUs with and without native bfloat16)."""
    return r.device == here and (r.isa is None or isa is None or r.isa == isa)


def threads_of(device: str) -> int | None:
    """'AMD EPYC (2 cores, 1 threads)' → 1: a cell on two threads runs faster than its one-thread records."""
    found = re.search(r"(\d+) threads\)", device)
    return int(found.group(1)) if found else None


def machine(device: str) -> str:
    """'AMD EPYC (2 cores, 1 threads)' → 'AMD EPYC': records of one CPU model compare across core counts."""
    return device.split(" (")[0].strip()


def load_records(reports: Path) -> list[Measured]:
    """Every finished cell's time per step (reports/cells and reports/short/cells): one per machine and thread
    count its segments ran on, since a cell resumed on two threads, or on another CPU, ran at two speeds."""
    out = []
    for path in sorted([*reports.glob("cells/*/provenance.json"), *reports.glob("short/cells/*/provenance.json")]):
        try:
            p = json.loads(path.read_text())
            cfg, of_steps = p["config"], int(p["steps"])
            for (device, isa), (steps, secs) in runs_of(p).items():
                threads = threads_of(device)  # a CPU's device line names them (runinfo.device_name), a GPU's not
                if steps > 0 and secs > 0:
                    out.append(Measured(cfg["model"]["name"], cfg["data"]["name"], str(precision_of(cfg)),
                                        secs / steps, machine(device), p.get("cell", path.parent.name),
                                        threads is not None, isa, threads, steps, of_steps, str(path.parent)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or foreign: no evidence
    return out


def runs_of(prov: dict) -> dict[tuple[str, str | None], tuple[int, float]]:
    """A record's (steps, seconds) per (device line, widest instruction set) of its segments, a segment of older
    code that names none counting for any CPU of its model as an older record does; where the segments do not
    account for all its steps (older records), the whole record under its own device line, and an instruction
    set only where every segment names the same one ('mixed', which no machine matches, where they differ)."""
    runs: dict[tuple[str, str | None], tuple[int, float]] = {}
    for s in prov.get("segments", []):
        key = (s.get("device", prov.get("device", "")), widest_isa(s.get("cpu_flags")))
        try:
            steps, secs = int(s["to_step"]) - int(s["from_step"]), float(s["seconds"])
        except (KeyError, TypeError, ValueError):
            steps, secs = 0, 0.0
        had = runs.get(key, (0, 0.0))
        runs[key] = (had[0] + steps, had[1] + secs)
    if sum(n for n, _ in runs.values()) == int(prov["steps"]):
        return runs
    isas = {isa for _, isa in runs}
    isa = None if isas <= {None} else isas.pop() if len(isas) == 1 else "mixed"
    return {(prov.get("device", ""), isa): (int(prov["steps"]), float(prov["fit_seconds"]))}


def md_tables(text: str) -> list[list[dict]]:
    """The pipe tables of a markdown text, each as a list of {column: cell text}."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) > 2:
                tables.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return tables


@dataclass
class Bench:
    """One benchmark file's step times, and whether its CPU had native bfloat16 (None: not said)."""
    name: str
    rows: list[Measured]
    native: bool | None = None


def bench_native(text: str) -> bool | None:
    """'Native bfloat16: none (…)' → False, 'Native bfloat16: avx512_bf16.' → True, no such line → None."""
    _, found, rest = text.partition("Native bfloat16: ")
    return None if not found else not rest.startswith("none")


def load_bench(root: Path) -> list[Bench]:
    """Each benchmark table's step times, in the order they are consulted."""
    out = []
    for name, columns, unit in BENCH_TABLES:
        try:
            text = (root / name).read_text()
        except OSError:
            continue
        rows = []
        for table in md_tables(text):
            if not table or not {"model", "distortion"} <= set(table[0]) or not set(columns.values()) & set(table[0]):
                continue
            for r in table:
                for precision, col in columns.items():
                    try:
                        rows.append(Measured(r["model"], r["distortion"].lower(), precision, float(r[col]) * unit))
                    except (KeyError, ValueError):
                        pass
        if rows:
            out.append(Bench(name, rows, bench_native(text)))
    return out


# ------------------------------------------------------------------ the projection

def project(model: str, data: str, steps: int, precision: str, device: str, records: list[Measured],
            bench: list[Bench], cpu: bool = True, isa: str | None = None) -> tuple[float | None, str]:
    """(seconds, where the number comes from) of one cell of ``steps`` steps on ``device`` (a CPU, or a GPU:
    only its own records count there); (None, why) if unknown. ``isa``: this CPU's widest instruction set,
    which says whether it has native bfloat16 and which a record of the same CPU model must share to count as
    this machine's (None: unknown; any record does, and its CPU is assumed like the records')."""
    emulated = [b for b in bench if b.native is False]
    bench = [b for b in bench if b.native is not False]  # the emulated tables serve only the emulated case below
    here, threads = machine(device), threads_of(device)
    records = [r for r in records if r.cpu == cpu and (cpu or r.device == here)]
    if emulated_bf16(precision, cpu, isa):
        own = [r for r in records if (r.model, r.data, r.precision) == (model, data, precision)
               and ran_emulated(r) and on_machine(r, here, isa)]
        if own:  # this machine's own bf16 records, on float32 kernels as here
            s, what = _median(on_threads(own, threads))
            return s * steps, what + ", bf16-mixed emulated here"
        # else the records' CPUs had it: this CPU's own benchmark instead
        cal = next((b for b in bench if any((r.model, r.data) == (model, data) for r in b.rows)), None)
        found = _from_bench(emulated, model, data, precision, steps, records, here, isa, cal, threads)
        return (found[0], found[1] + ", bf16-mixed emulated here") if found else \
            (None, "bf16-mixed emulated here (no native bfloat16), and no benchmark of that")
    same = [r for r in records if (r.model, r.data) == (model, data) and not ran_emulated(r)]
    tiers = [(p, d) for p in (True, False) for d in (True, False)]  # same precision first, then same machine
    for same_prec, same_dev in tiers:
        pick = [r for r in same
                if (r.precision == precision) == same_prec and on_machine(r, here, isa) == same_dev]
        if not pick:
            continue
        if same_dev and same_prec and cpu and not any(r.threads == threads for r in pick):
            found = _from_bench(bench, model, data, precision, steps, records, here, isa, threads=threads,
                                strict_threads=True)
            if found:  # a benchmark calibrated on this run's thread count before the cell's other-thread records
                return found
        if same_dev:
            pick = on_threads(pick, threads)
        s, what = _median(pick)
        what += "" if same_dev else " on " + ", ".join(dict.fromkeys(r.where() for r in pick))
        if not same_prec:
            ratio = _precision_ratio(model, data, pick[0].precision, precision, bench)
            s *= ratio or 1.0
            what += f" at {pick[0].precision}" + (f" ×{ratio:.2f} ({precision} by the benchmark)" if ratio else "")
        return s * steps, what
    if cpu:  # the benchmark tables time a CPU core
        found = _from_bench(bench, model, data, precision, steps, records, here, isa, threads=threads)
        if found:
            return found
    return None, "no record or benchmark" if cpu else f"no record on {here}"


def _median(records: list[Measured]) -> tuple[float, str]:
    """The median time per step of ``records`` (one per cell), and where it comes from."""
    records = per_cell(records)
    one = records[0]
    part = f" ({one.steps:,} of its {one.of_steps:,} steps)" if one.steps < one.of_steps else ""
    what = f"record {one.key}{part}" if len(records) == 1 else f"median of {len(records)} records"
    return statistics.median(r.s_per_step for r in records), what


def on_threads(records: list[Measured], threads: int | None) -> list[Measured]:
    """Those of this machine's ``records`` made on as many threads as the run, where there are any, else all:
    a cell on both cores of a 2-core machine runs faster than its one-thread records."""
    return [r for r in records if r.threads == threads] or records


def per_cell(records: list[Measured]) -> list[Measured]:
    """One per record: its runs on several machines or thread counts merged, as one time per step over their
    steps."""
    runs: dict[str | int, list[Measured]] = {}
    for r in records:
        runs.setdefault(r.origin or id(r), []).append(r)
    return [rs[0] if len(rs) == 1 else _merged(rs) for rs in runs.values()]


def _merged(runs: list[Measured]) -> Measured:
    steps = sum(r.steps for r in runs)
    return replace(runs[0], s_per_step=sum(r.s_per_step * r.steps for r in runs) / steps, steps=steps)


def _from_bench(tables: list[Bench], model: str, data: str, precision: str, steps: int, records: list[Measured],
                here: str, isa: str | None = None, calibration: Bench | None = None,
                threads: int | None = None, strict_threads: bool = False) -> tuple[float, str] | None:
    """The cell's step time in the first table that has it × steps, calibrated on the records (by the table's own
    rows on this machine's records, or by ``calibration``'s on the records of any CPU of its model name, since
    which of them ran that table is not known: the overhead of a whole cell over a bare step). With
    ``strict_threads``, calibrated only on this machine's records on ``threads`` threads, and None where they are
    fewer than ``CALIBRATION_MIN``."""
    for b in tables:
        row = next((r for r in b.rows if (r.model, r.data, r.precision) == (model, data, precision)), None)
        if row is None:
            continue
        cal = calibration or b
        factor, n = _calibration(cal.rows, records, here, isa if cal is b else None, threads, strict_threads)
        if strict_threads and n < CALIBRATION_MIN:
            return None
        by = "" if cal is b else f" of {Path(cal.name).name}"
        what = Path(b.name).name + (f" ×{factor:.2f} (calibrated on {_n(n, 'record')}{by})" if n else " (step only)")
        return row.s_per_step * factor * steps, what
    return None


def isa_native(isa: str | None) -> bool | None:
    """Has a CPU whose widest instruction set is ``isa`` native bfloat16 (AMX or AVX512-BF16, the widest of
    ``ISA_FLAGS``)? None where unknown (None, or 'mixed' for a record of several)."""
    return None if isa in (None, "mixed") else has_native_bf16([isa])


def emulated_bf16(precision: str, cpu: bool, isa: str | None) -> bool:
    """A bf16-mixed cell on a CPU known to lack native bfloat16."""
    return cpu and precision == BF16 and isa_native(isa) is False


def ran_emulated(r: Measured) -> bool:
    """A bf16-mixed record of a CPU without native bfloat16 (on float32 kernels): it times only such CPUs."""
    return emulated_bf16(r.precision, r.cpu, r.isa)


def isa_here() -> str | None:
    """This CPU's widest instruction set, as its records will name it; None where /proc/cpuinfo cannot say."""
    return widest_isa(cpu_flags())


def _precision_ratio(model, data, have, want, bench) -> float | None:
    for b in bench:
        t = {r.precision: r.s_per_step for r in b.rows if (r.model, r.data) == (model, data)}
        if have in t and want in t:
            return t[want] / t[have]
    return None


def _calibration(rows: list[Measured], records: list[Measured], here: str, isa: str | None = None,
                 threads: int | None = None, strict_threads: bool = False) -> tuple[float, int]:
    """Median of record / benchmark over the cells both have (this CPU model's records if any, of those the ones
    on ``threads`` threads if any; with ``strict_threads`` only those): the benchmark times one step of an idle or
    loaded core on one thread, a record the whole cell (data, evaluation, the loop) on its own threads."""
    bench = {(r.model, r.data, r.precision): r.s_per_step for r in rows}
    both = [r for r in records if (r.model, r.data, r.precision) in bench]
    mine = [r for r in both if on_machine(r, here, isa)]
    if strict_threads:
        both = [r for r in mine if r.threads == threads]
    else:
        both = on_threads(mine, threads) or both
    both = per_cell(both)
    if not both:
        return 1.0, 0
    return statistics.median(r.s_per_step / bench[r.model, r.data, r.precision] for r in both), len(both)


def run_device(accelerator: str) -> tuple[str, bool]:
    """(the device a cell with ``trainer.accelerator`` runs on here, as its record names it; is it a CPU)."""
    import torch

    from src.runinfo import device_name

    cuda = torch.cuda.is_available() and str(accelerator) in ("auto", "gpu", "cuda")
    return device_name(torch.device("cuda" if cuda else "cpu")), not cuda


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def hours(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    h = seconds / 3600
    return f"{seconds / 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h:.0f} h ({h / 24:.0f} days)"


def start_line(cfg, label: str, done: int = 0) -> str:
    """A cell's first line: ``<cell>: <steps> steps on <device>, precision <p>, projected <time>``; a run
    resuming at step ``done`` projects only the steps it has left (``..., <left> left from step <done>, ...``)."""
    steps, precision = int(cfg.trainer.max_steps), str(cfg.model.precision)
    left = max(steps - done, 0)
    device, seconds = str(cfg.trainer.accelerator), None
    try:
        device, cpu = run_device(cfg.trainer.accelerator)
        seconds, _ = project(str(cfg.model.name), str(cfg.data.name), left, precision, device,
                             load_records(REPO / "reports"), load_bench(REPO), cpu, isa_here())
    except Exception:  # noqa: BLE001 - a projection never stops a run
        pass
    rest = f"{left} left from step {done}, " if done else ""
    return f"{label}: {steps} steps on {device}, precision {precision}, {rest}projected {hours(seconds)}"


# ------------------------------------------------------------------ the cells dvc repro would train

def repro_stages(root: Path = REPO) -> tuple[list[dict], set[str]]:
    """Every stage in the order ``dvc repro`` runs them, as {stage, cmd, changes} (``dvc status``'s entries,
    empty when up to date), and the paths the stages produce."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    check_dvc_lock(root)
    try:
        with Repo(str(root)) as repo:
            pipeline = str(Path(repo.root_dir) / "dvc.yaml")  # the root's, wherever the process runs
            order = plan_repro(get_active_graph(repo.index.graph), collect_stages(repo, [pipeline]))
            status = repo.status()
            stages = [{"stage": s.addressing, "cmd": s.cmd, "changes": status.get(s.addressing, [])} for s in order]
            outs = {str(o.def_path) for s in order for o in s.outs}
    except DvcException as e:
        raise UserError(f"dvc status failed: {e}") from None
    return stages, outs


def staleness(changes: list, outs: set[str]) -> tuple[bool, bool]:
    """(will it run, is it stale through training code only): a missing dependency that a stage produces
    is regenerated, so it is no change; code-only means every change is a modified file under src/ other
    than src/run/fingerprint.json, with the record in place (``python -m src.run.relock`` re-locks it if the fingerprint
    holds)."""
    rest, code_only = [], True
    for entry in changes:
        if not isinstance(entry, dict):
            rest.append(entry)
            code_only = False
            continue
        for kind, paths in entry.items():
            for path, what in (paths.items() if isinstance(paths, dict) else [(paths, None)]):
                if kind == "changed deps" and what == "deleted" and path in outs:
                    continue
                rest.append(path)
                code_only &= (kind == "changed deps" and what == "modified" and str(path).startswith(CODE_DEPS)
                              and path != "src/run/fingerprint.json")
    return bool(rest), bool(rest) and code_only


@dataclass
class Planned:
    stage: str
    model: str
    data: str
    seed: int
    steps: int
    precision: str
    device: str
    cpu: bool = True
    seconds: float | None = None
    source: str = ""
    code_only: bool = False
    emulated: bool = False  # bf16-mixed on a CPU without native bfloat16
    done: int = 0  # the step an interrupted run of it resumes from: only the rest is projected

    @property
    def beyond(self) -> bool:
        return self.seconds is not None and self.seconds > REACH_HOURS * 3600 and self.cpu


def stage_data(args: dict) -> str:
    """A stage's distortion: ``data=…``, or the one its experiment (a sensitivity variant) overrides, whose
    time per step it is projected with."""
    if "data" in args or "+experiment" not in args:
        return args.get("data", "r")
    from omegaconf import OmegaConf

    exp = OmegaConf.load(REPO / "conf" / "experiment" / f"{args['+experiment']}.yaml")
    return next((d["override /data"] for d in exp.get("defaults", []) if "override /data" in d), "r")


def stage_cell(stage: str, cmd: str) -> Planned:
    """A training stage's cell from its command: model, data, seed, steps, precision, device."""
    from omegaconf import OmegaConf

    args = dict(a.split("=", 1) for a in shlex.split(cmd) if "=" in a and not a.startswith("-"))
    trainer = OmegaConf.load(REPO / "conf" / "trainer" / f"{args.get('trainer', 'full')}.yaml")
    model = model_config(args["model"])
    return Planned(stage, args["model"], stage_data(args), int(args.get("seed", 0)),
                   int(args.get("trainer.max_steps", trainer.max_steps)),
                   str(args.get("model.precision", model.get("precision", "32-true"))),
                   *run_device(args.get("trainer.accelerator", trainer.accelerator)))


def plan(root: Path = REPO) -> tuple[list[Planned], list[str]]:
    """The cells ``dvc repro`` would train, in its order, each projected (an interrupted one for the steps it
    has left); and the other stages it would run."""
    stages, outs = repro_stages(root)
    records, bench, isa = load_records(root / "reports"), load_bench(root), isa_here()
    cells, others = [], []
    for s in stages:
        runs, code_only = staleness(s["changes"], outs)
        if not runs:
            continue
        argv = shlex.split(s["cmd"])
        if argv[:len(TRAIN_CMD)] != TRAIN_CMD:
            others.append(s["stage"])
            continue
        c = stage_cell(s["stage"], s["cmd"])
        c.done = min(resumes_at(argv[len(TRAIN_CMD):], root), c.steps)
        c.seconds, c.source = project(c.model, c.data, c.steps - c.done, c.precision, c.device, records, bench,
                                      c.cpu, isa)
        c.code_only = code_only
        c.emulated = emulated_bf16(c.precision, c.cpu, isa)
        cells.append(c)
    return cells, others


def fit(cells: list[Planned], limit_hours: float) -> list[Planned]:
    """The cheapest cells of known time whose sum stays within ``limit_hours`` (greedy), to be trained
    seed by seed, cheapest first within a seed."""
    chosen, total = [], 0.0
    for c in sorted((c for c in cells if c.seconds is not None), key=lambda c: c.seconds):
        if total + c.seconds > limit_hours * 3600:
            break
        chosen.append(c)
        total += c.seconds
    return sorted(chosen, key=lambda c: (c.seed, c.seconds))


def command(cells: list[Planned]) -> list[list[str]]:
    """The commands that train exactly these cells in this order: their data first, then each stage alone."""
    data = sorted({f"distort@{c.data}" for c in cells})
    return [["dvc", "repro", *data], ["dvc", "repro", "-s", *[c.stage for c in cells]]] if cells else []


def one_liner(cmds: list[list[str]]) -> str:
    return " && ".join(shlex.join(c) for c in cmds)


def table(cells: list[Planned]) -> list[str]:
    lines = []
    for i, c in enumerate(cells, 1):
        mark = f"  {BEYOND}" if c.beyond else ""
        steps = f"{c.steps - c.done} left of {c.steps}" if c.done else str(c.steps)
        lines.append(f"{i:>4}  {c.stage:<24} {steps:>16} steps  {c.precision:<10} {hours(c.seconds):>16}  "
                     f"[{c.source}]{mark}")
    return lines


def total_line(cells: list[Planned]) -> str:
    known = [c.seconds for c in cells if c.seconds is not None]
    unknown = len(cells) - len(known)
    return (f"total: {hours(sum(known))} for {len(known)} cells, one after another"
            + (f"; {unknown} more of unknown time" if unknown else ""))


def report(cells: list[Planned], others: list[str], limit_hours: float | None) -> tuple[list[str], list[list[str]]]:
    """The printed plan and the commands it proposes."""
    if not cells:
        return (["dvc repro trains no cell: every training stage is up to date"
                 + (f" (it runs {', '.join(others)})" if others else "")], [["dvc", "repro"]] if others else [])
    device = cells[0].device
    lines = [f"dvc repro would train {len(cells)} cells on {machine(device)}"]
    if limit_hours is None:  # the whole plan; with --hours only what fits
        lines[0] += ", in this order (projected from the records of finished cells and the benchmarks):"
        lines += table(cells)
    lines.append(total_line(cells))
    if others:
        lines.append(f"and run {len(others)} other stages: {', '.join(others)}")
    beyond = [c for c in cells if c.beyond]
    if beyond:
        verb = "takes" if len(beyond) == 1 else "take"
        lines.append(f"{_n(len(beyond), 'cell')} {verb} more than {REACH_HOURS:g} h each here, beyond a CPU's reach: "
                     f"train them in a GPU window (docs/operations.md \"GPU window\", python -m src.ops.window) "
                     f"or on a cluster (docs/operations.md \"A cluster\", Hydra's submitit launcher).")
    emulated = [c for c in cells if c.emulated]
    if emulated:
        lines.append(f"{_n(len(emulated), 'cell')} in bf16-mixed {'runs' if len(emulated) == 1 else 'run'} emulated on "
                     "this CPU (no AMX or AVX512-BF16), on float32 kernels (src.models.bf16): at about the float32 "
                     "speed, slower than on a CPU with native bfloat16.")
    code = [c for c in cells if c.code_only]
    if code:
        lines.append(f"{len(code)} of these cells {'is' if len(code) == 1 else 'are'} stale only through training code "
                     f"under src/ with src/run/fingerprint.json unchanged: `python -m src.run.relock` checks that the "
                     f"fingerprint still matches and re-locks them without training "
                     f"(docs/pipeline.md \"Changing the code\").")
    if limit_hours is None:
        lines.append("python -m src.run.plan --hours N: the cells this machine finishes in N hours, and the command.")
        return lines, [["dvc", "repro"]]
    chosen = fit(cells, limit_hours)
    lines += ["", f"within {limit_hours:g} h here: {len(chosen)} cells, {hours(sum(c.seconds for c in chosen))} "
              f"(the cheapest; seed by seed, cheapest first)"]
    lines += table(chosen)
    cmds = command(chosen)
    lines.append(one_liner(cmds) if cmds else "no cell fits; raise --hours")
    if cmds:
        lines.append("then `dvc repro -s aggregate` for the report; `python -m src.run.plan --hours N --run` runs it.")
    return lines, cmds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.run.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, help="only the cheapest stale cells that finish in this many hours here")
    ap.add_argument("--run", action="store_true", help="then run it (the --hours cells, or plain `dvc repro`)")
    a = ap.parse_args(argv)
    try:
        if a.hours is not None and not a.hours > 0:
            raise UserError(f"--hours must be positive, got {a.hours:g}")
        cells, others = plan(REPO)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    lines, cmds = report(cells, others, a.hours)
    print("\n".join(lines), flush=True)
    if a.run:
        for cmd in cmds:
            print(f"$ {shlex.join(cmd)}", flush=True)
            rc = subprocess.call(cmd, cwd=REPO)
            if rc:
                sys.exit(rc)


if __name__ == "__main__":
    main()
