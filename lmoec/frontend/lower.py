"""Blocks and statements -> the IR (lmoec.ir.nodes), resolving imports and `extends`.

Each file is parsed once. A file sees the blocks it defines and, transitively,
those of the files it imports; two different blocks with one name are an error,
so a name always means one thing. `X extends Y` starts from a deep copy of Y's
lowered spec (pydantic `model_copy`) and applies X's statements on top; the
positions of inherited values come along, so errors point where a value was
written.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable, Optional

import lark
import sympy
from pydantic import ValidationError

from ..errors import SpecError
from ..ir import expr as ex
from ..ir.expr import F32_MAX
from ..ir.nodes import (
    AttentionSpec,
    Decay,
    Delta,
    DenseFFNSpec,
    DPLRTerms,
    LSMSpec,
    Memories,
    ModelSpec,
    MoESpec,
    ParallelSpec,
    Param,
    QKNorm,
    ResidualSpec,
    SpecIR,
    Update,
    WindowAttention,
)
from ..passes.validate import MAX_LAYERS, Locs, validate
from ..paths import ROOT
from .expressions import lower_expr
from .parse import Block, ParsedFile, Source, Stmt, Value, parse, read_source

FEATURE_MAPS = ("identity", "elu_p1", "relu", "silu", "l2norm", "taylor2", "rebased", "softmax")
DECAY_KINDS = ("none", "constant", "scalar", "vector")
GATE_PARTS = ("value", "step", "rate")  # element-wise gates (lmoec.kinds.elementwise): `decay value`, `decay step`, `decay rate`
PARAM_SYMBOLS = {"h", "i", "H", "K", "V", "layer", "layers"}
MAX_MINIBATCH = 256  # tokens per mini-batch of a test-time-training update (at most the largest chunk)
MAX_INT = 2**31 - 1  # integer settings size tensors and loops
MAX_IMPORT_DEPTH = 64  # files importing files; loading recurses once per level
MAX_EXTENDS_DEPTH = 64  # blocks extending blocks; lowering recurses once per level


def display_path(path: Path, given: str) -> str:
    """ROOT-relative inside the repository (stable in IR dumps), else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return given


# ---- literal values -----------------------------------------------------------


def _abbrev(text: str, keep: int = 24) -> str:
    """A number as written, shortened if long (a 5000-digit literal stays readable in a message)."""
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]} ({len(text)} characters)"


class Values:
    """Typed reads of one statement's values, each failing at the value's position."""

    def __init__(self, stmt: Stmt, src: Source, where: str):
        self.stmt, self.src, self.where = stmt, src, where

    def fail(self, message: str, node: Optional[Value] = None):
        raise self.src.error(f"{self.where}: {message}", node if node is not None else self.stmt.key)

    def one(self) -> Value:
        if len(self.stmt.values) != 1:
            self.fail(f"'{self.stmt.name}' takes one value, got {len(self.stmt.values)}", self.stmt.values[1])
        return self.stmt.values[0]

    @staticmethod
    def _name(node: Value) -> Optional[str]:
        if isinstance(node, lark.Tree) and node.data == "var":
            return str(node.children[0])
        return None

    def is_none(self) -> bool:
        return len(self.stmt.values) == 1 and self._name(self.stmt.values[0]) == "none"

    def number(self, integer: bool) -> Any:
        """An integer (|n| <= MAX_INT: they size tensors) or a real that is finite in float32."""
        node = self.one()
        sign = 1
        if isinstance(node, lark.Tree) and node.data == "neg":
            sign, node = -1, node.children[0]
        if isinstance(node, lark.Tree) and node.data == "number":
            text = str(node.children[0])
            if text.isdigit():
                if len(text.lstrip("0")) > len(str(MAX_INT)) or int(text) > MAX_INT:
                    self.fail(f"'{self.stmt.name}' = {_abbrev(text)} is out of range (at most {MAX_INT})", node)
                return sign * int(text)
            if not integer:
                value = float(text)
                if not abs(value) <= F32_MAX:
                    self.fail(f"'{self.stmt.name}' = {_abbrev(text)} is out of range: numbers are finite "
                              f"float32 values (|x| <= {F32_MAX:.4g})", node)
                return sign * value
        self.fail(f"'{self.stmt.name}' expects {'an integer' if integer else 'a number'}", node)

    def integer(self) -> int:
        return self.number(True)

    def real(self) -> float:
        return float(self.number(False))

    def boolean(self) -> bool:
        name = self._name(self.one())
        if name not in ("true", "false"):
            self.fail(f"'{self.stmt.name}' expects true or false", self.stmt.values[0])
        return name == "true"

    def choice(self, options, node: Optional[Value] = None, what: Optional[str] = None) -> str:
        node = node if node is not None else self.one()
        name = self._name(node)
        if name not in options:
            shown = repr(name) if name is not None else "this value"
            self.fail(f"unknown {what or self.stmt.name} {shown} (one of {', '.join(options)})", node)
        return name

    def ident(self) -> str:
        name = self._name(self.one())
        if name is None:
            self.fail(f"'{self.stmt.name}' expects a name", self.stmt.values[0])
        return name

    def pattern(self) -> str:
        """The layer letters; their count is checked before a string is built, so `* 10**20` can't exhaust memory."""
        node = self.one()

        def go(n: Value) -> str:
            if n.data == "pattern_str":
                return str(n.children[0])[1:-1]
            if n.data == "pattern_repeat":
                times = str(n.children[1])
                if not times.isdigit() or not times.strip("0"):
                    self.fail(f"a pattern repeats a positive integer number of times, not {_abbrev(times)}", n.children[1])
                part = go(n.children[0])
                if len(times.lstrip("0")) > len(str(MAX_LAYERS)) or len(part) * int(times) > MAX_LAYERS:
                    self.fail(f"the pattern would have more than {MAX_LAYERS} layers", n.children[1])
                return part * int(times)
            if n.data == "pattern_cat":
                whole = go(n.children[0]) + go(n.children[1])
                if len(whole) > MAX_LAYERS:
                    self.fail(f"the pattern would have more than {MAX_LAYERS} layers", n)
                return whole
            self.fail('pattern is a string of L and N, e.g. "LLLN" * 3', n)

        if not (isinstance(node, lark.Tree) and node.data.startswith("pattern")):
            self.fail('pattern is a string of L and N, e.g. "LLLN" * 3', node)
        return go(node)

    def expr(self, symbols: set[str]) -> sympy.Expr:
        return lower_expr(self.one(), symbols, self.src)


