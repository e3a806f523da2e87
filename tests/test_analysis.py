"""Every test error that reports/analysis.md quotes for a named cell is that cell's record.

The convention (written in the text, checked here): a backticked record reference, then at most a few
characters of punctuation (``):``, ``:``, ``**``), then the figure with two decimals and ``%``:

- one run: ``(`reports/metrics/1-fcn-r.json`): **2.70 %**`` or ``(`1-fcn-r`: 2.70 %)``, checked
  against that record's ``test.err`` (the table's number, the last checkpoint);
- the mean over seeds: ``(`reports/metrics/*-fcn-r.json`, mean of 3 seeds): **2.72 ± 0.06 %**`` (the
  ``± std`` optional), checked against the mean (and the sample std, ddof = 1) of the records of every
  seed of that model and distortion, the number of seeds included, to two decimals as results.md
  rounds them;
- ``reports/short/metrics/…`` names a record of the reduced budget, ``reports/sensitivity/metrics/…`` (e.g.
  ``0-fcn-p_sigma2``) one of the sensitivity study;
- a factor to the paper right after a full-budget figure is checked too, on the unrounded records and
  to the decimals written, against conf/reference/paper.yaml: ``**2.72 ± 0.06 %**, 1.29× the paper's``
  (ours / paper), and the flagged list's ``: 9.24 %; paper 3.1, 3.0×)`` (the paper's number, and the
  factor off it either way) or ``; paper 3.2, the paper's 1.5× ours)``.

- a range of per-bin errors: ``(`*-st_fcn_tps-rts`, per bin, 3 seeds pooled: 0.68–1.88 %)`` (or ``(`0-st_cnn-rts`,
  per bin: 0.22–1.48 %)`` for a model with one seed), checked against the lowest and highest bin of that
  model's column in results.md's "Test error by distortion strength" (seeds pooled, n beside the model).

A backticked reference followed closely by a percentage in any other form fails, so a figure cannot
slip past the check by being written differently. Cells of the earlier table (commit 18c9714, no
longer in reports/) are quoted without a backticked reference and are not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from src.report.aggregate import reference, row_label
from src.runinfo import REPO

ANALYSIS = REPO / "reports" / "analysis.md"
PAPER = reference("paper")["err"]

REF = (r"`(?:reports/(?P<short>short/|sensitivity/)?metrics/)?(?P<seed>\d+|\*)-(?P<model>[a-z][a-z_]*)"
       r"-(?P<data>(?:rts|tc|r|p|e)(?:_[a-z0-9_]+)?)(?P<ext>\.json)?`")
QUOTE = re.compile(REF + r"(?P<mean>,\s+mean\s+of\s+(?P<n>\d+)\s+seeds)?"
                   r"[\s:)*]{0,8}(?P<err>\d+\.\d\d)(?:\s*±\s*(?P<sd>\d+\.\d\d))?\s*%")
PER_BIN = re.compile(REF + r",\s+per\s+bin(?:,\s+(?P<n>\d+)\s+seeds\s+pooled)?:\s+"
                     r"(?P<lo>\d+\.\d\d)–(?P<hi>\d+\.\d\d)\s*%")
REF_RE = re.compile(REF)
NEAR = re.compile(r"\d+(?:\.\d+)?\s*%|±")  # a figure closely after a reference
NEAR_CHARS = 40
FACTOR = re.compile(r"\**(?:,\s+one\s+seed(?:,\s+in\s+`[^`]+`)?)?[\s,;(]*(?:(?P<of>\d+\.\d+)×\s+the\s+paper's"
                    r"|paper\s+(?P<paper>\d+(?:\.\d+)?),\s+(?P<theirs>the\s+paper's\s+)?(?P<off>\d+\.\d+)×)")


@dataclass
class Quote:
    ref: str  # the reference as written
    quoted: str  # the figure as written
    expected: str  # the figure from the records
    ok: bool


def records(short: str | bool, model: str, data: str, seed: str) -> dict[int, float]:
    """{seed: test.err} of the records of one model and distortion (one seed, or every seed for '*'); ``short``:
    the folder under reports/ ('short/', 'sensitivity/'), or none."""
    folder = REPO / "reports" / (short if isinstance(short, str) else "short/" if short else "") / "metrics"
    name = re.compile(rf"(\d+)-{re.escape(model)}-{re.escape(data)}\.json")
    out = {}
    for path in folder.glob(f"{seed}-{model}-{data}.json"):
        m = name.fullmatch(path.name)
        if m:
            out[int(m.group(1))] = json.loads(path.read_text())["test"]["err"]
    return out


def factor_quote(ref: str, f: re.Match, ours: float | None, paper: float | None) -> Quote:
    """The factor to the paper written after a figure (``FACTOR``) against the records' own: ours / paper for
    "x× the paper's", the factor off the paper either way for "paper y, x×", paper / ours for "the paper's x×
    ours"; to the decimals written."""
    written = f.group("of") or f.group("off")
    quoted = " ".join(f.group(0).strip("*,;( \n").split())
    if ours is None or paper is None or ours <= 0:
        return Quote(ref, quoted, "no record or no paper number", False)
    if f.group("of"):
        factor = ours / paper
    elif f.group("theirs"):
        factor = paper / ours
    else:
        factor = max(ours / paper, paper / ours)
    decimals = len(written.split(".")[1])
    expected = f"{factor:.{decimals}f}×" + (f", paper {paper:g}" if f.group("paper") else "")
    got = f"{written}×" + (f", paper {float(f.group('paper')):g}" if f.group("paper") else "")
    return Quote(ref, quoted, expected, got == expected)


