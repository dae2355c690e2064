"""Print spec expressions (sympy trees, lmoec/ir/expr.py) as PyTorch source text.

The emitted layer modules compute gates, decays and inits with this code.
Printing walks the tree and writes text; no spec text is ever evaluated, and
every name that reaches the output is checked to be a plain identifier that
the caller mapped (unknown names are a ValueError, so nothing a spec writes can
smuggle code into the output).

Shapes: `x` is the layer input [B, T, hidden]; a projection `Linear(inp, W, r)`
is `self.W(inp)` of width r, or, with r = 0, as wide as the slot the
expression feeds. The outermost slot-wide projection is reshaped to the slot's
per-head shape (e.g. [B, T, H, K]), so it combines with per-head tensors (q, k,
v) and per-head parameters ([H], [H, K]) by broadcasting.
"""
from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass
from typing import Optional

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from ..ir import expr as ex

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# spec function -> PyTorch callable (F is torch.nn.functional; l2norm is a helper the layer module defines)
TORCH_FUNCTIONS: dict[str, str] = {
    "sigmoid": "torch.sigmoid",
    "logsigmoid": "F.logsigmoid",
    "softplus": "F.softplus",
    "silu": "F.silu",
    "swish": "F.silu",
    "relu": "F.relu",
    "elu": "F.elu",
    "tanh": "torch.tanh",
    "l2norm": "l2norm",
}
assert set(TORCH_FUNCTIONS) == set(ex.FUNCTIONS), "every spec function needs a PyTorch spelling"


def check_identifier(name: str, what: str) -> str:
    """`name` if it is a plain Python identifier; a ValueError otherwise."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise ValueError(f"{what} {name!r} is not a plain identifier")
    return name


@dataclass(frozen=True)
class Slot:
    """Where an expression's value goes: its flat width and, if per head, the shape to unflatten to."""

    width: str  # code, e.g. "self.heads * self.head_k"
    unflatten: Optional[str] = None  # code of the per-head shape, e.g. "(self.heads, self.head_k)"


@dataclass(frozen=True)
class Projection:
    """One learned projection `nn.Linear(in_features, out_features, bias=False)` named `weight`."""

    weight: str
    in_features: str
    out_features: str


