"""Text -> a list of blocks and statements, with positions; lark errors become SpecErrors.

The grammar (grammar/lsm.lark) only fixes the shape of a file: blocks of
`key [qualifier] = value, ...` statements. What keys mean is decided by
`lower.py`, so a misspelled key is reported as such, with its position.

The LALR parser itself takes any nesting, but everything after it walks
trees recursively (this module, the expression builder, sympy, the printer,
and Python compiling the emitted code), so nesting is bounded here, right
after parsing, with an error at the place.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import lark

from ..errors import SpecError
from ..ir.nodes import SourceLoc
from ..paths import GRAMMAR

Value = Union[lark.Tree, lark.Token]

MAX_SPEC_BYTES = 256 * 1024  # library specs are ~1 KiB; this bounds the parser's time on any input
MAX_EXPR_DEPTH = 40  # nested operators and calls in one value; printed code stays under Python's 200 parentheses
MAX_EXPR_NODES = 500  # operators, calls, names and numbers in one statement
MAX_BLOCK_DEPTH = 8  # `key { ... }` inside a block; only one level means anything (attention, moe, ffn)

_EXPR_NODES = {"add", "sub", "mul", "div", "matmul", "neg", "pow", "number", "var", "call", "proj",
               "pattern_cat", "pattern_repeat", "pattern_str"}


def read_source(path: Path, display: str) -> str:
    """A spec file's text: UTF-8 (a BOM allowed), newlines made '\\n' as Python's text mode does.

    Problems with the file as a whole are SpecErrors without a line (`file=display`);
    a byte that is not UTF-8 is a SpecError at its line and column.
    """
    try:
        if path.is_dir():
            raise SpecError("is a directory, not a spec file", file=display)
        if not path.is_file():  # a FIFO or a device would block or never end
            raise SpecError("not a regular file", file=display)
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read the file: {err.strerror or err}", file=display) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"larger than {MAX_SPEC_BYTES // 1024} KiB: not a spec file", file=display)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        loc = SourceLoc(file=display, line=data.count(b"\n", 0, err.start) + 1,
                        col=len(data[start:err.start].decode("utf-8")) + 1)
        line = data[start:].split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
        raise SpecError(f"the file is not UTF-8 text: byte 0x{data[err.start]:02x} ({err.reason})", loc, line) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class Source:
    """One spec file's text, for positions and the caret line of diagnostics."""

    display: str  # the path printed in messages and stored in the IR
    lines: list[str]

    def loc(self, node: Value) -> SourceLoc:
        if isinstance(node, lark.Token):
            return SourceLoc(file=self.display, line=node.line, col=node.column)
        return SourceLoc(file=self.display, line=node.meta.line, col=node.meta.column)

    def line(self, loc: SourceLoc) -> Optional[str]:
        return self.lines[loc.line - 1] if 0 < loc.line <= len(self.lines) else None

    def error(self, message: str, node_or_loc) -> SpecError:
        loc = node_or_loc if isinstance(node_or_loc, SourceLoc) else self.loc(node_or_loc)
        return SpecError(message, loc, self.line(loc))


@dataclass
class Stmt:
    """`key [qual] = values`, `key qual` (a flag), `param key[dims] = value` or `key { body }`."""

    kind: str  # assign | flag | param | block
    key: lark.Token
    qual: Optional[lark.Token] = None
    values: list[Value] = field(default_factory=list)
    dims: list[lark.Token] = field(default_factory=list)
    body: list["Stmt"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.key} {self.qual}" if self.qual is not None else str(self.key)


@dataclass(eq=False)
class Block:
    kind: str  # lsm | model | parallel
    head: Value  # the node whose position is the block's
    name: Optional[lark.Token]
    extends: Optional[lark.Token]
    body: list[Stmt]
    doc: str
    source: Source


@dataclass
class ParsedFile:
    source: Source
    imports: list[lark.Token]  # the STRING tokens, quotes included
    blocks: list[Block]


@lru_cache(maxsize=1)
def parser() -> lark.Lark:
    """The LALR parser, its tables cached in lmoec's cache folder (keyed by the grammar's hash): building them
    is a third of `lmoec check`'s time."""
    from ..runtime.loader import cache_dir

    cache = cache_dir() / "lsm-grammar.lark-cache"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache folder: build the tables every time
        cache = None
    return lark.Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=str(cache) if cache else False,
    )


