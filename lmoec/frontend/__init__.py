"""Frontend: .lsm text -> parse tree (grammar/lsm.lark) -> the IR (lmoec.ir.nodes).

`load_spec(path)` is the entry point; every problem is a `lmoec.errors.SpecError`
with `file:line:col`, except a missing top-level file (FileNotFoundError).
"""
from .lower import load_spec  # noqa: F401
from .parse import parse  # noqa: F401
