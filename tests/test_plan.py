"""The plan before training: which cells `dvc repro` trains, in its order, how long each takes here, what fits
in N hours, and the start and resume lines of a cell."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl

import src.run.plan as plan_mod
from src.run.plan import Planned, command, fit, load_bench, md_tables, plan, project, report
from src.runinfo import REPO
from src.config import compose_config
from src.train import train

AMD = "AMD EPYC (2 cores, 1 threads)"
CONV = """# bench

| distortion   | model   |   fp32 (ms) |   bf16-mixed (ms) |
|:-------------|:--------|------------:|------------------:|
| R            | cnn     |         400 |               200 |
| TC           | cnn     |        8000 |              4000 |
"""


def cmd(model: str, data: str, seed: int, short: bool = False) -> str:
    profile = "trainer=short model.precision=bf16-mixed" if short else "trainer=full"
    return f"python -m src.train model={model} data={data} seed={seed} {profile} quiet=true paths.run_dir=runs/x"


def record(root, key: str, model: str, data: str, steps: int, seconds: float, device: str = AMD,
           precision: str = "32-true", short: bool = False, cpu_flags: list[str] | None = None,
           segments: list[dict] | None = None):
    d = root / "reports" / ("short/cells" if short else "cells") / key
    d.mkdir(parents=True, exist_ok=True)
    segments = segments or ([] if cpu_flags is None else [{"device": device, "cpu_flags": cpu_flags}])
    (d / "provenance.json").write_text(json.dumps({
        "cell": key, "steps": steps, "fit_seconds": seconds, "device": device, "accelerator": "cpu",
        "segments": segments, "config": {"model": {"name": model, "precision": precision}, "data": {"name": data}}}))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """Records and a benchmark in tmp_path, a fake `dvc status` in dvc repro's order, this machine an AMD EPYC
    whose instruction set is unknown, like the records'."""
    record(tmp_path, "0-fcn-e", "fcn", "e", 150_000, 900)
    record(tmp_path, "2-fcn-e", "fcn", "e", 150_000, 1100)
    record(tmp_path, "1-fcn-e", "fcn", "e", 150_000, 300, device="Intel(R) Xeon(R) Processor (2 cores, 1 threads)")
    record(tmp_path, "0-cnn-r", "cnn", "r", 40_000, 4000, short=True)
    (tmp_path / "reports" / "bench").mkdir(parents=True)
    (tmp_path / "reports" / "bench" / "conv.md").write_text(CONV)
    stages = [
        ("prepare", "python -m src.data.prepare", [{"changed outs": {"data/raw": "deleted"}}]),
        ("distort@r", "python -m src.data.distort data=r", [{"changed outs": {"data/distorted/r": "deleted"}}]),
        ("train@0-fcn-r", cmd("fcn", "r", 0),  # only its data is missing: regenerated, so no change
         [{"changed deps": {"data/raw": "deleted", "data/distorted/r": "deleted"}}]),
        ("train@0-fcn-e", cmd("fcn", "e", 0), [{"changed outs": {"reports/metrics/0-fcn-e.json": "deleted"}}]),
        ("train@0-st_fcn-e", cmd("st_fcn", "e", 0), []),  # up to date
        ("train@0-cnn-tc", cmd("cnn", "tc", 0), [{"changed deps": {"src/models": "modified"}}]),
        ("train@0-st_cnn_tps-p", cmd("st_cnn_tps", "p", 0), [{"changed outs": {"reports/cells/x": "deleted"}}]),
        ("train@1-fcn-e", cmd("fcn", "e", 1), [{"changed deps": {"conf/model/fcn.yaml": {"width": "modified"}}}]),
        ("short@0-cnn-r", cmd("cnn", "r", 0, short=True), [{"changed deps": {"src/run/fingerprint.json": "modified"}}]),
        ("aggregate", "python -m src.report.aggregate", [{"changed deps": {"reports/metrics": "modified"}}]),
    ]
    fake = [{"stage": s, "cmd": c, "changes": ch} for s, c, ch in stages]
    monkeypatch.setattr(plan_mod, "repro_stages", lambda root: (fake, {"data/raw", "data/distorted/r"}))
    monkeypatch.setattr(plan_mod, "run_device", lambda accelerator: (AMD, True))
    monkeypatch.setattr(plan_mod, "isa_here", lambda: None)  # a generation the records do not name: like theirs
    return tmp_path


