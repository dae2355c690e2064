"""The lmoec IR: one typed, JSON-serializable description of a compiled spec.

The frontend builds it, passes fill in the derived parts (family, chunk size,
communication plan), backends render code from it. Nothing downstream reads
spec text again.
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Optional

import sympy
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema

from . import expr as ex

SCHEMA_VERSION = 1


def _validate_expr(value: Any) -> sympy.Expr:
    if isinstance(value, sympy.Basic):
        return value
    return ex.from_json(value)


Expr = Annotated[
    sympy.Expr,
    PlainValidator(_validate_expr),
    PlainSerializer(ex.to_json, return_type=Any),
    WithJsonSchema({"description": "expression tree: number | {sym} | {op, args}"}),
]


class Node(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class SourceLoc(Node):
    """Where a construct was written, for diagnostics (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# ---- the recurrence ---------------------------------------------------------

DecayKind = Literal["none", "constant", "scalar", "vector"]
# element-wise gates G_t in R^{K x V}: an outer sum g 1^T + 1 gv^T (GFW), or an outer product dt[d] A[d, n] (Mamba)
ElementwiseKind = Literal["none", "outer_sum", "outer_product"]
# test-time-training memories: none, a linear memory M with a momentum state S (Titans, lmoec.kinds.titans), or
# TTT-Linear's LayerNorm inner model (lmoec.kinds.ttt)
UpdateKind = Literal["none", "titans", "ttt"]


class Family(str, Enum):
    """The transition families of DESIGN.md; they decide kernels and LASP-2 payloads."""

    additive = "additive"
    constant = "constant"
    scalar = "scalar"
    vector = "vector"
    delta = "delta"
    dplr = "dplr"
    elementwise = "elementwise"
    titans = "titans"
    ttt = "ttt"


class Recurrence(Node):
    """What a kernel is specialized on: the shape of the transition T_t.

    Two specs with equal `Recurrence` share kernels; everything else in an
    `LSMSpec` (projections, feature maps, gates) lives in the layer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    decay: DecayKind = "none"
    delta: bool = False
    dplr: bool = False
    bonus: bool = False  # RWKV6's u: o_t reads S_{t-1} plus (q.(u*k)) v
    elementwise: ElementwiseKind = "none"  # S_t = exp(G_t) * S_{t-1} + k_t v_t^T with G_t in R^{K x V}
    # a gradient step on an inner loss that is no delta rule: the joint state (M, S) of Titans' momentum, or TTT-Linear
    update: UpdateKind = "none"
    momentum: bool = False  # the update has a momentum gate eta (else eta = 0)
    weight_decay: bool = False  # the update has a forgetting gate alpha (else alpha = 0)
    minibatch: int = 1  # gradients at the start of each mini-batch of this many tokens (1: at every token)

    @property
    def family(self) -> Family:
        from ..kinds import kind_of  # the kinds' classify rules (lmoec.kinds imports this module)

        return kind_of(self).family

    @property
    def key(self) -> str:
        """A short stable name, used in kernel names and caches."""
        parts = [self.family.value]
        if self.family in (Family.delta, Family.dplr) and self.decay != "none":
            parts.append(self.decay)
        if self.elementwise != "none":
            parts.append(self.elementwise)
        if self.update != "none":
            parts += [p for p, on in (("momentum", self.momentum), ("wd", self.weight_decay)) if on]
            if self.minibatch > 1:
                parts.append(f"mb{self.minibatch}")
        if self.bonus:
            parts.append("bonus")
        return "_".join(parts)


FeatureMap = Literal["identity", "elu_p1", "relu", "silu", "l2norm", "taylor2", "rebased", "softmax"]


class Param(Node):
    """A learned tensor declared in a spec (e.g. Mamba2's A_log [H], RWKV6's u [H, K])."""

    name: str
    shape: list[str]  # dimension names: H, K, V, hidden
    init: Expr  # may read h (head index) and k index `i` for per-element inits
    loc: Optional[SourceLoc] = None


class Decay(Node):
    kind: DecayKind = "none"
    # log decay g: constant decays read only h/H/layer; data-dependent ones read x, params
    expr: Optional[Expr] = None
    # element-wise gates (lmoec.kinds.elementwise): a value-side log gate gv [B, T, H, V], summed with the key
    # side g over (K, V) (GFW); or a step dt [B, T, H, V] times a rate A [H, V, K] (Mamba: exp(dt A), input dt v)
    value: Optional[Expr] = None
    step: Optional[Expr] = None
    rate: Optional[Expr] = None


class Delta(Node):
    beta: Expr  # per head, in (0, 2) for a contraction; e.g. sigmoid(x @ W_beta)


class DPLRTerms(Node):
    """RWKV7-style rank-one correction: T_t = Diag(exp(g_t)) + a_t b_t^T."""

    a: Expr
    b: Expr


InnerLoss = Literal["mse", "ln_mse"]


class Update(Node):
    """A test-time-training memory: each token takes a gradient step on an inner loss (docs/LANGUAGE.md, `update`).

    With the linear memory M [K, V] and l = 1/2 |M^T k - v|^2, the gradient is k (M^T k - v)^T:
        S_t = eta_t S_{t-1} - lr_t grad l(M_0; k_t, v_t)        (momentum; S_t = the step when eta = 0)
        M_t = (1 - weight_decay_t) M_{t-1} + S_t
    where M_0 is M_{t-1} (gradient = token) or the memory at the start of the token's mini-batch (minibatch(N)).
    Without momentum and weight decay, per token, this is DeltaNet with beta = lr (classified as the delta kind).
    `ln_mse` is TTT-Linear's inner model k + LN(k W + b) fitted to v (the target of LN(k W + b) is v - k), with
    the inner bias b updated beside W and the LayerNorm's weight and bias learned by the outer model.
    """

    loss: InnerLoss = "mse"
    lr: Expr  # theta_t [B, T, H]
    momentum: Optional[Expr] = None  # eta_t [B, T, H]
    weight_decay: Optional[Expr] = None  # alpha_t [B, T, H]
    minibatch: int = 1

    def gates(self) -> list[tuple[str, "sympy.Expr"]]:
        """(statement key, expression) of each per-token gate the update has, in the op's argument order."""
        return [(key, e) for key, e in (("lr", self.lr), ("momentum", self.momentum),
                                        ("weight_decay", self.weight_decay)) if e is not None]


MemoryPart = Literal["k", "v", "beta", "decay"]


class QKNorm(Node):
    """RMSNorm over the head dim of q and k right after their projections, a weight per side (Qwen3)."""

    eps: float = 1e-6


class WindowAttention(Node):
    """Liger Attention (Lan et al., 2025): the layer's output mixes sliding-window softmax attention over its own
    q, k, v (RoPE, before feature maps) with the LSM's output: o = mix * attention + (1 - mix) * lsm."""

    window: int
    mix: float = 0.5
    rope_theta: float = 10000.0


class Memories(Node):
    """Mixture-of-Memories (Du et al., 2025): `count` states, each token routed to `top_k` of them.

    Memory m runs the layer's recurrence over only the tokens routed to it, in order; outputs come
    back weighted by the renormalised router weights. `per_memory` names what each memory owns
    (its k / v projections, the projections inside beta and the decay); the rest is shared.
    `shared` adds one memory that sees every token, with weight 1.
    """

    count: int
    top_k: int
    shared: bool = False
    per_memory: list[MemoryPart] = Field(default_factory=lambda: ["k", "v", "beta", "decay"])
    aux_loss: float = 0.01  # load balancing: count * sum_m f_m P_m, as the MoE router's
    z_loss: float = 0.0  # mean(logsumexp(router logits)^2)

    @property
    def states(self) -> int:
        """Memory states per layer: the routed ones plus the shared one."""
        return self.count + int(self.shared)


class LSMSpec(Node):
    """One linear sequence model layer: the recurrence and everything around it."""

    name: str
    doc: str = ""
    loc: Optional[SourceLoc] = None
    heads: Optional[int] = None  # None: the model's heads
    expand_k: float = 1.0  # head dim K = expand_k * hidden / heads
    expand_v: float = 1.0
    head_k: Optional[int] = None  # K itself, whatever hidden and heads (Mamba's state size N); None: from expand_k
    head_v: Optional[int] = None  # V itself, whatever hidden and heads (MiniMax-01: 128 with 6144 / 64); None: from expand_v
    groups: Optional[int] = None  # q and k projected once per group of heads and shared by its heads; None: per head
    kv_heads: Optional[int] = None  # k and v projected for this many heads, each shared by heads / kv_heads q heads (GQA)
    qkv_bias: bool = False  # the q, k and v projections have a bias (Qwen2)
    qk_norm: Optional[QKNorm] = None  # RMSNorm of q and k per head after their projections (Qwen3)
    feature_map_q: list[FeatureMap] = Field(default_factory=lambda: ["identity"])
    feature_map_k: list[FeatureMap] = Field(default_factory=lambda: ["identity"])
    feature_map_v: list[FeatureMap] = Field(default_factory=lambda: ["identity"])  # width-keeping maps only (MiniMax: silu)
    decay: Decay = Field(default_factory=Decay)
    delta: Optional[Delta] = None
    dplr: Optional[DPLRTerms] = None
    bonus_u: bool = False
    tie_k_to_decay: bool = False  # HGRN2: k = 1 - exp(g)
    short_conv: int = 0  # causal depthwise conv kernel size on q/k/v; 0: none
    # rmsnorm, layernorm: per head over V; groupnorm: one group per head; rmsnorm_all_heads: one RMSNorm over the
    # H * V channels of all heads at once (MiniMax-01's lightning layers)
    output_norm: Literal["none", "rmsnorm", "layernorm", "groupnorm", "rmsnorm_all_heads"] = "none"
    output_norm_eps: Optional[float] = None  # None: 1e-6 for rmsnorm (either), 1e-5 for layernorm and groupnorm
    output_gate: Optional[Expr] = None  # o = norm(o) * gate(x)
    skip: Optional[Expr] = None  # o = o + skip * v before the norm (Mamba's D), per value channel
    query: Optional[Expr] = None  # the op's q from this expression instead of a projection (S4D's time-invariant C)
    key: Optional[Expr] = None  # the op's k likewise (S4D's B)
    scale: Optional[Expr] = None  # None: K ** -0.5
    params: dict[str, Param] = Field(default_factory=dict)
    chunk_size: int = 64
    memories: Optional[Memories] = None  # None: one state (a plain layer)
    update: Optional[Update] = None  # a test-time-training memory instead of delta / decay statements
    window_attention: Optional[WindowAttention] = None  # Liger Attention: mixed with sliding-window softmax attention

    # filled by passes
    recurrence: Optional[Recurrence] = None


# ---- the model stack ---------------------------------------------------------


class AttentionSpec(Node):
    """Softmax attention of the N layers (causal, RoPE)."""

    heads: Optional[int] = None  # None: the model's heads
    kv_heads: Optional[int] = None  # None: = heads (MHA); fewer: GQA
    rope_theta: float = 10000.0
    window: Optional[int] = None  # sliding window; None: full causal
    head_dim: Optional[int] = None  # per-head width of q, k, v; None: hidden / heads (MiniMax-01: 128 with 6144 / 64)
    rotary_dim: Optional[int] = None  # RoPE rotates only the first rotary_dim dims of a head; None: all of them


class ResidualSpec(Node):
    """How a block adds each sublayer f (mixer, then FFN) to its stream, with the residual scaled by alpha:

    pre-norm (postnorm false):  x = alpha * x + beta * f(norm(x))
    post-norm (postnorm true):  h = norm(x);  x = alpha * h + beta * f(h)   (MiniMax-01's `postnorm`: the residual is
    the normed input, which is DeepNorm's x = LN(alpha x + f(x)) with each LN moved to the start of the next sublayer)
    """

    postnorm: bool = False
    alpha: float = 1.0
    beta: float = 1.0


class MoESpec(Node):
    experts: int
    top_k: int
    expert_ffn: int
    shared_experts: int = 0  # always-on experts, each of width expert_ffn
    score: Literal["softmax", "sigmoid"] = "softmax"
    order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    bias_balancing: bool = False  # aux-loss-free balancing with a router bias
    bias_update_rate: float = 1e-3
    aux_loss: float = 0.01
    z_loss: float = 0.001
    capacity_factor: Optional[float] = None  # None: dropless
    normalize_topk: bool = True  # renormalize the k selected weights to sum to 1


class DenseFFNSpec(Node):
    ffn: int  # SwiGLU inner width


class ParallelSpec(Node):
    dp: int = 1
    sp: int = 1
    ep: int = 1
    tp: int = 1
    loc: Optional[SourceLoc] = None


class ModelSpec(Node):
    name: str
    doc: str = ""
    loc: Optional[SourceLoc] = None
    vocab: int
    hidden: int
    layers: int
    heads: int
    pattern: str  # one letter per layer: L (LSM) or N (softmax attention)
    lsm: Optional[str] = None  # name of the LSM the L layers use
    attention: AttentionSpec = Field(default_factory=AttentionSpec)
    residual: ResidualSpec = Field(default_factory=ResidualSpec)
    moe: Optional[MoESpec] = None
    ffn: Optional[DenseFFNSpec] = None  # used when moe is None
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 4096


# ---- derived: communication plans ---------------------------------------------


class CommStep(Node):
    """One collective of one layer, per rank, per direction."""

    layer: int
    kind: Literal["lsm", "attention", "moe"]
    direction: Literal["forward", "backward"]
    collective: Literal["all_gather", "all_to_all", "reduce_scatter"]
    group: Literal["sp", "ep", "dp"]
    what: str  # e.g. "A_r [B,H,K] + M_r [B,H,K,V] fp32"
    shape: dict[str, list[str]]  # tensor -> symbolic shape
    bytes_per_rank: Expr  # a sympy formula of B, T (local length), dtype bytes
    depends_on_seq_len: bool


class CommPlan(Node):
    steps: list[CommStep] = Field(default_factory=list)


# ---- the compilation unit ------------------------------------------------------


class SpecIR(Node):
    """Everything one spec file (with its imports) compiles to."""

    schema_version: int = SCHEMA_VERSION
    source: str
    name: str
    lsms: dict[str, LSMSpec] = Field(default_factory=dict)
    model: Optional[ModelSpec] = None
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    comm: Optional[CommPlan] = None  # filled by passes.comm

    def lsm(self, name: Optional[str] = None) -> LSMSpec:
        if name is None:
            if self.model is not None and self.model.lsm is not None:
                name = self.model.lsm
            elif len(self.lsms) == 1:
                name = next(iter(self.lsms))
            else:
                raise ValueError(f"{self.source}: names {sorted(self.lsms)}; say which lsm")
        if name not in self.lsms:
            raise ValueError(f"{self.source}: no lsm named {name!r} (has {sorted(self.lsms)})")
        return self.lsms[name]

    def dump(self) -> str:
        return self.model_dump_json(indent=2)
