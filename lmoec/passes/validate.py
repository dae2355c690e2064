"""Pass: semantic checks the grammar can't express; each failure names the spec location.

The frontend calls `validate(ir, locs)` with the position of every statement,
so a message points at the value that is wrong. The pass pipeline calls it
again without positions (an IR built in Python or read from JSON has none):
then a message points at the enclosing block, or carries no position.
"""
from __future__ import annotations

import keyword
import re
from typing import Optional

import sympy

from ..errors import SpecError
from ..ir import expr as ex
from ..ir.nodes import LSMSpec, ModelSpec, SourceLoc, SpecIR
from ..ir.shapes import ShapeError, check_shapes

DIMS = ("H", "K", "V", "hidden")
CHUNK_SIZES = (16, 32, 64, 128, 256)
MAX_NAME = 64  # an lsm's name names its files and modules (`<lsm>_triton.py`)
MAX_SHORT_CONV = 64
MAX_EXPAND = 64  # expand_k, expand_v
MAX_HEAD_K = 256  # head_k, head_v: the state is [K, V] per head
MAX_HEAD_DIM = 1024  # an attention head's width
VALUE_FEATURE_MAPS = ("identity", "silu", "relu", "elu_p1", "l2norm")  # feature_map v: maps that keep the width
MAX_MEMORIES = 64  # memory states per layer; the decode cache holds all of them
MAX_LAYERS = 1024  # a longer stack is a typo; passes run per layer (the frontend checks before building a pattern)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Names a param or projection weight can't take: both become attributes of the emitted layer
# (`self.NAME`), beside the layer's own and those of torch.nn.Module (tests/test_hardening_frontend.py
# checks this covers the template's and the installed torch's). Names starting with '_' are reserved too.
LAYER_NAMES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "q_conv", "k_conv", "v_conv", "o_norm", "log_decay", "scale",
    "hidden", "heads", "head_k", "head_v", "key_proj_dim", "layer_idx", "layers", "norm_gate", "q_features",
    "k_features", "reset_parameters", "groups", "q_rebased_gamma", "q_rebased_beta", "k_rebased_gamma", "k_rebased_beta",
    # a layer with memories (templates/modules/memories.py.j2)
    "router", "mix_memories", "balancing_loss", "last_aux_loss", "last_z_loss", "last_tokens_per_memory",
    # kv_heads, and a layer with window_attention (Liger Attention)
    "kv_heads", "window_attention", "mix", "q_norm", "k_norm",
})
MODULE_NAMES = frozenset({
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "compile", "cpu",
    "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules", "mtia", "named_buffers",
    "named_children", "named_modules", "named_parameters", "parameters", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
    "register_module", "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
    "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train",
    "training", "type", "xpu", "zero_grad",
    "smart_apply",  # transformers adds it to every nn.Module once it builds a model (an HF-wrapped layer has it)
})
RESERVED_NAMES = LAYER_NAMES | MODULE_NAMES | set(ex.RESERVED_SYMBOLS) | {"i"}


