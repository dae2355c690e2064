"""Spec expressions as sympy trees, with an eval-free JSON form.

Gates, betas and constant decays are written in a spec as expressions
(`logsigmoid(x @ W_g[16] @ W_g2) / 16`). The frontend parses them with the
grammar and builds sympy trees from the vocabulary below; nothing here ever
calls `sympify`/`eval` on text. The JSON form is a plain tree of
`{"op": ..., "args": [...]}` so an IR dump can be read back without eval.

Vocabulary
- symbols: `x` (layer input [B,T,hidden]), `q`/`k`/`v` (per-head projections,
  after feature maps), `h` (head index, 0-based), `H`, `K`, `V` (heads and head
  dims), `layer` (0-based layer index), and the names of declared parameters.
- `Linear(input, W, out)`: a learned projection `input @ W`. `out` is an
  integer width (a low-rank bottleneck, `W[16]`) or 0, meaning "as wide as
  the slot it feeds" (H for a scalar gate, H*K for a vector gate, ...).
- elementwise functions in `FUNCTIONS` plus sympy's exp, log, Abs, Min, Max.
"""
from __future__ import annotations

from typing import Any

import sympy

# Elementwise functions a spec may call, beyond sympy's own exp/log/Min/Max/Abs.
# name -> number of arguments
FUNCTIONS: dict[str, int] = {
    "sigmoid": 1,
    "logsigmoid": 1,
    "softplus": 1,
    "silu": 1,
    "swish": 1,
    "relu": 1,
    "elu": 1,
    "tanh": 1,
    "l2norm": 1,
}

# sympy builtins allowed in specs, by spec name
BUILTINS: dict[str, Any] = {
    "exp": sympy.exp,
    "log": sympy.log,
    "abs": sympy.Abs,
    "min": sympy.Min,
    "max": sympy.Max,
    "sqrt": sympy.sqrt,
}

RESERVED_SYMBOLS = ("x", "q", "k", "v", "h", "H", "K", "V", "layer", "layers")

# Every number in an expression is a finite float32 value (what kernels and layers compute in), and
# exact fractions stay small enough to print as int64 literals (PyTorch can't take a larger int).
F32_MAX = 3.4028234663852886e38
INT64_BITS = 63

_FUNCTION_CLASSES: dict[str, type[sympy.Function]] = {name: sympy.Function(name) for name in FUNCTIONS}
Linear = sympy.Function("Linear")


def function(name: str) -> type[sympy.Function]:
    """The sympy class of a spec function (sigmoid, logsigmoid, ...)."""
    return _FUNCTION_CLASSES[name]


def linear(inp: sympy.Expr, weight: str, out: int = 0) -> sympy.Expr:
    return Linear(inp, sympy.Symbol(weight), sympy.Integer(out))


def linears(expr: sympy.Expr) -> list[sympy.Expr]:
    """All projections inside an expression, innermost first."""
    found: list[sympy.Expr] = []

    def walk(e: sympy.Basic) -> None:
        for a in e.args:
            walk(a)
        if isinstance(e, sympy.Function) and e.func == Linear:
            found.append(e)

    walk(expr)
    return found


def free_names(expr: sympy.Expr) -> set[str]:
    """Names of symbols an expression reads, projection weights excluded."""
    names: set[str] = set()

    def walk(e: sympy.Basic) -> None:
        if isinstance(e, sympy.Function) and e.func == Linear:
            walk(e.args[0])
            return
        if isinstance(e, sympy.Symbol):
            names.add(e.name)
        for a in e.args:
            walk(a)

    walk(expr)
    return names


# ---- JSON form -------------------------------------------------------------

def to_json(expr: sympy.Basic) -> Any:
    """A JSON tree of an expression: numbers, {"sym"}, {"op", "args"}."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Rational):
        return {"op": "Rational", "args": [int(expr.p), int(expr.q)]}
    if isinstance(expr, sympy.Float):
        return float(expr)
    if isinstance(expr, sympy.Symbol):
        return {"sym": expr.name}
    if expr is sympy.pi:
        return {"sym": "pi"}
    if expr is sympy.E:
        return {"sym": "E"}
    if isinstance(expr, sympy.Function) and not isinstance(expr, (sympy.exp, sympy.log, sympy.Abs, sympy.Min, sympy.Max)):
        name = expr.func.__name__
    else:
        name = type(expr).__name__
    return {"op": name, "args": [to_json(a) for a in expr.args]}


_JSON_OPS: dict[str, Any] = {
    "Add": lambda *a: sympy.Add(*a),
    "Mul": lambda *a: sympy.Mul(*a),
    "Pow": lambda b, e: sympy.Pow(b, e),
    "Rational": lambda p, q: sympy.Rational(p, q),
    "exp": sympy.exp,
    "log": sympy.log,
    "Abs": sympy.Abs,
    "Min": sympy.Min,
    "Max": sympy.Max,
    "Linear": lambda i, w, o: Linear(i, w, o),
    **{name: cls for name, cls in _FUNCTION_CLASSES.items()},
}


def from_json(tree: Any) -> sympy.Expr:
    """Inverse of `to_json`; raises ValueError on anything outside the vocabulary."""
    if isinstance(tree, bool):
        raise ValueError(f"not an expression: {tree!r}")
    if isinstance(tree, int):
        return sympy.Integer(tree)
    if isinstance(tree, float):
        return sympy.Float(tree)
    if isinstance(tree, dict) and "sym" in tree:
        return {"pi": sympy.pi, "E": sympy.E}.get(tree["sym"], sympy.Symbol(tree["sym"]))
    if isinstance(tree, dict) and tree.get("op") in _JSON_OPS:
        args = [from_json(a) if not (tree["op"] == "Rational") else a for a in tree["args"]]
        return _JSON_OPS[tree["op"]](*args)
    raise ValueError(f"not an expression: {tree!r}")