def _check_keys(stmts: list[Stmt], src: Source, where: str, known: dict[str, tuple], params: bool = False) -> None:
    """Unknown keys, wrong statement forms and duplicates, before any value is read.

    `known` maps key -> (statement kinds allowed, qualifiers allowed or None); `params`:
    whether `param` statements are allowed (in lsm blocks only).
    """
    seen: dict[tuple, lark.Token] = {}
    for s in stmts:
        if s.kind == "param":
            if not params:
                raise src.error(f"{where}: 'param {s.key}[...]' belongs in an lsm block", s.key)
            ident = ("param", str(s.key))
        else:
            if s.key not in known:
                raise src.error(f"{where}: unknown key '{s.key}' (known: {', '.join(sorted(known))})", s.key)
            kinds, quals = known[s.key]
            if s.kind not in kinds:
                forms = {"assign": f"{s.key} = ...", "flag": f"{s.key} NAME", "block": f"{s.key} {{ ... }}"}
                raise src.error(f"{where}: '{s.key}' is written {' or '.join(forms[k] for k in kinds)}", s.key)
            if s.qual is not None and (quals is None or s.qual not in quals):
                if quals is None:
                    raise src.error(f"{where}: '{s.key}' takes no qualifier, got '{s.qual}'", s.qual)
                raise src.error(f"{where}: unknown {s.key} '{s.qual}' (one of {', '.join(quals)})", s.qual)
            ident = (str(s.key), str(s.qual) if s.qual is not None else None)
        if ident in seen:
            first = seen[ident]
            raise src.error(f"{where}: duplicate '{s.name}' (first set at line {first.line})", s.key)
        seen[ident] = s.key


# ---- the LSM block ---------------------------------------------------------------

