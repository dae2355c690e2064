"""The committed generated/<name>/ packages are exactly what the spec library compiles to.

Every change to emitted code shows in review as a diff of generated/. After an intended change,
regenerate from the repository root with:

    lmoec compile specs/lsm/*.lsm specs/models/*.lsm
"""
from __future__ import annotations

import difflib

import pytest

from lmoec import compile_spec
from lmoec.paths import GENERATED, SPECS

SPEC_FILES = sorted(SPECS.rglob("*.lsm"))
HINT = "regenerate with `lmoec compile specs/lsm/*.lsm specs/models/*.lsm` (from the repository root)"


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_generated_matches_spec(spec):
    files = compile_spec(spec).files
    golden_dir = GENERATED / spec.stem
    assert golden_dir.is_dir(), f"{golden_dir} is missing: {HINT}"
    golden = {p.name: p.read_text() for p in sorted(golden_dir.iterdir()) if p.is_file()}
    assert sorted(golden) == sorted(files), f"{spec.name}: emitted file set differs from {golden_dir}: {HINT}"
    for name, text in files.items():
        if golden[name] != text:
            diff = "".join(list(difflib.unified_diff(golden[name].splitlines(True), text.splitlines(True),
                                                     f"generated/{spec.stem}/{name}", "emitted"))[:40])
            pytest.fail(f"{spec.name}: {name} differs from the committed file: {HINT}\n{diff}")
