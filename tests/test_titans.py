"""Test-time-training memories (`update { }`, lmoec.kinds.titans): the language, the classification, the oracle and
the torch chunkwise backend of Titans' exact per-token recurrence and of its chunk-start (mini-batch) form.

The torch backend against the float64 token-by-token oracle (forward, final joint state, every gradient), the oracle
against Titans' equations written out here, the equivalences (momentum 0 is Gated DeltaNet with a rescaled write; the
plain per-token form is DeltaNet and runs its kernels), decoding token by token, and a model that trains.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmoec
import lmoec.paths
from conftest import assert_close_to_scale, hybrid_trains_and_decodes
from lmoec.ir.nodes import Family

F64 = torch.float64


# Titans' parallel form, gradients at the start of each mini-batch of 64 tokens: an option of the update, not a library
# spec (it has no one-token decode step, which the library's specs all have)
CHUNK_START = 'import "{}"\nlsm titans_chunk extends titans {{ update {{ gradient = minibatch(64) }} }}\n'


def _chunk_start_spec(folder):
    path = folder / "titans_chunk.lsm"
    path.write_text(CHUNK_START.format(lmoec.paths.SPECS / "lsm" / "titans.lsm"))
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return {"titans": lmoec.compile_spec("specs/lsm/titans.lsm"),
            "titans_chunk": lmoec.compile_spec(_chunk_start_spec(tmp_path_factory.mktemp("specs")))}


def _inputs(B, T, H, K, V, seed=0, gates=("theta", "eta", "alpha")):
    """Fresh random op inputs as a layer feeds them: L2-normalized keys, gates in (0, 1) (weight decay small)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    inputs = {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, H, K), dim=-1), "v": randn(B, T, H, V)}
    draws = {"theta": torch.sigmoid(randn(B, T, H)), "eta": torch.sigmoid(randn(B, T, H)),
             "alpha": torch.sigmoid(randn(B, T, H) - 3)}
    return {**inputs, **{n: draws[n] for n in gates}}


_close = assert_close_to_scale


def _titans_as_written(q, k, v, theta, eta, alpha, M, S, scale, minibatch=1):
    """Titans' linear memory per (batch, head), straight from the paper's equations, one sequence [T, D]:
    S_t = eta_t S_{t-1} - theta_t grad, grad = k_t (M_*^T k_t - v_t)^T, M_t = (1 - alpha_t) M_{t-1} + S_t."""
    outs = []
    for t in range(q.shape[0]):
        if t % minibatch == 0:
            anchor = M.clone()
        grad = torch.outer(k[t], anchor.T @ k[t] - v[t])
        S = eta[t] * S - theta[t] * grad
        M = (1 - alpha[t]) * M + S
        outs.append(scale * M.T @ q[t])
    return torch.stack(outs), M, S


@pytest.mark.parametrize("name,minibatch", [("titans", 1), ("titans_chunk", 64)])
def test_oracle_is_titans_as_written(programs, name, minibatch):
    """The oracle (the kind's token step) equals the equations spelled out per head, from a given (M, S)."""
    op = programs[name].op()
    B, T, H, K, V = 1, 70, 2, 3, 4
    x = _inputs(B, T, H, K, V, seed=1)
    h0 = torch.randn(B, H, K, 2 * V, dtype=F64)
    o, final = op(**x, initial_state=h0, output_final_state=True, backend="reference")
    for h in range(H):
        per = {n: t[0, :, h] for n, t in x.items()}
        want, M, S = _titans_as_written(**per, M=h0[0, h, :, :V], S=h0[0, h, :, V:], scale=K ** -0.5,
                                        minibatch=minibatch)
        _close(o[0, :, h], want, 1e-12)
        _close(final[0, h], torch.cat([M, S], dim=-1), 1e-12)


