"""Pass: derive the communication plan (LASP-2 / LASP-2H / expert parallel) from the IR.

An LSM layer's local slice acts on the incoming state as an affine map
S -> A_r S + M_r (DESIGN.md). LASP-2 all-gathers (A_r, M_r) over the
sequence-parallel group forward; backward reduce-scatters their gradients
(same shapes) back to the rank that sent them (lmoec.trainer.lasp2). The
shape of A_r follows from the kind alone (`Kind.lasp2_map`):

    additive   A_r = I              nothing to send but M_r
    constant   A_r = gamma^T_local  known to every rank: nothing to send (g given per
                                    token [B, T, H] is sent as the scalar family's [B, H])
    scalar     A_r [B, H]
    vector     A_r [B, H, K]
    delta/DPLR A_r [B, H, K, K]
    titans     A_r [B, H, 2K, 2K]   the joint state (M, S) stacked as [2K, V]: M_r is [B, H, 2K, V]
    ttt        none: the inner LayerNorm makes the update non-affine, so there is no map (check refuses sp > 1)

so the payload depends on B, H, K, V and never on the sequence length. A layer with memories
sends one map per (memory, sequence) segment: every shape gains a leading M (the memory states,
with the shared one), and a constant decay's A_r, which then depends on the segment's length,
travels as the scalar family's [M, B, H].
Softmax attention layers (LASP-2H) all-gather K and V, which does grow with T.
"""
from __future__ import annotations

import re

import sympy

from ..ir.nodes import CommPlan, CommStep, Family, LSMSpec, ModelSpec, SpecIR
from ..kinds import kind_of

B, T, H, K, V, D, hidden, topk, act = sympy.symbols("B T H K V D hidden topk act_bytes")
E = sympy.Symbol("E")  # experts of the MoE layers
M = sympy.Symbol("M")  # memory states of a layer with memories
FP32 = 4


def _numel(shape: list[str]) -> sympy.Expr:
    """Elements of a shape of dim names, each maybe with a whole factor ("2K": a joint state's stacked rows)."""
    sym = {"B": B, "T": T, "H": H, "K": K, "V": V, "D": D, "hidden": hidden, "topk": topk, "M": M}

    def dim(name: str) -> sympy.Expr:
        factor, base = re.fullmatch(r"(\d*)(\w+)", name).groups()
        return int(factor or 1) * sym[base]

    return sympy.Mul(*[dim(d) for d in shape]) if shape else sympy.Integer(0)


def lsm_steps(layer: int, lsm: LSMSpec) -> list[CommStep]:
    """The LASP-2 all-gathers of one LSM layer, forward and backward."""
    kind = kind_of(lsm.recurrence)
    if kind.lasp2_map is None:
        return []
    a_shape = kind.lasp2_map
    m_shape = ["B", "H", "K" if kind.state_width == 1 else f"{kind.state_width}K", "V"]
    if lsm.memories is not None:
        # routed tokens give every (memory, sequence) segment its own A_r: a constant decay's is then per segment too
        a_shape = ["M"] + (["B", "H"] if lsm.recurrence.family is Family.constant else a_shape)
        m_shape = ["M"] + m_shape
    shapes = {"M_r": m_shape}
    if a_shape:
        shapes["A_r"] = a_shape
    nbytes = FP32 * (_numel(a_shape) + _numel(m_shape))
    if lsm.memories is not None:
        nbytes = nbytes.subs(M, lsm.memories.states)
    what = " + ".join(f"{n} [{', '.join(s)}]" for n, s in sorted(shapes.items())) + " fp32"
    # backward (lmoec.trainer.lasp2): the gradients of every rank's gathered (A_r, M_r) are
    # reduce-scattered back to their owner, the same shapes in reverse
    return [
        CommStep(layer=layer, kind="lsm", direction="forward", collective="all_gather", group="sp", what=what,
                 shape=shapes, bytes_per_rank=nbytes, depends_on_seq_len=False),
        CommStep(layer=layer, kind="lsm", direction="backward", collective="reduce_scatter", group="sp",
                 what="d" + what.replace(" + ", " + d"), shape=shapes, bytes_per_rank=nbytes, depends_on_seq_len=False),
    ]