def bin_columns() -> dict[tuple[str, str], tuple[int, list[float]]]:
    """{(distortion, model label): (n seeds pooled, per-bin errors)} from results.md's "Test error by distortion
    strength" tables (a cell reads "1.65 [1.22, 2.21]": the error, then its interval)."""
    text = (REPO / "reports" / "results.md").read_text()
    section = text[text.index("## Test error by distortion strength"):]
    section = section[:section.index("\n## ", 1)]
    out = {}
    parts = re.split(r"^\*\*(\w+)\*\*$", section, flags=re.M)
    for data, block in zip(parts[1::2], parts[2::2]):
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
                if line.startswith("|")]
        for j, head in enumerate(rows[0][2:], start=2):
            m = re.fullmatch(r"(.+) \(n=(\d+)\)", head)
            errs = [float(r[j].split()[0]) for r in rows[2:] if re.match(r"\d", r[j])]
            out[(data.lower(), m.group(1))] = (int(m.group(2)), errs)
    return out


def per_bin_quote(m: re.Match, columns: dict) -> Quote:
    """A range of per-bin errors (``PER_BIN``) against the lowest and highest bin of its model's column."""
    ref = REF_RE.match(m.string, m.start()).group(0)
    quoted = f"{m.group('lo')}–{m.group('hi')} % (n={m.group('n') or 1})"
    column = columns.get((m.group("data"), row_label(m.group("model"))))
    if column is None or m.group("short"):
        return Quote(ref, quoted, "no per-bin column in results.md", False)
    n, errs = column
    seeds = records(False, m.group("model"), m.group("data"), "*").keys()
    seed_ok = m.group("seed") == "*" or (n == 1 and not m.group("n") and seeds == {int(m.group("seed"))})
    expected = f"{min(errs):.2f}–{max(errs):.2f} % (n={n})"
    return Quote(ref, quoted, expected, seed_ok and quoted == expected)


