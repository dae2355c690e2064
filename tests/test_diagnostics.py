"""Every bad spec in tests/bad_specs/ fails with its expected `file:line:col: error: message`.

Each corpus file starts with `# expect: LINE:COL: MESSAGE-SUBSTRING`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmoec.errors import SpecError
from lmoec.frontend import load_spec
from lmoec.passes import run_passes
from lmoec.paths import SPECS

BAD = Path(__file__).parent / "bad_specs"
CASES = sorted(BAD.glob("*.lsm"))


def expectation(path: Path) -> tuple[int, int, str]:
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# expect: (\d+):(\d+): (.+)", first)
    assert m, f"{path.name}: first line must be '# expect: LINE:COL: MESSAGE'"
    return int(m.group(1)), int(m.group(2)), m.group(3)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_spec(path: Path):
    line, col, message = expectation(path)
    with pytest.raises(SpecError) as info:
        run_passes(load_spec(path))
    err = info.value
    assert err.loc is not None, str(err)
    assert (err.loc.line, err.loc.col) == (line, col), str(err)
    assert message in err.message, str(err)
    text = str(err).splitlines()
    assert text[0].endswith(f":{line}:{col}: error: {err.message}")
    # the source line and a caret under the column
    assert text[1].strip() == path.read_text().splitlines()[line - 1].strip()
    assert text[2].index("^") - 4 == col - 1


def test_error_without_positions_names_the_block():
    """Validation of an IR built in Python (no statement positions) falls back to the block."""
    ir = load_spec(SPECS / "lsm" / "gla.lsm")
    ir.lsms["gla"].chunk_size = 48
    with pytest.raises(SpecError, match="chunk_size must be one of") as info:
        run_passes(ir)
    assert info.value.loc == ir.lsms["gla"].loc
