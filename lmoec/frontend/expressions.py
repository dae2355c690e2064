"""Parse-tree expressions -> sympy trees, built node by node from lmoec.ir.expr's vocabulary.

Nothing is ever `sympify`-ed or `eval`-ed: every sympy object here is built
from a grammar node whose kind we checked, so a spec can only say what the
vocabulary allows.
"""
from __future__ import annotations

import re

import lark
import sympy

from ..ir import expr as ex
from .parse import Source, Value

INPUTS = ("x", "q", "k", "v")
_INT = re.compile(r"\d+")
_VARIADIC = {"min", "max"}


def number(token: lark.Token) -> sympy.Expr:
    text = str(token)
    return sympy.Integer(int(text)) if _INT.fullmatch(text) else sympy.Float(text)


def lower_expr(node: Value, symbols: set[str], src: Source) -> sympy.Expr:
    """Build the sympy tree of `node`; names outside `symbols` are errors at their position."""

    def go(n: Value) -> sympy.Expr:
        kind = n.data if isinstance(n, lark.Tree) else None
        if kind == "number":
            return number(n.children[0])
        if kind == "var":
            tok = n.children[0]
            if tok in symbols:
                return sympy.Symbol(str(tok))
            if tok in ex.FUNCTIONS or tok in ex.BUILTINS:
                raise src.error(f"'{tok}' is a function: call it as {tok}(...)", tok)
            raise src.error(f"unknown name '{tok}' (known: {', '.join(sorted(symbols))})", tok)
        if kind == "call":
            return call(n)
        if kind in ("add", "sub", "mul", "div", "pow"):
            a, b = go(n.children[0]), go(n.children[1])
            return {
                "add": lambda: sympy.Add(a, b),
                "sub": lambda: sympy.Add(a, sympy.Mul(sympy.Integer(-1), b)),
                "mul": lambda: sympy.Mul(a, b),
                "div": lambda: sympy.Mul(a, sympy.Pow(b, sympy.Integer(-1))),
                "pow": lambda: sympy.Pow(a, b),
            }[kind]()
        if kind == "neg":
            return sympy.Mul(sympy.Integer(-1), go(n.children[0]))
        if kind == "matmul":
            return matmul(n)
        if kind is not None and kind.startswith("pattern"):
            raise src.error("expected an expression, not a string", n)
        raise src.error(f"not an expression: {kind or n}", n)

    def call(n: lark.Tree) -> sympy.Expr:
        name, *args = n.children
        args = [a for a in args if a is not None]
        if name in ex.FUNCTIONS:
            want = ex.FUNCTIONS[name]
        elif name in _VARIADIC:
            want = None
        elif name in ex.BUILTINS:
            want = 1
        else:
            known = ", ".join(sorted(set(ex.FUNCTIONS) | set(ex.BUILTINS)))
            raise src.error(f"unknown function '{name}' (known: {known})", name)
        if want is not None and len(args) != want:
            raise src.error(f"function '{name}' takes {want} argument{'s' if want != 1 else ''}, got {len(args)}", name)
        if want is None and len(args) < 2:
            raise src.error(f"function '{name}' takes at least 2 arguments, got {len(args)}", name)
        lowered = [go(a) for a in args]
        if name in ex.FUNCTIONS:
            return ex.function(str(name))(*lowered)
        return ex.BUILTINS[str(name)](*lowered)

    def matmul(n: lark.Tree) -> sympy.Expr:
        left, proj = n.children
        inp = go(left)
        weight, rank = proj.children
        if not (ex.free_names(inp) & set(INPUTS)) and not ex.linears(inp):
            raise src.error("the left side of '@' must read an input (x, q, k or v)", n)
        if weight in symbols or weight in ex.FUNCTIONS or weight in ex.BUILTINS:
            raise src.error(f"'{weight}' is not a weight name: it names a symbol or function", weight)
        width = 0
        if rank is not None:
            if not _INT.fullmatch(str(rank)) or int(rank) < 1:
                raise src.error(f"a low-rank width must be a positive integer, got {rank}", rank)
            width = int(rank)
        return ex.linear(inp, str(weight), width)

    result = go(node)
    if result.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise src.error("expression is undefined (division by zero or log of zero)", node)
    return result
