"""The layer stack of a model as a networkx graph, and its parameter counts, from the IR alone.

Counts are analytic: every projection a spec writes (low-rank ones as two
factors), convolutions, norms, declared params, attention, experts, router,
embeddings and the head. They describe the layers lmoec emits:

- LSM layer with memories (MoM): each memory's own parts (`per_memory`) once per state
  (count, plus the shared memory), the rest once, a router hidden x count; active: the
  top_k memories and the shared one (`params_per_memory` on the node).
- LSM layer: q/k/v projections hidden -> H*K (H*V for v; no k when HGRN2 ties
  k = 1 - exp(g)), an output projection H*V -> hidden, depthwise short
  convolutions on q, k, v, the projections inside gate/decay/beta/dplr
  expressions (an unsized `x @ W` is as wide as its slot: H for scalar gates and
  beta, H*K for vector gates and dplr terms, H*V for the output gate), the
  declared params, the output norm (weights shared over heads: V for rmsnorm,
  2V for layernorm; 2*H*V for groupnorm, H*V for rmsnorm_all_heads), Rebased's affine (2*K per map).
- attention layer: q/o hidden x heads*D, k/v hidden x kv_heads*D (D: head_dim, or hidden / heads), no biases.
- MoE: router hidden x experts, SwiGLU experts 3*hidden*expert_ffn each;
  active = top_k + shared experts. Dense FFN: one SwiGLU 3*hidden*ffn.
- per block two norms; a final norm; embeddings vocab*hidden; an untied head
  another vocab*hidden.
"""
from __future__ import annotations

import networkx as nx
import sympy

from . import expr as ex
from .nodes import LSMSpec, ModelSpec, SpecIR


def _norm(kind: str, width: int) -> int:
    return {"rmsnorm": width, "layernorm": 2 * width, "none": 0}[kind]


