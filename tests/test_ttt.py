"""TTT-Linear (`update { loss = ln_mse ... }`, lmoec.kinds.ttt): the oracle against the paper's inner loop with
autograd's gradients, the torch backend against the oracle (forward, final (W, b), every gradient, the LayerNorm's
params included), decoding across mini-batch boundaries, the reduction to DeltaNet, and a model that trains.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmoec
import lmoec.paths
from conftest import assert_close_to_scale, hybrid_trains_and_decodes
from lmoec.ir.nodes import Family
from lmoec.kinds import ttt

F64 = torch.float64
PER_TOKEN = 'import "{}"\nlsm ttt_token_ln extends ttt_linear {{ update {{ gradient = token }} }}\n'


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "ttt_token_ln.lsm"
    path.write_text(PER_TOKEN.format(lmoec.paths.SPECS / "lsm" / "ttt_linear.lsm"))
    return {"ttt_linear": lmoec.compile_spec("specs/lsm/ttt_linear.lsm"), "ttt_token_ln": lmoec.compile_spec(path)}


def _inputs(B, T, H, D, seed=0):
    """Fresh random op inputs: learning rates as the spec makes them (sigmoid / D), LayerNorm params near (1, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, D),
            "theta": torch.sigmoid(randn(B, T, H)) / D * 4, "ln_weight": 1 + 0.2 * randn(H, D),
            "ln_bias": 0.2 * randn(H, D)}


_close = assert_close_to_scale


def _ttt_as_written(q, k, v, theta, ln_weight, ln_bias, W, b, minibatch):
    """TTT-Linear's inner loop for one head and sequence [T, D], with the gradient from autograd (not the kind's
    hand-written LayerNorm backward): l = 1/2 |k + LN(k W + b) - v|^2 at the mini-batch's first (W, b)."""
    def loss(W_, b_, t):
        z = F.layer_norm(k[t] @ W_ + b_, (W_.shape[-1],), ln_weight, ln_bias, eps=ttt.EPS)
        return 0.5 * ((k[t] + z - v[t]) ** 2).sum()

    outs = []
    for t in range(q.shape[0]):
        if t % minibatch == 0:
            W0, b0 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        dW, db = torch.autograd.grad(loss(W0, b0, t), (W0, b0))
        W, b = W - theta[t] * dW, b - theta[t] * db
        outs.append(q[t] + F.layer_norm(q[t] @ W + b, (W.shape[-1],), ln_weight, ln_bias, eps=ttt.EPS))
    return torch.stack(outs), W, b


