"""Emit one LSM layer module per LSM: `<lsm>_layer.py` with `class Layer(nn.Module)`.

The layer is everything around the op: q/k/v projections, short convolutions,
feature maps, the gate expressions of the spec (decay g, beta, DPLR a/b, the
output gate) printed as PyTorch code, the output norm and projection. The op
itself comes from the same package (`<lsm>_ops.op` / `step`).

All decisions are made here, into one `LayerContext` the template reads; the
template only lays the code out.
"""
from __future__ import annotations

from typing import Optional

import sympy
from pydantic import BaseModel, ConfigDict

from ..ir import expr as ex
from ..ir.nodes import LSMSpec, SpecIR
from ..kinds import kind_of
from ..passes.validate import RESERVED_NAMES
from .context import lsm_context
from .literal import Name
from .printer import Projection, Slot, check_identifier, print_torch, projections_of

# code names of the layer's dimensions, as the emitted module spells them
DIMS = {"H": "self.heads", "K": "self.head_k", "V": "self.head_v", "hidden": "self.hidden"}
NUMBERS = {**{k: v for k, v in DIMS.items() if k != "hidden"}, "layer": "self.layer_idx", "layers": "self.layers"}

SCALAR = Slot("self.heads")
PER_KEY = Slot("self.heads * self.head_k", "(self.heads, self.head_k)")
PER_VALUE = Slot("self.heads * self.head_v", "(self.heads, self.head_v)")
DATA = {"x", "q", "k", "v"}


class FeatureStep(BaseModel):
    """One feature map applied to q or k: the line of code and the key dim after it."""

    kind: str
    code: str  # e.g. "q = F.silu(q)"
    dim_after: str  # code of the per-head dim after this map


class ParamDecl(BaseModel):
    name: Name
    shape: list[str]  # code per dim
    init: str  # code of the init value (a number or a tensor of h / i)
    grid: list[str]  # lines defining h / i for the init, if it reads them


class MemoriesContext(BaseModel):
    """A layer's Mixture-of-Memories (templates/modules/memories.py.j2): routing, and the gates on slot rows."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    count: int
    top_k: int
    shared: bool
    states: int  # count, plus the shared memory
    own_k: bool  # each memory has its own k projection
    own_v: bool
    projections: list[Name]  # the spec's projections each memory owns (inside beta / the decay)
    g_code: Optional[str]  # the gates of the slot rows: per-memory projections take the routing plan
    beta_code: Optional[str]
    aux_loss: float
    z_loss: float


class WindowContext(BaseModel):
    """Liger Attention's numbers (templates/modules/layer.py.j2 pastes them as code)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    window: int
    mix: float
    rope_theta: float


