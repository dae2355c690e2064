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

import math
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


# ---- value bounds -----------------------------------------------------------

_INF = float("inf")


def _monotone(f):
    """Bounds of an increasing function over an interval."""
    return lambda lo, hi: (f(lo), f(hi))


def _softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z))) if math.isfinite(z) else max(z, 0.0)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z > -700 else 0.0


# the functions a spec may call, as maps of an input interval to an output interval (silu and elu dip below 0 and
# rise again: their minimum over the reals bounds them from below)
_FUNCTION_BOUNDS = {
    "sigmoid": _monotone(_sigmoid),
    "logsigmoid": _monotone(lambda z: -_softplus(-z)),
    "softplus": _monotone(_softplus),
    "tanh": _monotone(math.tanh),
    "relu": _monotone(lambda z: max(z, 0.0)),
    "silu": lambda lo, hi: (-0.2785, hi if hi <= 0 or not math.isfinite(hi) else hi * _sigmoid(hi)),
    "swish": lambda lo, hi: (-0.2785, hi if hi <= 0 or not math.isfinite(hi) else hi * _sigmoid(hi)),
    "elu": lambda lo, hi: (max(-1.0, math.expm1(lo)) if math.isfinite(lo) else -1.0, hi),
}
_POSITIVE = {"H": 1.0, "K": 1.0, "V": 1.0, "layers": 1.0, "h": 0.0, "layer": 0.0}  # dims and indices: lower ends


def _power(base: float, exponent: float) -> float:
    """base ** exponent for base > 0, saturating at 0 and inf instead of raising."""
    if base == 1:
        return 1.0
    if math.isinf(exponent):
        return _INF if (base > 1) == (exponent > 0) else 0.0
    try:
        return base ** exponent
    except OverflowError:
        return _INF


def _mul(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    products = [x * y if x and y else 0.0 for x in a for y in b]  # 0 * inf is 0 here: an exact zero factor
    return min(products), max(products)


def bounds(expr: sympy.Expr) -> tuple[float, float]:
    """An interval (lo, hi) that holds every value `expr` takes, whatever its inputs and parameters (+-inf where
    nothing bounds it). Interval arithmetic over the vocabulary: sound, not tight (x - x gets (-inf, inf)). Where
    float arithmetic fails (an overflow, inf - inf), the answer is the whole line, which is always sound."""
    try:
        lo, hi = _node_bounds(expr)
    except (OverflowError, ValueError, ZeroDivisionError):
        return -_INF, _INF
    return (lo, hi) if lo <= hi else (-_INF, _INF)  # NaN compares false


def _node_bounds(expr: sympy.Expr) -> tuple[float, float]:
    """bounds() of one node from its arguments' bounds."""
    if expr.is_Number or expr in (sympy.pi, sympy.E):
        value = float(expr)
        return value, value
    if isinstance(expr, sympy.Symbol):
        return (_POSITIVE[expr.name], _INF) if expr.name in _POSITIVE else (-_INF, _INF)
    parts = [bounds(a) for a in expr.args] if not (isinstance(expr, sympy.Function) and expr.func == Linear) else []
    if isinstance(expr, sympy.Add):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(expr, sympy.Mul):
        out = (1.0, 1.0)
        for p in parts:
            out = _mul(out, p)
        return out
    if isinstance(expr, sympy.Pow) and expr.exp.is_Number:
        (lo, hi), e = parts[0], float(expr.exp)
        if lo > 0:  # a positive base: monotone in it
            ends = sorted([lo ** e if math.isfinite(lo) else (0.0 if e < 0 else _INF), hi ** e if math.isfinite(hi) else (0.0 if e < 0 else _INF)])
            return ends[0], ends[1]
        if e > 0 and e == int(e) and int(e) % 2 == 0:
            return 0.0, _INF
        return -_INF, _INF
    if isinstance(expr, sympy.Pow) and expr.base.is_Number and float(expr.base) > 0:  # b ** e: monotone in e
        b, (lo, hi) = float(expr.base), parts[1]
        ends = sorted(_power(b, x) for x in (lo, hi))
        return ends[0], ends[1]
    if isinstance(expr, sympy.exp):
        lo, hi = parts[0]
        return math.exp(min(lo, 709.0)), math.exp(min(hi, 709.0)) if hi < 709 else _INF
    if isinstance(expr, sympy.log) and parts[0][0] > 0:
        return math.log(parts[0][0]), math.log(parts[0][1]) if math.isfinite(parts[0][1]) else _INF
    if isinstance(expr, sympy.Abs):
        lo, hi = parts[0]
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
    if isinstance(expr, (sympy.Min, sympy.Max)):
        pick = min if isinstance(expr, sympy.Min) else max
        return pick(p[0] for p in parts), pick(p[1] for p in parts)
    if isinstance(expr, sympy.Function) and expr.func.__name__ in _FUNCTION_BOUNDS and len(parts) == 1:
        return _FUNCTION_BOUNDS[expr.func.__name__](*parts[0])
    return -_INF, _INF


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