@pytest.mark.parametrize("name,minibatch", [("ttt_linear", 16), ("ttt_token_ln", 1)])
def test_oracle_is_ttt_linear_as_written(programs, name, minibatch):
    op = programs[name].op()
    B, T, H, D = 1, 37, 2, 6
    x = _inputs(B, T, H, D, seed=1)
    h0 = 0.3 * torch.randn(B, H, D + 1, D, dtype=F64)
    o, final = op(**x, initial_state=h0, output_final_state=True, backend="reference")
    for h in range(H):
        per = {n: (t[0, :, h] if t.dim() > 2 else t[h]) for n, t in x.items()}
        want, W, b = _ttt_as_written(**per, W=h0[0, h, :D], b=h0[0, h, D], minibatch=minibatch)
        _close(o[0, :, h], want, 1e-12)
        _close(final[0, h], torch.cat([W, b[None]]), 1e-12)


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_token_ln"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_torch_backend_matches_oracle_with_gradients(programs, name, varlen):
    """T not a multiple of the mini-batch (16), varlen with a one-token sequence, initial and final (W, b); o, the
    state and every gradient (q, k, v, theta, the LayerNorm's weight and bias, the initial state)."""
    op = programs[name].op()
    H, D = 2, 5
    if varlen:
        B, T, cu, n_seq = 1, 60, torch.tensor([0, 21, 22, 60]), 3
    else:
        B, T, cu, n_seq = 2, 39, None, 2
    inputs = _inputs(B, T, H, D)
    h0 = 0.3 * torch.randn(n_seq, H, D + 1, D, dtype=F64)
    results = {}
    for backend in ("reference", "torch"):
        leaves = {n: t.clone().requires_grad_() for n, t in {**inputs, "initial_state": h0}.items()}
        o, final = op(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        torch.manual_seed(1)
        do, dfinal = torch.randn(o.shape, dtype=F64), torch.randn(final.shape, dtype=F64)
        ((o * do).sum() + (final * dfinal).sum()).backward()
        results[backend] = (o, final, {n: t.grad for n, t in leaves.items()})
    (o_ref, s_ref, g_ref), (o, s, grads) = results["reference"], results["torch"]
    assert s.shape == (n_seq, H, D + 1, D)
    _close(o, o_ref, 1e-10)
    _close(s, s_ref, 1e-10)
    assert set(grads) == {"q", "k", "v", "theta", "ln_weight", "ln_bias", "initial_state"}
    for n in grads:
        assert grads[n] is not None and grads[n].abs().max() > 0, n
        _close(grads[n], g_ref[n], 1e-9)


def test_template_epsilon_is_the_oracle_s(programs):
    assert programs["ttt_linear"].package.ttt_linear_torch.EPS == ttt.EPS


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_token_ln"])
def test_decode_steps_equal_the_chunked_forward(programs, name):
    """Prefill 13 tokens, then decode one at a time across two mini-batch boundaries (16, 32): the layer keeps the
    boundary state and the open mini-batch's inputs; every output equals the full chunked forward's."""
    layer = programs[name].layer(hidden=32, heads=2).double()
    x = torch.randn(2, 36, 32, dtype=F64)
    full = layer(x, backend="torch")
    y, cache = layer(x[:, :13], use_cache=True, backend="torch")
    outs = [y]
    for t in range(13, 36):
        y, cache = layer(x[:, t: t + 1], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    assert cache["state"].shape == (2, 2, layer.head_k + 1, layer.head_v)
    _close(torch.cat(outs, dim=1), full, 1e-10)


def test_without_layernorm_per_token_is_deltanet():
    """TTT with b = 1 and no LayerNorm (loss = mse, gradient = token) is DeltaNet: it classifies as the delta kind
    (tests/test_titans.py checks its layer against DeltaNet's), and its op is DeltaNet's op on beta = lr."""
    plain = lmoec.compile_spec("specs/lsm/ttt_token.lsm")
    assert plain.ir.lsm().recurrence.family is Family.delta
    x = _inputs(2, 50, 2, 6, seed=3)
    k = F.normalize(x["k"], dim=-1)
    o, _ = plain.op()(x["q"], k, x["v"], beta=x["theta"] * 6, backend="reference")
    # the same mini-batch-of-one gradient steps, written out
    W = torch.zeros(2, 2, 6, 6, dtype=F64)
    outs = []
    for t in range(50):
        lr, k_t = (x["theta"][:, t] * 6)[..., None, None], k[:, t]
        W = W - lr * k_t[..., :, None] * (torch.einsum("bhk,bhkv->bhv", k_t, W) - x["v"][:, t])[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", x["q"][:, t], W) * 6 ** -0.5)
    _close(o, torch.stack(outs, dim=1), 1e-12)


def test_hybrid_model_trains_a_step_and_decodes(tmp_path):
    """lsm = ttt_linear in a hybrid Linear-MoE stack (LN): a training step gives finite gradients to every parameter
    (the inner LayerNorm's included), and decoding through the caches gives the logits of the full forward."""
    model = hybrid_trains_and_decodes("ttt_linear", tmp_path)
    assert any("ln_weight" in name for name, _ in model.named_parameters())


def test_generation_falls_back_to_the_dynamic_step(tmp_path, capsys):
    """A mini-batch update's cache grows with its open mini-batch, so it has no static (CUDA-graph) form: generation
    says so and decodes with the dynamic path, the same tokens as asked for directly."""
    from lmoec.trainer.generate import generate_ids

    spec = tmp_path / "ttt_gen.lsm"
    spec.write_text(f'import "{lmoec.paths.SPECS / "lsm" / "ttt_linear.lsm"}"\n'
                    'model ttt_gen { vocab = 64 hidden = 32 layers = 1 heads = 2 lsm = ttt_linear ffn { ffn = 64 } }\n')
    torch.manual_seed(0)
    model = lmoec.compile_spec(spec).model().eval()
    prompt = torch.randint(0, 64, (1, 5))
    static = torch.cat(list(generate_ids(model, prompt, 20, temperature=0.0, static=True)), dim=-1)
    assert "decoding without a static step" in capsys.readouterr().err
    dynamic = torch.cat(list(generate_ids(model, prompt, 20, temperature=0.0, static=False)), dim=-1)
    assert torch.equal(static, dynamic) and static.numel() == 20
