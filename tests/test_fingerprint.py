"""The result fingerprint (src/run/fingerprint.py): the committed hashes are what the training code computes,
on any CPU. A change that moves a hash changes results, and the cells it touches retrain."""

from __future__ import annotations

import json

from src.run.fingerprint import FILE, pinned


def test_the_training_code_computes_the_committed_fingerprint():
    committed = json.loads(FILE.read_text())
    now = pinned()
    moved = sorted(k for k in committed if now.get(k) != committed[k])
    assert set(now) == set(committed) and not moved, (
        f"results changed for {moved}: retrain them, or, if the change is intended and the cells are retrained, "
        "run `python -m src.run.fingerprint --write`")


def test_the_fingerprint_does_not_depend_on_the_cpus_instruction_set():
    """The child is pinned to portable kernels: a parent that asks for AVX2 (or anything else) gets the same
    hashes (unpinned, AVX2 and the default kernels differ in the last bits on this code)."""
    committed = json.loads(FILE.read_text())
    cells = ["0-st_fcn_tps-e", "0-st_cnn_proj-p"]
    for level in ("avx2", "default"):
        assert pinned(cells, parent_env={"ATEN_CPU_CAPABILITY": level}) == {k: committed[k] for k in cells}