LSM_KEYS: dict[str, tuple] = {
    "heads": (("assign",), None),
    "expand_k": (("assign",), None),
    "expand_v": (("assign",), None),
    "head_k": (("assign",), None),
    "head_v": (("assign",), None),
    "groups": (("assign",), None),
    "skip": (("assign",), None),
    "query": (("assign",), None),
    "key": (("assign",), None),
    "feature_map": (("assign",), ("q", "k", "v")),
    "decay": (("assign",), DECAY_KINDS + GATE_PARTS),
    "delta": (("assign",), ("beta",)),
    "dplr": (("assign",), ("a", "b")),
    "bonus": (("assign", "flag"), ("u",)),
    "tie": (("assign",), ("k",)),
    "short_conv": (("assign",), None),
    "output_norm": (("assign",), None),
    "output_norm_eps": (("assign",), None),
    "output_gate": (("assign",), None),
    "scale": (("assign",), None),
    "chunk_size": (("assign",), None),
    "memories": (("block", "assign"), None),
    "update": (("block", "assign"), None),
    "kv_heads": (("assign",), None),
    "qkv_bias": (("assign",), None),
    "window_attention": (("block", "assign"), None),
    "qk_norm": (("block", "assign"), None),
}
UPDATE_KEYS = {k: (("assign",), None) for k in ("loss", "lr", "momentum", "weight_decay", "gradient")}
INNER_LOSSES = ("mse", "ln_mse")
QK_NORM_KEYS = {k: (("assign",), None) for k in QKNorm.model_fields}
WINDOW_KEYS = {k: (("assign",), None) for k in WindowAttention.model_fields}
MEMORY_KEYS = {k: (("assign",), None) for k in Memories.model_fields}
MEMORY_PARTS = ("k", "v", "beta", "decay")


