"""One error type for everything wrong with a spec, printed as `file:line:col: error: ...`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .ir.nodes import SourceLoc


class SpecError(Exception):
    """A malformed or invalid spec. `str()` is the full diagnostic with the source line and a caret."""

    def __init__(self, message: str, loc: Optional[SourceLoc] = None, source_line: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.source_line = source_line
        if loc is not None and source_line is None:
            try:
                lines = Path(loc.file).read_text().splitlines()
                self.source_line = lines[loc.line - 1] if 0 < loc.line <= len(lines) else None
            except OSError:
                self.source_line = None

    def __str__(self) -> str:
        if self.loc is None:
            return f"error: {self.message}"
        out = f"{self.loc}: error: {self.message}"
        if self.source_line is not None:
            out += f"\n    {self.source_line}\n    {' ' * (self.loc.col - 1)}^"
        return out