@pytest.mark.parametrize("name", ["titans", "titans_chunk"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_torch_backend_matches_oracle_with_gradients(programs, name, varlen):
    """K != V, T not a multiple of the chunk (64), initial and final joint states; o, (M, S) and every gradient."""
    op = programs[name].op()
    H, K, V = 2, 5, 7
    if varlen:
        B, T, cu, n_seq = 1, 150, torch.tensor([0, 61, 62, 150]), 3  # a one-token sequence among them
    else:
        B, T, cu, n_seq = 2, 139, None, 2
    inputs = _inputs(B, T, H, K, V)
    h0 = torch.randn(n_seq, H, K, 2 * V, dtype=F64)
    results = {}
    for backend in ("reference", "torch"):
        leaves = {n: x.clone().requires_grad_() for n, x in {**inputs, "initial_state": h0}.items()}
        o, final = op(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        torch.manual_seed(1)  # the same output gradients for both backends
        do, dfinal = torch.randn(o.shape, dtype=F64), torch.randn(final.shape, dtype=F64)
        ((o * do).sum() + (final * dfinal).sum()).backward()
        results[backend] = (o, final, {n: x.grad for n, x in leaves.items()})
    (o_ref, s_ref, g_ref), (o, s, grads) = results["reference"], results["torch"]
    assert s.shape == (n_seq, H, K, 2 * V)
    _close(o, o_ref, 1e-10)
    _close(s, s_ref, 1e-10)
    assert set(grads) == set(g_ref) == {"q", "k", "v", "theta", "eta", "alpha", "initial_state"}
    for n in grads:
        assert grads[n] is not None and grads[n].abs().max() > 0, n
        _close(grads[n], g_ref[n], 1e-9)


def test_float32_inputs(programs):
    """fp32 inputs (fp32 arithmetic, the triangular solve included) agree with the float64 oracle to ~1e-5."""
    op = programs["titans"].op()
    inputs = _inputs(2, 100, 2, 16, 32, seed=2)
    o, final = op(**{n: x.float() for n, x in inputs.items()}, output_final_state=True, backend="torch")
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    o_ref, s_ref = op(**inputs, output_final_state=True, backend="reference")
    _close(o, o_ref, 1e-5)
    _close(final, s_ref, 1e-5)


def test_no_momentum_is_gated_deltanet_with_a_rescaled_write(tmp_path):
    """Titans without momentum, M_t = (1 - alpha) M - theta k k^T M + theta k v^T, is Gated DeltaNet's
    exp(g) (I - beta k k^T) M + beta k v'^T at g = log(1 - alpha), beta = theta / (1 - alpha) and v' = (1 - alpha) v:
    the erase and write strengths differ, so the gates agree only with the write rescaled (DESIGN.md). Also: the
    momentum kind at eta = 0 gives the same."""
    spec = tmp_path / "titans_no_momentum.lsm"
    spec.write_text("lsm titans_no_momentum { update { lr = sigmoid(x @ W_lr) weight_decay = sigmoid(x @ W_a) } }\n")
    program = lmoec.compile_spec(spec)
    assert program.ir.lsm().recurrence.family is Family.titans and not program.ir.lsm().recurrence.momentum
    gdn = lmoec.compile_spec("specs/lsm/gated_deltanet.lsm").op()
    x = _inputs(2, 90, 2, 6, 5, seed=3, gates=("theta", "alpha"))
    h0 = torch.randn(2, 2, 6, 10, dtype=F64)
    h0[..., 5:] = 0  # no momentum: S_0 plays no part, and S_t is the step itself
    o, final = program.op()(**x, initial_state=h0, output_final_state=True, backend="torch")
    keep = 1 - x["alpha"]
    o_gdn, m_gdn = gdn(x["q"], x["k"], x["v"] * keep[..., None], g=keep.log(), beta=x["theta"] / keep,
                       initial_state=h0[..., :5].contiguous(), output_final_state=True, backend="torch")
    _close(o, o_gdn, 1e-10)
    _close(final[..., :5], m_gdn, 1e-10)
    o_zero, _ = lmoec.compile_spec("specs/lsm/titans.lsm").op()(**x, eta=torch.zeros_like(x["theta"]),
                                                                 initial_state=h0, backend="torch")
    _close(o_zero, o_gdn, 1e-10)


def test_plain_update_is_deltanet_and_runs_its_kernels():
    """`update { lr = ... gradient = token }` with neither momentum nor weight decay is the delta rule: classified
    as the delta kind, Triton kernels emitted, and the layer equals DeltaNet's with W_lr as W_beta."""
    plain = lmoec.compile_spec("specs/lsm/ttt_token.lsm")
    rec = plain.ir.lsm().recurrence
    assert rec.family is Family.delta and rec.update == "none"
    assert "ttt_token_triton.py" in plain.files
    torch.manual_seed(4)
    layer = plain.layer(hidden=32, heads=2).double()
    delta = lmoec.compile_spec("specs/lsm/deltanet.lsm").layer(hidden=32, heads=2).double()
    state = {n.replace("W_lr", "W_beta"): p for n, p in layer.state_dict().items()}
    delta.load_state_dict(state)
    x = torch.randn(2, 40, 32, dtype=F64)
    _close(layer(x, backend="torch"), delta(x, backend="torch"), 1e-12)


@pytest.mark.parametrize("name", ["titans", "titans_chunk"])
def test_decode_steps_equal_the_chunked_forward(programs, name):
    """Prefill 70 tokens (chunked), then decode one token at a time through the layer's caches (conv states, the joint
    [H, K, 2V] state; for the mini-batch form the state at the last boundary and the open mini-batch's inputs): every
    output equals the full chunked forward's, across a mini-batch boundary (64) too."""
    layer = programs[name].layer(hidden=32, heads=4).double()
    x = torch.randn(2, 80, 32, dtype=F64)
    full = layer(x, backend="torch")
    y, cache = layer(x[:, :60], use_cache=True, backend="torch")
    outs = [y]
    for t in range(60, 80):
        y, cache = layer(x[:, t: t + 1], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    assert cache["state"].shape == (2, 4, layer.head_k, 2 * layer.head_v)
    if name == "titans_chunk":
        assert cache["open"]["q"].shape[1] == 80 - 64
    _close(torch.cat(outs, dim=1), full, 1e-10)


def test_minibatch_op_step_says_why_not(programs):
    """The op's one-token step cannot take a mini-batch's gradient point (it holds no mini-batch's first memory): a
    clear error, not a wrong answer; the layer decodes that form by running its open mini-batch again."""
    B, H, K, V = 1, 2, 4, 6
    x = {n: t[:, 0] for n, t in _inputs(B, 1, H, K, V).items()}
    with pytest.raises(ValueError, match="minibatch\\(64\\).*decode with the chunked op"):
        programs["titans_chunk"].package.titans_chunk_ops.step(**x, state=torch.zeros(B, H, K, 2 * V, dtype=F64))


def test_contract_names_the_update_arguments(programs):
    op = programs["titans"].op()
    x = _inputs(1, 8, 2, 4, 6)
    with pytest.raises(ValueError, match="eta is required"):
        op(**{n: t for n, t in x.items() if n != "eta"})
    with pytest.raises(ValueError, match="initial_state must have shape \\[N, H, K, 2V\\] = \\[1, 2, 4, 12\\]"):
        op(**x, initial_state=torch.zeros(1, 2, 4, 6, dtype=F64))


def test_check_and_inspect_show_the_classification(tmp_path, capsys):
    """`lmoec check` names the kind; `inspect --ir` carries the update and its recurrence (in process: no torch
    start-up per command)."""
    from lmoec.cli import main

    def run(*args):
        assert main(list(args)) == 0
        return capsys.readouterr().out
    assert "(titans)" in run("check", "specs/lsm/titans.lsm")
    assert "(delta)" in run("check", "specs/lsm/ttt_token.lsm")
    assert "(ttt)" in run("check", "specs/lsm/ttt_linear.lsm")
    ir = run("inspect", str(_chunk_start_spec(tmp_path)), "--ir")
    assert '"update": "titans"' in ir and '"minibatch": 64' in ir and '"loss": "mse"' in ir


def test_hybrid_model_trains_a_step_and_decodes(tmp_path):
    """lsm = titans in a hybrid Linear-MoE stack (LN): a training step gives finite gradients to every parameter,
    and decoding through the caches gives the logits of the full forward."""
    hybrid_trains_and_decodes("titans", tmp_path)


def test_lasp2_plan_carries_the_joint_state():
    """The comm plan derives the joint state's map from the IR: A_r [B, H, 2K, 2K] and M_r [B, H, 2K, V] in fp32
    (tests/test_lasp2.py runs it: the op at sp = 2 and 4, segments, and a hybrid model)."""
    import sympy

    step = lmoec.compile_spec("specs/lsm/titans.lsm").ir.comm.steps[0]
    assert step.shape == {"A_r": ["B", "H", "2K", "2K"], "M_r": ["B", "H", "2K", "V"]}
    B, H, K, V = sympy.symbols("B H K V")
    assert sympy.expand(step.bytes_per_rank - 4 * (B * H * (2 * K) ** 2 + B * H * 2 * K * V)) == 0