def test_the_plan_lists_the_stale_cells_in_dvc_repros_order_each_projected_with_its_source(repo):
    cells, others = plan(repo)
    assert [c.stage for c in cells] == ["train@0-fcn-e", "train@0-cnn-tc", "train@0-st_cnn_tps-p", "train@1-fcn-e",
                                        "short@0-cnn-r"]
    assert others == ["prepare", "distort@r", "aggregate"]
    c = {c.stage: c for c in cells}
    # this CPU's two records (the Xeon's faster one is left out), scaled by steps
    assert c["train@0-fcn-e"].seconds == pytest.approx(1000) and c["train@0-fcn-e"].source == "median of 2 records"
    # no record: the benchmark's step time in the precision conf/model/cnn.yaml names (bf16-mixed, 4.0 s) × its
    # calibration on the cells both have (0.1 s / 0.4 s in float32)
    assert c["train@0-cnn-tc"].precision == "bf16-mixed"
    assert c["train@0-cnn-tc"].seconds == pytest.approx(4.0 * 0.25 * 150_000)
    assert c["train@0-cnn-tc"].source.startswith("conv.md ×0.25") and c["train@0-cnn-tc"].beyond
    # a float32 record of a bf16-mixed cell: scaled by the benchmark's bf16 / fp32 ratio
    assert (c["short@0-cnn-r"].steps, c["short@0-cnn-r"].precision) == (40_000, "bf16-mixed")
    assert c["short@0-cnn-r"].seconds == pytest.approx(0.1 * 0.5 * 40_000) and "×0.50" in c["short@0-cnn-r"].source
    assert c["train@0-st_cnn_tps-p"].seconds is None
    assert [s for s, x in c.items() if x.code_only] == ["train@0-cnn-tc"]  # src/run/fingerprint.json is no code-only change

    lines, cmds = report(cells, others, None)
    text = "\n".join(lines)
    assert cmds == [["dvc", "repro"]]
    assert re.search(r"total: 42.8 h for 4 cells, one after another; 1 more of unknown time", text), text
    beyond = [ln for ln in lines if "train@0-cnn-tc" in ln][0]
    assert "beyond a CPU's reach" in beyond and "41.7 h" in beyond
    assert "GPU window" in text and "A cluster" in text and "unknown" in text
    assert "1 of these cells is stale only through training code" in text


def test_an_interrupted_cell_is_projected_for_the_steps_it_has_left(repo):
    import torch

    from src.run.checkpoints import checkpoint_dir

    args = cmd("fcn", "e", 0).split()[3:]
    ckpts = repo / checkpoint_dir(compose_config(args))
    ckpts.mkdir(parents=True)
    torch.save({"global_step": 100_000}, ckpts / "last.ckpt")
    c = {c.stage: c for c in plan(repo)[0]}
    assert c["train@0-fcn-e"].done == 100_000 and c["train@0-fcn-e"].seconds == pytest.approx(1000 / 3)
    assert c["train@1-fcn-e"].done == 0  # another seed: another run directory's fingerprint
    assert "50000 left of 150000 steps" in "\n".join(report(list(c.values()), [], None)[0])
    (ckpts / "last.ckpt").write_bytes(b"truncated")  # src.train resumes from best.ckpt then: so does the plan
    torch.save({"global_step": 90_000}, ckpts / "best.ckpt")
    assert {c.stage: c.done for c in plan(repo)[0]}["train@0-fcn-e"] == 90_000
    (ckpts / "best.ckpt").write_bytes(b"")  # nothing readable: src.train refuses to guess, the plan says all of it
    assert {c.stage: c.done for c in plan(repo)[0]}["train@0-fcn-e"] == 0


