"""The element-wise kind (lmoec.kinds.elementwise): Mamba's outer-product gate and GFW's outer-sum gate.

The torch chunkwise backend against the float64 token-by-token oracle (forward, final state, every gradient),
the oracle and the Mamba layer against mamba_ssm's `selective_scan_ref` semantics written out here, strong gates,
and decoding token by token against the chunked forward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmoec
import lmoec.paths
from conftest import assert_close_to_scale, hybrid_trains_and_decodes

F64 = torch.float64


@pytest.fixture(scope="module")
def programs():
    return {name: lmoec.compile_spec(f"specs/lsm/{name}.lsm") for name in ("mamba", "gfw")}


def _inputs(kind, B, T, H, K, V, dtype=F64, strong=False, seed=0):
    """Fresh random op inputs; `strong`: log gates near -50 per step (dt * A for Mamba)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if kind == "mamba":
        dt = F.softplus(randn(B, T, H, V)) + (9.5 if strong else 0)  # strong: dt ~ 10, A in [-5, -4]
        A = -(torch.rand(H, V, K, generator=gen, dtype=F64) + (4 if strong else 0.1))
        gates = {"dt": dt, "A": A}
    else:
        g, gv = F.logsigmoid(randn(B, T, H, K)), F.logsigmoid(randn(B, T, H, V))
        gates = {"g": g * 50 if strong else g, "gv": gv * 50 if strong else gv}
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), **{n: x.to(dtype) for n, x in gates.items()}}


_close = assert_close_to_scale


