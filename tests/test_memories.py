"""Mixture-of-Memories layers (`memories { }`): the layer against a float64 reference written from the semantics.

The reference loops over sequences and memories: memory m of sequence b is the plain layer of the same spec
(its *twin*, without memories) with memory m's own weights, run on exactly the tokens routed to m, in order,
through the token-by-token float64 oracle (backend="reference"); those outputs are summed back with the
renormalised softmax top-k weights (plus the shared memory's, weight 1), and the twin's own output norm,
gate and projection finish the layer. So the reference shares no routing, grouping, segment convolution or
cu_seqlens code with the layer it checks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sympy
import torch

import lmoec
from lmoec.errors import SpecError
from lmoec.frontend import load_spec
from lmoec.ir.graph import layer_graph, lsm_active_params, lsm_param_split, lsm_params
from lmoec.ir.nodes import Memories, SpecIR
from lmoec.paths import SPECS
from lmoec.program import compile_ir
from lmoec.runtime.memories import MemoryLinear
from lmoec.variants import render_variant

from conftest import RECURRENCES, lsm_spec_for
from interpreted import interpreted

def _twin_program(spec):
    plain = spec.model_copy(update={"memories": None, "recurrence": None, "name": spec.name + "_twin"})
    return compile_ir(SpecIR(name="t_mem_twin", source="<test>", lsms={plain.name: plain}))


def _programs(spec):
    prog = compile_ir(SpecIR(name="t_mem", source="<test>", lsms={spec.name: spec}))
    return prog, _twin_program(spec)


def _perturbed(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _memory_params(layer, twin, m):
    """The twin's parameters as memory m sees them: its own slice of each per-memory weight, the rest shared."""
    own = dict(layer.named_parameters())
    out = {}
    for name, p in twin.named_parameters():
        src = own[name]
        out[name] = src if src.shape == p.shape else src[m].t()  # MemoryLinear [M, in, out] -> Linear [out, in]
    return out


def reference(layer, twin, xs, top_k, count, shared, skip_param=None):
    """y [B, T, hidden] of `layer` on xs, from the semantics (see the module docstring); differentiable."""
    twin_module = sys.modules[type(twin).__module__]
    real_op = twin_module.op
    B, T, _ = xs.shape
    probs = torch.softmax(xs @ layer.router.weight.t(), -1)  # [B, T, M]
    chosen = probs.topk(top_k, -1).indices  # random float64 logits: no ties
    weights = probs.gather(-1, chosen)
    weights = weights / weights.sum(-1, keepdim=True)
    captured, rows = {}, []

    def capture(*args, **kwargs):
        kwargs["backend"] = "reference"
        out, state = real_op(*args, **kwargs)
        captured["o"], captured["v"] = out, args[2] if len(args) > 2 else kwargs["v"]
        return out, state

    # a skip term (Mamba's `skip = D`, a [H, V] parameter named by skip_param) belongs to each memory:
    # o_m + D v_m with v_m its own values; the twin's tail below then runs with D = 0, adding none of its own
    skip = None if skip_param is None else dict(layer.named_parameters())[skip_param]

    try:
        twin_module.op = capture
        for b in range(B):
            o_b = 0
            for m in range(count + int(shared)):
                if m == count:  # the shared memory: every token, weight 1
                    idx, w = torch.arange(T), torch.ones(T, dtype=xs.dtype)
                else:
                    hit = chosen[b] == m
                    idx = hit.any(-1).nonzero().squeeze(1)
                    w = (weights[b] * hit).sum(-1)[idx]
                if idx.numel() == 0:
                    continue
                torch.func.functional_call(twin, _memory_params(layer, twin, m), (xs[b : b + 1, idx],),
                                           {"backend": "reference"})
                o_m = captured["o"][0] + (0 if skip is None else skip * captured["v"][0])
                o_m = o_m * w[:, None, None]
                o_b = o_b + torch.zeros(T, *o_m.shape[1:], dtype=xs.dtype).index_add(0, idx, o_m)
            rows.append(o_b)
        combined = torch.stack(rows)
        twin_module.op = lambda *args, **kwargs: (combined, None)  # the twin's tail: norm, gate, o_proj
        tail = _memory_params(layer, twin, 0)
        if skip is not None:
            tail[skip_param] = torch.zeros_like(skip)
        return torch.func.functional_call(twin, tail, (xs,), {"backend": "reference"})
    finally:
        twin_module.op = real_op