def test_hours_picks_the_cheapest_cells_that_fit_and_the_command_that_trains_exactly_them(repo):
    cells, others = plan(repo)
    assert [c.stage for c in fit(cells, 0.6)] == ["train@0-fcn-e", "train@1-fcn-e"]
    chosen = fit(cells, 2)  # cheapest first, trained seed by seed; unknown and too long ones left out
    assert [c.stage for c in chosen] == ["train@0-fcn-e", "short@0-cnn-r", "train@1-fcn-e"]
    assert command(chosen) == [["dvc", "repro", "distort@e", "distort@r"],
                               ["dvc", "repro", "-s", "train@0-fcn-e", "short@0-cnn-r", "train@1-fcn-e"]]
    lines, cmds = report(cells, others, 2)
    assert cmds == command(chosen)
    assert "dvc repro distort@e distort@r && dvc repro -s train@0-fcn-e short@0-cnn-r train@1-fcn-e" in lines
    assert not any("train@0-cnn-tc" in ln for ln in lines)  # the whole plan is not listed with --hours
    assert fit(cells, 0.1) == [] and "no cell fits; raise --hours" in report(cells, others, 0.1)[0]


def test_run_executes_the_proposed_commands_in_order(repo, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(plan_mod, "plan", lambda root: plan(repo))
    monkeypatch.setattr(plan_mod.subprocess, "call", lambda c, cwd: calls.append(c) or 0)
    plan_mod.main(["--hours", "0.6", "--run"])
    assert calls == [["dvc", "repro", "distort@e"], ["dvc", "repro", "-s", "train@0-fcn-e", "train@1-fcn-e"]]
    calls.clear()
    plan_mod.main(["--run"])
    assert calls == [["dvc", "repro"]]
    assert "$ dvc repro" in capsys.readouterr().out


def test_a_gpu_cell_counts_only_its_own_records_and_is_never_beyond_reach(repo):
    records = plan_mod.load_records(repo / "reports")
    assert project("fcn", "e", 150_000, "32-true", "NVIDIA H100", records, load_bench(repo), cpu=False) == \
        (None, "no record on NVIDIA H100")
    assert not Planned("train@0-cnn-tc", "cnn", "tc", 0, 150_000, "32-true", "NVIDIA H100", cpu=False,
                       seconds=100 * 3600).beyond


def test_a_bf16_cell_on_a_cpu_without_native_bf16_is_projected_as_emulated_not_as_the_records(repo, monkeypatch):
    """The bf16 records come from CPUs with native bfloat16; emulated, the same cell takes many times longer."""
    records = plan_mod.load_records(repo / "reports")
    emulated = CONV.replace(" 400 |", " 500 |").replace(" 200 |", " 3000 |") + \
        "\nNative bfloat16: none (bf16-mixed is emulated here, slower than fp32).\n"
    (repo / "reports" / "bench" / "conv_no_native_bf16.md").write_text(emulated)
    bench = load_bench(repo)
    assert [b.native for b in bench] == [None, False]
    native = project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa="avx512_bf16")
    assert native[0] == pytest.approx(150_000 * 0.1 * 0.5)  # the fp32 record ×200/400: the emulated table never serves
    seconds, source = project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa="avx2")
    assert seconds == pytest.approx(150_000 * 3.0 * 0.25)  # the emulated step × the records' overhead on conv.md
    assert source == "conv_no_native_bf16.md ×0.25 (calibrated on 1 record of conv.md), bf16-mixed emulated here"
    assert project("cnn", "r", 150_000, "32-true", AMD, records, bench, isa="avx2") == (15_000, "record 0-cnn-r")
    assert project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa=None)[0] == \
        pytest.approx(150_000 * 0.05)  # this CPU unknown (not x86 Linux): the records hold
    assert project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench[:1], isa="avx2") == \
        (None, "bf16-mixed emulated here (no native bfloat16), and no benchmark of that")
    monkeypatch.setattr(plan_mod, "isa_here", lambda: "avx2")
    cells, others = plan(repo)
    assert [c.stage for c in cells if c.emulated] == ["train@0-cnn-tc", "train@0-st_cnn_tps-p", "short@0-cnn-r"]
    lines = "\n".join(report(cells, others, None)[0])
    assert "3 cells in bf16-mixed run emulated on this CPU (no AMX or AVX512-BF16)" in lines