@pytest.mark.parametrize("name", ["mamba", "gfw"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_torch_backend_matches_oracle_with_gradients(programs, name, varlen):
    """K != V, T not a multiple of the chunk (64), initial and final states; o, the state and every gradient."""
    op = programs[name].op()
    H, K, V = 2, 5, 7
    if varlen:
        B, T, cu = 1, 150, torch.tensor([0, 61, 62, 150])  # a one-token sequence among them
        n_seq = 3
    else:
        B, T, cu = 2, 139, None
        n_seq = 2
    inputs = _inputs(name, B, T, H, K, V)
    h0 = torch.randn(n_seq, H, K, V, dtype=F64)
    results = {}
    for backend in ("reference", "torch"):
        leaves = {n: x.clone().requires_grad_() for n, x in {**inputs, "initial_state": h0}.items()}
        o, final = op(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        torch.manual_seed(1)  # the same output gradients for both backends
        do, dfinal = torch.randn(o.shape, dtype=F64), torch.randn(final.shape, dtype=F64)
        ((o * do).sum() + (final * dfinal).sum()).backward()
        results[backend] = (o, final, {n: x.grad for n, x in leaves.items()})
    (o_ref, s_ref, g_ref), (o, s, grads) = results["reference"], results["torch"]
    _close(o, o_ref, 1e-10)
    _close(s, s_ref, 1e-10)
    assert set(grads) == set(g_ref) and all(g is not None for g in grads.values())
    for n in grads:
        _close(grads[n], g_ref[n], 1e-9)


@pytest.mark.parametrize("name", ["mamba", "gfw"])
def test_float32_and_bfloat16_inputs(programs, name):
    """fp32 inputs agree with the float64 oracle to ~1e-5; bf16 inputs (arithmetic in fp32) to the bf16 rounding
    of the output, against the oracle on the same rounded inputs."""
    op = programs[name].op()
    inputs = _inputs(name, 2, 100, 2, 16, 32)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):
        low = {n: x.to(dtype) for n, x in inputs.items()}
        o, _ = op(**low, backend="torch")
        assert o.dtype == dtype
        o_ref, _ = op(**{n: x.double() for n, x in low.items()}, backend="reference")
        _close(o, o_ref, rtol)


@pytest.mark.parametrize("name", ["mamba", "gfw"])
def test_strong_gates_stay_finite(programs, name):
    """Log gates down to about -50 per token (Mamba: dt * A): outputs and gradients finite and equal to the oracle."""
    op = programs[name].op()
    inputs = _inputs(name, 1, 90, 2, 4, 6, strong=True)
    gate = inputs["dt"][..., None, :] * inputs["A"].transpose(-1, -2) if name == "mamba" else inputs["g"]
    assert gate.min() < -40
    h0 = torch.randn(1, 2, 4, 6, dtype=F64)
    outs = {}
    for backend in ("reference", "torch"):
        leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
        o, final = op(**leaves, initial_state=h0, output_final_state=True, backend=backend)
        (o.sum() + final.sum()).backward()
        outs[backend] = (o, {n: x.grad for n, x in leaves.items()})
    for n, grad in outs["torch"][1].items():
        _close(grad, outs["reference"][1][n], 1e-9)
    _close(outs["torch"][0], outs["reference"][0], 1e-10)


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, return_last_state=True):
    """mamba_ssm's reference semantics, re-derived: u, delta, z [b, d, l]; A [d, n]; B, C [b, g, n, l] (g groups of
    d / g channels); D, delta_bias [d]. delta = softplus(delta + delta_bias); x_t = exp(delta_t A) x_{t-1} +
    delta_t B_t u_t; y_t = C_t x_t; out = (y + D u) * silu(z) (z None: no gate)."""
    b, d, l = u.shape
    groups = B.shape[1]
    delta = F.softplus(delta + delta_bias[:, None])
    Bc = B.repeat_interleave(d // groups, dim=1)  # [b, d, n, l]
    Cc = C.repeat_interleave(d // groups, dim=1)
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for i in range(l):
        x = torch.exp(delta[:, :, i, None] * A) * x + delta[:, :, i, None] * Bc[:, :, :, i] * u[:, :, i, None]
        ys.append((x * Cc[:, :, :, i]).sum(-1))
    y = torch.stack(ys, dim=2)
    out = y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return (out, x) if return_last_state else out


def test_op_is_the_selective_scan(programs):
    """The op with q = C, k = B, v = u, dt, A [H, V, K] = A [d, n] per head, plus the layer's D skip and z gate, is
    selective_scan_ref with two groups of B and C."""
    op = programs["mamba"].op()
    b, H, V, N, l, groups = 2, 4, 3, 16, 70, 2
    d = H * V
    torch.manual_seed(3)
    u, delta, z = (torch.randn(b, d, l, dtype=F64) for _ in range(3))
    A = -torch.rand(d, N, dtype=F64) * 4
    Bm, Cm = torch.randn(b, groups, N, l, dtype=F64), torch.randn(b, groups, N, l, dtype=F64)
    D, delta_bias = torch.randn(d, dtype=F64), torch.randn(d, dtype=F64)
    want, last = selective_scan_ref(u, delta, A, Bm, Cm, D, z, delta_bias)

    def heads(x):  # [b, d, l] -> [b, l, H, V], channel d = h * V + v
        return x.transpose(1, 2).unflatten(-1, (H, V))

    def per_head(x):  # [b, groups, n, l] -> [b, l, H, N], each group's to its heads
        return x.permute(0, 3, 1, 2).repeat_interleave(H // groups, dim=2)

    dt = F.softplus(heads(delta) + delta_bias.view(H, V))
    for backend in ("reference", "torch"):
        o, final = op(per_head(Cm), per_head(Bm), heads(u), dt=dt, A=A.view(H, V, N), scale=1.0,
                      output_final_state=True, backend=backend)
        out = (o + D.view(H, V) * heads(u)) * F.silu(heads(z))
        _close(out, heads(want), 1e-10)
        _close(final.transpose(-1, -2).reshape(b, d, N), last, 1e-10)


def test_mamba_layer_is_mamba(programs):
    """The emitted layer = out_proj(selective_scan_ref(u, dt, A, B, C, D, z)) with u, B, C out of their convs and
    dt = softplus(W_dt2 W_dt x + dt_bias): the spec's reading of Mamba, checked on the layer's own weights."""
    layer = programs["mamba"].layer(hidden=24, heads=3).double()
    with torch.no_grad():
        for p in layer.parameters():  # fresh, not the init: nothing symmetric hides a transposed weight
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 45, 24, dtype=F64)
    H, V, N = layer.heads, layer.head_v, layer.head_k
    u = layer.v_conv(layer.v_proj(x))[0]  # [b, l, d]
    Bm = layer.k_conv(layer.k_proj(x))[0]  # [b, l, n]: one group
    Cm = layer.q_conv(layer.q_proj(x))[0]
    delta = layer.W_dt2(layer.W_dt(x))
    z = layer.W_z(x)
    A = -torch.exp(layer.A_log).reshape(H * V, N)
    out = selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2)[:, None],
                             Cm.transpose(1, 2)[:, None], layer.D.reshape(-1), z.transpose(1, 2), layer.dt_bias.reshape(-1),
                             return_last_state=False)
    want = layer.o_proj(out.transpose(1, 2))
    for backend in ("reference", "torch"):
        _close(layer(x, backend=backend), want, 1e-10)


def test_s4_layer_is_s4d():
    """The S4 layer = o_proj of S4D's time-invariant scan: dt = exp(dt_log), A = -exp(A_log), B = B_s and C = C_s the
    same at every token (per head here), u = v_proj(x), plus D u; selective_scan_ref with constant dt, B, C."""
    layer = lmoec.compile_spec("specs/lsm/s4.lsm").layer(hidden=24, heads=3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b, l = 2, 45
    x = torch.randn(b, l, 24, dtype=F64)
    H, V, N = layer.heads, layer.head_v, layer.head_k
    u = layer.v_proj(x).transpose(1, 2)  # [b, d, l]
    dt = torch.exp(layer.dt_log).reshape(-1)
    delta = torch.log(torch.expm1(dt))[None, :, None].expand(b, H * V, l)  # softplus(delta) = dt
    Bm = layer.B_s[None, :, :, None].expand(b, H, N, l)  # one group per head
    Cm = layer.C_s[None, :, :, None].expand(b, H, N, l)
    A = -torch.exp(layer.A_log).reshape(H * V, N)
    out = selective_scan_ref(u, delta, A, Bm, Cm, layer.D.reshape(-1), None, torch.zeros(H * V, dtype=F64),
                             return_last_state=False)
    want = layer.o_proj(out.transpose(1, 2))
    for backend in ("reference", "torch"):
        _close(layer(x, backend=backend), want, 1e-10)


@pytest.mark.parametrize("name", ["mamba", "gfw"])
def test_decode_steps_equal_the_chunked_forward(programs, name):
    """Prefill 70 tokens (chunked), then decode one token at a time through the layer's caches (conv states and
    the [H, K, V] state): every output equals the full chunked forward's."""
    layer = programs[name].layer(hidden=32, heads=4).double()
    x = torch.randn(2, 80, 32, dtype=F64)
    full = layer(x, backend="torch")
    y, cache = layer(x[:, :70], use_cache=True, backend="torch")
    outs = [y]
    for t in range(70, 80):
        y, cache = layer(x[:, t : t + 1], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    assert cache["state"].shape == (2, 4, layer.head_k, layer.head_v)
    _close(torch.cat(outs, dim=1), full, 1e-10)


def test_contract_names_the_gate_arguments(programs):
    """The op refuses a missing or misshapen gate, naming it."""
    op = programs["mamba"].op()
    inputs = _inputs("mamba", 1, 8, 2, 4, 6)
    with pytest.raises(ValueError, match="A must have shape \\[2, 6, 4\\]"):
        op(**{**inputs, "A": inputs["A"].transpose(-1, -2)})
    with pytest.raises(ValueError, match="dt is required"):
        op(**{n: x for n, x in inputs.items() if n != "dt"})
    gfw = programs["gfw"].op()
    with pytest.raises(ValueError, match="gv is required"):
        g_inputs = _inputs("gfw", 1, 8, 2, 4, 6)
        gfw(**{n: x for n, x in g_inputs.items() if n != "gv"})


def test_hybrid_model_trains_a_step_and_decodes(tmp_path):
    """lsm = mamba in a hybrid Linear-MoE stack (LN): a training step gives finite gradients to every parameter,
    and decoding through the caches gives the logits of the full forward."""
    hybrid_trains_and_decodes("mamba", tmp_path)