def apply_lsm(spec: LSMSpec, block: Block, locs: Locs) -> LSMSpec:
    """Apply one lsm block's statements on top of `spec` (a fresh default or a base's copy)."""
    src, where = block.source, f"lsm '{block.name}'"
    _check_keys(block.body, src, where, LSM_KEYS, params=True)
    f = spec.model_dump(exclude={"recurrence"}, round_trip=True)
    f.update(decay=spec.decay, delta=spec.delta, dplr=spec.dplr, output_gate=spec.output_gate, scale=spec.scale, skip=spec.skip,
             query=spec.query, key=spec.key, update=spec.update)
    params = dict(spec.params)
    at = ("lsm", spec.name)

    # params first: any expression of the block may read them
    for s in (s for s in block.body if s.kind == "param"):
        if s.key in ex.RESERVED_SYMBOLS:
            raise src.error(f"{where}: param '{s.key}' shadows the built-in symbol '{s.key}'", s.key)
        init = lower_expr(s.values[0], PARAM_SYMBOLS, src)
        params[str(s.key)] = Param(name=str(s.key), shape=[str(d) for d in s.dims], init=init, loc=src.loc(s.key))
        locs.set(at + ("params", str(s.key)), src.loc(s.key))
    symbols = set(ex.RESERVED_SYMBOLS) | set(params)
    dplr_parts = {"a": spec.dplr.a, "b": spec.dplr.b} if spec.dplr is not None else {}
    dplr_node: Optional[Stmt] = None
    keys_here: set[str] = set()

    for s in block.body:
        if s.kind == "param":
            continue
        v = Values(s, src, where)
        key, qual = str(s.key), (str(s.qual) if s.qual is not None else None)
        locs.set(at + ((key, qual) if qual else (key,)), src.loc(s.key))
        if key not in keys_here:  # a key written twice (dplr a, dplr b) is placed at its first statement
            locs.set(at + (key,), src.loc(s.key))
            keys_here.add(key)
        none = v.is_none()
        if key in ("heads", "head_k", "head_v", "groups", "kv_heads"):
            f[key] = None if none else v.integer()
        elif key in ("expand_k", "expand_v", ):
            f[key] = v.real()
        elif key in ("short_conv", "chunk_size"):
            f[key] = v.integer()
        elif key == "feature_map":
            maps = [v.choice(FEATURE_MAPS, n, "feature map") for n in s.values]
            for side in ((qual,) if qual else ("q", "k")):
                f[f"feature_map_{side}"] = maps
        elif key == "decay":
            if qual is None:
                if not none:
                    v.fail("write 'decay KIND = EXPR' (KIND: constant, scalar, vector, value, step, rate) or 'decay = none'")
                f["decay"] = Decay()
            elif qual == "none":
                v.fail("write 'decay = none'")
            elif qual in GATE_PARTS:  # a part of an element-wise gate: the key-side decay (if any) stays
                f["decay"] = f["decay"].model_copy(update={qual: None if none else v.expr(symbols)})
            else:
                f["decay"] = f["decay"].model_copy(update={"kind": qual, "expr": v.expr(symbols)})
        elif key == "delta":
            if qual is None and not none:
                v.fail("write 'delta beta = EXPR' or 'delta = none'")
            f["delta"] = None if qual is None else Delta(beta=v.expr(symbols))
        elif key == "dplr":
            if qual is None:
                if not none:
                    v.fail("write 'dplr a = EXPR' and 'dplr b = EXPR', or 'dplr = none'")
                dplr_parts = {}
            else:
                dplr_parts[qual] = v.expr(symbols)
                dplr_node = s
        elif key == "bonus":
            if s.kind == "assign" and not (qual is None and none):
                v.fail("write 'bonus u' (RWKV6's bonus, param u[H, K]) or 'bonus = none'")
            f["bonus_u"] = s.kind == "flag"
        elif key == "tie":
            if qual is None:
                if not none:
                    v.fail("write 'tie k = 1 - exp(g)' or 'tie = none'")
                f["tie_k_to_decay"] = False
            else:
                g = sympy.Symbol("g")
                if v.expr(symbols | {"g"}) != 1 - sympy.exp(g):
                    v.fail("only 'tie k = 1 - exp(g)' (HGRN2) is supported", s.values[0])
                f["tie_k_to_decay"] = True
        elif key == "output_norm":
            f["output_norm"] = v.choice(("none", "rmsnorm", "layernorm", "groupnorm", "rmsnorm_all_heads"))
        elif key == "output_norm_eps":
            f["output_norm_eps"] = None if none else v.real()
        elif key in ("output_gate", "scale", "skip", "query", "key"):
            f[key] = None if none else v.expr(symbols)
        elif key == "qkv_bias":
            f["qkv_bias"] = v.boolean()
        elif key == "qk_norm":
            if s.kind == "assign":
                if not none:
                    v.fail("write 'qk_norm { eps = 1e-6 }' (or 'qk_norm { }') or 'qk_norm = none'")
                f["qk_norm"] = None
            else:
                where_block = f"{where} qk_norm"
                _check_keys(s.body, src, where_block, QK_NORM_KEYS)
                fields = spec.qk_norm.model_dump() if spec.qk_norm is not None else {}
                for t in s.body:
                    locs.set(at + ("qk_norm", str(t.key)), src.loc(t.key))
                    fields[str(t.key)] = Values(t, src, where_block).real()
                f["qk_norm"] = QKNorm(**fields)
        elif key == "window_attention":
            if s.kind == "assign":
                if not none:
                    v.fail("write 'window_attention { window = 64 mix = 0.5 }' or 'window_attention = none'")
                f["window_attention"] = None
            else:
                f["window_attention"] = _window_attention(spec.window_attention, s, src, where, locs, at)
        elif key == "memories":
            if s.kind == "assign":
                if not none:
                    v.fail("write 'memories { count = 4 top_k = 2 ... }' or 'memories = none'")
                f["memories"] = None
            else:
                f["memories"] = _memories(spec.memories, s, src, where, locs, at)
        elif key == "update":
            if s.kind == "assign":
                if not none:
                    v.fail("write 'update { lr = EXPR ... }' or 'update = none'")
                f["update"] = None
            else:
                f["update"] = _update(spec.update, s, src, where, locs, at, symbols)

    if dplr_parts and set(dplr_parts) != {"a", "b"}:
        missing = ({"a", "b"} - set(dplr_parts)).pop()
        raise src.error(f"{where}: dplr needs both a and b; 'dplr {missing} = ...' is missing", dplr_node.key)
    f["dplr"] = DPLRTerms(**dplr_parts) if dplr_parts else None
    if f.get("update") is not None and _loss_of(f["update"]) == "ln_mse":  # TTT-Linear's inner LayerNorm, learned outside
        for name, init in (("ln_weight", 1), ("ln_bias", 0)):
            if name not in params:
                params[name] = Param(name=name, shape=["H", "V"], init=sympy.Integer(init), loc=spec.loc)
    if f["bonus_u"] and "u" not in params:
        params["u"] = Param(name="u", shape=["H", "K"], init=sympy.Integer(0), loc=spec.loc)
    f["params"] = params
    return LSMSpec(**f)


def _window_attention(base: Optional[WindowAttention], s: Stmt, src: Source, where: str, locs: Locs,
                      at: tuple) -> WindowAttention:
    """A `window_attention { }` block, merged over the base lsm's."""
    where = f"{where} window_attention"
    _check_keys(s.body, src, where, WINDOW_KEYS)
    fields = base.model_dump() if base is not None else {}
    for t in s.body:
        v, key = Values(t, src, where), str(t.key)
        locs.set(at + ("window_attention", key), src.loc(t.key))
        fields[key] = v.integer() if key == "window" else v.real()
    if "window" not in fields:
        raise src.error(f"{where}: missing window", s.key)
    return WindowAttention(**fields)