def test_a_bf16_record_on_float32_kernels_times_only_cpus_without_native_bf16(repo):
    """A bf16-mixed record of an AVX2 CPU serves that CPU's bf16 projections first, and never a native CPU's."""
    record(repo, "1-cnn-r", "cnn", "r", 150_000, 9000, precision="bf16-mixed", cpu_flags=["avx2"])
    (repo / "reports" / "bench" / "conv_no_native_bf16.md").write_text(CONV + "\nNative bfloat16: none (…).\n")
    records, bench = plan_mod.load_records(repo / "reports"), load_bench(repo)
    assert project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa="avx2") == \
        (9000, "record 1-cnn-r, bf16-mixed emulated here")
    assert project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa="avx512f")[1] \
        .startswith("conv_no_native_bf16.md")  # another generation: its benchmark, not that record
    assert project("cnn", "r", 150_000, "bf16-mixed", AMD, records, bench, isa="avx512_bf16") == \
        (pytest.approx(150_000 * 0.1 * 0.5), "record 0-cnn-r at 32-true ×0.50 (bf16-mixed by the benchmark)")
    two = AMD.replace("1 threads", "2 threads")  # and on two threads, its records on two threads
    record(repo, "2-cnn-r", "cnn", "r", 150_000, 4500, device=two, precision="bf16-mixed", cpu_flags=["avx2"])
    records = plan_mod.load_records(repo / "reports")
    for device, seconds, key in [(AMD, 9000, "1-cnn-r"), (two, 4500, "2-cnn-r")]:
        assert project("cnn", "r", 150_000, "bf16-mixed", device, records, bench, isa="avx2") == \
            (seconds, f"record {key}, bf16-mixed emulated here")


def test_records_of_one_cpu_model_and_another_generation_are_another_machine(repo):
    """'AMD EPYC' names CPUs with and without AVX512-BF16; a record's cpu_flags tell them apart where recorded."""
    record(repo, "0-fcn-e", "fcn", "e", 150_000, 900, cpu_flags=["avx512_bf16", "avx512f", "avx2"])
    record(repo, "2-fcn-e", "fcn", "e", 150_000, 1100, cpu_flags=["avx2"])
    records, bench = plan_mod.load_records(repo / "reports"), load_bench(repo)
    assert {r.key: r.isa for r in records if r.data == "e"} == {"0-fcn-e": "avx512_bf16", "2-fcn-e": "avx2",
                                                                "1-fcn-e": None}
    e = dict(model="fcn", data="e", steps=150_000, precision="32-true", device=AMD, records=records, bench=bench)
    assert project(**e, isa="avx512_bf16") == (900, "record 0-fcn-e")
    assert project(**e, isa="avx2") == (1100, "record 2-fcn-e")
    assert project(**e, isa=None) == (pytest.approx(1000), "median of 2 records")  # this CPU unknown: both count
    # no record of this generation: the others, each machine named
    assert project(**e, isa="amx_bf16") == \
        (900, "median of 3 records on AMD EPYC [avx512_bf16], Intel(R) Xeon(R) Processor, AMD EPYC [avx2]")