def lsm_dims(lsm: LSMSpec, hidden: int, model_heads: int) -> dict[str, int]:
    heads = lsm.heads or model_heads
    return {"H": heads, "K": lsm.head_k or int(lsm.expand_k * hidden) // heads,
            "V": lsm.head_v or int(lsm.expand_v * hidden) // heads, "hidden": hidden}


def _linear_params(e: sympy.Expr, slot: int, d: dict[str, int], seen: dict[str, int]) -> None:
    """Add each projection of `e` (name -> size) to `seen`; one weight counted once."""
    widths = {"x": d["hidden"], "q": d["H"] * d["K"], "k": d["H"] * d["K"], "v": d["H"] * d["V"]}

    def width_of(inp: sympy.Expr) -> int:
        if isinstance(inp, sympy.Function) and inp.func == ex.Linear:
            return int(inp.args[2]) or slot
        inner = ex.linears(inp)
        if inner:
            return width_of(inner[-1])
        names = ex.free_names(inp) & set(widths)
        return max(widths[n] for n in names) if names else d["hidden"]

    for lin in ex.linears(e):
        inp, weight, out = lin.args
        seen.setdefault(weight.name, width_of(inp) * (int(out) or slot))


def lsm_params(lsm: LSMSpec, hidden: int, model_heads: int) -> int:
    """All parameters of one LSM layer (every memory's, with memories)."""
    shared, per_memory, router = lsm_param_split(lsm, hidden, model_heads)
    states = lsm.memories.states if lsm.memories else 1
    return shared + states * per_memory + router


def lsm_active_params(lsm: LSMSpec, hidden: int, model_heads: int) -> int:
    """The parameters one token uses: with memories, those of its top_k memories and the shared one."""
    shared, per_memory, router = lsm_param_split(lsm, hidden, model_heads)
    used = lsm.memories.top_k + int(lsm.memories.shared) if lsm.memories else 1
    return shared + used * per_memory + router


def lsm_param_split(lsm: LSMSpec, hidden: int, model_heads: int) -> tuple[int, int, int]:
    """(shared, per memory, router) parameters of one LSM layer; a plain layer is all per memory of one.

    Each memory owns the parts `memories.per_memory` names: its k and v projections and the
    projections inside beta and the decay expression (Du et al., 2025); the router is hidden x count.
    """
    d = lsm_dims(lsm, hidden, model_heads)
    H, K, V = d["H"], d["K"], d["V"]
    qk = H * K
    owned = set(lsm.memories.per_memory) if lsm.memories else set()
    n_k = 0 if lsm.tie_k_to_decay else 1
    kv = lsm.kv_heads or H  # k and v are projected per kv head
    proj = {"q": hidden * qk, "k": hidden * kv * K * n_k, "v": hidden * kv * V}
    if lsm.qkv_bias:
        proj = {"q": proj["q"] + qk, "k": proj["k"] + kv * K * n_k, "v": proj["v"] + kv * V}
    per_memory = sum(n for part, n in proj.items() if part in owned)
    shared = sum(n for part, n in proj.items() if part not in owned) + H * V * hidden
    shared += lsm.short_conv * (qk + kv * K * n_k + kv * V)
    slots = []
    if lsm.decay.expr is not None and lsm.decay.kind in ("scalar", "vector"):
        slots.append((lsm.decay.expr, H if lsm.decay.kind == "scalar" else qk, "decay"))
    if lsm.delta is not None:
        slots.append((lsm.delta.beta, H, "beta"))
    if lsm.update is not None:
        slots += [(e, H, None) for _, e in lsm.update.gates()]
    if lsm.dplr is not None:
        slots += [(lsm.dplr.a, qk, None), (lsm.dplr.b, qk, None)]
    if lsm.output_gate is not None:
        slots.append((lsm.output_gate, H * V, None))
    weights: dict[str, int] = {}
    owned_weights: set[str] = set()
    for e, slot, part in slots:
        _linear_params(e, slot, d, weights)
        if part in owned:
            owned_weights |= {lin.args[1].name for lin in ex.linears(e)}
    per_memory += sum(n for w, n in weights.items() if w in owned_weights)
    total = shared + sum(n for w, n in weights.items() if w not in owned_weights)
    for p in lsm.params.values():
        total += int(sympy.Mul(*[d[s] for s in p.shape]))
    total += {"none": 0, "rmsnorm": V, "layernorm": 2 * V, "groupnorm": 2 * H * V, "rmsnorm_all_heads": H * V}[lsm.output_norm]
    total += 2 * K if lsm.qk_norm is not None else 0
    total += 2 * K * (lsm.feature_map_q.count("rebased") + lsm.feature_map_k.count("rebased"))
    if lsm.memories is None:
        return 0, total + per_memory, 0
    return total, per_memory, hidden * lsm.memories.count


def attention_params(model: ModelSpec) -> int:
    heads = model.attention.heads or model.heads
    kv = model.attention.kv_heads or heads
    head_dim = model.attention.head_dim or model.hidden // heads
    return 2 * model.hidden * heads * head_dim + 2 * model.hidden * kv * head_dim


def ffn_params(model: ModelSpec) -> tuple[int, int]:
    """(total, active) of one block's feed-forward part."""
    if model.moe is not None:
        moe = model.moe
        expert = 3 * model.hidden * moe.expert_ffn
        router = model.hidden * moe.experts
        return router + expert * (moe.experts + moe.shared_experts), router + expert * (moe.top_k + moe.shared_experts)
    if model.ffn is not None:
        dense = 3 * model.hidden * model.ffn.ffn
        return dense, dense
    return 0, 0


def layer_graph(ir: SpecIR) -> nx.DiGraph:
    """embed -> (mixer -> ffn/moe) per layer -> final norm -> head; nodes carry kind and params."""
    model = ir.model
    if model is None:
        raise ValueError(f"{ir.source}: no model block, so no layer graph")
    g = nx.DiGraph(name=model.name)
    lsm = ir.lsms[model.lsm] if model.lsm else None
    emb = model.vocab * model.hidden
    g.add_node("embed", kind="embedding", params_total=emb, params_active=emb)
    prev = "embed"
    norm = _norm(model.norm, model.hidden)
    ffn_total, ffn_active = ffn_params(model)
    attention = attention_params(model)
    mixers = {"L": (lsm_params(lsm, model.hidden, model.heads), lsm_active_params(lsm, model.hidden, model.heads))
              if lsm else (0, 0), "N": (attention, attention)}
    per_memory = lsm_param_split(lsm, model.hidden, model.heads)[1] if lsm and lsm.memories else None
    for i, letter in enumerate(model.pattern):
        mixer = f"layer{i}.{'lsm' if letter == 'L' else 'attention'}"
        total, active = mixers[letter]
        extra = {"params_per_memory": per_memory} if letter == "L" and per_memory is not None else {}
        g.add_node(mixer, kind="lsm" if letter == "L" else "attention", layer=i,
                   lsm=model.lsm if letter == "L" else None, params_total=total + norm, params_active=active + norm, **extra)
        ffn = f"layer{i}.{'moe' if model.moe else 'ffn'}"
        g.add_node(ffn, kind="moe" if model.moe else "ffn", layer=i,
                   params_total=ffn_total + norm, params_active=ffn_active + norm)
        g.add_edge(prev, mixer)
        g.add_edge(mixer, ffn)
        prev = ffn
    g.add_node("final_norm", kind="norm", params_total=norm, params_active=norm)
    head = 0 if model.tie_embeddings else emb
    g.add_node("head", kind="head", tied=model.tie_embeddings, params_total=head, params_active=head)
    g.add_edge(prev, "final_norm")
    g.add_edge("final_norm", "head")
    return g


def param_counts(ir: SpecIR) -> tuple[int, int]:
    """(total, active) parameters of the model, embeddings and head included."""
    g = layer_graph(ir)
    return (sum(d["params_total"] for _, d in g.nodes(data=True)),
            sum(d["params_active"] for _, d in g.nodes(data=True)))


def embedding_params(ir: SpecIR) -> int:
    """Embedding plus untied head: what papers usually leave out of a model's size name."""
    g = layer_graph(ir)
    return g.nodes["embed"]["params_total"] + g.nodes["head"]["params_total"]
