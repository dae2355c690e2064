"""Where lmoec's data lives: the grammar, the templates and the spec library.

In a source checkout (and an editable install) they are the top-level folders grammar/, templates/ and
specs/ beside the package; a wheel ships them inside it, as lmoec/grammar/ and so on (setup.py maps them).
generated/, the golden packages the tests compare with, exists in a checkout only.
"""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def _data(name: str) -> Path:
    inside = PACKAGE / name
    return inside if inside.is_dir() else ROOT / name


GRAMMAR = _data("grammar") / "lsm.lark"
TEMPLATES = _data("templates")
SPECS = _data("specs")
GENERATED = ROOT / "generated"