def test_a_run_on_two_threads_is_projected_by_the_records_and_calibration_on_two_threads(repo):
    """The benchmark times one thread; a cell on both cores of a machine runs faster than its one-thread records."""
    two = AMD.replace("1 threads", "2 threads")
    record(repo, "3-fcn-e", "fcn", "e", 150_000, 600, device=two)
    record(repo, "1-cnn-r", "cnn", "r", 150_000, 6000, device=two, precision="bf16-mixed")  # 0.04 s on a 0.2 s step
    records, bench = plan_mod.load_records(repo / "reports"), load_bench(repo)
    assert {r.key: r.threads for r in records if r.key in ("0-fcn-e", "3-fcn-e")} == {"0-fcn-e": 1, "3-fcn-e": 2}
    e = dict(model="fcn", data="e", steps=150_000, precision="32-true", records=records, bench=bench)
    assert project(**e, device=two) == (600, "record 3-fcn-e")
    assert project(**e, device=AMD) == (pytest.approx(1000), "median of 2 records")  # 0-fcn-e and 2-fcn-e
    tc = dict(model="cnn", data="tc", steps=150_000, precision="bf16-mixed", records=records, bench=bench)
    assert project(**tc, device=two) == (pytest.approx(4.0 * 0.2 * 150_000), "conv.md ×0.20 (calibrated on 1 record)")
    assert project(**tc, device=AMD) == (pytest.approx(4.0 * 0.25 * 150_000), "conv.md ×0.25 (calibrated on 1 record)")
    assert project(**tc, device="AMD EPYC")[1] == "conv.md ×0.22 (calibrated on 2 records)"  # threads unknown: both


def test_a_cell_with_records_only_on_other_threads_is_projected_by_a_benchmark_calibrated_on_its_threads(repo):
    """Two threads against one change a step by more than a whole cell's overhead over the benchmark varies
    between cells: the cell's one-thread record counts only where fewer than three records on two threads
    calibrate the benchmark."""
    two = AMD.replace("1 threads", "2 threads")
    record(repo, "0-cnn-tc", "cnn", "tc", 40_000, 40_000 * 3.0, precision="bf16-mixed", short=True)  # one thread
    tc = dict(model="cnn", data="tc", steps=150_000, precision="bf16-mixed", bench=load_bench(repo))
    for key, seconds, precision in [("1-cnn-r", 6000, "bf16-mixed"), ("2-cnn-r", 12_000, "32-true"),
                                    ("3-cnn-r", 6000, "bf16-mixed")]:
        records = plan_mod.load_records(repo / "reports")
        assert project(**tc, records=records, device=two) == (pytest.approx(3.0 * 150_000), "record 0-cnn-tc")
        record(repo, key, "cnn", "r", 150_000, seconds, device=two, precision=precision)  # 0.2× conv.md's step
    records = plan_mod.load_records(repo / "reports")
    assert project(**tc, records=records, device=two) == (
        pytest.approx(4.0 * 0.2 * 150_000), "conv.md ×0.20 (calibrated on 3 records)")
    assert project(**tc, records=records, device=AMD) == (pytest.approx(3.0 * 150_000), "record 0-cnn-tc")


def test_a_records_generation_is_known_only_where_every_cpu_segment_recorded_it():
    def segs(*flags, timed=False):  # "old": a segment of older code, without the key
        timing = {"from_step": 0, "to_step": 5, "seconds": 0.5} if timed else {}
        return {"accelerator": "cpu", "device": AMD, "steps": 5 * len(flags) if timed else 10, "fit_seconds": 1.0,
                "segments": [{**timing, **({} if f == "old" else {"cpu_flags": f})} for f in flags]}

    def isas(prov):
        return sorted((isa for _, isa in plan_mod.runs_of(prov)), key=str)

    # segments that do not account for the steps (older records): the whole record, one generation or none
    assert isas(segs(["avx2"], ["avx2"])) == ["avx2"]
    assert isas(segs("old", "old")) == [None] and isas(segs(None)) == [None] and isas(segs()) == [None]
    assert isas(segs(["avx2"], ["amx_bf16", "avx2"])) == ["mixed"]  # moved machines: none matches
    assert isas(segs("old", ["avx2"])) == ["mixed"]  # resumed across the change: the first unknown
    # timed segments: each run apart, one of older code counting for any CPU of the model as an older record does
    assert isas(segs(["avx2"], ["amx_bf16", "avx2"], timed=True)) == ["amx_bf16", "avx2"]
    assert isas(segs("old", ["avx2"], timed=True)) == [None, "avx2"]


