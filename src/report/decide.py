"""Settle the open protocol choices on validation: SGD momentum × training distortions (fixed | fresh).

Each setting is an ordinary training run (``python -m src.train`` in a subprocess) whose record goes to
``reports/decisions/<tag>/``; runs whose metrics exist are not repeated, and an interrupted one
resumes; a record made under another config (any other override) is retrained. The table is then
written into reports/decisions.md between the markers below. Only validation error is read here:
the test set plays no part in a decision.

    python -m src.report.decide                                 # FCN on R, 40k steps (trainer=short)
    python -m src.report.decide model=st_fcn trainer=quick      # any other model / budget
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd


from src.runinfo import REPO, UserError, write_atomic
from src.config import compose_config, result_config

MOMENTA = (0.0, 0.9)
MODES = ("fixed", "fresh")
DEFAULTS = ["model=fcn", "data=r", "trainer=short", "seed=0"]
OUT_DIR = REPO / "reports" / "decisions"
PAGE = REPO / "reports" / "decisions.md"
BEGIN, END = "<!-- decide:begin -->", "<!-- decide:end -->"


def recorded(out: Path, cfg) -> bool:
    """True when ``out`` holds a finished run of exactly this config."""
    try:
        prov = json.loads((out / "provenance.json").read_text())
    except (OSError, ValueError):
        return False
    return (out / "metrics.json").is_file() and result_config(prov.get("config", {})) == result_config(cfg)


def run_setting(overrides: list[str], momentum: float, mode: str) -> dict:
    """Train one setting unless a record of the same config exists; return a table row."""
    setting = [*overrides, f"optim.momentum={momentum}", f"loader.mode={mode}"]
    cfg = compose_config(setting)
    tag = f"{cfg.model.name}-{cfg.data.name}-{cfg.trainer.max_steps}steps-s{cfg.seed}-m{momentum:g}-{mode}"
    out = OUT_DIR / tag
    run = [*setting, "quiet=true", f"paths.run_dir={REPO / 'runs' / 'decisions' / tag}",
           f"paths.metrics_file={out / 'metrics.json'}", f"paths.curve_file={out / 'curve.csv'}", f"paths.cell_dir={out}"]
    cfg = compose_config(run)
    if not recorded(out, cfg):
        print(f"decide: training {tag}", flush=True)
        r = subprocess.run([sys.executable, "-m", "src.train", *run], cwd=REPO, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            raise UserError(f"{tag}: {(r.stderr.strip().splitlines() or ['training failed'])[-1]}")
    m = json.loads(Path(cfg.paths.metrics_file).read_text())
    prov = json.loads((out / "provenance.json").read_text())
    return {"model": cfg.model.name, "data": cfg.data.name, "steps": m["steps"], "seed": cfg.seed,
            "momentum": momentum, "loader.mode": mode, "val err % (last)": m["val"]["err_last"],
            "val err % (best)": m["val"]["err_best"], "device": prov["device"], "commit": prov["commit"][:8]}


def write_table(rows: list[dict], overrides: list[str]) -> None:
    """Replace this model/data/budget's table in reports/decisions.md (other tables are kept)."""
    df = pd.DataFrame(rows)
    r0 = rows[0]
    title = f"{r0['model']} on {r0['data'].upper()}, {r0['steps']} steps, seed {r0['seed']}"
    best = df.loc[df["val err % (last)"].idxmin()]
    block = (f"### {title}\n\n{df.to_markdown(index=False)}\n\nLowest validation error: momentum "
             f"{best['momentum']:g}, `loader.mode={best['loader.mode']}`. "
             f"Rebuild: `python -m src.report.decide {' '.join(overrides)}`.\n")
    page = PAGE.read_text()
    if BEGIN not in page:
        page = page.rstrip() + f"\n\n## Validation comparison (`python -m src.report.decide`)\n\n{BEGIN}\n{END}\n"
    head, rest = page.split(BEGIN, 1)
    inner, tail = rest.split(END, 1)
    blocks = [b for b in re.split(r"(?=^### )", inner.strip(), flags=re.M) if b.strip()]
    blocks = [b for b in blocks if not b.startswith(f"### {title}\n")] + [block]
    write_atomic(PAGE, f"{head}{BEGIN}\n" + "\n".join(b.rstrip() + "\n" for b in sorted(blocks)) + f"{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    keys = {o.split("=", 1)[0] for o in given}
    overrides = [o for o in DEFAULTS if o.split("=", 1)[0] not in keys] + list(given)
    try:
        rows = [run_setting(overrides, mom, mode) for mom, mode in itertools.product(MOMENTA, MODES)]
        write_table(rows, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"decide: {len(rows)} settings -> {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