def _memories(base: Optional[Memories], s: Stmt, src: Source, where: str, locs: Locs, at: tuple) -> Memories:
    """A `memories { }` block, merged over the base lsm's (so `extends` can change only top_k)."""
    where = f"{where} memories"
    _check_keys(s.body, src, where, MEMORY_KEYS)
    fields = base.model_dump() if base is not None else {}
    for t in s.body:
        v, key = Values(t, src, where), str(t.key)
        locs.set(at + ("memories", key), src.loc(t.key))
        if key == "per_memory":
            fields[key] = [] if v.is_none() else [v.choice(MEMORY_PARTS, n, "per_memory part") for n in t.values]
            if len(set(fields[key])) != len(fields[key]):
                v.fail("per_memory names a part twice")
        else:
            fields[key] = _read(v, key)
    missing = [k for k in ("count", "top_k") if k not in fields]
    if missing:
        raise src.error(f"{where}: missing {' and '.join(missing)}", s.key)
    return Memories(**fields)


def _update(base: Optional[Update], s: Stmt, src: Source, where: str, locs: Locs, at: tuple,
            symbols: set[str]) -> Update:
    """An `update { }` block (a test-time-training memory), merged over the base lsm's: `extends` can change
    one gate, and `momentum = none` / `weight_decay = none` remove one."""
    where = f"{where} update"
    _check_keys(s.body, src, where, UPDATE_KEYS)
    fields = dict(base) if base is not None else {}  # the base's fields as they are (expressions stay sympy)
    for t in s.body:
        v, key = Values(t, src, where), str(t.key)
        locs.set(at + ("update", key), src.loc(t.key))
        if key == "loss":
            fields[key] = v.choice(INNER_LOSSES, what="inner loss")
        elif key == "gradient":
            fields["minibatch"] = _gradient_point(v)
        elif key == "lr":
            fields[key] = v.expr(symbols)
        else:
            fields[key] = None if v.is_none() else v.expr(symbols)
    if fields.get("lr") is None:
        raise src.error(f"{where}: missing lr (the inner learning rate, e.g. lr = sigmoid(x @ W_lr))", s.key)
    return Update(**fields)


def _loss_of(update) -> str:
    """The inner loss of an update as a field holds it (a node, or a dump of one)."""
    return update.loss if isinstance(update, Update) else update.get("loss", "mse")


def _gradient_point(v: Values) -> int:
    """`gradient = token` (1) or `gradient = minibatch(N)`: the tokens that share one gradient point."""
    node = v.one()
    usage = "gradient is 'token' or 'minibatch(N)' with a whole N >= 1"
    if isinstance(node, lark.Tree) and node.data == "var" and str(node.children[0]) == "token":
        return 1
    if not (isinstance(node, lark.Tree) and node.data == "call" and str(node.children[0]) == "minibatch"):
        v.fail(usage, node)
    args = [a for a in node.children[1:] if a is not None]
    if len(args) != 1 or not (isinstance(args[0], lark.Tree) and args[0].data == "number"):
        v.fail(usage, node)
    text = str(args[0].children[0])
    # the length test first: int() of thousands of digits raises (Python's integer-string limit)
    if not text.isdigit() or len(text.lstrip("0")) > len(str(MAX_MINIBATCH)) or not 1 <= int(text) <= MAX_MINIBATCH:
        v.fail(f"minibatch(N) takes a whole N from 1 to {MAX_MINIBATCH}, got {_abbrev(text)}", args[0])
    return int(text)


# ---- the model block -------------------------------------------------------------

MODEL_KEYS: dict[str, tuple] = {
    **{k: (("assign",), None) for k in ("vocab", "hidden", "layers", "heads", "pattern", "lsm", "norm", "norm_eps",
                                         "tie_embeddings", "init_std", "max_seq_len")},
    "attention": (("block",), None),
    "residual": (("block", "assign"), None),
    "moe": (("block", "assign"), None),
    "ffn": (("block", "assign"), None),
}
ATTENTION_KEYS = {k: (("assign",), None) for k in AttentionSpec.model_fields}
RESIDUAL_KEYS = {k: (("assign",), None) for k in ResidualSpec.model_fields}
MOE_KEYS = {k: (("assign",), None) for k in MoESpec.model_fields}
FFN_KEYS = {"ffn": (("assign",), None)}