def test_a_record_resumed_on_more_threads_or_another_cpu_times_each_run_apart(repo):
    """A cell begun on one thread and finished on two ran at two speeds; each projects the runs like it."""
    two = AMD.replace("1 threads", "2 threads")
    record(repo, "3-fcn-e", "fcn", "e", 150_000, 1500, segments=[
        {"device": AMD, "cpu_flags": ["avx2"], "from_step": 0, "to_step": 50_000, "seconds": 800},
        {"device": two, "cpu_flags": ["avx2"], "from_step": 50_000, "to_step": 100_000, "seconds": 300},
        {"device": two, "cpu_flags": ["avx512_bf16", "avx2"], "from_step": 100_000, "to_step": 150_000,
         "seconds": 400}])
    record(repo, "4-fcn-e", "fcn", "e", 150_000, 1200, segments=[  # a GPU window, finished on a CPU
        {"device": "NVIDIA H100", "from_step": 0, "to_step": 100_000, "seconds": 200},
        {"device": two, "cpu_flags": ["avx2"], "from_step": 100_000, "to_step": 150_000, "seconds": 1000}])
    records, bench = plan_mod.load_records(repo / "reports"), load_bench(repo)
    runs = {(r.key, r.cpu, r.threads, r.isa): (r.steps, r.s_per_step) for r in records if r.key[0] in "34"}
    assert runs == {("3-fcn-e", True, 1, "avx2"): (50_000, 0.016), ("3-fcn-e", True, 2, "avx2"): (50_000, 0.006),
                    ("3-fcn-e", True, 2, "avx512_bf16"): (50_000, 0.008),
                    ("4-fcn-e", False, None, None): (100_000, 0.002), ("4-fcn-e", True, 2, "avx2"): (50_000, 0.02)}
    e = dict(model="fcn", data="e", steps=150_000, precision="32-true", records=records, bench=bench)
    assert project(**e, device=two, isa="avx512_bf16") == \
        (pytest.approx(1200), "record 3-fcn-e (50,000 of its 150,000 steps)")
    assert project(**e, device="NVIDIA H100", cpu=False) == \
        (pytest.approx(300), "record 4-fcn-e (100,000 of its 150,000 steps)")
    # threads unknown: the runs of a record merge back into one, by their steps (3-fcn-e's avx2 runs: 1650;
    # 0-, 2- and 4-fcn-e: 900, 1100, 3000)
    assert project(**e, device="AMD EPYC", isa="avx2") == (pytest.approx(1375), "median of 4 records")
    # a short and a full record of one cell are two records; so are they where a benchmark is calibrated
    record(repo, "0-cnn-r", "cnn", "r", 150_000, 30_000, segments=[
        {"device": AMD, "from_step": 0, "to_step": 75_000, "seconds": 15_000},
        {"device": two, "from_step": 75_000, "to_step": 150_000, "seconds": 15_000}])
    records = plan_mod.load_records(repo / "reports")
    assert project("cnn", "r", 150_000, "32-true", "AMD EPYC", records, bench) == \
        (pytest.approx(150_000 * 0.15), "median of 2 records")
    assert project("cnn", "tc", 150_000, "32-true", "AMD EPYC", records, bench)[1] == \
        "conv.md ×0.38 (calibrated on 2 records)"


def test_cpu_flags_read_proc_cpuinfo_widest_first_and_say_none_where_it_cannot_tell(tmp_path, monkeypatch):
    import src.runinfo as runinfo

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(runinfo, "CPUINFO", info)
    monkeypatch.setattr(runinfo.platform, "machine", lambda: "x86_64")
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 vaes\n")
    assert runinfo.cpu_flags() == ["avx512_bf16", "avx512f", "avx2"] and runinfo.native_bf16() == ["avx512_bf16"]
    assert runinfo.widest_isa(runinfo.cpu_flags()) == "avx512_bf16" and runinfo.has_native_bf16(["avx2"]) is False
    info.write_text("flags\t\t: fpu sse sse2\n")
    assert runinfo.cpu_flags() == [] and runinfo.widest_isa([]) == "below avx2"
    assert runinfo.ISA_FLAGS[:len(runinfo.BF16_FLAGS)] == runinfo.BF16_FLAGS  # so the widest tells native bf16
    assert [plan_mod.isa_native(i) for i in ("amx_bf16", "avx512_bf16", "avx512f", "below avx2", "mixed")] == \
        [True, True, False, False, None]
    info.unlink()
    assert runinfo.cpu_flags() is None and plan_mod.isa_here() is None and runinfo.native_bf16() == []
    info.write_text("Features\t: fp asimd\n")
    monkeypatch.setattr(runinfo.platform, "machine", lambda: "aarch64")
    assert runinfo.cpu_flags() is None and plan_mod.isa_here() is None


