"""The project's documents hold only what exists: linked files and headings, documented modules, scripts and
dvc stages, the README's commands as CI runs them, and a README that fits one screen."""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from src.runinfo import REPO

GUIDES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
DOCS = [*GUIDES, *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "reports").glob("*.md"))]
README_LINES = 60  # one screen
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def local_targets(text: str) -> list[str]:
    """Relative link targets of a markdown text, without their #anchor (web links and pure anchors left out)."""
    return [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lowercase, punctuation dropped but '-' and '_', spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[str]:
    """ATX headings outside fenced code, in order."""
    return HEADING.findall(FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """Every #anchor a markdown text defines: heading slugs (repeats numbered -1, -2, … as GitHub does) and
    HTML id/name attributes."""
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for h in headings(text):
        s = slug(h)
        out.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return out


def code(text: str) -> list[str]:
    """Shell text of a document: every line of its fenced blocks (comments cut) and every inline code span."""
    lines = []
    for m in FENCE.finditer(text):
        lines += [ln.split(" #")[0] for ln in m.group(0).splitlines()[1:-1]]
    spans = re.findall(r"`([^`]+)`", FENCE.sub("", text))
    return lines + [" ".join(s.split()) for s in spans]


def test_local_targets_reads_relative_links_only():
    text = "[a](figures/x.png) [b](https://x.org/y) [c](#how) [d](analysis.md#p) [e](mailto:a@b)"
    assert local_targets(text) == ["figures/x.png", "analysis.md"]


def test_slug_follows_githubs_rules():
    assert slug("A cluster: Hydra's submitit launcher") == "a-cluster-hydras-submitit-launcher"
    assert slug("θ for each transform (`stn.transform`)") == "θ-for-each-transform-stntransform"
    assert slug("Test error %") == "test-error-"
    assert slug("Reduced budget: 40,000 steps (the seed report's budget)") == \
        "reduced-budget-40000-steps-the-seed-reports-budget"
    assert slug("Speed ([benchmarks.md](benchmarks.md), 2-core CPU)") == "speed-benchmarksmd-2-core-cpu"
    text = "# Top\n\n```bash\n# not a heading\n```\n\n## Notes\n\n### Notes\n"
    assert anchors(text) == {"top", "notes", "notes-1"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    path = REPO / doc
    missing = [t for t in local_targets(path.read_text()) if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_anchor_names_a_heading_of_its_target(doc):
    path = REPO / doc
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or "#" not in target:
            continue
        file, anchor = target.split("#", 1)
        dest = (path.parent / file) if file else path
        if dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest.read_text()):
            bad.append(target)
    assert not bad, f"{doc} links to headings that do not exist: {bad}"


def test_readme_fits_one_screen():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_LINES, f"README.md has {n} lines; keep it to {README_LINES} and move the rest into docs/"


def readme_commands() -> list[list[list[str]]]:
    """The README's fenced one-line commands, each a list of its `&&`-joined steps, split as a shell would."""
    text = (REPO / "README.md").read_text()
    blocks = [m.group(0).splitlines()[1:-1] for m in FENCE.finditer(text)]
    return [[shlex.split(step) for step in b[0].split("&&")] for b in blocks if len(b) == 1]


def test_readme_test_command_is_what_ci_runs():
    test = [c for c in readme_commands() if c[-1][-1] == "pytest"]
    assert len(test) == 1, "README.md: one install-and-test command"
    ci = []
    for line in (REPO / ".ci/run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["python"]:
            words = words[2:] if words[1:3] == ["-m", "pip"] else words  # `python -m pip` is `pip`
            ci.append([w for w in words if w != "-q"])
    assert ci == test[0]
    run = [c for c in readme_commands() if c[-1] == ["dvc", "repro"]]
    assert len(run) == 1 and run[0][0] == ci[0], "README.md: one install-and-run command, torch pinned as in CI"


def test_documented_modules_exist():
    """Every `python -m src.<module>` of README.md and docs/ (code blocks and inline code) can be run."""
    named = {m for doc in GUIDES for line in code((REPO / doc).read_text())
             for m in re.findall(r"python3? -m (src(?:\.\w+)+)", line)}
    assert {"src.train", "src.run.plan", "src.ops.window"} <= named  # the check reads the documents at all
    missing = sorted(m for m in named if importlib.util.find_spec(m) is None)
    assert not missing, f"documented modules that do not exist: {missing}"


def test_documented_scripts_exist():
    named = {p for doc in GUIDES for line in code((REPO / doc).read_text())
             for p in re.findall(r"(?:python3?|bash|sh) ((?:bench|src|tests|\.ci)/[\w./-]+)", line)}
    assert named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"documented scripts that do not exist: {missing}"


def stage_names() -> tuple[set[str], set[str]]:
    """The stages dvc.yaml defines, as `dvc stage list` names them (a matrix: `<stage>@<values joined by ->`),
    and the stage names without their matrix key."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def resolve(value):
        if isinstance(value, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", value)):
            out = params
            for key in m.group(1).split("."):
                out = out[key]
            return out
        return value

    names = set()
    for stage, body in stages.items():
        if "matrix" in body:
            axes = [resolve(v) for v in body["matrix"].values()]
            names |= {f"{stage}@" + "-".join(map(str, combo)) for combo in itertools.product(*axes)}
        else:
            names.add(stage)
    return names, set(stages)


def dvc_targets(line: str) -> list[str]:
    """The stage targets of the `dvc repro`, `dvc commit` and `dvc exp run` commands of a shell line."""
    out = []
    for part in re.split(r"&&|\|\||[;|&]", line):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if "dvc" not in words:
            continue
        words = words[words.index("dvc") + 1:]
        while words and words[0].startswith("-"):  # dvc's own options (--wait-for-lock)
            words.pop(0)
        if words[:1] in (["repro"], ["commit"]):
            args = words[1:]
        elif words[:2] == ["exp", "run"]:
            args = words[2:]
        else:
            continue
        skip = False
        for w in args:
            if skip or w.startswith("-"):
                skip = w in ("-S", "--set-param")
                continue
            out.append(w)
    return out


def test_dvc_targets_reads_stage_arguments():
    line = ("dvc exp run -S conf/optim/sgd.yaml:momentum=0 -s train@0-fcn-r && dvc --wait-for-lock repro -s x@1 & "
            "dvc metrics show reports/summary.json; dvc commit -f aggregate")
    assert dvc_targets(line) == ["train@0-fcn-r", "x@1", "aggregate"]


@pytest.mark.parametrize("doc", GUIDES)
def test_documented_dvc_stages_exist(doc):
    """Every stage a documented dvc command names, and every concrete `<stage>@<key>` in the text, is one of
    dvc.yaml's (placeholders such as `train@<cell>` left out); a `^…` grep pattern is a prefix of one."""
    names, bases = stage_names()
    assert "train@0-fcn-r" in names and "aggregate" in names
    text = (REPO / doc).read_text()
    bad = [t for line in code(text) for t in dvc_targets(line)
           if not re.search(r"[<>…$*{]", t) and t not in names and t not in bases]
    stage = "|".join(sorted(bases, key=len, reverse=True))
    for m in re.finditer(rf"(?<![\w/.-])(\^?)((?:{stage})@\w[\w.-]*)", text):
        name = m.group(2).rstrip(".-")
        if not (name in names or m.group(1) and any(n.startswith(name) for n in names)):
            bad.append(name)
    assert not bad, f"{doc} names dvc stages that dvc.yaml does not define: {sorted(set(bad))}"


def section_references() -> list[tuple[str, str, str]]:
    """(file, document, section) of every `README "Section"` or `docs/x.md "Section"` in code, configs and
    reports (prose pointers into a document's section)."""
    files = [p for pat in ("src/**/*.py", "bench/*", "tests/*.py", "conf/**/*.yaml", "reports/*.md", "docs/*.md",
                           ".ci/*", "dvc.yaml", "params.yaml", "README.md")
             for p in REPO.glob(pat) if p.is_file() and p.name != Path(__file__).name]
    out = []
    for p in files:
        text = " ".join(p.read_text(errors="replace").split())
        for doc, section in re.findall(r"(README(?:\.md)?|docs/[\w-]+\.md),? \\?\"([^\"\\]+)\\?\"", text):
            out.append((p.relative_to(REPO).as_posix(), "README.md" if doc.startswith("README") else doc, section))
    return out


def test_section_references_name_a_heading():
    refs = section_references()
    assert any(doc == "docs/operations.md" for _, doc, _ in refs)  # src/run/plan.py points there
    bad = [r for r in refs if not (REPO / r[1]).is_file()
           or not any(h.lower().startswith(r[2].lower()) for h in headings((REPO / r[1]).read_text()))]
    assert not bad, f"references to sections that do not exist (file, document, section): {bad}"


def test_every_test_file_is_in_the_catalogue():
    text = (REPO / "docs/tests.md").read_text()
    missing = [p.name for p in sorted((REPO / "tests").glob("test_*.py")) if f"`{p.name}`" not in text]
    assert not missing, f"docs/tests.md does not list {missing}"