# how each sub-block key is read: a Values method name, or a tuple of choices
_READERS: dict[str, Any] = {
    "experts": "integer", "top_k": "integer", "expert_ffn": "integer", "shared_experts": "integer",
    "score": ("softmax", "sigmoid"), "order": ("softmax_topk", "topk_softmax"), "bias_balancing": "boolean",
    "bias_update_rate": "real", "aux_loss": "real", "z_loss": "real", "capacity_factor": "real?",
    "normalize_topk": "boolean", "heads": "integer?", "kv_heads": "integer?", "rope_theta": "real",
    "window": "integer?", "head_dim": "integer?", "rotary_dim": "integer?", "postnorm": "boolean", "alpha": "real",
    "beta": "real", "ffn": "integer", "vocab": "integer", "hidden": "integer", "layers": "integer",
    "norm": ("rmsnorm", "layernorm"), "norm_eps": "real", "tie_embeddings": "boolean", "init_std": "real",
    "max_seq_len": "integer", "count": "integer", "shared": "boolean", "dp": "integer", "sp": "integer", "ep": "integer", "tp": "integer",
}


def _read(v: Values, key: str) -> Any:
    how = _READERS[key]
    if isinstance(how, tuple):
        return v.choice(how)
    if how.endswith("?"):
        return None if v.is_none() else getattr(v, how[:-1])()
    return getattr(v, how)()


def _apply_plain(fields: dict, stmts: list[Stmt], v_of: Callable[[Stmt], Values], locs: Locs, at: tuple) -> None:
    for s in stmts:
        locs.set(at + (str(s.key),), v_of(s).src.loc(s.key))
        fields[str(s.key)] = _read(v_of(s), str(s.key))


def _sub(cls, base: Optional[Any], s: Stmt, src: Source, where: str, keys: dict, locs: Locs, at: tuple):
    """A sub-block (attention / moe / ffn), merged over the base model's one."""
    _check_keys(s.body, src, f"{where} {s.key}", keys)
    fields = base.model_dump() if base is not None else {}
    _apply_plain(fields, s.body, lambda t: Values(t, src, f"{where} {s.key}"), locs, at)
    missing = [k for k, info in cls.model_fields.items() if info.is_required() and k not in fields]
    if missing:
        raise src.error(f"{where}: {s.key} {{ }} is missing {', '.join(missing)}", s.key)
    return cls(**fields)


def apply_model(spec: Optional[ModelSpec], block: Block, locs: Locs) -> tuple[dict, Optional[Stmt]]:
    """The fields of a model block over its base's; returns them and the `lsm = ...` statement."""
    src, where = block.source, f"model '{block.name}'"
    _check_keys(block.body, src, where, MODEL_KEYS)
    f = spec.model_dump() if spec is not None else {}
    f.update(name=str(block.name), doc=block.doc or f.get("doc", ""), loc=src.loc(block.head))
    lsm_stmt = None
    blocks = {str(s.key): s for s in block.body if s.kind == "block"}
    if "moe" in blocks and "ffn" in blocks:
        raise src.error(f"{where}: a model has either a moe {{ }} or an ffn {{ }} block, not both", blocks["ffn"].key)
    for s in block.body:
        key = str(s.key)
        v = Values(s, src, where)
        locs.set(("model", key), src.loc(s.key))
        if s.kind == "block":
            if key == "attention":
                base = AttentionSpec(**f["attention"]) if "attention" in f else None
                f["attention"] = _sub(AttentionSpec, base, s, src, where, ATTENTION_KEYS, locs, ("model", key)).model_dump()
            elif key == "residual":
                base = ResidualSpec(**f["residual"]) if "residual" in f else None
                f["residual"] = _sub(ResidualSpec, base, s, src, where, RESIDUAL_KEYS, locs, ("model", key)).model_dump()
            elif key == "moe":
                base = MoESpec(**f["moe"]) if f.get("moe") else None
                f["moe"] = _sub(MoESpec, base, s, src, where, MOE_KEYS, locs, ("model", key)).model_dump()
                f["ffn"] = None
            else:
                base = DenseFFNSpec(**f["ffn"]) if f.get("ffn") else None
                f["ffn"] = _sub(DenseFFNSpec, base, s, src, where, FFN_KEYS, locs, ("model", key)).model_dump()
                f["moe"] = None
        elif key in ("moe", "ffn"):
            if not v.is_none():
                v.fail(f"write '{key} {{ ... }}' or '{key} = none'")
            f[key] = None
        elif key == "residual":  # `= none`: back to the plain pre-norm residual a base's block changed
            if not v.is_none():
                v.fail("write 'residual { postnorm = true alpha = ... }' or 'residual = none'")
            f.pop("residual", None)
        elif key == "pattern":
            f["pattern"] = v.pattern()
        elif key == "lsm":
            f["lsm"] = None if v.is_none() else v.ident()
            lsm_stmt = s
        else:
            f[key] = v.integer() if key == "heads" else _read(v, key)  # a model's heads can't be none (attention's can)
    missing = [k for k in ("vocab", "hidden", "heads") if k not in f]
    if "pattern" not in f and "layers" not in f:
        missing.append('layers = N or pattern = "..."')
    if missing:
        raise src.error(f"{where}: missing {', '.join(missing)}", block.head)
    if "pattern" not in f:
        if f["layers"] > MAX_LAYERS:
            raise src.error(f"{where}: layers = {f['layers']} is more than {MAX_LAYERS}",
                            locs.get("model", "layers") or src.loc(block.head))
        f["pattern"] = "L" * f["layers"]
    f.setdefault("layers", len(f["pattern"]))
    return f, lsm_stmt