def _check(prog, twin_prog, hidden, heads, B, T, seed, never=None, backend="torch"):
    """The layer vs the reference: forward and the gradient of x and of every parameter."""
    mem = prog.ir.lsm().memories
    torch.manual_seed(seed)
    layer = _perturbed(prog.layer(hidden=hidden, heads=heads).double(), seed)
    twin = twin_prog.layer(hidden=hidden, heads=heads).double()
    gen = torch.Generator().manual_seed(seed + 7)
    xs = torch.randn(B, T, hidden, generator=gen, dtype=torch.float64)
    if never is not None:  # memory `never` always scores lowest: it receives no token
        xs[..., 0] = xs[..., 0].abs() + 1
        with torch.no_grad():
            layer.router.weight[never] = 0
            layer.router.weight[never, 0] = -50
    xs.requires_grad_(True)
    y = layer(xs, backend=backend)
    counts = layer.last_tokens_per_memory
    if never is not None:
        assert counts[never] == 0 and counts.sum() == B * T * mem.top_k
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [xs, *layer.parameters()], grad_out)
    skip = prog.ir.lsm().skip
    want_y = reference(layer, twin, xs, mem.top_k, mem.count, mem.shared, None if skip is None else str(skip))
    want = torch.autograd.grad(want_y, [xs, *layer.parameters()], grad_out, allow_unused=True)
    torch.testing.assert_close(y, want_y, rtol=1e-9, atol=1e-10)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert w is not None and w.abs().sum() > 0, f"{name}: the reference gives it no gradient"
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    return layer


def test_mom_library_spec_matches_reference():
    """Gated DeltaNet, 4 memories, top-2, shared: every parameter, uneven routing, segments over chunk boundaries."""
    spec = lmoec.compile_spec(SPECS / "lsm" / "mom.lsm").ir.lsm().model_copy(update={"chunk_size": 16})
    spec = spec.model_copy(update={"recurrence": None})
    prog, twin = _programs(spec)
    _check(prog, twin, hidden=16, heads=2, B=2, T=37, seed=0)


@pytest.mark.parametrize("name", ["hgrn2", "rwkv7"])
def test_library_specs_with_memories_match_reference(name):
    """HGRN2 (k tied to the per-memory decay, no k projection) and RWKV7 (DPLR terms that read each memory's k)."""
    spec = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm").ir.lsm()
    spec = spec.model_copy(update={"chunk_size": 16, "recurrence": None, "memories": Memories(count=3, top_k=2)})
    prog, twin = _programs(spec)
    _check(prog, twin, hidden=16, heads=2, B=2, T=19, seed=4)


@pytest.mark.parametrize("name, update", [
    ("titans", {}),  # the joint state (M, S) [K, 2V] per memory
    ("titans", {"minibatch": 4}),  # the paper's parallel form: mini-batches counted in each memory's own tokens
    ("ttt_linear", {}),  # TTT-Linear's inner model per memory (mini-batches of 16), its LayerNorm shared
    ("ttt_linear", {"minibatch": 1}),
    ("mamba", {}),  # the outer-product gate exp(dt A), groups = 1, the D skip per memory
    ("gfw", {}),  # the outer-sum gate g 1^T + 1 gv^T
], ids=["titans", "titans_minibatch4", "ttt_linear", "ttt_linear_token", "mamba", "gfw"])
def test_new_kinds_with_memories_match_reference(name, update):
    spec = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm").ir.lsm()
    if update:
        spec = spec.model_copy(update={"update": spec.update.model_copy(update=update)})
    spec = spec.model_copy(update={"chunk_size": 16, "recurrence": None, "memories": Memories(count=3, top_k=2)})
    prog, twin = _programs(spec)
    _check(prog, twin, hidden=16, heads=2, B=2, T=19, seed=6, never=1)


