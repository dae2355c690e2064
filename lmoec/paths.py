"""Where lmoec's data lives: the grammar and the templates ship beside the package."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRAMMAR = ROOT / "grammar" / "lsm.lark"
TEMPLATES = ROOT / "templates"
SPECS = ROOT / "specs"
GENERATED = ROOT / "generated"