class LayerContext(BaseModel):
    """What templates/modules/layer.py.j2 reads (and nothing else); `doc` is free text, the rest code or numbers."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    header: str
    name: Name
    doc: str
    family: str
    recurrence: str
    op_args: list[str]  # the op's tensor arguments in contract order (g, beta, u, a, b)
    default_heads: Optional[int]
    expand_k: float
    expand_v: float
    head_k: Optional[int]  # the q/k projection width per head, whatever hidden and heads (None: from expand_k)
    head_v: Optional[int]  # V likewise (None: from expand_v)
    groups: Optional[int]  # q and k projected per group of heads and repeated to the heads (None: per head)
    tie_k: bool
    short_conv: int
    feature_q: list[FeatureStep]
    feature_k: list[FeatureStep]
    feature_v: list[FeatureStep]  # width-keeping maps on v (after its short conv, if any)
    rebased_q: Optional[str]  # dim code of q's rebased gamma/beta, if q uses rebased
    rebased_k: Optional[str]
    projections: list[Projection]
    params: list[ParamDecl]
    decay: str  # none / constant / scalar / vector
    g_code: Optional[str]
    beta_code: Optional[str]
    a_code: Optional[str]
    b_code: Optional[str]
    gv_code: Optional[str]  # element-wise gates: value-side log decay [B, T, H, V]
    dt_code: Optional[str]  # step [B, T, H, V]
    rate_code: Optional[str]  # rate A [H, V, K]
    update_codes: dict[str, str]  # an update's per-token gates by op argument (theta, eta, alpha), each [B, T, H]
    minibatch: int  # an update's mini-batch (gradient = minibatch(N)); 1: per token
    state_dims: str  # code of the op state's shape [B, H, K + rows, width * V]
    param_args: dict[str, str]  # op arguments that are the layer's own params, passed whole (TTT's ln_weight, ln_bias)
    state_shape: str  # the decode cache's "state", for the docstring
    skip_code: Optional[str]  # o = o + skip * v
    query_code: Optional[str]  # the op's q [B, T, H, K] from the spec instead of q_proj
    key_code: Optional[str]  # the op's k likewise, instead of k_proj
    u_name: Optional[Name]  # the bonus parameter passed as u
    h_in_forward: bool  # the forward expressions read the head index h
    reads_layers: bool  # some expression reads `layers` (the model's layer count): the layer needs it given
    output_norm: str
    output_norm_eps: Optional[float]  # None: the norm's default (1e-6 for RMSNorm, 1e-5 for LayerNorm and GroupNorm)
    gate_code: Optional[str]
    scale_code: str
    helpers: list[str]  # names of module-level helpers the code uses (l2norm, taylor2, rebased)
    conv_features: list[str]  # sides (q, k) whose feature maps run inside their short conv's recompute
    norm_gate: bool  # output norm and gate run as one recompute
    cast_x_once: bool  # x feeds only linears: cast it to the autocast dtype once
    recompute_imports: list[str]  # names the layer imports from lmoec.runtime.recompute
    uses_functional: bool  # whether the code calls torch.nn.functional (imported as F only then)
    memories: Optional[MemoriesContext] = None  # Mixture-of-Memories; None: one state
    kv_heads: Optional[int] = None  # k and v projected for this many heads and repeated to the heads (None: per head)
    qkv_bias: bool = False  # the q, k and v projections have a bias
    qk_norm_eps: Optional[float] = None  # RMSNorm of q and k per head after their projections (None: none)
    window: Optional[WindowContext] = None  # Liger Attention: mixed with sliding-window softmax attention


def _feature_steps(side: str, maps: list[str], short_conv: int) -> tuple[list[FeatureStep], Optional[str], list[str]]:
    """The code of a feature map chain on q, k or v, its dims, and the helpers it uses.

    A short convolution ends in SiLU (as in fla), so a leading `silu` map is that same SiLU: applied once.
    """
    steps, rebased_dim, helpers = [], None, []
    dim = "self.key_proj_dim"
    maps = [m for m in maps if m != "identity"]
    if short_conv and maps[:1] == ["silu"]:
        maps = maps[1:]
    for kind in maps:
        if kind == "elu_p1":
            code = f"{side} = F.elu({side}) + 1"
        elif kind in ("relu", "silu"):
            code = f"{side} = F.{kind}({side})"
        elif kind == "softmax":  # over the head dim (Liger's feature map)
            code = f"{side} = {side}.softmax(-1)"
        elif kind == "l2norm":
            code, helpers = f"{side} = l2norm({side})", helpers + ["l2norm"]
        elif kind == "taylor2":
            code, helpers = f"{side} = taylor2({side})", helpers + ["taylor2"]
            dim = f"1 + {dim} + {dim} ** 2" if dim == "self.key_proj_dim" else f"1 + ({dim}) + ({dim}) ** 2"
        elif kind == "rebased":
            if rebased_dim is not None:
                raise ValueError(f"feature map of {side} applies rebased twice")
            rebased_dim = dim
            code, helpers = f"{side} = rebased({side}, self.{side}_rebased_gamma, self.{side}_rebased_beta)", helpers + ["rebased"]
            dim = f"({dim}) ** 2" if dim != "self.key_proj_dim" else f"{dim} ** 2"
        else:
            raise ValueError(f"unknown feature map {kind!r}")
        steps.append(FeatureStep(kind=kind, code=code, dim_after=dim))
    return steps, rebased_dim, helpers


def _x_only_projected(expr: sympy.Basic) -> bool:
    """Whether every x in the expression is the input of a projection (x @ W)."""
    outside = expr.replace(lambda e: isinstance(e, sympy.Function) and e.func == ex.Linear, lambda e: sympy.Integer(1))
    return "x" not in {s.name for s in outside.free_symbols}


def layer_context(ir: SpecIR, lsm: LSMSpec, header: str) -> LayerContext:
    """Decide the whole layer; a ValueError names the part of the spec that can't be built."""
    where = f"lsm {lsm.name}"
    ctx = lsm_context(ir, lsm)
    rec = ctx.rec

    for name in list(lsm.params):
        check_identifier(name, f"{where}: parameter")
        if name in RESERVED_NAMES or name.startswith("_"):
            raise ValueError(f"{where}: parameter name {name!r} is reserved")

    feature_q, rebased_q, helpers_q = _feature_steps("q", lsm.feature_map_q, lsm.short_conv)
    feature_k, rebased_k, helpers_k = _feature_steps("k", lsm.feature_map_k, lsm.short_conv)
    feature_v, _, helpers_v = _feature_steps("v", lsm.feature_map_v, lsm.short_conv)
    helpers = set(helpers_q) | set(helpers_k) | set(helpers_v)
    dim_q = feature_q[-1].dim_after if feature_q else "self.key_proj_dim"
    dim_k = feature_k[-1].dim_after if feature_k else "self.key_proj_dim"
    if lsm.tie_k_to_decay:
        if rec.decay != "vector":
            raise ValueError(f"{where}: tie_k_to_decay (k = 1 - exp(g)) needs a vector decay, not {rec.decay!r}")
        if feature_k:
            raise ValueError(f"{where}: k = 1 - exp(g) is tied to the decay; it takes no feature map")
        dim_k = dim_q
    if dim_q != dim_k:
        raise ValueError(f"{where}: feature maps give q dim {dim_q} but k dim {dim_k}; the op needs them equal")

    params = {name: f"self.{name}" for name in lsm.params}
    projections: dict[str, Projection] = {}

    def gate(expr: Optional[sympy.Basic], what: str, slot: Slot, per_head: set[str], h_code: str,
             extra_arg: str = "") -> Optional[str]:
        """Print one data-dependent expression that fills `slot` (extra_arg: see TorchPrinter)."""
        if expr is None:
            return None
        # a per-head param [H] lies along the slot's H axis, as h does ([H, 1] where the slot is per key or value)
        laid = {name: f"{code}[:, None]" for name, code in params.items() if lsm.params[name].shape == ["H"] and slot.unflatten}
        symbols = {"x": "x", "h": h_code, **NUMBERS, **params, **laid, **{s: s for s in per_head}}
        tensors = {"x", "h", *params, *per_head}
        try:
            code = print_torch(expr, symbols, tensors, slot, extra_arg=extra_arg)
            found = projections_of(expr, slot)
        except ValueError as err:
            raise ValueError(f"{where}: {what}: {err}") from None
        for p in found:
            if p.weight in params or p.weight in RESERVED_NAMES or p.weight.startswith("_"):
                raise ValueError(f"{where}: {what}: projection name {p.weight!r} is taken")
            old = projections.setdefault(p.weight, p)
            if old != p:
                raise ValueError(f"{where}: projection {p.weight} is used as {old.in_features} -> {old.out_features} and as {p.in_features} -> {p.out_features}")
        if not (ex.free_names(expr) & DATA or ex.linears(expr)):  # a number, or per head only: the op takes [B, T, ...]
            per_head = slot.unflatten[1:-1] if slot.unflatten else slot.width
            code = f"torch.broadcast_to(torch.as_tensor({code}, dtype=x.dtype, device=x.device), (*x.shape[:2], {per_head}))"
        return code

    g_code = None
    if rec.decay in ("scalar", "vector"):
        if lsm.decay.expr is None:
            raise ValueError(f"{where}: a {rec.decay} decay needs an expression for g")
        slot, h = (SCALAR, "h") if rec.decay == "scalar" else (PER_KEY, "h[:, None]")
        g_code = gate(lsm.decay.expr, f"decay ({rec.decay})", slot, set(), h)
    elif rec.decay == "constant":
        if lsm.decay.expr is None:
            raise ValueError(f"{where}: a constant decay needs an expression for g")
        if ex.linears(lsm.decay.expr):
            raise ValueError(f"{where}: a constant decay reads only h, H, K, V and layer, not projections of x")
        try:
            g_code = print_torch(lsm.decay.expr, {"h": "h", **NUMBERS}, {"h"})
        except ValueError as err:
            raise ValueError(f"{where}: constant decay: {err}") from None

    memories = None
    if lsm.memories is not None:
        memories = _memories_context(lsm, gate)
    per_key_readers = {"q"} if lsm.tie_k_to_decay else {"q", "k"}
    # an update that is the delta rule (passes.classify.update_is_delta) gives the delta kind its beta: the lr
    beta_expr = lsm.delta.beta if lsm.delta is not None else (lsm.update.lr if rec.delta and lsm.update else None)
    beta_code = gate(beta_expr, "beta", SCALAR, set(), "h") if beta_expr is not None else None
    update_codes = {}
    if rec.update in ("titans", "ttt"):
        exprs = {"theta": lsm.update.lr, "eta": lsm.update.momentum, "alpha": lsm.update.weight_decay}
        update_codes = {arg: gate(exprs[arg], f"update {key}", SCALAR, set(), "h")
                        for arg, key in (("theta", "lr"), ("eta", "momentum"), ("alpha", "weight_decay")) if arg in ctx.args}
    a_code = gate(lsm.dplr.a, "dplr a", PER_KEY, per_key_readers, "h[:, None]") if lsm.dplr is not None else None
    b_code = gate(lsm.dplr.b, "dplr b", PER_KEY, per_key_readers, "h[:, None]") if lsm.dplr is not None else None
    gate_code = gate(lsm.output_gate, "output gate", PER_VALUE, set(), "h[:, None]")
    skip_code = gate(lsm.skip, "skip", PER_VALUE, set(), "h[:, None]")
    query_code = gate(lsm.query, "query", PER_KEY, set(), "h[:, None]")
    key_code = gate(lsm.key, "key", PER_KEY, set(), "h[:, None]")
    gv_code = gate(lsm.decay.value, "decay value", PER_VALUE, set(), "h[:, None]")
    dt_code = gate(lsm.decay.step, "decay step", PER_VALUE, set(), "h[:, None]")
    rate_code = None
    if lsm.decay.rate is not None:
        if ex.linears(lsm.decay.rate) or ex.free_names(lsm.decay.rate) & (DATA | {"h"}):
            raise ValueError(f"{where}: decay rate reads only params, H, K, V and layer")
        try:
            rate = print_torch(lsm.decay.rate, {**NUMBERS, **params}, set(params))
        except ValueError as err:
            raise ValueError(f"{where}: decay rate: {err}") from None
        rate_code = f"torch.broadcast_to(torch.as_tensor({rate}, device=x.device), (self.heads, self.head_v, self.head_k))"

    u_name = None
    if rec.bonus:
        if "u" not in lsm.params:
            raise ValueError(f"{where}: bonus u needs a declared parameter `param u[H, K] = ...`")
        if lsm.params["u"].shape != ["H", "K"]:
            raise ValueError(f"{where}: bonus parameter u must have shape [H, K], got {lsm.params['u'].shape}")
        u_name = "u"

    scale_expr = lsm.scale if lsm.scale is not None else sympy.Symbol("K") ** sympy.Rational(-1, 2)
    try:
        scale_code = print_torch(scale_expr, NUMBERS)
    except ValueError as err:
        raise ValueError(f"{where}: scale: {err}") from None
    if "torch." in scale_code:  # computed as a float64 tensor (see printer._float64): the op takes a float
        scale_code = f"float({scale_code})"

    param_decls = []
    for name, p in lsm.params.items():
        for d in p.shape:
            if d not in DIMS:
                raise ValueError(f"{where}: parameter {name} has unknown dimension {d!r} (known: {', '.join(DIMS)})")
        grid = []
        ndim = len(p.shape)
        init_names = ex.free_names(p.init)
        if "h" in init_names:
            if "H" not in p.shape:
                raise ValueError(f"{where}: parameter {name}'s init reads h but it has no H dimension")
            view = ["1"] * ndim
            view[p.shape.index("H")] = "-1"
            grid.append(f"h = torch.arange(self.heads, dtype=torch.float64).view({', '.join(view)})")
        if "i" in init_names:
            other = [j for j, d in enumerate(p.shape) if d != "H"]
            if not other:
                raise ValueError(f"{where}: parameter {name}'s init reads i but it has no K, V or hidden dimension")
            view = ["1"] * ndim
            view[other[-1]] = "-1"
            grid.append(f"i = torch.arange({DIMS[p.shape[other[-1]]]}, dtype=torch.float64).view({', '.join(view)})")
        try:
            init = print_torch(p.init, {"h": "h", "i": "i", **NUMBERS}, {"h", "i"})
        except ValueError as err:
            raise ValueError(f"{where}: init of parameter {name}: {err}") from None
        param_decls.append(ParamDecl(name=name, shape=[DIMS[d] for d in p.shape], init=init, grid=grid))

    forward_exprs = [e for e in (lsm.decay.expr if rec.decay in ("scalar", "vector") else None,
                                 lsm.delta.beta if lsm.delta else None, lsm.dplr.a if lsm.dplr else None,
                                 lsm.dplr.b if lsm.dplr else None, lsm.output_gate, lsm.skip, lsm.decay.value,
                                 lsm.decay.step, lsm.query, lsm.key,
                                 *(e for _, e in (lsm.update.gates() if lsm.update else []))) if e is not None]
    if any(getattr(f, "func", None) == ex.function("l2norm") for e in forward_exprs for f in sympy.preorder_traversal(e)):
        helpers.add("l2norm")

    h_in_forward = any("h" in ex.free_names(e) for e in forward_exprs)
    every_expr = [e for e in (lsm.decay.expr, lsm.decay.rate, lsm.scale, *(p.init for p in lsm.params.values())) if e is not None]
    reads_layers = any("layers" in ex.free_names(e) for e in every_expr + forward_exprs)
    # (a memory layer convolves per segment, lmoec.runtime.memories.segment_conv, then maps)
    conv_features = [side for side, steps, rebased in (("q", feature_q, rebased_q), ("k", feature_k, rebased_k))
                     if lsm.short_conv and memories is None and steps and rebased is None and not (side == "k" and lsm.tie_k_to_decay)]
    norm_gate = lsm.output_norm != "none" and gate_code is not None
    # x.dtype also types h and a constant decay: the one cast would change those under autocast
    cast_x_once = memories is None and not h_in_forward and rec.decay != "constant" and all(_x_only_projected(e) for e in forward_exprs)
    recompute_imports = [name for name, used in (("autocast_input", cast_x_once), ("recompute", lsm.short_conv or norm_gate)) if used]
    return LayerContext(
        header=header,
        name=lsm.name,
        doc=" ".join(lsm.doc.split()),
        family=rec.family.value,
        recurrence=rec.key,
        op_args=ctx.args,
        default_heads=lsm.heads,
        expand_k=lsm.expand_k,
        expand_v=lsm.expand_v,
        head_k=lsm.head_k,
        head_v=lsm.head_v,
        groups=lsm.groups,
        tie_k=lsm.tie_k_to_decay,
        short_conv=lsm.short_conv,
        feature_q=feature_q,
        feature_k=feature_k,
        feature_v=feature_v,
        rebased_q=rebased_q,
        rebased_k=rebased_k,
        projections=list(projections.values()),
        params=param_decls,
        decay=rec.decay,
        g_code=g_code,
        beta_code=beta_code,
        a_code=a_code,
        b_code=b_code,
        gv_code=gv_code,
        dt_code=dt_code,
        rate_code=rate_code,
        update_codes=update_codes,
        minibatch=rec.minibatch,
        state_dims=_state_dims(kind_of(rec)),
        param_args={arg: f"self.{arg}" for arg in ("ln_weight", "ln_bias") if arg in ctx.args},
        state_shape={"titans": "[B, H, K, 2V] (the memory M, then its momentum S)",
                     "ttt": "[B, H, K + 1, V] (the inner W, then its bias b)"}.get(rec.update, "[B, H, K, V]"),
        skip_code=skip_code,
        query_code=query_code,
        key_code=key_code,
        u_name=u_name,
        h_in_forward=h_in_forward,
        reads_layers=reads_layers,
        output_norm=lsm.output_norm,
        output_norm_eps=lsm.output_norm_eps,
        gate_code=gate_code,
        scale_code=scale_code,
        helpers=sorted(helpers),
        conv_features=conv_features,
        norm_gate=norm_gate,
        cast_x_once=cast_x_once,
        recompute_imports=recompute_imports,
        uses_functional=bool(lsm.short_conv) or norm_gate or any(
            "F." in code for code in (g_code, beta_code, a_code, b_code, gate_code, skip_code, gv_code, dt_code, rate_code, query_code, key_code,
                                      *update_codes.values(),
                                      *(f.code for f in feature_q + feature_k + feature_v)) if code
        ),
        memories=memories,
        kv_heads=lsm.kv_heads,
        qkv_bias=lsm.qkv_bias,
        qk_norm_eps=None if lsm.qk_norm is None else lsm.qk_norm.eps,
        window=None if lsm.window_attention is None else WindowContext(**lsm.window_attention.model_dump()),
    )


