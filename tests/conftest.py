"""Shared fixtures: a compiled Program for a bare `Recurrence` (no frontend), and realistic random inputs for it.

`lsm_program(rec, chunk_size)` builds a one-LSM SpecIR whose expressions only exist to declare the family
(the op applies no gate function), compiles it and caches the Program. `lsm_inputs(rec, ...)` draws fresh
inputs shaped as the op contract says, with the statistics real models feed a kernel: negative log decays,
L2-normalized delta keys with beta in (0, 1), and RWKV7's DPLR terms a = -kk, b = kk * a_gate (a contraction).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import sympy
import torch

import torch.nn.functional as F

import lmoec
import lmoec.paths
from lmoec.ir import expr as ex
from lmoec.ir.nodes import Decay, Delta, DPLRTerms, LSMSpec, Param, Recurrence, SpecIR
from lmoec.program import Program, compile_ir

# every family the torch backend emits, by a readable id
RECURRENCES = {
    "additive": Recurrence(),
    "additive_bonus": Recurrence(bonus=True),
    "constant": Recurrence(decay="constant"),
    "scalar": Recurrence(decay="scalar"),
    "vector": Recurrence(decay="vector"),
    "vector_bonus": Recurrence(decay="vector", bonus=True),
    "delta": Recurrence(delta=True),
    "delta_scalar": Recurrence(decay="scalar", delta=True),
    "delta_vector": Recurrence(decay="vector", delta=True),
    "dplr": Recurrence(dplr=True),
    "dplr_scalar": Recurrence(decay="scalar", dplr=True),
    "dplr_vector": Recurrence(decay="vector", dplr=True),
}


def lsm_spec_for(rec: Recurrence, chunk_size: int = 64) -> LSMSpec:
    """An LSMSpec of the given recurrence; its expressions declare the family (the op never evaluates them)."""
    x, h = sympy.Symbol("x"), sympy.Symbol("h")
    sigmoid, logsigmoid = ex.function("sigmoid"), ex.function("logsigmoid")
    if rec.decay == "constant":
        decay = Decay(kind="constant", expr=sympy.log(1 - 2 ** (-5 - h)))
    elif rec.decay in ("scalar", "vector"):
        decay = Decay(kind=rec.decay, expr=logsigmoid(ex.linear(x, "W_g")) / 16)
    else:
        decay = Decay()
    kk = sympy.Symbol("k")
    return LSMSpec(
        name="lsm",
        decay=decay,
        delta=Delta(beta=sigmoid(ex.linear(x, "W_beta"))) if rec.delta else None,
        dplr=DPLRTerms(a=-kk, b=kk * sigmoid(ex.linear(x, "W_a"))) if rec.dplr else None,
        bonus_u=rec.bonus,
        params={"u": Param(name="u", shape=["H", "K"], init=sympy.Float(0.5))} if rec.bonus else {},
        chunk_size=chunk_size,
    )


@functools.lru_cache(maxsize=None)
def _program(rec: Recurrence, chunk_size: int) -> Program:
    ir = SpecIR(name=f"test_{rec.key}_c{chunk_size}", source="<test>", lsms={"lsm": lsm_spec_for(rec, chunk_size)})
    program = compile_ir(ir)
    assert program.ir.lsms["lsm"].recurrence == rec
    return program


@pytest.fixture
def lsm_program():
    """(rec, chunk_size=64) -> compiled Program with one LSM named 'lsm' (cached across tests)."""
    return lambda rec, chunk_size=64: _program(rec, chunk_size)


def random_inputs(rec: Recurrence, B=2, T=37, H=2, K=8, V=8, dtype=torch.float64, n_seq=None, strong_decay=False,
                  constant_per_head=True, generator=None) -> dict:
    """Op keyword arguments (q, k, v and what the family takes, plus initial_state) drawn fresh."""
    gen = generator

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def l2norm(x):
        return x / x.norm(dim=-1, keepdim=True)

    out = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if rec.decay == "constant":
        per_head = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
        out["g"] = per_head if constant_per_head else per_head.view(1, 1, H).expand(B, T, H).clone()
    elif rec.decay in ("scalar", "vector"):
        shape = (B, T, H) if rec.decay == "scalar" else (B, T, H, K)
        if strong_decay:
            out["g"] = -5 - 15 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        else:
            out["g"] = torch.nn.functional.logsigmoid(randn(*shape) + 2)
    if rec.delta:
        out["k"] = l2norm(out["k"])
        out["beta"] = torch.sigmoid(randn(B, T, H))
    if rec.bonus:
        out["u"] = randn(H, K) * 0.5
    if rec.dplr:
        kk = l2norm(randn(B, T, H, K))
        a_gate = torch.sigmoid(randn(B, T, H, K))
        out["a"], out["b"] = -kk, kk * a_gate
        out["k"] = out["k"] * 0.5
    if rec.elementwise == "outer_sum":
        out["gv"] = -5 - 15 * torch.rand(B, T, H, V, generator=gen, dtype=torch.float64) if strong_decay else \
            torch.nn.functional.logsigmoid(randn(B, T, H, V) + 2)
    elif rec.elementwise == "outer_product":
        out["dt"] = torch.nn.functional.softplus(randn(B, T, H, V)) + (5 if strong_decay else 0)
        out["A"] = -(torch.rand(H, V, K, generator=gen, dtype=torch.float64) + (3 if strong_decay else 0.1))
    rows, width = K, 1  # the state [N, H, rows, width * V]
    if rec.update == "titans":  # unit keys, gates in (0, 1); the joint state (M, S)
        out["k"] = l2norm(out["k"])
        out["theta"] = torch.sigmoid(randn(B, T, H))
        if rec.momentum:
            out["eta"] = torch.sigmoid(randn(B, T, H))
        if rec.weight_decay:
            out["alpha"] = torch.sigmoid(randn(B, T, H) - 3)
        width = 2
    elif rec.update == "ttt":  # lr / K as the library spec; the inner LayerNorm near (1, 0); W and its bias b
        out["theta"] = torch.sigmoid(randn(B, T, H)) / K
        out["ln_weight"], out["ln_bias"] = 1 + 0.1 * randn(H, V), 0.1 * randn(H, V)
        rows = K + 1
    out["initial_state"] = randn(n_seq or B, H, rows, width * V) * 0.5
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # states are fp32 in the contract
    return {name: t.to(state_dtype if name == "initial_state" else dtype) for name, t in out.items()}


@pytest.fixture
def lsm_inputs():
    """(rec, **shape) -> fresh op inputs; see `random_inputs`."""
    return random_inputs


def cuda_like(head_dim: int = 64, dtype=torch.bfloat16) -> SimpleNamespace:
    """What an op's `backend_for` reads of q, as a CUDA tensor [1, 8, 2, head_dim] would show it (no GPU here)."""
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 8, 2, head_dim))


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Relative to the tensor's scale: max |got - want| <= rtol * max |want|, and nothing NaN."""
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


def hybrid_trains_and_decodes(lsm: str, tmp_path) -> torch.nn.Module:
    """The library spec `lsm` in a tiny hybrid Linear-MoE stack (LN), in float64: one training step gives finite
    gradients to every parameter, and decoding 10 tokens through the caches gives the full forward's logits.
    Returns the model (for checks of its own)."""
    spec = tmp_path / f"{lsm}_tiny.lsm"
    spec.write_text(f'import "{lmoec.paths.SPECS / "lsm" / f"{lsm}.lsm"}"\n'
                    f'model {lsm}_tiny {{ vocab = 64 hidden = 32 layers = 2 heads = 2 pattern = "LN" lsm = {lsm}\n'
                    '    moe { experts = 4 top_k = 2 expert_ffn = 32 } max_seq_len = 64 }\n')
    torch.manual_seed(0)
    model = lmoec.compile_spec(spec).model().double()
    ids = torch.randint(0, 64, (2, 40))
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        out, cache = model(ids[:, :30], use_cache=True)
        steps = [out]
        for t in range(30, 40):
            out, cache = model(ids[:, t: t + 1], cache=cache, use_cache=True)
            steps.append(out)
    assert_close_to_scale(torch.cat(steps, dim=1), logits.detach(), 1e-9)
    return model
