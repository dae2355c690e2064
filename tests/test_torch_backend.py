"""The emitted torch chunkwise path (`<lsm>_torch.py`) against the float64 token-by-token reference.

Every family, through the public op (`Program.op()(..., backend="torch")` vs `backend="reference"`):
forward with initial and final states at T not a multiple of the chunk, packed sequences, gradients of
every input, gradcheck, bf16 / fp32 inputs, strong vector decay, the decode `step`, and argument errors.
Tolerances: fp64 inputs are computed in fp64 (1e-10); fp32 inputs 1e-5 (DESIGN.md); bf16 inputs are
computed in fp32 but the output is rounded to bf16 (8 bits of mantissa): 1e-2 relative.
"""
import pytest
import torch

from conftest import RECURRENCES, random_inputs

FAMILIES = list(RECURRENCES)


def rel_err(x, ref):
    """max |x - ref| / max |ref|; NaN or inf anywhere in x fails."""
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def both(op, inputs, **kw):
    """(torch outputs, reference outputs) of one op on the same inputs."""
    return op(**inputs, backend="torch", **kw), op(**inputs, backend="reference", **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk,B,T,H,K,V", [(16, 2, 37, 2, 8, 6), (32, 1, 75, 3, 4, 10)])
def test_forward_and_states_match_reference(lsm_program, family, chunk, B, T, H, K, V):
    rec = RECURRENCES[family]
    op = lsm_program(rec, chunk).op()
    torch.manual_seed(hash((family, chunk)) % 2**31)
    inputs = random_inputs(rec, B=B, T=T, H=H, K=K, V=V)
    (o, S), (o_ref, S_ref) = both(op, inputs, output_final_state=True)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(S, S_ref) < 1e-10
    # without an initial state, and no final state asked for
    inputs.pop("initial_state")
    (o, S), (o_ref, _) = both(op, inputs, scale=0.3)
    assert S is None
    assert rel_err(o, o_ref) < 1e-10


def test_default_chunk_size_and_long_sequence(lsm_program):
    """The spec's default chunk (64) over several chunks, for the two families with the most machinery."""
    for family in ("vector_bonus", "dplr_vector"):
        rec = RECURRENCES[family]
        torch.manual_seed(1)
        inputs = random_inputs(rec, B=1, T=150, H=2, K=16, V=8)
        (o, S), (o_ref, S_ref) = both(lsm_program(rec).op(), inputs, output_final_state=True)
        assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


def test_constant_decay_given_per_token(lsm_program):
    rec = RECURRENCES["constant"]
    torch.manual_seed(2)
    inputs = random_inputs(rec, B=2, T=21, H=3, K=4, V=4, constant_per_head=False)
    assert inputs["g"].shape == (2, 21, 3)
    (o, S), (o_ref, S_ref) = both(lsm_program(rec, 16).op(), inputs, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences(lsm_program, family):
    """cu_seqlens with uneven lengths (one of length 1, one spanning chunks), states per sequence."""
    rec = RECURRENCES[family]
    offsets = torch.tensor([0, 5, 40, 41, 58], dtype=torch.int32)
    torch.manual_seed(3)
    inputs = random_inputs(rec, B=1, T=58, H=2, K=8, V=4, n_seq=4)
    (o, S), (o_ref, S_ref) = both(lsm_program(rec, 16).op(), inputs, output_final_state=True, cu_seqlens=offsets)
    assert S.shape == (4, 2, 8, 4)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_of_every_input_match_reference(lsm_program, family):
    rec = RECURRENCES[family]
    op = lsm_program(rec, 16).op()
    torch.manual_seed(4)
    inputs = random_inputs(rec, B=2, T=35, H=2, K=8, V=4)
    torch.manual_seed(5)
    do, dS = torch.randn(2, 35, 2, 4, dtype=torch.float64), torch.randn(2, 2, 8, 4, dtype=torch.float64)

    def grads(backend):
        leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
        o, S = op(**leaves, output_final_state=True, backend=backend)
        torch.autograd.backward([o, S], [do, dS])
        return {name: t.grad for name, t in leaves.items()}

    got, want = grads("torch"), grads("reference")
    assert set(got) >= {"q", "k", "v", "initial_state"}
    for name in want:
        assert got[name] is not None, name
        assert rel_err(got[name], want[name]) < 1e-9, name


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck(lsm_program, family):
    """Finite differences of the torch path itself, over two chunks plus a padded tail.

    fast_mode checks random projections u^T J v of the full Jacobian (fresh u, v each run); the test above
    already compares every gradient element with the reference's autograd.
    """
    rec = RECURRENCES[family]
    op = lsm_program(rec, 16).op()
    torch.manual_seed(6)
    inputs = random_inputs(rec, B=1, T=19, H=1, K=3, V=2)
    names = list(inputs)

    def fn(*tensors):
        return op(**dict(zip(names, tensors)), output_final_state=True, backend="torch")

    leaves = [t.clone().requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_low_precision_inputs(lsm_program, family, dtype, tol):
    """bf16 / fp32 inputs against the float64 reference on the same (rounded) values; states stay fp32."""
    rec = RECURRENCES[family]
    torch.manual_seed(7)
    inputs = random_inputs(rec, B=1, T=70, H=2, K=16, V=16, dtype=dtype)
    op = lsm_program(rec, 32).op()
    o, S = op(**inputs, output_final_state=True, backend="torch")
    assert o.dtype == dtype and S.dtype == torch.float32
    exact = {name: t.double() for name, t in inputs.items()}
    o_ref, S_ref = op(**exact, output_final_state=True, backend="reference")
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, S_ref) < max(tol / 4, 1e-5)  # fp32 state, not rounded to bf16


@pytest.mark.parametrize("family", ["vector", "vector_bonus", "delta_vector", "dplr_vector", "scalar"])
def test_strong_decay_stays_finite_and_correct(lsm_program, family):
    """g in [-20, -5]: exp(-cumsum g) over a chunk would overflow fp32 (and fp64 at chunk 64) if ever formed."""
    rec = RECURRENCES[family]
    torch.manual_seed(8)
    inputs = random_inputs(rec, B=1, T=100, H=2, K=16, V=8, dtype=torch.float32, strong_decay=True)
    op = lsm_program(rec).op()
    o, S = op(**inputs, output_final_state=True, backend="torch")
    o_ref, S_ref = op(**{n: t.double() for n, t in inputs.items()}, output_final_state=True, backend="reference")
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, S = op(**leaves, output_final_state=True, backend="torch")
    (o.sum() + S.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_step_token_by_token_equals_chunk(lsm_program, family):
    rec = RECURRENCES[family]
    program = lsm_program(rec, 16)
    ops = program.package.lsm_ops
    torch.manual_seed(9)
    inputs = random_inputs(rec, B=2, T=20, H=2, K=8, V=4)
    o_chunk, S_chunk = ops.op(**inputs, output_final_state=True, backend="torch")
    per_token = [n for n in ("q", "k", "v", "g", "beta", "a", "b") if n in inputs and inputs[n].dim() >= 3]
    state = inputs["initial_state"]
    outs = []
    for t in range(20):
        args = {n: (inputs[n][:, t] if n in per_token else inputs[n]) for n in inputs if n != "initial_state"}
        o_t, state = ops.step(**args, state=state)
        outs.append(o_t)
    assert rel_err(torch.stack(outs, 1), o_chunk) < 1e-10
    assert rel_err(state, S_chunk) < 1e-10


def test_argument_errors_name_the_argument(lsm_program):
    torch.manual_seed(10)
    vector = lsm_program(RECURRENCES["vector"], 16).op()
    inputs = random_inputs(RECURRENCES["vector"], B=1, T=5, H=2, K=4, V=4)
    with pytest.raises(ValueError, match=r"\bg\b.*\[1, 5, 2, 4\]"):
        vector(**{**inputs, "g": inputs["g"][..., 0]}, backend="torch")
    with pytest.raises(ValueError, match=r"\bbeta\b"):
        vector(**inputs, beta=torch.rand(1, 5, 2, dtype=torch.float64), backend="torch")
    with pytest.raises(ValueError, match=r"\bg\b is required"):
        vector(**{n: t for n, t in inputs.items() if n != "g"}, backend="torch")
    with pytest.raises(ValueError, match=r"initial_state"):
        vector(**{**inputs, "initial_state": inputs["initial_state"][:, :1]}, backend="torch")

    additive = lsm_program(RECURRENCES["additive"], 16).op()
    with pytest.raises(ValueError, match=r"\bg\b is not accepted"):
        additive(inputs["q"], inputs["k"], inputs["v"], g=inputs["g"], backend="torch")

    dplr = lsm_program(RECURRENCES["dplr_vector"], 16).package.lsm_ops
    step_in = random_inputs(RECURRENCES["dplr_vector"], B=2, T=1, H=2, K=4, V=3)
    args = {n: t[:, 0] for n, t in step_in.items() if n != "initial_state"}
    dplr.step(**args, state=step_in["initial_state"])  # well-formed: no error
    with pytest.raises(ValueError, match=r"step: a must have shape \[2, 2, 4\]"):
        dplr.step(**{**args, "a": args["a"][..., :3]}, state=step_in["initial_state"])
    with pytest.raises(ValueError, match=r"step: state"):
        dplr.step(**args, state=step_in["initial_state"][:1])


def test_emitted_code_has_only_the_needed_branches(lsm_program):
    """Specialization at generation time: no decay -> no decay code; no rank-one terms -> no solve."""
    additive = lsm_program(RECURRENCES["additive"], 16).files["lsm_torch.py"]
    assert "exp(" not in additive and "_UnitLowerInverse" not in additive and "cum" not in additive
    vector = lsm_program(RECURRENCES["vector"], 16).files["lsm_torch.py"]
    assert "SUB = 16" in vector and "_UnitLowerInverse" not in vector
    delta = lsm_program(RECURRENCES["delta_scalar"], 16).files["lsm_torch.py"]
    assert "_UnitLowerInverse" in delta and "SUB" not in delta


@pytest.mark.parametrize("family", ["vector", "vector_bonus", "delta_vector", "dplr_vector"])
def test_vector_decay_log_space_path(lsm_program, family, monkeypatch):
    """Ordinary decays take the factored one-matmul path; force the strong-decay (log-space, sub-block) path
    and check it too, forward and gradients, over chunks of two sub-blocks."""
    rec = RECURRENCES[family]
    program = lsm_program(rec, 32)
    monkeypatch.setattr(program.package.lsm_torch, "FACTORED_SPAN", 0.0)
    op = program.op()
    torch.manual_seed(11)
    inputs = random_inputs(rec, B=1, T=45, H=2, K=8, V=4)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o, S = op(**leaves, output_final_state=True, backend="torch")
    (o.square().sum() + S.sum()).backward()
    exact = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    o_ref, S_ref = op(**exact, output_final_state=True, backend="reference")
    (o_ref.square().sum() + S_ref.sum()).backward()
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    for name in inputs:
        assert rel_err(leaves[name].grad, exact[name].grad) < 1e-9, name


@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
def test_unit_lower_inverse_is_exact(lsm_program, chunk):
    """The blocked inverse the rank-one families use, at chunk sizes with 0 to 3 merges of 16 x 16 blocks,
    against LAPACK's inverse; only the strictly lower part of its input may count, and its gradient
    (custom backward) against finite differences."""
    inverse = lsm_program(RECURRENCES["delta"], chunk).package.lsm_torch._UnitLowerInverse.apply
    torch.manual_seed(12)
    scores = torch.randn(3, 2, chunk, chunk, dtype=torch.float64) * 0.3
    strict = scores.tril(-1)
    want = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + strict)
    assert rel_err(inverse(scores), want) < 1e-12
    assert rel_err(inverse(strict), want) < 1e-12
    leaf = scores[:1, :1].clone().requires_grad_()
    assert torch.autograd.gradcheck(inverse, (leaf,), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("family", ["delta_vector", "dplr_scalar"])
@pytest.mark.parametrize("chunk", [64, 128])
def test_rank_one_chunks_with_merged_inverse_blocks(lsm_program, family, chunk):
    """Forward, states and gradients at chunks whose triangular inverse merges blocks (several chunks)."""
    rec = RECURRENCES[family]
    op = lsm_program(rec, chunk).op()
    torch.manual_seed(13)
    inputs = random_inputs(rec, B=1, T=2 * chunk + 7, H=2, K=8, V=4)

    def run(backend):
        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        o, S = op(**leaves, output_final_state=True, backend=backend)
        (o.square().sum() + S.sum()).backward()
        return o, S, {n: t.grad for n, t in leaves.items()}

    (o, S, grads), (o_ref, S_ref, grads_ref) = run("torch"), run("reference")
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    for name in inputs:
        assert rel_err(grads[name], grads_ref[name]) < 1e-9, name