def _state_dims(kind) -> str:
    rows = f"self.head_k + {kind.state_rows}" if kind.state_rows else "self.head_k"
    columns = f"{kind.state_width} * self.head_v" if kind.state_width > 1 else "self.head_v"
    return f"x.shape[0], self.heads, {rows}, {columns}"


def _memories_context(lsm: LSMSpec, gate) -> MemoriesContext:
    """The memories' part of a layer: which parts each memory owns, and beta / g printed for slot rows.

    A per-memory gate's projections are MemoryLinear modules, called with the routing plan `slots`.
    """
    mem = lsm.memories
    owned = set(mem.per_memory)
    rec_decay = lsm.decay.kind
    own_g = "decay" in owned and rec_decay in ("scalar", "vector")
    own_beta = "beta" in owned and lsm.delta is not None
    g_code = beta_code = None
    if rec_decay in ("scalar", "vector"):
        slot, h = (SCALAR, "h") if rec_decay == "scalar" else (PER_KEY, "h[:, None]")
        g_code = gate(lsm.decay.expr, f"decay ({rec_decay})", slot, set(), h, "slots" if own_g else "")
    if lsm.delta is not None:
        beta_code = gate(lsm.delta.beta, "beta", SCALAR, set(), "h", "slots" if own_beta else "")
    names = []
    for own, e in ((own_g, lsm.decay.expr), (own_beta, lsm.delta.beta if lsm.delta else None)):
        if own:
            names += [lin.args[1].name for lin in ex.linears(e) if lin.args[1].name not in names]
    return MemoriesContext(
        count=mem.count, top_k=mem.top_k, shared=mem.shared, states=mem.states,
        own_k="k" in owned and not lsm.tie_k_to_decay, own_v="v" in owned, projections=names,
        g_code=g_code, beta_code=beta_code, aux_loss=mem.aux_loss, z_loss=mem.z_loss,
    )


def emit_layers(ir: SpecIR) -> dict[str, str]:
    """`<lsm>_layer.py` for each LSM of the spec."""
    from .render import header, render  # jinja2 only when rendering: `lmoec check` imports this module

    files = {}
    for lsm in ir.lsms.values():
        text_header = header(ir, f"lsm {lsm.name}, layer module")
        ctx = layer_context(ir, lsm, text_header)
        files[f"{lsm.name}_layer.py"] = render("modules/layer.py.j2", ctx=ctx)
    return files