def name_problem(name: str, attribute: bool) -> Optional[str]:
    """Why `name` can't name an attribute of emitted code (attribute=True), or files and modules, or None."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        return "is not an identifier (letters, digits and _, not starting with a digit)"
    if attribute and keyword.iskeyword(name):
        return "is a Python keyword"
    if not attribute and len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    return None


class Locs:
    """Statement positions by key, e.g. ("lsm", "gla", "decay") or ("model", "moe", "top_k")."""

    def __init__(self) -> None:
        self._at: dict[tuple, SourceLoc] = {}

    def set(self, key: tuple, loc: Optional[SourceLoc]) -> None:
        if loc is not None:
            self._at[key] = loc

    def get(self, *key) -> Optional[SourceLoc]:
        return self._at.get(tuple(key))

    def copy_prefix(self, old: tuple, new: tuple) -> None:
        """Inherit the positions of a base block (extends)."""
        n = len(old)
        for key, loc in list(self._at.items()):
            if key[:n] == old:
                self._at.setdefault(new + key[n:], loc)


class _Checker:
    def __init__(self, ir: SpecIR, locs: Optional[Locs]):
        self.ir = ir
        self.locs = locs or Locs()

    def fail(self, message: str, *key: str, fallback: Optional[SourceLoc] = None):
        """Raise at the most precise position known: the key, then its prefixes, then the block."""
        for n in range(len(key), 0, -1):
            loc = self.locs.get(*key[:n])
            if loc is not None:
                raise SpecError(message, loc)
        raise SpecError(message, fallback)

    # ---- one LSM ----------------------------------------------------------------

    def lsm(self, lsm: LSMSpec) -> None:
        at = ("lsm", lsm.name)

        def fail(msg: str, *field: str):
            self.fail(f"lsm {lsm.name!r}: {msg}", *at, *field, fallback=lsm.loc)

        problem = name_problem(lsm.name, attribute=False)
        if problem:
            fail(f"the name {problem}: it names the layer's files and modules")
        if lsm.heads is not None and lsm.heads < 1:
            fail(f"heads must be >= 1, got {lsm.heads}", "heads")
        for key in ("head_k", "head_v"):
            if getattr(lsm, key) is not None and not 1 <= getattr(lsm, key) <= MAX_HEAD_K:
                fail(f"{key} must be between 1 and {MAX_HEAD_K}, got {getattr(lsm, key)}", key)
        if lsm.groups is not None:
            if lsm.groups < 1:
                fail(f"groups must be >= 1, got {lsm.groups}", "groups")
            if lsm.heads is not None and lsm.heads % lsm.groups:
                fail(f"groups = {lsm.groups} does not divide heads = {lsm.heads}", "groups")
            if lsm.tie_k_to_decay:
                fail("groups share q and k over heads, but tie k makes k per head from the decay", "groups")
        if lsm.kv_heads is not None:
            if lsm.kv_heads < 1:
                fail(f"kv_heads must be >= 1, got {lsm.kv_heads}", "kv_heads")
            if lsm.heads is not None and lsm.heads % lsm.kv_heads:
                fail(f"kv_heads = {lsm.kv_heads} does not divide heads = {lsm.heads}", "kv_heads")
            for statement, present in (("groups", lsm.groups), ("tie k", lsm.tie_k_to_decay or None),
                                       ("key = ...", lsm.key), ("memories", lsm.memories)):
                if present is not None:
                    fail(f"kv_heads (k and v shared by groups of q heads) goes without {statement}", "kv_heads")
        if lsm.qkv_bias and lsm.memories is not None:
            fail("qkv_bias goes without memories (the per-memory projections have no bias)", "qkv_bias")
        if lsm.qk_norm is not None:
            if not lsm.qk_norm.eps > 0:
                fail(f"qk_norm eps must be > 0, got {lsm.qk_norm.eps}", "qk_norm", "eps")
            for statement, present in (("groups", lsm.groups), ("query = ...", lsm.query), ("key = ...", lsm.key),
                                        ("tie k", lsm.tie_k_to_decay or None), ("memories", lsm.memories),
                                        ("short_conv", lsm.short_conv or None)):
                if present is not None:
                    fail(f"qk_norm (per head, right after the q and k projections) goes without {statement}", "qk_norm")
        if lsm.window_attention is not None:
            self._window_attention(lsm, fail)
        for key in ("expand_k", "expand_v"):
            if not 0 < getattr(lsm, key) <= MAX_EXPAND:
                fail(f"{key} must be > 0 and at most {MAX_EXPAND}, got {getattr(lsm, key)}", key)
        if lsm.output_norm_eps is not None and not lsm.output_norm_eps > 0:
            fail(f"output_norm_eps must be > 0, got {lsm.output_norm_eps}", "output_norm_eps")
        if not 0 <= lsm.short_conv <= MAX_SHORT_CONV:
            fail(f"short_conv must be between 0 (none) and {MAX_SHORT_CONV}, got {lsm.short_conv}", "short_conv")
        if lsm.chunk_size not in CHUNK_SIZES:
            fail(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}, got {lsm.chunk_size}", "chunk_size")
        for side in ("q", "k"):
            maps = getattr(lsm, f"feature_map_{side}")
            for m in maps[:-1]:
                if m in ("taylor2", "rebased"):
                    fail(f"feature map {m!r} expands the key dimension and must come last", "feature_map", side)
        if lsm.tie_k_to_decay and lsm.feature_map_k != ["identity"]:
            fail("tie k = 1 - exp(g) makes k from the decay: it takes no feature map (feature_map q = ... only)",
                 "feature_map", "k")
        self._value_features(lsm, fail)
        widths = {side: [m for m in getattr(lsm, f"feature_map_{side}") if m in ("taylor2", "rebased")] for side in "qk"}
        if widths["q"] != widths["k"] and not lsm.tie_k_to_decay:
            end = {side: widths[side][-1] if widths[side] else "no map that changes the width" for side in "qk"}
            fail(f"q and k need one feature width, but q's feature maps end in {end['q']} and k's in {end['k']} "
                 "(taylor2 and rebased change it)", "feature_map")

        params = set(lsm.params)
        data = {"x"} | params | {"h", "H", "K", "V", "layer", "layers"}
        decay = lsm.decay
        if decay.kind == "none" and decay.expr is not None:
            fail("decay none takes no expression", "decay")
        if decay.kind != "none":
            if decay.expr is None:
                fail(f"decay {decay.kind} needs an expression for the log decay g", "decay")
            names = ex.free_names(decay.expr)
            if decay.kind == "constant":
                bad = names - {"h", "H", "K", "V", "layer", "layers"}
                if bad or ex.linears(decay.expr):
                    what = f"'{sorted(bad)[0]}'" if bad else "a projection"
                    fail(f"constant decay may read only h, H, K, V, layer and layers, not {what} (use decay scalar or "
                         "vector)", "decay")
            else:
                self._reads(names, data, f"{decay.kind} decay", fail, "decay")
                if "x" not in names:
                    fail(f"{decay.kind} decay must depend on the input x; a decay of h alone is 'decay constant'", "decay")
        self._elementwise(lsm, data, fail)
        if lsm.update is not None:
            self._update(lsm, data, fail)
        if lsm.delta is not None:
            if lsm.dplr is not None:
                fail("delta and dplr are exclusive: dplr already generalizes the delta rule", "dplr")
            self._reads(ex.free_names(lsm.delta.beta), data, "delta beta", fail, "delta")
        if lsm.dplr is not None:
            for part in ("a", "b"):
                names = ex.free_names(getattr(lsm.dplr, part))
                self._reads(names, data | {"q", "k", "v"}, f"dplr {part}", fail, "dplr", part)
        if lsm.bonus_u:
            if lsm.delta is not None or lsm.dplr is not None:
                fail("bonus u (RWKV6) reads S_{t-1} and is defined only without delta/dplr", "bonus")
            if "u" in lsm.params and lsm.params["u"].shape != ["H", "K"]:
                fail(f"param u must have shape [H, K], got [{', '.join(lsm.params['u'].shape)}]", "params", "u")
        if lsm.tie_k_to_decay and decay.kind != "vector":
            fail(f"tie k = 1 - exp(g) needs a vector decay (HGRN2), not decay {decay.kind}", "tie")
        if lsm.output_gate is not None:
            self._reads(ex.free_names(lsm.output_gate), data, "output_gate", fail, "output_gate")
        if lsm.skip is not None:
            self._reads(ex.free_names(lsm.skip), data, "skip", fail, "skip")
        for side in ("query", "key"):
            if getattr(lsm, side) is None:
                continue
            self._reads(ex.free_names(getattr(lsm, side)), data, side, fail, side)
            if getattr(lsm, f"feature_map_{side[0]}") != ["identity"]:
                fail(f"{side} = ... gives the op's {side[0]} itself: it takes no feature map", side)
            if lsm.groups is not None:
                fail(f"{side} = ... gives the op's {side[0]} per head: groups (shared projections) do not apply", side)
        if lsm.key is not None and lsm.tie_k_to_decay:
            fail("key = ... and tie k both define k", "key")
        if lsm.scale is not None:
            bad = ex.free_names(lsm.scale) - {"H", "K", "V"}
            if bad or ex.linears(lsm.scale):
                fail("scale may read only H, K and V", "scale")
        for name, p in lsm.params.items():
            if name in ex.RESERVED_SYMBOLS:
                fail(f"param {name!r} shadows a built-in symbol", "params", name)
            self._attribute_name(name, "param", fail, "params", name)
            if not p.shape:
                fail(f"param {name!r} needs at least one dimension", "params", name)
            for d in p.shape:
                if d not in DIMS:
                    fail(f"param {name!r}: unknown dimension {d!r} (one of {', '.join(DIMS)})", "params", name)
            bad = ex.free_names(p.init) - {"h", "i", "H", "K", "V", "layer", "layers"}
            if bad or ex.linears(p.init):
                fail(f"param {name!r}: an init may read only h, i, H, K, V and layer", "params", name)
            reads = ex.free_names(p.init)
            if "h" in reads and "H" not in p.shape:
                fail(f"param {name!r}: the init reads the head index h, but the param has no H dimension", "params", name)
            if "i" in reads and not set(p.shape) - {"H"}:
                fail(f"param {name!r}: the init reads the index i, but the param has no K, V or hidden dimension",
                     "params", name)
        self._weights(lsm, fail)
        if lsm.memories is not None:
            self._memories(lsm, fail)
        try:
            check_shapes(lsm)
        except ShapeError as err:
            fail(str(err), *err.field)
        numbers = [(("scale",), lsm.scale), (("decay", "rate"), lsm.decay.rate)] + [(("params", n), p.init) for n, p in lsm.params.items()]
        for field, e in _expressions(lsm) + numbers:
            problem = number_problem(e) if e is not None else None
            if problem:
                fail(problem, *field)

    def _elementwise(self, lsm: LSMSpec, data: set[str], fail) -> None:
        """The element-wise gates: a value decay (outer sum with the key side), or a step and a rate (outer product)."""
        decay = lsm.decay
        if decay.value is not None:
            if decay.kind not in ("none", "vector"):
                fail(f"decay value sums with a vector decay over (K, V) (G = g 1^T + 1 gv^T), not with decay {decay.kind}",
                     "decay", "value")
            self._reads(ex.free_names(decay.value), data, "value decay", fail, "decay", "value")
        if (decay.step is None) != (decay.rate is None):
            have, missing = ("step", "rate") if decay.rate is None else ("rate", "step")
            fail(f"decay {have} needs 'decay {missing} = ...': the gate is exp(step * rate) (Mamba: dt and A)", "decay", have)
        if decay.step is not None:
            if decay.kind != "none" or decay.value is not None:
                other = "value" if decay.kind == "none" else decay.kind
                fail(f"decay step and rate are the whole gate (exp(dt A)); remove decay {other}", "decay", "step")
            self._reads(ex.free_names(decay.step), data, "decay step", fail, "decay", "step")
            bad = ex.free_names(decay.rate) - (set(lsm.params) | {"H", "K", "V", "layer", "layers"})
            if bad or ex.linears(decay.rate):
                what = f"'{sorted(bad)[0]}'" if bad else "a projection"
                fail(f"decay rate is a learned matrix [H, V, K]: it may read params, H, K, V, layer and layers, not {what}",
                     "decay", "rate")
        if decay.value is not None or decay.step is not None:
            for other, present in (("delta", lsm.delta), ("dplr", lsm.dplr), ("bonus", lsm.bonus_u or None),
                                   ("tie", lsm.tie_k_to_decay or None)):
                if present is not None:
                    fail(f"element-wise gates (decay value / step) go without {other}", other)

    def _update(self, lsm: LSMSpec, data: set[str], fail) -> None:
        """A test-time-training memory: the update is the whole transition, and its gates are per token and head."""
        upd = lsm.update
        for other, present in (("delta", lsm.delta), ("dplr", lsm.dplr), ("bonus", lsm.bonus_u or None),
                               ("tie", lsm.tie_k_to_decay or None)):
            if present is not None:
                fail(f"update is the whole transition (a gradient step on the inner loss): remove {other}", other)
        if lsm.decay.kind != "none" or any(getattr(lsm.decay, p) is not None for p in ("value", "step", "rate")):
            fail("update is the whole transition: forgetting is its weight_decay, not a decay statement", "decay")
        if upd.loss == "ln_mse":
            for key, e in (("momentum", upd.momentum), ("weight_decay", upd.weight_decay)):
                if e is not None:
                    fail(f"loss ln_mse (TTT-Linear) takes plain gradient steps: no {key}", "update", key)
            widening = {"taylor2", "rebased"} & set(lsm.feature_map_q + lsm.feature_map_k)
            if lsm.expand_k != lsm.expand_v or lsm.head_k is not None or lsm.head_v is not None or widening:
                fail("loss ln_mse fits k + LN(k W + b) to v and reads q + LN(q W + b): it needs K = V (equal "
                     "expand_k and expand_v, no head_k or head_v, no feature map that changes the width)", "update", "loss")
            if lsm.scale is None or lsm.scale != 1:
                fail("loss ln_mse reads o = q + LN(q W + b), which has no output scale: write scale = 1", "update", "loss")
            for name in ("ln_weight", "ln_bias"):
                if name in lsm.params and lsm.params[name].shape != ["H", "V"]:
                    fail(f"param {name} (the inner LayerNorm's) must have shape [H, V], got "
                         f"[{', '.join(lsm.params[name].shape)}]", "params", name)
        for key, e in upd.gates():
            self._reads(ex.free_names(e), data, f"update {key}", fail, "update", key)
        if upd.minibatch > 1 and lsm.chunk_size % upd.minibatch:
            fail(f"gradient = minibatch({upd.minibatch}): the mini-batch must divide chunk_size = {lsm.chunk_size} "
                 "(the chunkwise form keeps mini-batches inside chunks)", "update", "gradient")

    @staticmethod
    def _value_features(lsm: LSMSpec, fail) -> None:
        """`feature_map v`: maps that keep the value width, on the plain layer's v (MiniMax-01's SiLU on q, k and v)."""
        bad = [m for m in lsm.feature_map_v if m not in VALUE_FEATURE_MAPS]
        if bad:
            fail(f"feature_map v takes maps that keep the value width ({', '.join(VALUE_FEATURE_MAPS)}), not {bad[0]!r}",
                 "feature_map", "v")
        if lsm.feature_map_v != ["identity"]:
            for statement, present in (("memories", lsm.memories), ("window_attention", lsm.window_attention)):
                if present is not None:
                    fail(f"feature_map v goes without {statement}", "feature_map", "v")

    @staticmethod
    def _window_attention(lsm: LSMSpec, fail) -> None:
        """Liger Attention runs softmax attention on the layer's own q, k, v projections."""
        w = lsm.window_attention
        if w.window < 1:
            fail(f"window_attention window must be >= 1, got {w.window}", "window_attention", "window")
        if not 0 <= w.mix <= 1:
            fail(f"window_attention mix (the attention's weight) must be between 0 and 1, got {w.mix}", "window_attention", "mix")
        if not w.rope_theta > 0:
            fail(f"window_attention rope_theta must be > 0, got {w.rope_theta}", "window_attention", "rope_theta")
        for statement, present in (("groups", lsm.groups), ("query = ...", lsm.query), ("key = ...", lsm.key),
                                    ("tie k", lsm.tie_k_to_decay or None), ("memories", lsm.memories),
                                    ("short_conv", lsm.short_conv or None), ("head_k", lsm.head_k), ("head_v", lsm.head_v)):
            if present is not None:
                fail(f"window_attention (softmax attention over the layer's q, k, v projections) goes without {statement}",
                     "window_attention")
        if lsm.expand_k != lsm.expand_v:
            fail("window_attention needs expand_k = expand_v (its attention reads q, k and v of one head width)", "window_attention")

    @staticmethod
    def _memories(lsm: LSMSpec, fail) -> None:
        mem = lsm.memories
        # the memory layer (templates/modules/memories.py.j2) projects q and k from each slot's input; a q or k
        # the spec gives itself (S4's learned B and C) has no per-memory form there yet
        for statement, present in (("query", lsm.query), ("key", lsm.key)):
            if present is not None:
                fail(f"memories go without {statement} (not supported in a layer with memories yet)", "memories")
        if not 1 <= mem.count <= MAX_MEMORIES:
            fail(f"memories count must be between 1 and {MAX_MEMORIES}, got {mem.count}", "memories", "count")
        if not 1 <= mem.top_k <= mem.count:
            fail(f"memories top_k = {mem.top_k} must be between 1 and count = {mem.count}", "memories", "top_k")
        for key in ("aux_loss", "z_loss"):
            if getattr(mem, key) < 0:
                fail(f"memories {key} must be >= 0, got {getattr(mem, key)}", "memories", key)
        # a projection weight is owned by each memory or shared by all, never both
        owned = {"beta": [e for f, e in _expressions(lsm) if f == ("delta",)],
                 "decay": [e for f, e in _expressions(lsm) if f == ("decay",)]}
        per = {lin.args[1].name for part in mem.per_memory for e in owned.get(part, []) for lin in ex.linears(e)}
        for field, e in _expressions(lsm):
            part = {("delta",): "beta", ("decay",): "decay"}.get(field)
            if part in mem.per_memory:
                continue
            both = sorted(per & {lin.args[1].name for lin in ex.linears(e)})
            if both:
                fail(f"projection {both[0]!r} is per memory (per_memory) but also used by {' '.join(field)}, "
                     "which is shared: give it another name", *field)

    @staticmethod
    def _attribute_name(name: str, what: str, fail, *field: str) -> None:
        problem = name_problem(name, attribute=True)
        if problem is None and (name in RESERVED_NAMES or name.startswith("_")):
            problem = "is reserved: the emitted layer uses it (as it may any name starting with '_')"
        if problem:
            fail(f"{what} name {name!r} {problem}", *field)

    @staticmethod
    def _reads(names: set[str], allowed: set[str], what: str, fail, *field: str) -> None:
        bad = sorted(names - allowed)
        if bad:
            fail(f"{what} may not read {bad[0]!r}", *field)

    def _weights(self, lsm: LSMSpec, fail) -> None:
        """A projection weight is one tensor with a free name: not a param's, a symbol's or the layer's."""
        for field, e in _expressions(lsm):
            for lin in ex.linears(e):
                w, out = lin.args[1].name, int(lin.args[2])
                if w in lsm.params or w in ex.RESERVED_SYMBOLS:
                    fail(f"projection weight {w!r} collides with a symbol or param of the same name", *field)
                self._attribute_name(w, "projection weight", fail, *field)
                if out < 0:
                    fail(f"projection {w!r}: a low-rank width must be positive", *field)

    # ---- the model --------------------------------------------------------------

    def model(self, model: ModelSpec) -> None:
        def fail(msg: str, *field: str):
            self.fail(f"model {model.name!r}: {msg}", "model", *field, fallback=model.loc)

        for key in ("vocab", "hidden", "layers", "heads", "max_seq_len"):
            if getattr(model, key) < 1:
                fail(f"{key} must be >= 1, got {getattr(model, key)}", key)
        if model.layers > MAX_LAYERS:
            fail(f"layers = {model.layers} is more than {MAX_LAYERS}", "layers")
        if model.hidden % model.heads:
            fail(f"heads = {model.heads} does not divide hidden = {model.hidden}", "heads")
        bad = sorted(set(model.pattern) - {"L", "N"})
        if bad:
            fail(f"pattern may contain only L (LSM layer) and N (softmax attention layer), not {bad[0]!r}", "pattern")
        if len(model.pattern) != model.layers:
            fail(f"pattern has {len(model.pattern)} layers but layers = {model.layers}", "pattern")
        if "L" in model.pattern and model.lsm is None:
            fail("the pattern has L layers but the model names no lsm (add `lsm = NAME`)", "pattern")
        if model.lsm is not None:
            if model.lsm not in self.ir.lsms:
                fail(f"uses lsm {model.lsm!r}, which is not defined or imported", "lsm")
            lsm = self.ir.lsms[model.lsm]
            heads = lsm.heads or model.heads
            if lsm.groups is not None and heads % lsm.groups:
                fail(f"lsm {lsm.name!r}: groups = {lsm.groups} does not divide heads = {heads}", "lsm")
            if lsm.kv_heads is not None and heads % lsm.kv_heads:
                fail(f"lsm {lsm.name!r}: kv_heads = {lsm.kv_heads} does not divide heads = {heads}", "lsm")
            for key in [k for k, given in (("expand_k", lsm.head_k), ("expand_v", lsm.head_v)) if given is None]:
                width = getattr(lsm, key) * model.hidden
                if width != int(width) or int(width) % heads or int(width) < heads:
                    fail(f"lsm {lsm.name!r}: {key} * hidden = {width:g} is not a positive multiple of heads = {heads}", "lsm")
            self._constant_decay_in_model(model, lsm)
        attn = model.attention
        heads = attn.heads or model.heads
        if heads < 1 or (attn.head_dim is None and model.hidden % heads):
            fail(f"attention heads = {heads} does not divide hidden = {model.hidden} (or give head_dim)", "attention", "heads")
        if attn.head_dim is not None and not 1 <= attn.head_dim <= MAX_HEAD_DIM:
            fail(f"attention head_dim must be between 1 and {MAX_HEAD_DIM}, got {attn.head_dim}", "attention", "head_dim")
        head_dim = attn.head_dim or model.hidden // heads
        rotary = attn.rotary_dim if attn.rotary_dim is not None else head_dim
        if rotary % 2 or not 2 <= rotary <= head_dim:
            what = "rotary_dim" if attn.rotary_dim is not None else "head_dim"
            fail(f"attention {what} = {rotary}: RoPE rotates pairs of dims, so it needs an even rotary_dim from 2 to "
                 f"head_dim = {head_dim}", "attention", what)
        residual = model.residual
        for key in ("alpha", "beta"):
            if not getattr(residual, key) > 0:
                fail(f"residual {key} must be > 0, got {getattr(residual, key)}", "residual", key)
        kv = attn.kv_heads or heads
        if kv < 1 or heads % kv:
            fail(f"attention kv_heads = {kv} does not divide heads = {heads}", "attention", "kv_heads")
        if attn.window is not None and attn.window < 1:
            fail(f"attention window must be >= 1, got {attn.window}", "attention", "window")
        if model.moe is not None and model.ffn is not None:
            fail("a model has either a moe { } or an ffn { } block, not both", "ffn")
        if model.moe is None and model.ffn is None:
            fail("a model needs a moe { } block (Linear-MoE) or an ffn { } block (dense)")
        if model.moe is not None:
            moe = model.moe
            for key in ("experts", "expert_ffn"):
                if getattr(moe, key) < 1:
                    fail(f"moe {key} must be >= 1, got {getattr(moe, key)}", "moe", key)
            if not 0 < moe.top_k <= moe.experts:
                fail(f"moe top_k = {moe.top_k} must be between 1 and experts = {moe.experts}", "moe", "top_k")
            if moe.shared_experts < 0:
                fail(f"moe shared_experts must be >= 0, got {moe.shared_experts}", "moe", "shared_experts")
            for key in ("aux_loss", "z_loss", "bias_update_rate"):
                if getattr(moe, key) < 0:
                    fail(f"moe {key} must be >= 0", "moe", key)
            if moe.capacity_factor is not None and moe.capacity_factor <= 0:
                fail("moe capacity_factor must be > 0 (or none: dropless)", "moe", "capacity_factor")
        if model.ffn is not None and model.ffn.ffn < 1:
            fail(f"ffn must be >= 1, got {model.ffn.ffn}", "ffn", "ffn")

    def _constant_decay_in_model(self, model: ModelSpec, lsm: LSMSpec) -> None:
        """A constant decay that reads layer or layers gets its numbers only in a model: it must be finite at each
        of the model's L layers (MiniMax's 1 - layer / (layers - 1) divides by zero in a one-layer stack)."""
        decay = lsm.decay
        if decay.kind != "constant" or decay.expr is None or not {"layer", "layers"} & ex.free_names(decay.expr):
            return
        heads = lsm.heads or model.heads
        numbers = {"H": heads, "K": lsm.head_k or int(lsm.expand_k * model.hidden) // heads,
                   "V": lsm.head_v or int(lsm.expand_v * model.hidden) // heads, "layers": model.layers}
        fixed = decay.expr.subs({s: numbers[s.name] for s in decay.expr.free_symbols if s.name in numbers})
        for i in (i for i, kind in enumerate(model.pattern) if kind == "L"):
            g = fixed.subs({s: i for s in fixed.free_symbols if s.name == "layer"})
            if g.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo):
                self.fail(f"lsm {lsm.name!r}: the constant decay is not finite at layer {i} of model {model.name!r} "
                          f"(layers = {model.layers}): {g}", "lsm", lsm.name, "decay", fallback=lsm.loc)

    # ---- parallelism --------------------------------------------------------------

    def parallel(self) -> None:
        par, model = self.ir.parallel, self.ir.model

        def fail(msg: str, *field: str):
            self.fail(msg, "parallel", *field, fallback=par.loc)

        for name in ("dp", "sp", "ep", "tp"):
            if getattr(par, name) < 1:
                fail(f"parallel degree {name} must be >= 1, got {getattr(par, name)}", name)
        if model is None:
            return
        if par.ep > 1 and model.moe is None:
            fail(f"ep = {par.ep} needs experts, but model {model.name!r} is dense", "ep")
        if model.moe is not None and model.moe.experts % par.ep:
            fail(f"ep = {par.ep} does not divide experts = {model.moe.experts}", "ep")
        if model.heads % par.tp:
            fail(f"tp = {par.tp} does not divide heads = {model.heads}", "tp")
        lsm = self.ir.lsms.get(model.lsm) if model.lsm else None
        if par.sp > 1 and lsm is not None and lsm.update is not None and lsm.update.loss == "ln_mse":
            fail(f"sp = {par.sp}: lsm {lsm.name!r} (loss ln_mse, TTT-Linear) is not affine in its state, so LASP-2 "
                 "cannot split its sequence", "sp")

    def run(self) -> None:
        for lsm in self.ir.lsms.values():
            self.lsm(lsm)
        if self.ir.model is not None:
            self.model(self.ir.model)
        self.parallel()