_TERMINAL_WORDS = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "$END": "end of file"}


@lru_cache(maxsize=1)
def _terminal_names() -> dict[str, str]:
    """Readable names of the grammar's terminals, for 'expected ...' lists."""
    out = dict(_TERMINAL_WORDS)
    for t in parser().terminals:
        if t.name not in out and t.pattern.type == "str":
            out[t.name] = f"'{t.pattern.value}'"
    return out


def _expected(names) -> str:
    words = sorted({_terminal_names().get(n, n) for n in names})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _syntax_error(err: lark.exceptions.UnexpectedInput, src: Source) -> SpecError:
    loc = SourceLoc(file=src.display, line=err.line if err.line > 0 else max(1, len(src.lines)),
                    col=err.column if err.column > 0 else 1)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        msg = f"unexpected character {err.char!r}"
    elif isinstance(err, lark.exceptions.UnexpectedToken) and err.token.type != "$END":
        msg = f"unexpected {_terminal_names().get(err.token.type, err.token.type).removeprefix('a ')} {str(err.token)!r}"
        if err.token.type in ("NAME", "NUMBER", "STRING"):
            msg = f"unexpected {str(err.token)!r}"
        msg += f"; expected {_expected(err.expected)}"
    else:
        expected = getattr(err, "expected", None)
        msg = "unexpected end of file" + (f"; expected {_expected(expected)}" if expected else "")
    return SpecError(f"syntax error: {msg}", loc, src.line(loc))


def _doc_above(lines: list[str], line: int) -> str:
    """The '#' comment block directly above a 1-based line, without the '#'."""
    out: list[str] = []
    i = line - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        out.append(lines[i].lstrip()[1:].removeprefix(" ").rstrip())
        i -= 1
    return "\n".join(reversed(out)).strip()


def _stmts(body: lark.Tree) -> list[Stmt]:
    out = []
    for node in body.children:
        if node.data == "assign":
            key, qual, *values = node.children
            out.append(Stmt("assign", key, qual, values))
        elif node.data == "flag":
            out.append(Stmt("flag", node.children[0], node.children[1]))
        elif node.data == "param":
            name, *dims, init = node.children
            out.append(Stmt("param", name, None, [init], dims=dims))
        elif node.data == "sub_block":
            out.append(Stmt("block", node.children[0], None, body=_stmts(node.children[1])))
    return out


def _check_limits(tree: lark.Tree, src: Source) -> None:
    """Bound expression depth and size and block nesting, walking the tree without recursion."""
    stack: list[tuple[lark.Tree, int, int, Optional[lark.Tree]]] = [(tree, 0, 0, None)]
    sizes: Counter = Counter()
    while stack:
        node, depth, blocks, stmt = stack.pop()
        if node.data in ("assign", "param"):
            stmt = node
        elif node.data == "sub_block":
            blocks += 1
            if blocks > MAX_BLOCK_DEPTH:
                raise src.error(f"blocks nest more than {MAX_BLOCK_DEPTH} deep", node)
        elif node.data in _EXPR_NODES:
            depth += 1
            if depth > MAX_EXPR_DEPTH:
                raise src.error(f"expression nests more than {MAX_EXPR_DEPTH} levels deep "
                                "(every operator and call is a level)", node)
            sizes[id(stmt)] += 1
            if sizes[id(stmt)] > MAX_EXPR_NODES:
                raise src.error(f"value too large: more than {MAX_EXPR_NODES} numbers, names and operators", stmt)
        # leftmost child on top: the first node past a limit is the leftmost one, where a reader starts
        stack.extend((c, depth, blocks, stmt) for c in reversed(node.children) if isinstance(c, lark.Tree))


def parse(text: str, display: str) -> ParsedFile:
    src = Source(display=display, lines=text.split("\n"))
    try:
        tree = parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, src) from None
    _check_limits(tree, src)
    imports, blocks = [], []
    for item in tree.children:
        if item.data == "import_stmt":
            imports.append(item.children[0])
            continue
        if item.data == "parallel_block":
            name, extends, body = None, None, item.children[0]
        else:
            name, extends, body = item.children
            extends = extends.children[0] if extends is not None else None
        kind = item.data.removesuffix("_block")
        blocks.append(Block(kind, item, name, extends, _stmts(body), _doc_above(src.lines, item.meta.line), src))
    return ParsedFile(src, imports, blocks)