def check(text: str) -> tuple[list[Quote], list[str]]:
    """The quoted figures of a text with their verdicts, and the references followed by a percentage
    that is not in the convention's form."""
    quotes, malformed, matched = [], [], set()
    columns = bin_columns() if PER_BIN.search(text) else {}
    for m in PER_BIN.finditer(text):
        matched.add(m.start())
        quotes.append(per_bin_quote(m, columns))
    for m in QUOTE.finditer(text):
        matched.add(m.start())
        ref = REF_RE.match(text, m.start()).group(0)
        short, seed, model, data = m.group("short") or "", m.group("seed"), m.group("model"), m.group("data")
        errs = records(short, model, data, seed)
        quoted = m.group("err") + (f" ± {m.group('sd')}" if m.group("sd") else "")
        if seed == "*":
            if not m.group("mean"):
                quotes.append(Quote(ref, quoted, "a mean needs ', mean of N seeds'", False))
                continue
            vals = np.array([errs[s] for s in sorted(errs)], dtype=float)
            expected = f"{vals.mean():.2f}" if len(vals) else "no record"
            if m.group("sd"):
                expected += f" ± {vals.std(ddof=1):.2f}" if len(vals) > 1 else " ± (one seed)"
            n_ok = int(m.group("n")) == len(vals)
            quotes.append(Quote(ref, f"{quoted} (n={m.group('n')})", f"{expected} (n={len(vals)})",
                                n_ok and quoted == expected))
            ours = float(vals.mean()) if len(vals) else None
        else:
            if m.group("mean") or m.group("sd"):
                quotes.append(Quote(ref, quoted, "one run has no mean or std", False))
                continue
            expected = f"{errs[int(seed)]:.2f}" if int(seed) in errs else "no record"
            quotes.append(Quote(ref, quoted, expected, quoted == expected))
            ours = errs.get(int(seed))
        f = FACTOR.match(text, m.end())
        if f and not short:
            quotes.append(factor_quote(ref, f, ours, PAPER.get(model, {}).get(data)))
    for m in REF_RE.finditer(text):
        if m.start() in matched:
            continue
        after = text[m.end(): m.end() + NEAR_CHARS].split("`")[0]
        if NEAR.search(after):
            malformed.append(text[m.start(): m.end() + len(after)].replace("\n", " "))
    return quotes, malformed


def test_every_quoted_cell_figure_is_its_record():
    quotes, malformed = check(ANALYSIS.read_text())
    assert len(quotes) >= 80, f"only {len(quotes)} quoted figures found: has the convention changed?"
    wrong = [f"{q.ref}: {q.quoted} (records: {q.expected})" for q in quotes if not q.ok]
    assert not wrong, "figures in analysis.md that are not their cells' records:\n" + "\n".join(wrong)
    assert not malformed, ("references in analysis.md followed by a figure not in the form "
                           "'`ref`): **x.xx %**':\n" + "\n".join(malformed))


def test_check_catches_doctored_figures():
    """The check fails on a wrong figure, a wrong mean, a wrong std, a wrong n, a missing record and a
    figure in another form, and passes the right ones (read from the records themselves)."""
    r = records(False, "fcn", "r", "*")
    assert len(r) >= 2, "the FCN on R has records of at least two seeds"
    s = min(r)
    vals = np.array([r[k] for k in sorted(r)])
    mean, sd, n = f"{vals.mean():.2f}", f"{vals.std(ddof=1):.2f}", len(vals)
    good = (f"(`reports/metrics/{s}-fcn-r.json`): **{r[s]:.2f} %** and (`{s}-fcn-r`: {r[s]:.2f} %), "
            f"(`reports/metrics/*-fcn-r.json`, mean of {n} seeds): **{mean} ± {sd} %**, "
            f"`*-fcn-r`, mean of\n{n} seeds: {mean} %.")
    quotes, malformed = check(good)
    assert len(quotes) == 4 and all(q.ok for q in quotes) and not malformed

    off = f"{r[s] + 0.01:.2f}"
    for doctored in (f"(`reports/metrics/{s}-fcn-r.json`): **{off} %**",
                     f"(`{s}-fcn-r`: {off} %)",
                     f"(`reports/metrics/*-fcn-r.json`, mean of {n} seeds): **{float(mean) + 0.01:.2f} %**",
                     f"(`reports/metrics/*-fcn-r.json`, mean of {n} seeds): **{mean} ± {float(sd) + 0.01:.2f} %**",
                     f"(`reports/metrics/*-fcn-r.json`, mean of {n + 1} seeds): **{mean} %**",
                     f"(`reports/metrics/*-fcn-r.json`): **{mean} %**",
                     f"(`reports/metrics/{s}-fcn-r.json`, mean of 1 seeds): **{r[s]:.2f} %**",
                     "(`reports/metrics/7-fcn-r.json`): **2.70 %**"):
        quotes, malformed = check(doctored)
        assert len(quotes) == 1 and not quotes[0].ok, doctored
    for other_form in (f"(`reports/metrics/{s}-fcn-r.json`) gives **{r[s]:.2f} %**",
                       f"(`{s}-fcn-r`: {r[s]:.1f} %)"):
        quotes, malformed = check(other_form)
        assert not quotes and malformed, other_form


