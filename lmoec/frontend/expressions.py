"""Parse-tree expressions -> sympy trees, built node by node from lmoec.ir.expr's vocabulary.

Nothing is ever `sympify`-ed or `eval`-ed: every sympy object here is built
from a grammar node whose kind we checked, so a spec can only say what the
vocabulary allows.

sympy folds numbers exactly as it builds (`9 ** 9 ** 9` would run for hours),
so constants are checked in float64 before a power is built and after every
node: a spec's constants are real, finite float32 values, each error at the
place where a constant leaves that range.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import lark
import sympy

from ..ir import expr as ex
from ..ir.expr import F32_MAX, INT64_BITS
from .parse import Source, Value

INPUTS = ("x", "q", "k", "v")
_INT = re.compile(r"[0-9]+")
_VARIADIC = {"min", "max"}


def _sigmoid(a: float) -> float:
    return 1 / (1 + math.exp(-a)) if a >= 0 else math.exp(a) / (1 + math.exp(a))


def _softplus(a: float) -> float:
    return max(a, 0.0) + math.log1p(math.exp(-abs(a)))


# float64 values of the spec functions, for constant arguments (math raises where a result is not a real)
_FLOAT_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sigmoid": _sigmoid,
    "logsigmoid": lambda a: -_softplus(-a),
    "softplus": _softplus,
    "silu": lambda a: a * _sigmoid(a),
    "swish": lambda a: a * _sigmoid(a),
    "relu": lambda a: max(a, 0.0),
    "elu": lambda a: a if a > 0 else math.expm1(a),
    "tanh": math.tanh,
    "l2norm": lambda a: math.copysign(1.0, a) if a else 0.0,
    "exp": math.exp,
    "log": math.log,
    "Abs": abs,
    "Min": min,
    "Max": max,
}
assert set(ex.FUNCTIONS) <= set(_FLOAT_FUNCTIONS)


class _NotReal(ArithmeticError):
    """A constant with no real value (log of a negative number, a fractional power of one)."""


def float_value(e: sympy.Basic) -> float:
    """The float64 value of a constant expression (no symbols); OverflowError, ZeroDivisionError, _NotReal."""
    if isinstance(e, sympy.Rational):
        return int(e.p) / int(e.q)
    if isinstance(e, (sympy.Float, sympy.NumberSymbol)):
        return float(e)
    args = [float_value(a) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(args)
    if isinstance(e, sympy.Mul):
        return math.prod(args)
    if isinstance(e, sympy.Pow):
        return _pow(*args)
    name = type(e).__name__
    if name in _FLOAT_FUNCTIONS:
        try:
            return _FLOAT_FUNCTIONS[name](*args)
        except ValueError:
            raise _NotReal(name) from None
    raise _NotReal(f"{e} has no real value")


def _pow(base: float, exponent: float) -> float:
    if base == 0 and exponent < 0:
        raise ZeroDivisionError("0 to a negative power")
    try:
        return math.pow(base, exponent)
    except ValueError:
        raise _NotReal("a fractional power of a negative number") from None


def number(token: lark.Token) -> sympy.Expr:
    """A literal; the caller has checked its range."""
    text = str(token)
    return sympy.Integer(int(text)) if _INT.fullmatch(text) else sympy.Float(float(text))


def lower_expr(node: Value, symbols: set[str], src: Source) -> sympy.Expr:
    """Build the sympy tree of `node`; names outside `symbols` are errors at their position."""
    values: dict[sympy.Basic, float] = {}

    def value(e: sympy.Basic, at: Value) -> float:
        """The float64 value of constant `e`; an error at `at` unless it is a real, finite float32 value."""
        if e not in values:
            try:
                v = float_value(e)
            except ZeroDivisionError:
                raise src.error("expression is undefined (division by zero)", at) from None
            except _NotReal:
                raise src.error("expression is not a real number (log or fractional power of a negative "
                                "number, or log of zero)", at) from None
            except OverflowError:
                v = math.inf
            if not abs(v) <= F32_MAX:
                raise src.error(f"constant out of range: spec numbers are finite float32 values "
                                f"(|x| <= {F32_MAX:.4g}), this is {_magnitude(v)}", at)
            values[e] = v
        return values[e]

    def checked(e: sympy.Expr, at: Value) -> sympy.Expr:
        if not e.free_symbols:
            value(e, at)
        return e

    def go(n: Value) -> sympy.Expr:
        return checked(build(n), n)

    def build(n: Value) -> sympy.Expr:
        kind = n.data if isinstance(n, lark.Tree) else None
        if kind == "number":
            return literal(n)
        if kind == "var":
            tok = n.children[0]
            if tok in symbols:
                return sympy.Symbol(str(tok))
            if tok in ex.FUNCTIONS or tok in ex.BUILTINS:
                raise src.error(f"'{tok}' is a function: call it as {tok}(...)", tok)
            raise src.error(f"unknown name '{tok}' (known: {', '.join(sorted(symbols))})", tok)
        if kind == "call":
            return call(n)
        if kind in ("add", "sub", "mul", "div"):
            a, b = go(n.children[0]), go(n.children[1])
            if kind == "div" and not b.free_symbols and value(b, n.children[1]) == 0:
                raise src.error("expression is undefined (division by zero)", n)
            return {
                "add": lambda: sympy.Add(a, b),
                "sub": lambda: sympy.Add(a, sympy.Mul(sympy.Integer(-1), b)),
                "mul": lambda: sympy.Mul(a, b),
                "div": lambda: sympy.Mul(a, sympy.Pow(b, sympy.Integer(-1))),
            }[kind]()
        if kind == "pow":
            return power(n, go(n.children[0]), go(n.children[1]))
        if kind == "neg":
            return sympy.Mul(sympy.Integer(-1), go(n.children[0]))
        if kind == "matmul":
            return matmul(n)
        if kind is not None and kind.startswith("pattern"):
            raise src.error("expected an expression, not a string", n)
        raise src.error(f"not an expression: {kind or n}", n)

    def literal(n: lark.Tree) -> sympy.Expr:
        text = str(n.children[0])
        # a float32 value has at most 39 integer digits: longer text is out of range before int() reads it
        if _INT.fullmatch(text) and len(text.lstrip("0")) > 39 or not abs(float(text)) <= F32_MAX:
            raise src.error(f"number out of range: spec numbers are finite float32 values (|x| <= {F32_MAX:.4g})", n)
        return number(n.children[0])

    def power(n: lark.Tree, base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
        """sympy raises numbers to integer powers exactly, also a base's factor ((2*h)**n = 2**n * h**n):
        check those powers in float64 first, so exact arithmetic stays within float32 magnitudes."""
        if not exponent.free_symbols:
            e = value(exponent, n.children[1])
            if not base.free_symbols:
                b = value(base, n.children[0])
                try:
                    result = _pow(b, e)
                except ZeroDivisionError:
                    raise src.error("expression is undefined (division by zero)", n) from None
                except _NotReal:
                    raise src.error("expression is not a real number (a fractional power of a negative number)", n) from None
                except OverflowError:
                    result = math.inf
                if not abs(result) <= F32_MAX:
                    raise src.error(f"constant out of range: spec numbers are finite float32 values "
                                    f"(|x| <= {F32_MAX:.4g}), this is {_magnitude(result)}", n)
            else:
                coeff, _ = base.as_coeff_Mul()
                c = abs(float_value(coeff))
                if c not in (0.0, 1.0) and abs(math.log(c) * e) > math.log(F32_MAX):
                    raise src.error(f"constant factor out of range: {coeff} ** {exponent} is beyond float32 "
                                    f"(|x| <= {F32_MAX:.4g})", n)
        return sympy.Pow(base, exponent)

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
        if name in ("log", "sqrt") and not lowered[0].free_symbols:
            arg = value(lowered[0], args[0])
            if arg < 0 or (name == "log" and arg == 0):
                raise src.error(f"{name}({_magnitude(arg)}) is not a real number", n)
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
            if not _INT.fullmatch(str(rank)) or len(str(rank)) > 9 or int(rank) < 1:
                raise src.error(f"a low-rank width must be a positive integer below 10**9, got {rank}", rank)
            width = int(rank)
        return ex.linear(inp, str(weight), width)

    result = go(node)
    if result.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise src.error("expression is undefined (division by zero or log of zero)", node)
    if result.has(sympy.I):
        raise src.error("expression is not a real number", node)
    return _fit_numbers(result, lambda message: src.error(message, node))


def _fit_numbers(e: sympy.Expr, error: Callable[[str], Exception]) -> sympy.Expr:
    """Check the numbers sympy folded together (`2 * x * 1e38 * 10` has the factor 2e39), and round exact
    fractions too long for an int64 literal to float64."""
    swap = {}
    for n in e.atoms(sympy.Number):
        p, q = (int(n.p), int(n.q)) if isinstance(n, sympy.Rational) else (None, None)
        if p is not None and abs(p) > F32_MAX * q or p is None and not abs(float(n)) <= F32_MAX:
            raise error(f"constant out of range after folding: spec numbers are finite float32 values "
                        f"(|x| <= {F32_MAX:.4g})")
        if p is not None and max(abs(p).bit_length(), q.bit_length()) > INT64_BITS:
            swap[n] = sympy.Float(p / q)
    return e.xreplace(swap) if swap else e


def _magnitude(v: float) -> str:
    return "infinite (it overflows)" if math.isinf(v) else f"{v:.4g}"