def test_the_committed_benchmarks_parse_for_every_cell_of_the_grid():
    bench = {b.name: b.rows for b in load_bench(REPO)}
    conv, grid = bench["reports/bench/conv.md"], bench["reports/benchmarks.md"]
    cnn = {"cnn", "st_cnn", "st_cnn_proj", "st_cnn_tps"}
    assert {(r.model, r.data, r.precision) for r in conv} == \
        {(m, d, p) for m in cnn for d in ("r", "rts", "p", "e", "tc") for p in ("32-true", "bf16-mixed")}
    assert len({(r.model, r.data) for r in grid}) == 40 and all(r.s_per_step > 0 for r in grid)
    assert md_tables("| a | b |\n|:--|--:|\n| 1 | 2 |\n\ntext") == [[{"a": "1", "b": "2"}]]


# ------------------------------------------------------------------ the cell's own lines

@pytest.fixture
def smoke(synthetic_data, tmp_path):
    return ["trainer=smoke", "quiet=true", "model=fcn", "trainer.max_steps=40",
            f"paths.data_dir={synthetic_data['data_dir']}", f"paths.raw_file={synthetic_data['raw_file']}",
            f"paths.run_dir={tmp_path / 'run'}",
            f"paths.metrics_file={tmp_path / 'metrics.json'}", f"paths.curve_file={tmp_path / 'curve.csv'}",
            f"paths.cell_dir={tmp_path / 'cell'}"]


class _Kill(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 25:
            raise RuntimeError("simulated kill")


def test_a_cell_says_at_once_what_it_trains_and_where_it_resumes(smoke, caplog):
    caplog.set_level(logging.INFO, logger="src.train")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_config(smoke), extra_callbacks=(_Kill(),))
    first = caplog.messages[0]
    line = r"0-fcn-r: 40 steps on .+, precision 32-true, projected (unknown|\d+ min|[\d.]+ h.*)"
    assert re.fullmatch(line, first), first
    assert not any(m.startswith("resuming") for m in caplog.messages)
    caplog.clear()
    train(compose_config(smoke))
    resume = [m for m in caplog.messages if m.startswith("resuming")]
    assert re.fullmatch(r"0-fcn-r: 40 steps on .+, precision 32-true, 20 left from step 20, projected .+",
                        caplog.messages[0]), caplog.messages[0]  # the time it has left, not the whole cell's
    assert len(resume) == 1 and re.fullmatch(r"resuming 0-fcn-r from step 20 \(.+/checkpoints/last\.ckpt\)", resume[0])


def test_a_resumed_cell_projects_only_the_steps_it_has_left(smoke, monkeypatch):
    monkeypatch.setattr(plan_mod, "project", lambda model, data, steps, *a: (60.0 * steps, "a minute a step"))
    cfg = compose_config(smoke)
    assert plan_mod.start_line(cfg, "0-fcn-r").endswith(", precision 32-true, projected 40 min")
    assert plan_mod.start_line(cfg, "0-fcn-r", done=30).endswith(
        ", precision 32-true, 10 left from step 30, projected 10 min")


def test_the_start_and_resume_lines_reach_the_terminal_and_train_log(smoke, tmp_path):
    def run():
        r = subprocess.run([sys.executable, "-m", "src.train", *smoke], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout + r.stderr

    out = run()
    assert "0-fcn-r: 40 steps on " in out and "resuming" not in out
    out = run()  # the finished run again: it resumes from its last checkpoint
    resume = re.compile(r"resuming 0-fcn-r from step \d+ \(.+/checkpoints/last\.ckpt\)")
    assert resume.search(out), out
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("0-fcn-r: 40 steps on ") == 2 and resume.search(log), log
