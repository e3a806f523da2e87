"""The layout shows the architecture: every module of src/ stands on a floor and imports only from its own floor
or below (no cycle can then cross floors), and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# The floors, lowest first: the library and what every run records; data and networks; running a cell;
# the entry point and the report; operations tooling.
FLOORS = {"stn": 1, "runinfo": 1, "cell": 1, "config": 1, "data": 2, "models": 2, "run": 3, "train": 4, "report": 4, "ops": 5}


def room(module: str) -> str:
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """module → the src modules it imports (at any depth of its code)."""
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.rsplit(".", node.level)[0]
                found.add(f"{base}.{node.module}" if node.module else base)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src"):
                found.update(f"{node.module}.{a.name}" if node.module == "src" or
                             (SRC.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                             else node.module for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("src."))
        out[name] = found - {name}
    return out


def test_every_module_stands_on_a_floor():
    rooms = {room(m) for m in imports() if m != "src"}
    assert rooms <= set(FLOORS), f"modules outside the floors: {sorted(rooms - set(FLOORS))}"
    assert {"stn", "data", "models", "run", "report", "ops"} <= rooms  # the test sees the tree at all
    assert "src.cell" in imports()["src.report.aggregate"]  # ... and its imports


def test_no_import_runs_up_a_floor():
    up = [f"{m} → {i}" for m, found in imports().items() if m != "src"
          for i in found if i != "src" and FLOORS[room(i)] > FLOORS[room(m)]]
    assert not up, "imports that run up a floor:\n" + "\n".join(sorted(up))


def test_no_two_modules_import_each_other():
    graph = imports()
    pairs = sorted({tuple(sorted((m, i))) for m, found in graph.items() for i in found if m in graph.get(i, ())})
    assert not pairs, f"import cycles: {pairs}"