def test_check_catches_a_doctored_factor_to_the_paper():
    """Each form of the factor to the paper is checked on the records: the right factor passes, one off by a
    unit of its last decimal fails, and so does a wrong paper number."""
    r = records(False, "fcn", "p", "*")
    assert r, "the FCN on P has records"
    vals = np.array([r[k] for k in sorted(r)])
    mean, n, paper = vals.mean(), len(vals), PAPER["fcn"]["p"]
    head = f"(`*-fcn-p`, mean of {n} seeds: {mean:.2f} %"
    right = (f"{head}; paper {paper:g}, {mean / paper:.1f}×)",
             f"(`reports/metrics/*-fcn-p.json`, mean of {n} seeds): **{mean:.2f} %**, {mean / paper:.2f}× the paper's",
             f"{head}; paper {paper:g}, the paper's {paper / mean:.1f}× ours)")
    wrong = (f"{head}; paper {paper:g}, {mean / paper + 0.1:.1f}×)",
             f"{head}; paper {paper + 1:g}, {mean / paper:.1f}×)",
             f"(`reports/metrics/*-fcn-p.json`, mean of {n} seeds): **{mean:.2f} %**, {mean / paper + 0.01:.2f}× the paper's",
             f"{head}; paper {paper:g}, the paper's {paper / mean + 0.1:.1f}× ours)")
    for text in right:
        quotes, _ = check(text)
        assert len(quotes) == 2 and all(q.ok for q in quotes), (text, quotes)
    for text in wrong:
        quotes, _ = check(text)
        assert len(quotes) == 2 and quotes[0].ok and not quotes[1].ok, (text, quotes)


def test_check_catches_a_doctored_per_bin_range():
    """A per-bin range passes when it is its model's column in results.md, and fails one unit off at either
    end, with a wrong number of seeds, or for a seed that is not the column's only one."""
    n, errs = bin_columns()[("r", "ST-FCN Aff")]
    lo, hi = min(errs), max(errs)
    right = f"(`*-st_fcn-r`, per bin, {n} seeds pooled: {lo:.2f}–{hi:.2f} %)"
    wrong = (f"(`*-st_fcn-r`, per bin, {n} seeds pooled: {lo + 0.01:.2f}–{hi:.2f} %)",
             f"(`*-st_fcn-r`, per bin, {n} seeds pooled: {lo:.2f}–{hi - 0.01:.2f} %)",
             f"(`*-st_fcn-r`, per bin, {n + 1} seeds pooled: {lo:.2f}–{hi:.2f} %)",
             f"(`0-st_fcn-r`, per bin: {lo:.2f}–{hi:.2f} %)")
    quotes, malformed = check(right)
    assert len(quotes) == 1 and quotes[0].ok and not malformed, quotes
    for text in wrong:
        quotes, malformed = check(text)
        assert len(quotes) == 1 and not quotes[0].ok and not malformed, (text, quotes)


COUNT = re.compile(r"the records in `reports/metrics/`, (?P<n>\d+) of\s+the grid's (?P<total>\d+) cells")


def test_the_state_of_the_table_counts_the_committed_records():
    """The cell count that opens analysis.md is the aggregate's own count (reports/summary.json, which
    test_lock keeps current with the records), so it cannot lag behind a newly committed cell."""
    m = COUNT.search(ANALYSIS.read_text())
    assert m, "analysis.md no longer says how many cells are finished in the form this test reads"
    summary = json.loads((REPO / "reports" / "summary.json").read_text())
    assert (int(m.group("n")), int(m.group("total"))) == (summary["cells_run"], summary["cells_total"])