def _expressions(lsm: LSMSpec) -> list[tuple[tuple[str, ...], sympy.Expr]]:
    """Every expression of an LSM that may hold projections, with its statement's position key, in a fixed order."""
    out = []
    if lsm.decay.expr is not None:
        out.append((("decay",), lsm.decay.expr))
    if lsm.delta is not None:
        out.append((("delta",), lsm.delta.beta))
    if lsm.dplr is not None:
        out += [(("dplr", "a"), lsm.dplr.a), (("dplr", "b"), lsm.dplr.b)]
    for part in ("value", "step"):
        if getattr(lsm.decay, part) is not None:
            out.append((("decay", part), getattr(lsm.decay, part)))
    if lsm.update is not None:
        out += [(("update", key), e) for key, e in lsm.update.gates()]
    if lsm.output_gate is not None:
        out.append((("output_gate",), lsm.output_gate))
    if lsm.skip is not None:
        out.append((("skip",), lsm.skip))
    for side in ("query", "key"):
        if getattr(lsm, side) is not None:
            out.append(((side,), getattr(lsm, side)))
    return out


def number_problem(e: sympy.Basic) -> Optional[str]:
    """What is wrong with the numbers of an expression, or None: each is real and a finite float32 value, and
    an exact fraction fits int64 (what the frontend guarantees for spec text; an IR built in Python may not)."""
    if e.has(sympy.I, sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return f"expression {e} is not a finite real number"
    for n in e.atoms(sympy.Number):
        if isinstance(n, sympy.Rational):
            if abs(int(n.p)) > ex.F32_MAX * int(n.q):
                return f"the number {n} is beyond float32 (|x| <= {ex.F32_MAX:.4g})"
            if max(abs(int(n.p)).bit_length(), int(n.q).bit_length()) > ex.INT64_BITS:
                return f"the fraction {n} does not fit int64: write it as a float"
        elif not abs(float(n)) <= ex.F32_MAX:
            return f"the number {n} is beyond float32 (|x| <= {ex.F32_MAX:.4g})"
    return None


def validate(ir: SpecIR, locs: Optional[Locs] = None) -> SpecIR:
    _Checker(ir, locs).run()
    return ir
