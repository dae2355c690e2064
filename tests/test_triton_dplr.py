"""The emitted DPLR (RWKV7) Triton kernels against the float64 reference, on CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is imported, so the checks run in one subprocess (this file
run as a script) with that variable set, and LMOEC_POISON=1 so that every output starts as NaN and
an element no kernel writes fails. Each test below asserts one check's result. Inputs are RWKV7's:
a = -alpha kk, b = kk with kk L2-normalized, alpha in (0, 1), log decay in [-0.6065, 0). Shapes are
tiny (chunk 16, K = V = 16, T = 40: not a multiple of the chunk).

Precision: the interpreter's fp32 tl.dot is exact, so fp32 is held to TOL (the reference is float64).
bf16 runs in tests/test_triton_bf16.py (the interpreter made to round as the GPU does) and in
bench/families_gpu.py on the GPU. fp16 inputs run in fp32 inside (fp16 can't hold the decayed factors); what is left of
their error is the rounding of inputs and outputs to fp16 (2^-11 relative), hence TOL_FP16.
check_fp16_dots runs the kernels themselves on fp16 operands, the interpreter's stand-in for bf16 matmuls.

The interpreter accepts code the GPU compiler rejects: tests/test_hopper_compile.py compiles every kernel
for sm_90 (Triton's own compiler and ptxas, no GPU needed) at the benchmark's head dims.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from interpreted import interpreted_cases, max_relative_error as _rel

CHUNK = 16
TOL = 1e-5  # fp32 against float64: max |err| / max |ref| per tensor
TOL_FP16 = 5e-3  # fp16 outputs and gradients, against float64 on the fp16-rounded inputs

CASES = {
    # name: (decay, varlen, dtype)
    "vector": ("vector", False, "float32"),
    "vector_varlen": ("vector", True, "float32"),
    "scalar": ("scalar", False, "float32"),
    "vector_fp16": ("vector", False, "float16"),
    # K = 32, V = 64 in blocks of 16: the sequential kernels run four programs per head, the chunk kernels loop
    # four times, the chunk-map and input-gradient kernels run two K blocks per chunk
    "vector_vblocks": ("vector", False, "float32"),
    # log decay down to -3.9 per token, -63 over a chunk: the factors exp(+-G) near the edge of the fp32 range
    "vector_strong_decay": ("vector", False, "float32"),
    # sequences cut into segments of one chunk: the walks' maps, the prefix over segments (LASP-2 on one device)
    "vector_segments": ("vector", False, "float32"),
    "vector_varlen_segments": ("vector", True, "float32"),
    # the walks' V block halved for want of programs (64 -> 16 at K = 32, V = 64)
    "vector_few_programs": ("vector", False, "float32"),
    # head dims K = 24, V = 40: run on tiles padded to 32 and 64
    "vector_dims_24_40": ("vector", False, "float32"),
    # specs/lsm/rwkv7.lsm through the whole pipeline (frontend, passes, emitted package, op), chunk 64
    "spec_rwkv7": ("vector", True, "float32"),
}
SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs", "lsm", "rwkv7.lsm")


# ---- the checks (run in the subprocess) -------------------------------------


def _build_from_spec():
    """The op of specs/lsm/rwkv7.lsm forced onto its emitted Triton kernels."""
    import functools
    import types

    import lmoec

    program = lmoec.compile_spec(SPEC)
    lsm = program.ir.lsm()
    assert f"{lsm.name}_triton.py" in program.files, "rwkv7 must get Triton kernels"
    kernels = getattr(program.package, f"{lsm.name}_triton")
    op = functools.partial(program.op(), backend="triton")
    return types.SimpleNamespace(chunk=op, step=kernels.step), lsm.recurrence


def _build(decay: str):
    """Compile a DPLR spec (no frontend) and import its emitted Triton module from a real file."""
    import importlib.util
    import tempfile

    import sympy

    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import Decay, DPLRTerms, LSMSpec, SpecIR
    from lmoec.program import compile_ir

    x = sympy.Symbol("x")  # any expressions of x: the kernels see only the recurrence's shape
    lsm = LSMSpec(name="mem", decay=Decay(kind=decay, expr=ex.linear(x, "W_g")),
                  dplr=DPLRTerms(a=ex.linear(x, "W_a"), b=ex.linear(x, "W_b")), chunk_size=CHUNK)
    program = compile_ir(SpecIR(source=f"test_{decay}.lsm", name=f"test_{decay}", lsms={"mem": lsm}))
    ctx = lsm_context(program.ir, program.ir.lsm())
    ok, reason = triton_backend.supports(ctx)
    assert ok, reason
    name = f"mem_dplr_{decay}_triton"
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
        f.write(triton_backend.emit(ctx, "# test build"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ctx.rec


def _inputs(decay, varlen, B=2, T=40, H=2, D=16, V=16):
    """RWKV7-like inputs: a = -alpha kk, b = kk (|kk| = 1), log decay in [-0.6065, 0)."""
    import torch

    if varlen:
        B, cu = 1, torch.tensor([0, 13, 45, 57, 61], dtype=torch.int32)  # lengths 13, 32, 12, 4
        T, N = 61, 4
    else:
        cu, N = None, B
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    alpha = torch.sigmoid(torch.randn(B, T, H, 1))
    w = -0.6065 * torch.rand(B, T, H, D if decay == "vector" else 1).clamp_min(1e-3)
    args = {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, T, H, D) * 0.5,
        "v": torch.randn(B, T, H, V),
        "g": w if decay == "vector" else w[..., 0],
        "a": -alpha * kk,
        "b": kk,
        "initial_state": torch.randn(N, H, D, V) * 0.5,
    }
    return args, cu


def check(name: str) -> dict:
    """Forward, final state and every gradient of one case; the decode step; step by step == chunked."""
    import torch

    from lmoec.backends.reference import recurrent_reference

    decay, varlen, dtype = CASES[name]
    dtype = getattr(torch, dtype)
    torch.manual_seed(sum(map(ord, name)))
    mod, rec = _build_from_spec() if name.startswith("spec_") else _build(decay)
    if name == "vector_vblocks":
        mod.CONFIG.update(BV=16, BV_chunk=16, BV_dv=16, BV_dqk=16, BK_map=16, BK_dqk=16)
    if name.endswith("segments"):
        mod.CONFIG.update(walk_programs=10**9, segment_chunks=1)
    if name == "vector_few_programs":
        mod.CONFIG.update(seq_programs=1000)
    dims = {"vector_vblocks": {"D": 32, "V": 64}, "vector_few_programs": {"D": 32, "V": 64},
            "vector_dims_24_40": {"D": 24, "V": 40}}.get(name, {})
    args, cu = _inputs(decay, varlen, **dims)
    if name == "vector_strong_decay":
        args["g"] = args["g"] * 6.5
    args = {n: t.to(dtype) if n != "initial_state" else t for n, t in args.items()}
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.double().requires_grad_() for n, t in args.items()}
    scale = 0.25
    o, ht = mod.chunk(**ours, scale=scale, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = recurrent_reference(rec, **refs, scale=scale, output_final_state=True, cu_seqlens=cu)
    assert o.dtype == dtype and ht.dtype == torch.float32
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    ((o.float() * do.float()).sum() + (ht * dht.float()).sum()).backward()
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    errors = {"o": _rel(o, o_ref), "final_state": _rel(ht, ht_ref)}
    errors.update({f"d{n}": _rel(ours[n].grad, refs[n].grad) for n in args})
    if cu is not None:
        return errors

    # decode: one token from a given state equals the reference's first step
    state = torch.randn(*ht.shape) * 0.5
    first = {n: t[:, 0] for n, t in args.items() if n != "initial_state"}
    o1, s1 = mod.step(**first, state=state, scale=scale)
    o1_ref, s1_ref = recurrent_reference(rec, **{n: t[:, :1].double() for n, t in args.items() if n != "initial_state"},
                                         scale=scale, initial_state=state.double(), output_final_state=True)
    errors["step_o"] = _rel(o1, o1_ref[:, 0])
    errors["step_state"] = _rel(s1, s1_ref)
    # and token by token through a whole sequence, against the chunked forward
    with torch.no_grad():
        o_chunk, s_chunk = mod.chunk(**args, scale=scale, output_final_state=True)
        s, outs = args["initial_state"], []
        for t in range(args["q"].shape[1]):
            o_t, s = mod.step(**{n: x[:, t] for n, x in args.items() if n != "initial_state"}, state=s, scale=scale)
            outs.append(o_t)
    errors["steps_vs_chunk_o"] = _rel(torch.stack(outs, 1), o_chunk.double())
    errors["steps_vs_chunk_state"] = _rel(s, s_chunk.double())
    return errors


def check_fp16_dots() -> dict:
    """The kernels with fp16 matmul operands (the op itself runs fp16 inputs in fp32): the interpreter's stand-in
    for the GPU's bf16 path, 8x finer. Strong decay (down to -0.667 per token, what fp16 holds over a chunk).

    Returns the errors against float64 on the same fp16 inputs, and dg's error over the largest of dq, dk, dv's
    (norm-relative): dg is a reverse cumsum of pair terms that cancel, so rounding them differently from the
    matmuls shows up here first (that ratio was 1.7 before they were made consistent, 3.4x fla's on the GPU).
    """
    import torch

    from lmoec.backends.reference import recurrent_reference

    torch.manual_seed(11)
    mod, rec = _build("vector")
    args, _ = _inputs("vector", False, T=100)
    args["g"] = args["g"] * 1.1
    ours = {n: (t if n in ("g", "initial_state") else t.half()).clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.detach().double().requires_grad_() for n, t in ours.items()}
    o, ht = mod._ChunkFunction.apply(*(ours[n] for n in "qkvgab"), 0.25, ours["initial_state"], True, None)
    o_ref, ht_ref = recurrent_reference(rec, **refs, scale=0.25, output_final_state=True)
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    ((o.float() * do.float()).sum() + (ht * dht.float()).sum()).backward()
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    errors = {"o": _rel(o, o_ref), "final_state": _rel(ht, ht_ref)}
    errors.update({f"d{n}": _rel(ours[n].grad, refs[n].grad) for n in ours})
    norm = {n: ((ours[n].grad.double() - refs[n].grad).norm() / refs[n].grad.norm()).item() for n in "qkvg"}
    errors["dg_norm_over_dqkv"] = norm["g"] / max(norm["q"], norm["k"], norm["v"])
    return errors


def check_varlen_vs_separate() -> dict:
    """Packed sequences (cu_seqlens) give exactly what separate calls give, gradients included."""
    import torch

    torch.manual_seed(7)
    mod, _ = _build("vector")
    args, cu = _inputs("vector", True)
    packed = {n: t.clone().requires_grad_() for n, t in args.items()}
    o, ht = mod.chunk(**packed, scale=0.25, output_final_state=True, cu_seqlens=cu)
    do = torch.randn_like(o)
    ((o * do).sum() + ht.sum()).backward()
    errors = {}
    bounds = cu.tolist()
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        one = {name: (t[n : n + 1] if name == "initial_state" else t[:, s:e]).detach().clone().requires_grad_()
               for name, t in args.items()}
        o1, h1 = mod.chunk(**one, scale=0.25, output_final_state=True)
        ((o1 * do[:, s:e]).sum() + h1.sum()).backward()
        errors[f"seq{n}_o"] = _rel(o[:, s:e], o1.double())
        errors[f"seq{n}_final_state"] = _rel(ht[n : n + 1], h1.double())
        for name, t in one.items():
            got = packed[name].grad[n : n + 1] if name == "initial_state" else packed[name].grad[:, s:e]
            errors[f"seq{n}_d{name}"] = _rel(got, t.grad.double())
    return errors


EXTRA = {"varlen_vs_separate": check_varlen_vs_separate, "fp16_dots": check_fp16_dots}


# ---- the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    return interpreted_cases(__file__, [*CASES, *EXTRA])


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(results, name):
    errors = results[name]
    assert set(errors) >= {"o", "final_state", "dq", "dk", "dv", "dg", "da", "db", "dinitial_state"}
    if not CASES[name][1]:
        assert {"step_o", "step_state", "steps_vs_chunk_o", "steps_vs_chunk_state"} <= set(errors)
    tol = TOL_FP16 if CASES[name][2] == "float16" else TOL
    bad = {what: err for what, err in errors.items() if not err <= tol}  # NaN / inf fail too
    assert not bad, f"{name}: relative errors above {tol}: {bad}"


def test_varlen_equals_separate_calls(results):
    errors = results["varlen_vs_separate"]
    assert len(errors) == 4 * 9
    bad = {what: err for what, err in errors.items() if not err <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_fp16_dots_dg_on_par(results):
    """dg as accurate as the other gradients when the matmul operands are rounded (the GPU's bf16 case)."""
    errors = dict(results["fp16_dots"])
    ratio = errors.pop("dg_norm_over_dqkv")
    bad = {what: err for what, err in errors.items() if not err <= TOL_FP16}
    assert not bad, f"relative errors above {TOL_FP16}: {bad}"
    assert ratio <= 1.3, f"dg's norm error is {ratio:.2f}x the largest of dq, dk, dv's"


def test_supports_and_dispatch():
    """RWKV7 gets Triton kernels and its op prefers them on CUDA; DPLR without decay is refused with a reason."""
    import sympy

    import lmoec
    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import DPLRTerms, LSMSpec, SpecIR
    from lmoec.program import compile_ir

    program = lmoec.compile_spec(SPEC)
    assert "rwkv7_triton.py" in program.files
    assert "triton" in program.package.rwkv7_ops.BACKENDS
    x = ex.linear(sympy.Symbol("x"), "W")
    lsm = LSMSpec(name="plain", dplr=DPLRTerms(a=x, b=x))
    plain = compile_ir(SpecIR(source="plain.lsm", name="plain", lsms={"plain": lsm}))
    ok, reason = triton_backend.supports(lsm_context(plain.ir, plain.ir.lsm()))
    assert not ok and "DPLR" in reason and "decay" in reason



@pytest.mark.parametrize("decay, reason", [("decay vector = logsigmoid(x @ W_d)", "has no lower bound"),
                                           ("decay vector = -2 * sigmoid(x @ W_d)", "reaches -2 a token (-128 a chunk)"),
                                           ("decay constant = log(1 - 2 ** (-5 - h))", ""),  # RetNet's: >= -0.032
                                           (None, "")])
def test_auto_keeps_unbounded_decays_off_the_kernels(tmp_path, decay, reason):
    """The DPLR kernels factor a chunk's decay as exp(G_i) exp(-G_j) (NaN in the interpreter from a log decay of 96 a
    chunk): backend="auto" takes them only where the spec's decay expression keeps a chunk above -80 (RWKV7's
    -0.606531 * sigmoid(...): -38.8 a chunk of 64), and says why otherwise; backend="triton" still forces them."""
    from conftest import cuda_like

    import lmoec

    spec = tmp_path / "strong.lsm"
    body = decay or "scale = 1"
    spec.write_text(f'import "{SPEC}"\nlsm strong extends rwkv7 {{ {body} }}\n')
    ops = lmoec.compile_spec(spec).package.strong_ops
    name, why = ops.backend_for("auto", cuda_like())
    if reason:
        assert name == "torch" and reason in why and "backend='triton' forces them" in why
    else:
        assert name == "triton"
    assert ops.backend_for("triton", cuda_like())[0] == "triton"

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {name: EXTRA[name]() if name in EXTRA else check(name) for name in sys.argv[1:]}
    print(json.dumps(out))
