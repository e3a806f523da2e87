"""The project's documents point only at files that exist."""

from __future__ import annotations

import re

import pytest

from src.runinfo import REPO

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "reports").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)


def local_targets(text: str) -> list[str]:
    """Relative link targets of a markdown text, without their #anchor (web links and pure anchors left out)."""
    return [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]


def test_local_targets_reads_relative_links_only():
    text = "[a](figures/x.png) [b](https://x.org/y) [c](#how) [d](analysis.md#p) [e](mailto:a@b)"
    assert local_targets(text) == ["figures/x.png", "analysis.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    path = REPO / doc
    missing = [t for t in local_targets(path.read_text()) if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"
