"""Every curated mutant in tests/mutants.py still applies to the sources: each old text occurs exactly once. A
refactor or reformat that moves the code a mutant targets fails here, in the fast suite, instead of silently
turning `make mutants` into a no-op."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mutants  # noqa: E402


def test_every_mutant_applies_to_the_current_sources():
    assert mutants.check_edits() == []


def test_check_edits_reports_a_mutant_whose_text_moved(tmp_path):
    m = mutants.MUTANTS[0]
    rel = m.edits[0][0]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("nothing the mutant looks for\n")
    problems = mutants.check_edits(tmp_path)
    assert any(p.startswith(f"{m.name}: {rel}: old text occurs 0 times") for p in problems)