PARALLEL_KEYS = {k: (("assign",), None) for k in ("dp", "sp", "ep", "tp")}


# ---- files, imports, namespaces ------------------------------------------------------


class Loader:
    """Loads one spec and its imports; lowers the blocks it needs, each once."""

    def __init__(self) -> None:
        self.files: dict[Path, ParsedFile] = {}
        self.spaces: dict[Path, dict[tuple[str, str], Block]] = {}
        self.stack: list[Path] = []
        self.locs = Locs()
        self.lsms: dict[int, LSMSpec] = {}
        self.models: dict[int, dict] = {}
        self.lowering: list[Block] = []

    def load(self, path: Path, given: str, at: Optional[tuple[Source, lark.Token]] = None) -> Path:
        """Parse `path` and its imports; returns its resolved path (the namespace key).

        A problem with a file as a whole is reported at the `import` that names it, or for
        the top-level file, against its name; a missing top-level file is FileNotFoundError.
        """

        def fail(message: str):
            if at is None:
                raise SpecError(message, file=given)
            src, tok = at
            raise src.error(f"cannot import {tok}: {message}", tok)

        if "\0" in given:
            fail("the path contains a NUL byte")
        try:
            resolved = path.resolve()
            exists = resolved.exists()
        except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
            fail(f"bad path ({err})")
        if resolved in self.stack:
            chain = [str(p.name) for p in self.stack[self.stack.index(resolved):]] + [resolved.name]
            src, tok = at
            raise src.error(f"import cycle: {' -> '.join(chain)}", tok)
        if resolved in self.files:
            return resolved
        if not exists:
            if at is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", given)
            fail(f"no such file ({given})")
        if len(self.stack) >= MAX_IMPORT_DEPTH:
            fail(f"imports nest more than {MAX_IMPORT_DEPTH} files deep")
        display = display_path(resolved, given)
        try:
            text = read_source(resolved, display)
        except SpecError as err:
            if err.loc is not None:  # a place inside the file itself (a byte that is not UTF-8)
                raise
            fail(err.message)
        parsed = parse(text, display)
        self.stack.append(resolved)
        space: dict[tuple[str, str], Block] = {}
        for tok in parsed.imports:
            rel = str(tok)[1:-1]
            child_given = os.path.normpath(os.path.join(os.path.dirname(given), rel))
            child = self.load(Path(resolved.parent, rel), child_given, (parsed.source, tok))
            for key, blk in self.spaces[child].items():
                self._define(space, key, blk, parsed.source, tok)
        for blk in parsed.blocks:
            if blk.kind != "parallel":
                self._define(space, (blk.kind, str(blk.name)), blk, parsed.source, blk.name)
        self.stack.pop()
        self.files[resolved] = parsed
        self.spaces[resolved] = space
        return resolved

    @staticmethod
    def _define(space: dict, key: tuple[str, str], blk: Block, src: Source, at: lark.Token) -> None:
        old = space.get(key)
        if old is not None and old is not blk:
            first = old.source.loc(old.head)
            raise src.error(f"{key[0]} '{key[1]}' is already defined at {first}", at)
        space[key] = blk

    def _base(self, blk: Block) -> Optional[Block]:
        if blk.extends is None:
            return None
        space = self.spaces[Path(self._file_of(blk))]
        base = space.get((blk.kind, str(blk.extends)))
        if base is None:
            known = sorted(n for k, n in space if k == blk.kind)
            raise blk.source.error(
                f"{blk.kind} '{blk.name}' extends unknown {blk.kind} '{blk.extends}'"
                + (f" (known: {', '.join(known)})" if known else ""), blk.extends)
        if base in self.lowering:
            chain = [str(b.name) for b in self.lowering[self.lowering.index(base):]] + [str(base.name)]
            raise blk.source.error(f"cyclic extends: {' -> '.join(chain)}", blk.extends)
        if len(self.lowering) >= MAX_EXTENDS_DEPTH:
            raise blk.source.error(f"extends chains more than {MAX_EXTENDS_DEPTH} blocks deep", blk.extends)
        return base

    def _file_of(self, blk: Block) -> Path:
        for path, parsed in self.files.items():
            if blk in parsed.blocks:
                return path
        return self.stack[-1]  # the file being loaded

    def lsm(self, blk: Block) -> LSMSpec:
        if id(blk) in self.lsms:
            return self.lsms[id(blk)]
        self.lowering.append(blk)
        base_blk = self._base(blk)
        name, loc = str(blk.name), blk.source.loc(blk.head)
        if base_blk is not None:
            base = self.lsm(base_blk)
            spec = base.model_copy(deep=True, update={"name": name, "doc": blk.doc or base.doc, "loc": loc})
            self.locs.copy_prefix(("lsm", base.name), ("lsm", name))
        else:
            spec = LSMSpec(name=name, doc=blk.doc, loc=loc)
        self.lowering.pop()
        self.lsms[id(blk)] = apply_lsm(spec, blk, self.locs)
        return self.lsms[id(blk)]

    def model(self, blk: Block) -> tuple[dict, Optional[str], Block]:
        """Model fields, plus the lsm name and the block whose file resolves it."""
        if id(blk) in self.models:
            return self.models[id(blk)]
        self.lowering.append(blk)
        base_blk = self._base(blk)
        base = ModelSpec(**self.model(base_blk)[0]) if base_blk is not None else None
        self.lowering.pop()
        fields, lsm_stmt = apply_model(base, blk, self.locs)
        if lsm_stmt is not None and fields["lsm"] is not None:
            space = self.spaces[self._file_of(blk)]
            if ("lsm", fields["lsm"]) not in space:
                known = sorted(n for k, n in space if k == "lsm")
                raise blk.source.error(
                    f"model '{blk.name}': unknown lsm '{fields['lsm']}'"
                    + (f" (defined or imported: {', '.join(known)})" if known else " (none defined or imported)"),
                    lsm_stmt.values[0])
        self.models[id(blk)] = (fields, fields.get("lsm"), blk)
        return self.models[id(blk)]


