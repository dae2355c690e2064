"""Transition kinds: each family of DESIGN.md's table as one registry entry.

A `Kind` names everything that differs between transitions: the rule that classifies a `Recurrence` into it,
its token step in the float64 oracle, the torch chunkwise template, the Triton emitter and its `supports`
check, its cost model for `inspect --stats`, and the shape of its LASP-2 map. Adding a kind is a module in this package plus its templates,
appended to `KINDS`; nothing else dispatches on the family.

This module imports neither torch nor jinja2 (`lmoec check` uses the classify rules): the kinds' oracle steps
use tensor methods (or import torch when called), their emitters import the renderer when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..ir.expr import bounds
from ..ir.nodes import Family, Recurrence

if TYPE_CHECKING:
    from ..backends.context import LSMContext
    from ..backends.stats import Sizes

Costs = list[tuple[str, bool, float, float]]  # (kernel, in the forward, flops, bytes)


@dataclass(frozen=True)
class Kind:
    family: Family
    matches: Callable[[Recurrence], bool]  # the classify rule; KINDS are tried in order, the first match wins
    # one token for all (batch, head) pairs: (rec, S [N,H,K,V], q, k [N,H,K], v [N,H,V], inputs, scale) ->
    # (S, o); inputs maps the op's extra arguments to their values at this token (per-head ones whole)
    oracle_step: Callable[..., Any]
    torch_template: str  # templates/ path of `<lsm>_torch.py`
    supports: Callable[["LSMContext"], tuple[bool, str]]  # (ok, reason) of the Triton kernels
    emit_triton: Callable[["LSMContext", str], str]  # (ctx, header) -> `<lsm>_triton.py`, where supports is ok
    costs: Callable[["LSMContext", "Sizes", int], Costs]  # (ctx, sizes, bytes of the end states)
    # dims of A_r in LASP-2's affine map S -> A_r S + M_r ([]: nothing to send; None: the transition is not affine in
    # the state, so LASP-2 does not apply)
    lasp2_map: Optional[list[str]]
    # rec -> why backend="auto" keeps CUDA tensors of that recurrence on the torch path ("": it takes the Triton
    # kernels): kernels that have not passed a GPU check stay opt-in (backend="triton")
    auto_torch_reason: Callable[[Recurrence], str] = lambda rec: ""
    # rec -> the largest log decay one chunk may take in the Triton kernels (0: no limit). Kernels that factor a chunk's
    # decay as exp(G_i) exp(-G_j) (on the matrix units) overflow past ~88; where the spec's decay expression does
    # not bound a chunk's decay within this, backend="auto" keeps the layer on the torch path (see `decay_reason`)
    chunk_log_decay_limit: Callable[[Recurrence], float] = lambda rec: 0.0
    # the largest head dim the Triton kernels take (0: any the validator allows); beyond it "auto" runs the torch path
    triton_max_head_dim: int = 0
    state_width: int = 1  # the op's state is [N, H, K + state_rows, state_width * V] (Titans: memory and momentum;
    state_rows: int = 0  # TTT-Linear: the inner bias as one more row)
    # the oracle's working state from the op's state and back (a kind that keeps more while it steps)
    oracle_state_in: Callable[[Recurrence, Any], Any] = lambda rec, state: state
    oracle_state_out: Callable[[Recurrence, Any], Any] = lambda rec, state: state


def _registry() -> list[Kind]:
    from . import decay, delta, dplr, elementwise, titans, ttt

    # precedence: test-time-training updates, element-wise gates, DPLR, delta, then the decays (validate keeps the
    # first four exclusive)
    return [titans.KIND, ttt.KIND, elementwise.KIND, dplr.KIND, delta.KIND, *decay.KINDS]


KINDS: list[Kind] = _registry()


def decay_reason(kind: Kind, rec: Recurrence, log_decay, chunk_size: int) -> str:
    """Why backend="auto" keeps an lsm off `kind`'s Triton kernels for its decay (log_decay: the spec's expression of
    the per-token log decay, a sympy tree), or "" where every value the expression can take is within the limit."""
    limit = kind.chunk_log_decay_limit(rec)
    if not limit or log_decay is None:
        return ""
    floor = bounds(log_decay)[0]
    if floor * chunk_size >= -limit:
        return ""
    what = "has no lower bound" if floor == float("-inf") else f"reaches {floor:.4g} a token ({floor * chunk_size:.4g} a chunk)"
    return (f"the {kind.family.value} Triton kernels factor a chunk's decay as exp(G_i) exp(-G_j), exact while a chunk's "
            f"log decay stays above -{limit:g}; this spec's log decay {what} (chunk_size {chunk_size}). "
            "backend='triton' forces them")


def kind_of(rec: Recurrence) -> Kind:
    """The kind a recurrence belongs to (the first of KINDS whose rule matches)."""
    for kind in KINDS:
        if kind.matches(rec):
            return kind
    raise ValueError(f"no transition kind matches {rec!r}")