@pytest.mark.parametrize("name, update", [("titans", {}), ("titans", {"minibatch": 4}), ("ttt_linear", {}),
                                          ("ttt_linear", {"minibatch": 1}), ("mamba", {})],
                         ids=["titans", "titans_minibatch4", "ttt_linear", "ttt_linear_token", "mamba"])
def test_new_kinds_with_memories_decode_as_the_full_forward(name, update):
    """Prefill, then one token at a time (the routed memories' steps: the joint Titans state, TTT's (W, b), Mamba's
    skip per memory; with mini-batches, the op over each memory's open mini-batch), then a chunk from the cache ==
    one full forward, and the caches agree."""
    spec = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm").ir.lsm()
    if update:
        spec = spec.model_copy(update={"update": spec.update.model_copy(update=update)})
    spec = spec.model_copy(update={"recurrence": None, "memories": Memories(count=3, top_k=2)})
    prog = compile_ir(SpecIR(name=f"t_mem_decode_{name}", source="<test>", lsms={name: spec}))
    layer = _perturbed(prog.layer(hidden=16, heads=2).double())
    xs = torch.randn(2, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    full, full_cache = layer(xs, use_cache=True, backend="torch")
    y, cache = _in_parts(layer, xs, prefill=4, stepped=21)
    torch.testing.assert_close(y, full, rtol=1e-9, atol=1e-10)
    _assert_same_cache(cache, full_cache)


def _family_spec(family, **memories):
    spec = lsm_spec_for(RECURRENCES[family], chunk_size=16)
    return spec.model_copy(update={"short_conv": 3, "memories": Memories(**memories)})


@pytest.mark.parametrize("family, memories, never", [
    ("additive", dict(count=3, top_k=3, shared=False), None),  # top_k = count: every token everywhere
    ("constant", dict(count=4, top_k=1, shared=True), 2),  # a memory with no token
    ("vector_bonus", dict(count=3, top_k=2, shared=False, per_memory=["v"]), None),
    ("delta_scalar", dict(count=4, top_k=2, shared=False, per_memory=["k", "v", "beta"]), 3),
    ("dplr_vector", dict(count=2, top_k=1, shared=True, per_memory=["k", "decay"]), None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_family_with_memories_matches_reference(family, memories, never):
    prog, twin = _programs(_family_spec(family, **memories))
    _check(prog, twin, hidden=8, heads=2, B=2, T=21, seed=3, never=never)


def test_prefill_then_decode_equals_full_forward():
    """Chunkwise prefill, then one token at a time (routed states only), == one full forward; caches agree.
    Likewise prefill then a chunk from the cache."""
    spec = lmoec.compile_spec(SPECS / "lsm" / "mom.lsm").ir.lsm()
    prog = compile_ir(SpecIR(name="t_mem_decode", source="<test>", lsms={"mom": spec.model_copy(update={"recurrence": None})}))
    layer = _perturbed(prog.layer(hidden=16, heads=2).double())
    xs = torch.randn(3, 11, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    full, full_cache = layer(xs, use_cache=True, backend="torch")

    def routed_states_only(before, after):  # top_k of the 4 memories and the shared one change, per sequence
        changed = (after["state"] != before["state"]).flatten(2).any(-1)  # [M', B]
        assert changed.sum(0).tolist() == [3] * 3 and changed[-1].all()

    y, cache = _in_parts(layer, xs, prefill=5, stepped=11, on_step=routed_states_only)
    torch.testing.assert_close(y, full, rtol=1e-9, atol=1e-10)
    _assert_same_cache(cache, full_cache)
    # a chunk that starts from the cache: every memory's initial state and conv state
    y, cache = _in_parts(layer, xs, prefill=5, stepped=5)
    torch.testing.assert_close(y, full, rtol=1e-9, atol=1e-10)
    _assert_same_cache(cache, full_cache)


def _in_parts(layer, xs, prefill, stepped, on_step=None):
    """The layer on xs[:, :prefill] with a cache, then one token at a time up to `stepped`, then the rest as one
    chunk from the cache: (the outputs joined, the last cache). on_step(cache before, cache after) checks each step."""
    y, cache = layer(xs[:, :prefill], use_cache=True, backend="torch")
    outs = [y]
    for t in range(prefill, stepped):
        before = cache
        y, cache = layer(xs[:, t : t + 1], past=cache, use_cache=True, backend="torch")
        if on_step is not None:
            on_step(before, cache)
        outs.append(y)
    if stepped < xs.shape[1]:
        y, cache = layer(xs[:, stepped:], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    return torch.cat(outs, 1), cache


def _assert_same_cache(got, want):
    """Every cache entry, and every entry of a nested one (a mini-batch update's open inputs), equal."""
    assert got.keys() == want.keys()
    for name in want:
        if isinstance(want[name], dict):
            _assert_same_cache(got[name], want[name])
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_balancing_losses_are_the_moe_routers():
    prog = lmoec.compile_spec(SPECS / "lsm" / "mom.lsm")
    layer = prog.layer(hidden=16, heads=2)
    xs = torch.randn(2, 9, 16)
    layer(xs, backend="torch")
    logits = xs.reshape(-1, 16) @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == m).sum() for m in range(4)]).float() / top.numel()
    torch.testing.assert_close(layer.last_aux_loss, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(layer.balancing_loss(), 0.01 * layer.last_aux_loss)
    assert layer.last_tokens_per_memory.sum() == 18 * 2


# ---- the language: extends, none, parameter counts, variants --------------------------------------


def _load(tmp_path, text):
    path = tmp_path / "spec.lsm"
    path.write_text(f'import "{SPECS / "lsm" / "mom.lsm"}"\n' + text)
    return load_spec(path)


def test_memories_extend_and_none(tmp_path):
    ir = _load(tmp_path, "lsm a extends mom { memories { top_k = 1 per_memory = k, v } }\n"
                         "lsm b extends a { memories = none }\n")
    a, b = ir.lsms["a"].memories, ir.lsms["b"].memories
    assert (a.count, a.top_k, a.shared, a.per_memory, a.aux_loss) == (4, 1, True, ["k", "v"], 0.01)
    assert b is None
    with pytest.raises(SpecError, match=r"spec.lsm:3:16: .*memories top_k = 5 must be between 1 and count = 4"):
        _load(tmp_path, "lsm a extends mom {\n    memories { top_k = 5 } }\n")


def test_graph_counts_every_memory_and_the_router(tmp_path):
    """The analytic count equals the built layer's parameters; active counts top_k memories and the shared one."""
    ir = _load(tmp_path, "lsm a extends mom { memories { per_memory = k, beta } }\n"
                         "model m { vocab = 32 hidden = 64 heads = 4 pattern = \"LN\" lsm = a ffn { ffn = 64 } }\n")
    for name in ("mom", "a"):
        lsm = load_spec(SPECS / "lsm" / "mom.lsm").lsms["mom"] if name == "mom" else ir.lsms["a"]
        layer = compile_ir(SpecIR(name="t_mem_count", source="<test>", lsms={lsm.name: lsm})).layer(hidden=64, heads=4)
        built = sum(p.numel() for p in layer.parameters())
        assert lsm_params(lsm, 64, 4) == built, name
        shared, per_memory, router = lsm_param_split(lsm, 64, 4)
        own = sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, MemoryLinear))
        assert router == 64 * 4 and per_memory * 5 == own, name
        assert lsm_active_params(lsm, 64, 4) == shared + 3 * per_memory + router
    node = layer_graph(ir).nodes["layer0.lsm"]
    assert node["params_per_memory"] == lsm_param_split(ir.lsms["a"], 64, 4)[1]
    assert node["params_total"] > node["params_active"]


def test_variants_vary_memories(tmp_path):
    variant = render_variant(SPECS / "models" / "recall.lsm", tmp_path,
                             {"lsm": "mom", "lsm.memories.count": "2", "lsm.memories.top_k": "1"})
    assert "memories { count = 2 top_k = 1 }" in variant.text
    (tmp_path / f"{variant.name}.lsm").write_text(variant.text)
    mem = load_spec(tmp_path / f"{variant.name}.lsm").lsm().memories
    assert (mem.count, mem.top_k, mem.shared) == (2, 1, True)


# ---- the Triton kernels under the interpreter -------------------------------------------------------

TRITON_CHECK = r"""
import json, sys
import torch
import lmoec
from lmoec.ir.nodes import Memories, SpecIR
from lmoec.paths import SPECS
from lmoec.program import compile_ir

# Gated DeltaNet with memories, and Titans' joint state (their kernels' own varlen checks are
# tests/test_triton_delta.py's and tests/test_triton_titans.py's; the decay families' and the element-wise kind's
# on packed batches with empty sequences are tests/test_triton.py's and tests/test_triton_elementwise.py's)
library = lambda name: lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm").ir.lsm()
specs = {name: library(base).model_copy(update={"chunk_size": 16, "recurrence": None, **extra})
         for name, base, extra in (("mom", "mom", {}), ("titans", "titans", {"memories": Memories(count=3, top_k=2)}))}
out = {}
for name, spec in specs.items():
    torch.manual_seed(0)  # the layer's own init too: the check is the same every run
    layer = compile_ir(SpecIR(name="t_mem_triton_" + name, source="<test>", lsms={spec.name: spec})).layer(hidden=32, heads=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        layer.router.weight[1] = 0
        layer.router.weight[1, 0] = -50  # memory 1 gets no token: an empty segment
    xs = torch.randn(2, 21, 32)
    xs[..., 0] = xs[..., 0].abs() + 1
    grad_out = torch.randn(2, 21, 32)
    errors = {}
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        model = layer.to(dtype)
        x = xs.to(dtype).requires_grad_(True)
        y, cache = model(x, use_cache=True, backend=backend)
        grads = torch.autograd.grad(y, [x, *model.parameters()], grad_out.to(dtype))
        results.append((y, cache["state"], grads, model.last_tokens_per_memory))
    (y, s, g, counts), (y_ref, s_ref, g_ref, _) = results
    rel = lambda a, b: float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())
    errors["o"], errors["final_state"] = rel(y, y_ref), rel(s, s_ref)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    errors.update({"d" + n: rel(a, b) for n, a, b in zip(names, g, g_ref)})
    errors["empty_memory_tokens"] = int(counts[1])
    out[name] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton", reason="the Triton backend needs triton installed")
    return interpreted(["-c", TRITON_CHECK], cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", ["mom", "titans"])
def test_triton_kernels_run_every_memory_in_one_varlen_call(triton_results, name):
    """fp32 Triton (interpreter) layer vs the float64 oracle backend: forward, final states, every gradient."""
    errors = dict(triton_results[name])
    assert errors.pop("empty_memory_tokens") == 0
    assert len(errors) > 10
    bad = {what: err for what, err in errors.items() if not err <= 1e-5}
    assert not bad, bad


def test_lasp2_plan_sends_one_map_per_memory():
    """inspect --plan: a layer with memories all-gathers M = count (+ shared) maps per sequence."""
    plain = lmoec.compile_spec(SPECS / "lsm" / "gated_deltanet.lsm").ir.comm.steps[0]
    mom = lmoec.compile_spec(SPECS / "lsm" / "mom.lsm").ir.comm.steps[0]
    assert sympy.simplify(mom.bytes_per_rank - 5 * plain.bytes_per_rank) == 0
    assert mom.shape == {"M_r": ["M", "B", "H", "K", "V"], "A_r": ["M", "B", "H", "K", "K"]}
    constant = _programs(_family_spec("constant", count=2, top_k=1))[0].ir.comm.steps[0]
    assert constant.shape["A_r"] == ["M", "B", "H"]  # a segment's decay depends on its length: sent