def load_spec(path: Path) -> SpecIR:
    """Parse, resolve and lower a spec file to a validated SpecIR (raises SpecError)."""
    path = Path(path)
    loader = Loader()
    key = loader.load(path, str(path))
    parsed = loader.files[key]
    src = parsed.source
    lsms: dict[str, LSMSpec] = {}
    model: Optional[ModelSpec] = None
    parallel = ParallelSpec()
    models = [b for b in parsed.blocks if b.kind == "model"]
    if len(models) > 1:
        raise src.error(f"one model per file: '{models[0].name}' is already defined here", models[1].head)
    pars = [b for b in parsed.blocks if b.kind == "parallel"]
    if len(pars) > 1:
        raise src.error("one parallel block per file", pars[1].head)
    for blk in parsed.blocks:
        if blk.kind == "lsm":
            spec = loader.lsm(blk)
            lsms[spec.name] = spec
    if models:
        fields, lsm_name, _ = loader.model(models[0])
        if lsm_name is not None and lsm_name not in lsms:
            lsms[lsm_name] = loader.lsm(loader.spaces[key][("lsm", lsm_name)])
        try:
            model = ModelSpec(**fields)
        except ValidationError as err:  # a type error no key check caught: its first problem, not pydantic's dump
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise src.error(f"model '{models[0].name}': {where}: {first['msg']}", models[0].head) from None
    if pars:
        blk = pars[0]
        _check_keys(blk.body, src, "parallel", PARALLEL_KEYS)
        fields: dict = {"loc": src.loc(blk.head)}
        _apply_plain(fields, blk.body, lambda s: Values(s, src, "parallel"), loader.locs, ("parallel",))
        parallel = ParallelSpec(**fields)
    ir = SpecIR(source=src.display, name=path.stem, lsms=lsms, model=model, parallel=parallel)
    sources = {p.source.display: p.source for p in loader.files.values()}
    try:
        validate(ir, loader.locs)
    except SpecError as err:
        if err.loc is not None and err.source_line is None and err.loc.file in sources:
            err.source_line = sources[err.loc.file].line(err.loc)
        raise
    return ir