class TorchPrinter(StrPrinter):
    """Prints one expression.

    symbols: spec name -> code (e.g. {"x": "x", "H": "self.heads", "A_log": "self.A_log"}).
    tensors: the spec names whose code is a tensor; the rest are Python numbers,
        so a sub-expression reading none of them is printed with `math`.
    slot: what a 0-width projection is as wide as; None forbids projections.
    hidden: code of the width of `x`.
    extra_arg: code passed to every projection after its input (a memory layer's per-memory
        projections take the routing plan: `self.W(x, slots)`); "" for none.
    """

    def __init__(
        self,
        symbols: Optional[dict[str, str]] = None,
        tensors: frozenset[str] = frozenset(),
        slot: Optional[Slot] = None,
        hidden: str = "self.hidden",
        extra_arg: str = "",
    ):
        super().__init__()
        self.symbols = dict(symbols or {})
        for name in self.symbols:
            check_identifier(name, "symbol")
        self.tensors = frozenset(tensors)
        self.slot = slot
        self.hidden = hidden
        self.extra_arg = extra_arg
        self._projecting = 0  # > 0 while printing a projection's input: projections there stay flat

    # ---- entry points -------------------------------------------------

    def doprint(self, expr: sympy.Basic) -> str:  # noqa: D102
        if not isinstance(expr, sympy.Basic):
            raise ValueError(f"not an expression: {expr!r}")
        return super().doprint(expr)

    def projections(self, expr: sympy.Basic) -> list[Projection]:
        """The projections an expression needs, innermost first, with their widths."""
        return [Projection(str(p.args[1]), self._width(p.args[0]), self._out_width(p)) for p in ex.linears(expr)]

    # ---- helpers -------------------------------------------------------

    def _is_tensor(self, expr: sympy.Basic) -> bool:
        return bool(ex.free_names(expr) & self.tensors) or bool(ex.linears(expr))

    def _out_width(self, proj: sympy.Basic) -> str:
        out = proj.args[2]
        if not isinstance(out, sympy.Integer) or int(out) < 0:
            raise ValueError(f"projection {proj.args[1]} has a bad width {out}")
        if int(out) > 0:
            return str(int(out))
        if self.slot is None:
            raise ValueError(f"projection @ {proj.args[1]} is not allowed here (no input x)")
        return self.slot.width

    def _width(self, expr: sympy.Basic) -> str:
        """Flat width of the input of a projection: x, another projection, or elementwise ops of them."""
        if isinstance(expr, sympy.Symbol):
            if expr.name == "x":
                return self.hidden
            raise ValueError(f"a projection reads {expr.name!r}; projections read x (or other projections of x)")
        if isinstance(expr, sympy.Function) and expr.func == ex.Linear:
            return self._out_width(expr)
        widths = {self._width(a) for a in expr.args if self._is_tensor(a)}
        if len(widths) != 1:
            raise ValueError(f"cannot tell the width of projection input {expr}: it mixes widths {sorted(widths)}")
        return widths.pop()

    def _call(self, fn: str, *args: sympy.Basic) -> str:
        return f"{fn}({', '.join(self._print(a) for a in args)})"

    def _elementwise(self, expr: sympy.Basic, torch_fn: str, math_fn: str) -> str:
        if self._is_tensor(expr):
            return self._call(torch_fn, *expr.args)
        if not expr.free_symbols:  # a constant: the frontend has checked it is a finite float32 value
            return self._call(math_fn, *expr.args)
        return f"{torch_fn}({', '.join(self._float64(a) for a in expr.args)})"

    def _float64(self, expr: sympy.Basic) -> str:
        """A number that reads H, K, V or layer, as a float64 0-d tensor: where Python's math raises on overflow
        or a negative argument and its ints grow past what PyTorch takes, a tensor gives inf or nan."""
        return f"torch.as_tensor({self._print(expr)}, dtype=torch.float64)"

    # ---- atoms -------------------------------------------------------------

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        if expr.name not in self.symbols:
            known = ", ".join(sorted(self.symbols)) or "none"
            raise ValueError(f"unknown name {expr.name!r} in this expression (known here: {known})")
        return self.symbols[expr.name]

    def _print_Integer(self, expr: sympy.Integer) -> str:
        # Python ints times the layer's sizes (ints) must stay within the int64 that PyTorch takes: large ones are floats
        return str(int(expr)) if abs(int(expr)) < 2**31 else repr(float(expr))

    def _print_Float(self, expr: sympy.Float) -> str:
        value = float(expr)
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value} in an expression")
        return repr(value)

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return f"{int(expr.p)}/{int(expr.q)}"

    def _print_Pi(self, expr) -> str:
        return "math.pi"

    def _print_Exp1(self, expr) -> str:
        return "math.e"

    def _print_NaN(self, expr) -> str:
        raise ValueError("nan in an expression")

    _print_Infinity = _print_NegativeInfinity = _print_ComplexInfinity = _print_NaN

    # ---- operators -------------------------------------------------------

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exp = expr.args
        if exp == sympy.S.Half:
            return self._elementwise(sympy.Function("sqrt")(base), "torch.sqrt", "math.sqrt")
        if exp == -sympy.S.Half:
            if self._is_tensor(base):
                return self._call("torch.rsqrt", base)
            if isinstance(base, sympy.Symbol) or not base.free_symbols:  # a size (>= 1) or a checked constant
                return f"(1 / {self._call('math.sqrt', base)})"
            return f"torch.rsqrt({self._float64(base)})"
        prec = PRECEDENCE["Pow"]
        exp_text = self._print(exp)
        if not (isinstance(exp, sympy.Integer) and exp >= 0):
            exp_text = f"({exp_text})"
        if not self._is_tensor(expr) and expr.free_symbols:
            return f"{self._float64(base)}**{exp_text}"
        return f"{self.parenthesize(base, prec, strict=True)}**{exp_text}"

    def _print_Function(self, expr: sympy.Function) -> str:
        name = expr.func.__name__
        if expr.func == ex.Linear:
            return self._print_Linear(expr)
        if name in TORCH_FUNCTIONS:
            (arg,) = expr.args
            text = self._print(arg)
            if not self._is_tensor(arg):  # a spec function of a constant: make it a 0-d tensor
                text = f"torch.tensor(float({text}), dtype=torch.float64)"
            return f"{TORCH_FUNCTIONS[name]}({text})"
        raise ValueError(f"unknown function {name!r} (known: {', '.join(sorted(TORCH_FUNCTIONS))}, exp, log, abs, min, max, sqrt)")

    def _print_exp(self, expr: sympy.exp) -> str:
        return self._elementwise(expr, "torch.exp", "math.exp")

    def _print_log(self, expr: sympy.log) -> str:
        if len(expr.args) != 1:
            raise ValueError(f"log takes one argument: {expr}")
        return self._elementwise(expr, "torch.log", "math.log")

    def _print_Abs(self, expr: sympy.Abs) -> str:
        return self._elementwise(expr, "torch.abs", "abs")

    def _print_Min(self, expr: sympy.Min) -> str:
        return self._min_max(expr, "min")

    def _print_Max(self, expr: sympy.Max) -> str:
        return self._min_max(expr, "max")

    def _min_max(self, expr: sympy.Basic, which: str) -> str:
        """Tensor with tensor: torch.minimum/maximum; tensor with a number: clamp; numbers: min/max."""
        tensors = [a for a in expr.args if self._is_tensor(a)]
        numbers = [a for a in expr.args if not self._is_tensor(a)]
        if not tensors:
            return self._call(which, *numbers)
        text = self._print(tensors[0])
        for t in tensors[1:]:
            text = f"torch.{which}imum({text}, {self._print(t)})"
        if numbers:
            bound = self._print(numbers[0]) if len(numbers) == 1 else self._call(which, *numbers)
            text = f"torch.clamp({text}, {'max' if which == 'min' else 'min'}={bound})"
        return text

    def _print_Linear(self, expr: sympy.Basic, inner: bool = False) -> str:
        inp, weight, _ = expr.args
        name = check_identifier(str(weight), "projection weight")
        self._out_width(expr)  # checks the width and that projections are allowed here
        if isinstance(inp, sympy.Function) and inp.func == ex.Linear:
            inner_text = self._print_Linear(inp, inner=True)
        else:
            self._width(inp)  # the input must be made of x and projections
            self._projecting += 1
            inner_text = self._print(inp)
            self._projecting -= 1
        text = f"self.{name}({inner_text}{', ' + self.extra_arg if self.extra_arg else ''})"
        if not (inner or self._projecting) and int(expr.args[2]) == 0 and self.slot is not None and self.slot.unflatten:
            text = f"{text}.unflatten(-1, {self.slot.unflatten})"
        return text

    def emptyPrinter(self, expr) -> str:  # noqa: N802 - sympy's hook name
        raise ValueError(f"cannot print {type(expr).__name__} {expr!r} as PyTorch code")

    def _print_Basic(self, expr) -> str:
        raise ValueError(f"cannot print {type(expr).__name__} {expr} as PyTorch code")


def print_torch(
    expr: sympy.Basic,
    symbols: dict[str, str],
    tensors: frozenset[str] | set[str] = frozenset(),
    slot: Optional[Slot] = None,
    hidden: str = "self.hidden",
    extra_arg: str = "",
) -> str:
    """PyTorch source text of one spec expression (see TorchPrinter)."""
    return TorchPrinter(symbols=symbols, tensors=frozenset(tensors), slot=slot, hidden=hidden, extra_arg=extra_arg).doprint(expr)


def projections_of(expr: sympy.Basic, slot: Optional[Slot], hidden: str = "self.hidden") -> list[Projection]:
    """The projections `expr` needs, with their input and output widths as code."""
    return TorchPrinter(slot=slot, hidden=hidden, tensors=frozenset({"x"})).projections(expr)
