"""The tensor shapes of an LSM's expressions in its layer, from the IR alone.

Each data-dependent expression fills a slot of the op (DESIGN.md's conventions):

    scalar     [B, T, H]      decay scalar, delta beta, update lr / momentum / weight_decay
    per_key    [B, T, H, K]   decay vector, dplr a and b
    per_key    [B, T, H, K]   query, key (given instead of projected)
    per_value  [B, T, H, V]   output_gate, skip, decay value, decay step
    rate       [H, V, K]      decay rate (a learned matrix: no B, T)

In the layer, `x` is [B, T, hidden]; `q`, `k` are [B, T, H, K] and `v` is
[B, T, H, V] (V counts as K where the two are always equal: one expansion and
no feature map that changes K); `h` is the head index, laid along the slot's H axis; a param has
its declared dims, except that a per-head param [H] lies along the slot's H
axis as h does; numbers and H, K, V, layer are scalars. Tensors combine by
broadcasting from the last axis, as PyTorch does. A projection `inp @ W[r]` is
a flat nn.Linear: its input is x or other projections (flat widths that must
agree), its output r wide or, with no width, as wide as the slot (H, H*K or
H*V) and then laid out per head as the slot is. One weight has one shape.

`check_shapes(lsm)` checks every expression of an LSM and raises ShapeError
with a message naming the statement; the validate pass turns it into a
SpecError at that statement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import sympy

from . import expr as ex
from .nodes import LSMSpec

Dim = Union[str, int]  # a dim name (B, T, H, K, V, hidden) or a width
Width = Union[str, int]  # a flat width: hidden, H, H*K, H*V, or a low-rank width


class ShapeError(ValueError):
    """An expression whose shape doesn't fit where the layer uses it; `field` names the statement."""

    def __init__(self, message: str, *field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Slot:
    what: str  # e.g. "decay vector", for messages
    field: tuple[str, ...]  # the statement, as validate's position keys: ("decay",), ("dplr", "a")
    per_head: tuple[Dim, ...]  # the slot's shape after [B, T]
    flat: Width  # the width of an unsized projection that feeds it


SCALAR = ("H",)


def _slots(lsm: LSMSpec) -> list[tuple[Slot, sympy.Expr]]:
    out = []
    if lsm.decay.kind in ("scalar", "vector") and lsm.decay.expr is not None:
        if lsm.decay.kind == "scalar":
            out.append((Slot("decay scalar", ("decay",), ("H",), "H"), lsm.decay.expr))
        else:
            out.append((Slot("decay vector", ("decay",), ("H", "K"), "H*K"), lsm.decay.expr))
    if lsm.delta is not None:
        out.append((Slot("delta beta", ("delta",), ("H",), "H"), lsm.delta.beta))
    if lsm.update is not None:
        out += [(Slot(f"update {key}", ("update", key), ("H",), "H"), e) for key, e in lsm.update.gates()]
    if lsm.dplr is not None:
        out += [(Slot(f"dplr {part}", ("dplr", part), ("H", "K"), "H*K"), getattr(lsm.dplr, part)) for part in ("a", "b")]
    for part in ("value", "step"):
        if getattr(lsm.decay, part) is not None:
            out.append((Slot(f"decay {part}", ("decay", part), ("H", "V"), "H*V"), getattr(lsm.decay, part)))
    if lsm.output_gate is not None:
        out.append((Slot("output_gate", ("output_gate",), ("H", "V"), "H*V"), lsm.output_gate))
    if lsm.skip is not None:
        out.append((Slot("skip", ("skip",), ("H", "V"), "H*V"), lsm.skip))
    for side in ("query", "key"):
        if getattr(lsm, side) is not None:
            out.append((Slot(side, (side,), ("H", "K"), "H*K"), getattr(lsm, side)))
    return out


def _show(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class _Shapes:
    def __init__(self, lsm: LSMSpec):
        self.lsm = lsm
        # V is K where the two are always equal: same expansion, and no feature map that changes K
        same = (lsm.expand_k == lsm.expand_v and lsm.head_k is None and lsm.head_v is None
                and not {"taylor2", "rebased"} & set(lsm.feature_map_q + lsm.feature_map_k))
        self.v_dim = "K" if same else "V"
        self.weights: dict[str, tuple[Width, Width, str]] = {}  # name -> (in, out, where first used)

    def dim(self, name: str) -> Dim:
        return self.v_dim if name == "V" else name

    def broadcast(self, slot: Slot, a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
        out = []
        for i in range(1, max(len(a), len(b)) + 1):
            da = a[-i] if i <= len(a) else 1
            db = b[-i] if i <= len(b) else 1
            if da != db and 1 not in (da, db):
                raise ShapeError(f"{slot.what}: a {_show(a)} and a {_show(b)} tensor don't line up "
                                 "(tensors broadcast from the last axis)", *slot.field)
            out.append(db if da == 1 else da)
        return tuple(reversed(out))

    def shape(self, e: sympy.Basic, slot: Slot) -> tuple[Dim, ...]:
        """The shape `e` has in the layer, where it feeds `slot`."""
        if isinstance(e, sympy.Symbol):
            name = e.name
            if name == "x":
                return ("B", "T", "hidden")
            if name in ("q", "k"):
                return ("B", "T", "H", "K")
            if name == "v":
                return ("B", "T", "H", self.v_dim)
            if name == "h":
                return ("H",) if slot.per_head == SCALAR else ("H", 1)
            if name in self.lsm.params:
                dims = tuple(self.dim(d) for d in self.lsm.params[name].shape)
                return ("H", 1) if dims == ("H",) and slot.per_head != SCALAR else dims  # per head, as h
            return ()  # H, K, V, layer: numbers (validate has checked what each expression may read)
        if isinstance(e, sympy.Function) and e.func == ex.Linear:
            inp, weight, out = e.args
            self.projection(e, slot)
            return ("B", "T", *slot.per_head) if int(out) == 0 else ("B", "T", int(out))
        shape: tuple[Dim, ...] = ()
        for a in e.args:
            shape = self.broadcast(slot, shape, self.shape(a, slot))
        return shape

    def projection(self, e: sympy.Basic, slot: Slot) -> Width:
        """Record the weight of projection `e` (and those in its input); returns its output width."""
        inp, weight, out = e.args
        width_in = self.width(inp, slot)
        if width_in is None:
            raise ShapeError(f"{slot.what}: projection {weight} reads no input (x or another projection)", *slot.field)
        width_out: Width = int(out) if int(out) > 0 else slot.flat
        first = self.weights.setdefault(weight.name, (width_in, width_out, slot.what))
        if first[:2] != (width_in, width_out):
            raise ShapeError(f"projection weight '{weight}' is used with two shapes: {first[0]} -> {first[1]} in "
                             f"{first[2]} and {width_in} -> {width_out} in {slot.what}", *slot.field)
        return width_out

    def width(self, e: sympy.Basic, slot: Slot) -> Optional[Width]:
        """The flat width of a projection's input; None for a number."""
        if isinstance(e, sympy.Symbol):
            if e.name == "x":
                return "hidden"
            if e.name in ("H", "K", "V", "layer", "layers"):
                return None
            raise ShapeError(f"{slot.what}: a projection's input may read x and other projections, not '{e.name}' "
                             "(per-head tensors are not projected)", *slot.field)
        if isinstance(e, sympy.Function) and e.func == ex.Linear:
            return self.projection(e, slot)
        widths = {w for w in (self.width(a, slot) for a in e.args) if w is not None}
        if len(widths) > 1:
            raise ShapeError(f"{slot.what}: a projection's input mixes widths {' and '.join(map(str, sorted(widths, key=str)))}",
                             *slot.field)
        return widths.pop() if widths else None


def check_shapes(lsm: LSMSpec) -> None:
    """Every slot expression fits its slot and every projection weight has one shape; ShapeError if not."""
    shapes = _Shapes(lsm)
    if lsm.decay.rate is not None:  # no B, T: a param expression that broadcasts to [H, V, K]
        slot = Slot("decay rate", ("decay", "rate"), ("H", "V", "K"), "H*V*K")
        got = tuple(shapes.dim(d) if isinstance(d, str) else d for d in shapes.shape(lsm.decay.rate, slot))
        want = tuple(shapes.dim(d) for d in slot.per_head)
        if len(got) > len(want) or any(g not in (w, 1) for g, w in zip(reversed(got), reversed(want))):
            raise ShapeError(f"decay rate is a {_show(got)} tensor, but it needs {_show(slot.per_head)} "
                             "(declare its param as [H, V, K], mamba_ssm's A [D, N] per head)", *slot.field)
    for slot, e in _slots(lsm):
        got = tuple(shapes.dim(d) if isinstance(d, str) else d for d in shapes.shape(e, slot))  # V is K where equal
        want = ("B", "T", *(shapes.dim(d) for d in slot.per_head))
        if len(got) > len(want) or any(g not in (w, 1) for g, w in zip(reversed(got), reversed(want))):
            hint = " (project it to the slot: x @ W)" if got == ("B", "T", "hidden") else ""
            needed = _show(("B", "T", *slot.per_head))
            raise ShapeError(f"{slot.what} is a {_show(got)} tensor, but it needs {needed}{hint}", *slot.field)
