"""One error type for everything wrong with a spec, printed as `file:line:col: error: ...`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .ir.nodes import SourceLoc


class SpecError(Exception):
    """A malformed or invalid spec. `str()` is the full diagnostic with the source line and a caret.

    `file` places an error that concerns a whole file (unreadable, a directory) when there is no
    line to point at.
    """

    def __init__(self, message: str, loc: Optional[SourceLoc] = None, source_line: Optional[str] = None,
                 file: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.file = file if loc is None else loc.file
        self.source_line = source_line
        if loc is not None and source_line is None:
            try:
                lines = Path(loc.file).read_text().split("\n")
                self.source_line = lines[loc.line - 1] if 0 < loc.line <= len(lines) else None
            except (OSError, ValueError):  # gone, unreadable or not UTF-8: the message stands without the line
                self.source_line = None

    def __str__(self) -> str:
        if self.loc is None:
            return f"{self.file}: error: {self.message}" if self.file else f"error: {self.message}"
        out = f"{self.loc}: error: {self.message}"
        if self.source_line is not None:
            line, col = _window(self.source_line, self.loc.col)
            out += f"\n    {line}\n    {' ' * (col - 1)}^"
        return out


def _window(line: str, col: int, width: int = 100) -> tuple[str, int]:
    """At most `width` characters of a long source line around `col`, and the caret's column in them."""
    if len(line) <= width:
        return line, col
    start = max(0, min(col - 1 - width // 2, len(line) - width))
    shown = line[start:start + width]
    if start > 0:
        shown, col = "..." + shown, col + 3
    if start + width < len(line):
        shown += "..."
    return shown, col - start
