"""Spec text in generated code: only as data, through this module.

A spec is shared like a config file, so nothing written in it may become code (docs/LANGUAGE.md). Two kinds
of spec values reach templates:

- names and numbers are code: the contexts type them (`Name`, ints, finite floats), so what is pasted is an
  identifier or a number literal, whatever the IR held (a checkpoint's ir.json is not frontend-checked);
- free text (doc comments, the spec's path) is data: it enters a template only through the `docstring`
  and `comment` filters, which share one escaping rule (`_escape`).
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the grammar's NAME (grammar/lsm.lark)


def check_name(value: str) -> str:
    """`value` if it is a name (what the grammar's NAME accepts), else ValueError: names become identifiers."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a name (letters, digits and _, not starting with a digit)")
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _escape(text: str, newlines: bool) -> str:
    """`text` with backslashes and non-printable characters written as Python escapes (newlines kept if asked).

    Non-printable covers NUL, carriage return, form feed, the line and paragraph separators that
    `str.splitlines` breaks at, and bidirectional controls (text that reads otherwise than it runs).
    """
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() or (newlines and ch == "\n") else repr(ch)[1:-1] for ch in text
    )


def docstring(text: str) -> str:
    """A triple-quoted literal whose value is `text`, with trailing whitespace of each line dropped (as render() drops it).

    A quote that is last or next to another is escaped, so the body never closes the literal early.
    """
    body = _escape("\n".join(line.rstrip() for line in text.split("\n")), newlines=True)
    return '"""' + re.sub(r'"(?="|\Z)', r'\\"', body) + '"""'


def comment(text: str) -> str:
    """`text` as the body of one `#` comment line.

    No line break survives, and no encoding declaration: `coding:` on one of a file's first two lines
    (PEP 263) would have Python decode it as, say, UTF-7, in which plain ASCII spells a newline or quotes.
    """
    return re.sub(r"(?<=coding)[:=]", lambda m: f"\\x{ord(m.group()):02x}", _escape(text, newlines=False))
