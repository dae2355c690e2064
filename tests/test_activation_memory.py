"""Recompute in the backward instead of keeping (issue #6): same numbers, fewer saved bytes.

Each changed path is compared with itself without the recompute (lmoec.runtime.recompute.recompute as a
plain call, the MoE experts as the plain autograd composition, the loss over whole logits): outputs and
gradients agree to float rounding, and the bytes autograd saves (lmoec.memory.count_saved) fall by at least
what the shapes say the dropped intermediates hold.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

from lmoec.bench import program_for
from lmoec.memory import count_saved
from lmoec.runtime import moe as moe_mod
from lmoec.runtime import recompute as rc
from lmoec.trainer.train import lm_loss

HIDDEN, HEADS, VOCAB, EXPERTS, TOP_K, FFN = 64, 2, 4096, 4, 2, 32
T = 128


def small_model(lsm):
    torch.manual_seed(0)
    program = program_for(lsm, "L", hidden=HIDDEN, heads=HEADS, vocab=VOCAB,
                          moe=dict(experts=EXPERTS, top_k=TOP_K, expert_ffn=FFN))
    return program.model()


def plain_moe(rows, counts, w_gate, w_up, w_down, backend="auto", row_weight=None):
    """swiglu_experts as plain autograd over its products (what autograd keeps without the recompute)."""
    gate = moe_mod.grouped_matmul(rows, w_gate, counts, backend)
    up = moe_mod.grouped_matmul(rows, w_up, counts, backend)
    return moe_mod.grouped_matmul(moe_mod.swiglu(gate, up, row_weight), w_down, counts, backend)


@contextlib.contextmanager
def without_recompute(model):
    """The same model with recompute() a plain call and the MoE experts plain autograd."""
    layer_module = sys.modules[type(model.blocks[0].mixer).__module__]
    saved = layer_module.recompute, moe_mod.swiglu_experts
    layer_module.recompute, moe_mod.swiglu_experts = (lambda fn, *inputs: fn(*inputs)), plain_moe
    try:
        yield
    finally:
        layer_module.recompute, moe_mod.swiglu_experts = saved


def step(model, ids, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        ce, loss = lm_loss(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lsm", ["gated_deltanet", "gla"])
@pytest.mark.parametrize("dtype", ["float32", "bf16 autocast"])
def test_recompute_keeps_loss_and_gradients(lsm, dtype):
    model = small_model(lsm)
    ids = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(1))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype != "float32" else contextlib.nullcontext
    ce, grads = step(model, ids, autocast())
    with without_recompute(model):
        ce_plain, grads_plain = step(model, ids, autocast())
    assert grads.keys() == grads_plain.keys()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(ce, ce_plain, rtol=1e-6, atol=1e-6)
    for name in grads:
        # every path but the loss is the same ops in the same order; the chunked loss only sums in another order
        torch.testing.assert_close(grads[name], grads_plain[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_experts_match_plain_autograd_exactly(backend, autocast):
    if backend == "grouped" and not moe_mod.grouped_mm_available():
        pytest.skip("no grouped_mm in this torch")
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])
    rows = torch.randn(16, 32, generator=gen, requires_grad=True)
    row_weight = torch.rand(16, generator=gen, requires_grad=True)
    weights = [(torch.randn(shape, generator=gen) * 0.1).requires_grad_() for shape in ((4, 32, 24), (4, 32, 24), (4, 24, 32))]
    results = []
    for fn in (moe_mod.swiglu_experts, plain_moe):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fn is plain_moe and autocast:  # the plain path with swiglu_experts' casts
                out = fn(rows.to(torch.bfloat16), counts, *(w.to(torch.bfloat16) for w in weights), backend, row_weight)
            else:
                out = fn(rows, counts, *weights, backend, row_weight)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), [rows, row_weight, *weights])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("needs", ["both", "x", "weight"])
def test_linear_cross_entropy_in_chunks(monkeypatch, needs):
    """Loss and gradients equal the whole-logits cross-entropy's, with an ignored target, a chunk that is not full,
    an incoming gradient other than 1, either input alone needing a gradient, and under no_grad (loss only)."""
    monkeypatch.setattr(rc, "LOSS_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows of a 50-word vocabulary per chunk
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, generator=gen, requires_grad=needs in ("both", "x"))
    weight = torch.randn(50, 16, generator=gen, requires_grad=needs in ("both", "weight"))
    targets = torch.randint(0, 50, (30,), generator=gen)
    targets[3] = -100  # ignored, as F.cross_entropy ignores it
    loss = rc.linear_cross_entropy(x, weight, targets)
    want = F.cross_entropy(F.linear(x, weight), targets)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    leaves = [t for t in (x, weight) if t.requires_grad]
    for got, expected in zip(torch.autograd.grad(2.5 * loss, leaves), torch.autograd.grad(2.5 * want, leaves)):
        assert torch.count_nonzero(expected) > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(rc.linear_cross_entropy(x, weight, targets), want.detach(), rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_under_autocast(monkeypatch):
    """bf16 autocast: the logits as F.linear under autocast makes them, the loss in float32, and gradients within
    bf16's rounding of the whole-logits path's."""
    monkeypatch.setattr(rc, "LOSS_CHUNK_BYTES", 4 * 50 * 7)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rc.linear_cross_entropy(x, weight, targets)
        want = F.cross_entropy(F.linear(x, weight).float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(loss, [x, weight]), torch.autograd.grad(want, [x, weight])):
        assert got.dtype == expected.dtype == torch.float32
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def saved_per_token(model, loss_fn=lm_loss):
    ids = torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(2))
    counts = count_saved(model, ids[:, :-1], ids[:, 1:], loss_fn, autocast=contextlib.nullcontext).by_component
    return {k: v / T for k, v in counts.items()}


def test_gated_deltanet_layer_saves_less_by_shapes():
    """float32, so every saved tensor is 4 bytes an element and no weight is cast."""
    model = small_model("gated_deltanet")
    layer = model.blocks[0].mixer
    dk, dv, K, V = HEADS * layer.head_k, HEADS * layer.head_v, layer.head_k, layer.head_v
    new = saved_per_token(model)["LSM layer"]
    with without_recompute(model):
        plain = saved_per_token(model)["LSM layer"]
    conv_inputs = (1 + 3 / T) * (2 * dk + dv)  # the short convs' windows
    op = (2 * dk + dv) + dk + HEADS * K * V / 64 + dv + 4 * HEADS  # q, k, v, w, chunk states, v_new, g, beta
    around = HIDDEN + 4 * dv + 8 * HEADS  # x; o, the gate's projection and SiLU, o_proj's input; gate scalars
    bound = 4 * (conv_inputs + op + around)
    assert new <= bound, (new, bound)
    # without recompute the conv outputs (SiLU's inputs) and the norm's output are kept as well
    assert plain >= new + 4 * ((2 * dk + dv) + dv), (plain, new)


def test_moe_and_loss_save_less_by_shapes():
    model = small_model("gla")
    new = saved_per_token(model)

    def whole_logits_loss(m, inputs, targets):
        logits = m(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), None

    with without_recompute(model):
        plain = saved_per_token(model, whole_logits_loss)
    slots = TOP_K
    # MoE: its input (the router's), the router's logits and probs, each slot's row, gate, up, weight and indices,
    # and per-expert counts and means (not per token)
    moe_bound = 4 * (HIDDEN + 3 * EXPERTS + slots * (HIDDEN + 2 * FFN + 1)) + 8 * 4 * slots + 16 * EXPERTS / T
    assert new["MoE FFN"] <= moe_bound, (new["MoE FFN"], moe_bound)
    assert plain["MoE FFN"] >= new["MoE FFN"] + 4 * slots * FFN  # the SwiGLU output, at least
    # loss: the final norm's input and output, the hidden states' gradient, and the head weight's gradient that
    # linear_cross_entropy forms in the forward (its size does not grow with T: here VOCAB * HIDDEN / T a token);
    # never a [tokens, vocab] tensor (4 * VOCAB a token, more than the bound)
    assert new["final norm + LM head + loss"] <= 4 * 4 * HIDDEN + 4 * VOCAB * HIDDEN / T < 4 * VOCAB
    assert plain["final norm + LM head + loss"] >= 4 * VOCAB