def attention_steps(layer: int) -> list[CommStep]:
    """LASP-2H: all-gather the local K and V; backward reduce-scatters their gradients."""
    shapes = {"K": ["B", "T", "H", "D"], "V": ["B", "T", "H", "D"]}
    nbytes = act * 2 * _numel(["B", "T", "H", "D"])
    return [
        CommStep(layer=layer, kind="attention", direction="forward", collective="all_gather", group="sp",
                 what="K, V [B, T, H_kv, D] activations", shape=shapes, bytes_per_rank=nbytes, depends_on_seq_len=True),
        CommStep(layer=layer, kind="attention", direction="backward", collective="reduce_scatter", group="sp",
                 what="dK, dV [B, T, H_kv, D] activations", shape=shapes, bytes_per_rank=nbytes, depends_on_seq_len=True),
    ]


def moe_steps(layer: int) -> list[CommStep]:
    """Expert parallel (lmoec.trainer.expert_parallel): a token-count exchange, then tokens to their
    experts' ranks and back. Forward: all_gather of every rank's [E] slot counts (the all_to_all
    split sizes, plus the global load for capacity, router stats and the aux loss), dispatch and
    combine all_to_all. Backward: the two all_to_all in reverse, reusing the forward's counts.
    Token payloads are upper bounds: the B*T*topk slots a rank sends, less those it keeps locally."""
    counts = CommStep(layer=layer, kind="moe", direction="forward", collective="all_gather", group="ep",
                      what="token counts [E] int64 per rank (split sizes, global expert load)",
                      shape={"counts": ["E"]}, bytes_per_rank=8 * E, depends_on_seq_len=False)
    shapes = {"tokens": ["B", "T", "topk", "hidden"]}
    nbytes = act * _numel(["B", "T", "topk", "hidden"])
    stages = {"forward": ("dispatch", "combine"), "backward": ("combine grad", "dispatch grad")}
    return [counts] + [
        CommStep(layer=layer, kind="moe", direction=d, collective="all_to_all", group="ep",
                 what=f"{stage}: routed tokens [B*T*topk, hidden] (at most)",
                 shape=shapes, bytes_per_rank=nbytes, depends_on_seq_len=True)
        for d in ("forward", "backward")
        for stage in stages[d]
    ]


def model_dims(model: ModelSpec, lsm: LSMSpec | None) -> dict[sympy.Symbol, int]:
    """Numbers for the symbols, where the model fixes them."""
    attention = model.attention
    dims = {hidden: model.hidden, D: attention.head_dim or model.hidden // (attention.heads or model.heads)}
    if model.moe is not None:
        dims[topk] = model.moe.top_k
        dims[E] = model.moe.experts
    if lsm is not None:
        heads = lsm.heads or model.heads
        dims[H] = heads
        dims[K] = lsm.head_k or int(lsm.expand_k * model.hidden) // heads
        dims[V] = lsm.head_v or int(lsm.expand_v * model.hidden) // heads
    return dims


def plan(ir: SpecIR) -> SpecIR:
    steps: list[CommStep] = []
    if ir.model is None:
        for i, lsm in enumerate(ir.lsms.values()):
            steps += lsm_steps(i, lsm)
    else:
        model = ir.model
        lsm = ir.lsms.get(model.lsm) if model.lsm else None
        dims = model_dims(model, lsm)
        attn_heads = model.attention.kv_heads or model.attention.heads or model.heads
        for i, kind in enumerate(model.pattern):
            layer_steps = lsm_steps(i, lsm) if kind == "L" else attention_steps(i)
            if model.moe is not None and ir.parallel.ep > 1:
                layer_steps += moe_steps(i)
            for s in layer_steps:
                sub = dict(dims)
                if s.kind == "attention":
                    sub[H] = attn_heads
                s.bytes_per_rank = s.bytes_per_rank.subs(sub)  # a monomial once the numbers multiply out
            steps += layer_steps
    ir.comm = CommPlan(steps=steps)
    return ir
