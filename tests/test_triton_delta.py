"""The emitted delta-rule Triton kernels against the float64 reference, on CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is imported, so the checks run in one subprocess
(this file run as a script) with that variable set; each test below asserts one check's
result. Shapes are tiny (T <= 100, K = V = 16) at chunk sizes 16, 32 and 64 (one, two and four tiles of
the UT transform's block inverse); bf16 runs in tests/test_triton_bf16.py, bf16 and the large shapes in
bench/families_gpu.py on the GPU.
The interpreter accepts code the GPU compiler rejects: tests/test_hopper_compile.py compiles every kernel
for sm_90 (Triton's own compiler and ptxas, no GPU needed) at the benchmark's head dims.
"""
from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

import pytest

from interpreted import interpreted_cases, max_relative_error as _rel

# fp32 kernels (the interpreter's fp32 dot is exact) against float64: max |err| / max |ref| per tensor
TOL = 1e-5



class Case(NamedTuple):
    decay: str
    varlen: bool
    k_scale: float | None  # None: L2-normalized k, as the models do
    chunk: int
    T: int | None  # None with varlen: the packed lengths in _inputs
    D: int = 16
    config: dict | None = None  # launch settings other than the defaults (blocks smaller than the head dims)
    Dv: int | None = None  # V when it differs from K = D
    strong: bool = False  # log decay about -4 a token: a chunk's whole decay (~ -250) is far past exp()'s fp32 range


# blocks smaller than K = V = 32: the backward's K split, every V loop over two blocks, the UT transform's and the
# output kernel's K loops (and the UT tiles' w, u loops) over two blocks
SPLIT = {"BV": 16, "BV_o": 16, "BK_dqk": 16, "BV_dqk": 16, "BV_wy": 16, "BK_ut": 16, "BK_o": 16, "BK_wu": 16}
# sequences cut into segments of 1 or 2 chunks: the augmented walks, the prefix over segments (LASP-2 on one device)
SEGMENTS = {"walk_programs": 10**9, "segment_chunks": 1}
SEGMENTS2 = {"walk_programs": 10**9, "segment_chunks": 2}
# the walks' V block halved (32 -> 16) for want of programs
FEW_PROGRAMS = {"seq_programs": 1000}
# the output computed in the sequential kernel (DeltaNet's default), or by its own kernel (the decays' default)
FUSED = {"fuse_output": True, "fuse_min_programs": 0}
UNFUSED = {"fuse_output": False}
# where w and u are formed: in the UT kernel's tiles (the vector decay's default), by their own kernel, or
# (v' = Tm (beta v - x S)) in the walk, w then by the backward ("auto", the default of DeltaNet and the scalar decay, picks between
# the last two by the walk's programs: the tiny cases here take the kernel)
TILES = {"wu": "tiles"}
WU_KERNEL = {"wu": "kernel"}
WU_WALK = {"wu": "walk"}
CASES = {
    "deltanet": Case("none", False, None, 16, 40),
    "deltanet_chunk64": Case("none", False, None, 64, 100),
    "deltanet_varlen": Case("none", True, None, 32, None),
    "deltanet_blocks": Case("none", False, None, 32, 40, D=32, config=SPLIT),
    "gated_scalar": Case("scalar", False, None, 32, 40),
    "gated_scalar_varlen": Case("scalar", True, None, 16, None),
    "gated_scalar_blocks": Case("scalar", True, None, 32, None, D=32, config=SPLIT),
    "gated_constant": Case("constant", False, None, 16, 40),
    "gated_vector": Case("vector", False, None, 32, 40),
    "gated_vector_varlen": Case("vector", True, None, 16, None),
    "gated_vector_blocks": Case("vector", False, None, 32, 40, D=32, config=SPLIT),
    "gated_scalar_few_programs": Case("scalar", False, None, 32, 40, D=32, config=FEW_PROGRAMS),
    "deltanet_segments_varlen": Case("none", True, None, 16, None, config=SEGMENTS2),
    "gated_vector_segments_unfused": Case("vector", True, None, 16, None, config={**SEGMENTS, **UNFUSED}),
    "gated_scalar_segments_blocks": Case("scalar", False, None, 16, 70, D=32, config={**SPLIT, **SEGMENTS2}),
    # head dims that are no powers of two: padded tiles, masked loads and stores
    "gated_scalar_dims_24_40": Case("scalar", False, None, 32, 40, D=24, Dv=40),
    "deltanet_dims_48_blocks": Case("none", True, None, 32, None, D=48, config=SPLIT),
    "gated_vector_dims_20_segments": Case("vector", False, None, 16, 60, D=20, config=SEGMENTS),
    "gated_scalar_unnormalized_k": Case("scalar", False, 0.3, 32, 40),
    "deltanet_output_kernel_blocks": Case("none", True, None, 32, None, D=32, config={**SPLIT, **UNFUSED}),
    "gated_scalar_fused_varlen": Case("scalar", True, None, 32, None, config=FUSED),
    "gated_vector_fused": Case("vector", False, None, 64, 100, config=FUSED),
    "gated_scalar_fused_blocks": Case("scalar", False, None, 16, 40, D=32, config={**SPLIT, **FUSED}),
    # the mixed-feature spec through the whole pipeline (frontend, passes, emitted package, op; its chunk is 64)
    "spec_gated_delta_vector": Case("vector", True, None, 64, None),
    "gated_scalar_wu_tiles_chunk64": Case("scalar", False, None, 64, 100, D=24, Dv=40, config=TILES),
    "deltanet_wu_kernel_blocks": Case("none", True, None, 32, None, D=48, config={**WU_KERNEL, "BK_wu": 16}),
    "gated_scalar_wu_kernel_chunk64": Case("scalar", False, None, 64, 100, D=24, Dv=40, config=WU_KERNEL),
    "gated_vector_wu_kernel_varlen": Case("vector", True, None, 16, None, D=40, config={**WU_KERNEL, "BK_wu": 16}),
    "deltanet_wu_walk_varlen_fused": Case("none", True, None, 32, None, config={**WU_WALK, **FUSED}),
    "gated_scalar_wu_walk_segments": Case("scalar", False, None, 16, 100, D=24, Dv=40, config={**WU_WALK, **SEGMENTS}),
    "gated_vector_wu_walk_chunk64": Case("vector", False, None, 64, 100, config=WU_WALK),
    # strong decays with partial chunks: a padded row must not meet exp(-G) of the chunk's valid rows
    "gated_scalar_strong": Case("scalar", False, None, 64, 100, strong=True),
    "gated_scalar_strong_varlen_unfused": Case("scalar", True, None, 32, None, strong=True, config=UNFUSED),
}
SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs", "lsm", "gated_delta_vector.lsm")


def _build_from_spec():
    """The op of specs/lsm/gated_delta_vector.lsm forced onto its emitted Triton kernels."""
    import functools
    import types

    import lmoec

    program = lmoec.compile_spec(SPEC)
    lsm = program.ir.lsm()
    assert f"{lsm.name}_triton.py" in program.files, "the mixed spec must get Triton kernels"
    kernels = getattr(program.package, f"{lsm.name}_triton")
    op = functools.partial(program.op(), backend="triton")
    return types.SimpleNamespace(chunk=op, step=kernels.step, CHUNK=kernels.CHUNK), lsm.recurrence


# ---- the checks (run in the subprocess) -------------------------------------


def _build(decay: str, chunk: int):
    """Compile a delta spec (no frontend) and import its emitted Triton module from a real file."""
    import importlib.util
    import tempfile

    import sympy

    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import Decay, Delta, LSMSpec, SpecIR
    from lmoec.program import compile_ir

    x = sympy.Symbol("x")
    # any beta / decay expression: the kernels see only the recurrence's shape (a constant decay reads only h)
    g_expr = {"none": None, "constant": sympy.Symbol("h")}.get(decay, ex.linear(x, "W_g"))
    lsm = LSMSpec(name="mem", decay=Decay(kind=decay, expr=g_expr), delta=Delta(beta=ex.linear(x, "W_b")), chunk_size=chunk)
    program = compile_ir(SpecIR(source=f"test_{decay}.lsm", name=f"test_{decay}", lsms={"mem": lsm}))
    ctx = lsm_context(program.ir, program.ir.lsm())
    ok, reason = triton_backend.supports(ctx)
    assert ok, reason
    path = os.path.join(tempfile.mkdtemp(), f"mem_{decay}_triton.py")
    with open(path, "w") as f:
        f.write(triton_backend.emit(ctx, "# test build"))
    spec = importlib.util.spec_from_file_location(f"mem_{decay}_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ctx.rec


def _inputs(decay, varlen, k_scale, T, B=2, H=2, D=16, Dv=None, strong=False):
    import torch

    Dv = Dv or D
    if varlen:
        B, cu = 1, torch.tensor([0, 13, 63, 75, 79], dtype=torch.int32)  # lengths 13, 50, 12, 4
        T, N = 79, 4
    else:
        cu, N = None, B
    q = torch.randn(B, T, H, D)
    k = torch.randn(B, T, H, D)
    k = k * k_scale if k_scale is not None else torch.nn.functional.normalize(k, dim=-1)
    args = {"q": q, "k": k, "v": torch.randn(B, T, H, Dv)}
    if decay == "scalar":
        args["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H) + (-4 if strong else 2))
    elif decay == "constant":
        args["g"] = torch.nn.functional.logsigmoid(torch.randn(H) + 2)
    elif decay == "vector":
        args["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D) + 2)
    args["beta"] = torch.sigmoid(torch.randn(B, T, H))
    args["initial_state"] = torch.randn(N, H, D, Dv) * 0.5
    return args, cu


def triton_blocks(mod, V):
    """V blocks of the module's walks at value dim V."""
    return -(-V // mod._block_v(V))


def check(name: str) -> dict:
    """Forward, final state and every gradient of one case; then the decode step."""
    import torch

    from lmoec.backends.reference import recurrent_reference

    case = CASES[name]
    decay = case.decay
    torch.manual_seed(sum(map(ord, name)))
    mod, rec = _build_from_spec() if name.startswith("spec_") else _build(decay, case.chunk)
    assert mod.CHUNK == case.chunk
    if case.config:
        mod.CONFIG.update(case.config)
    args, cu = _inputs(decay, case.varlen, case.k_scale, case.T, D=case.D, Dv=case.Dv, strong=case.strong)
    if name.endswith("few_programs"):
        assert mod._walk_layout(args["q"], case.D, cu)[0] == 16
    if "segments" in name:  # the case must take the segmented path
        bounds = [0, 13, 63, 75, 79] if cu is not None else [i * case.T for i in range(3)]
        assert mod._segment_chunks(bounds, 2 * triton_blocks(mod, case.Dv or case.D), mod.CHUNK) is not None
    names = list(args)
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.double().requires_grad_() for n, t in args.items()}
    scale = 0.25
    o, ht = mod.chunk(**ours, scale=scale, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = recurrent_reference(rec, **refs, scale=scale, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    ((o * do.float()).sum() + (ht * dht.float()).sum()).backward()
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    errors = {"o": _rel(o, o_ref), "final_state": _rel(ht, ht_ref)}
    errors.update({f"d{n}": _rel(ours[n].grad, refs[n].grad) for n in names})

    # a loss on ht.sum() alone: the final state's gradient arrives expanded (stride 0), o's as zeros
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.double().requires_grad_() for n, t in args.items()}
    mod.chunk(**ours, scale=scale, output_final_state=True, cu_seqlens=cu)[1].sum().backward()
    recurrent_reference(rec, **refs, scale=scale, output_final_state=True, cu_seqlens=cu)[1].sum().backward()
    errors.update({f"d{n} of ht.sum()": _rel(ours[n].grad, refs[n].grad) for n in names if n != "q"})  # q: no path

    # decode: one token from a given state equals the reference's first step
    B, H, K = args["q"].shape[0], args["q"].shape[2], args["q"].shape[3]
    state = torch.randn(B, H, K, args["v"].shape[-1]) * 0.5
    tok = {n: (t[:, 0] if t.dim() > 1 and n != "initial_state" else t) for n, t in args.items() if n != "initial_state"}
    if cu is None:
        o1, s1 = mod.step(**tok, state=state, scale=scale)
        ref_args = {n: t[:, :1].double() if t.dim() > 1 else t.double() for n, t in args.items() if n != "initial_state"}
        o1_ref, s1_ref = recurrent_reference(rec, **ref_args, scale=scale, initial_state=state.double(), output_final_state=True)
        errors["step_o"] = _rel(o1, o1_ref[:, 0])
        errors["step_state"] = _rel(s1, s1_ref)
    return errors


# ---- the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    return interpreted_cases(__file__, list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(results, name):
    errors = results[name]
    assert set(errors) >= {"o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state"}
    if CASES[name].decay != "none":
        assert "dg" in errors
    bad = {what: err for what, err in errors.items() if not err <= TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"


def test_dplr_goes_to_its_own_kernels():
    """A recurrence with DPLR terms (and a delta-like shape) is the DPLR kind, emitted from its own template."""
    import sympy

    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import Decay, DPLRTerms, Family, LSMSpec, SpecIR
    from lmoec.kinds import kind_of
    from lmoec.program import compile_ir

    x = ex.linear(sympy.Symbol("x"), "W")  # any per-key expression: the kernels see only the recurrence's shape
    lsm = LSMSpec(name="rwkv7", decay=Decay(kind="vector", expr=x), dplr=DPLRTerms(a=x, b=x))
    program = compile_ir(SpecIR(source="rwkv7.lsm", name="rwkv7", lsms={"rwkv7": lsm}))
    ctx = lsm_context(program.ir, program.ir.lsm())
    assert kind_of(ctx.rec).family is Family.dplr
    assert triton_backend.supports(ctx) == (True, "")
    assert "_fwd_state_kernel" in triton_backend.emit(ctx, "# test build")


def test_auto_keeps_the_vector_decay_delta_off_the_kernels():
    """The vector-decay delta kernels failed their GPU check (bf16 backward gradients non-finite on an H100, run 11),
    so backend="auto" keeps CUDA tensors of that spec on the torch path and says why; the scalar decay
    (Gated DeltaNet, which passed) takes the kernels; backend="triton" still forces them."""
    from conftest import cuda_like

    import lmoec
    from lmoec.paths import SPECS

    vector = lmoec.compile_spec(SPECS / "lsm" / "gated_delta_vector.lsm").package.gated_delta_vector_ops
    name, reason = vector.backend_for("auto", cuda_like())
    assert name == "torch" and "non-finite" in reason
    assert vector.backend_for("triton", cuda_like())[0] == "triton"
    scalar = lmoec.compile_spec(SPECS / "lsm" / "gated_deltanet.lsm").package.gated_deltanet_ops
    assert scalar.backend_for("auto", cuda_like())[0] == "triton"


def test_decay_limits_of_the_delta_kernels():
    """The vector decay's kernels factor exp(G_i) exp(-G_j) over a chunk (limit 80), the scalar decay's take
    exp(G_i - G_j) (no limit): Gated DeltaNet's unbounded -softplus(.) * exp(A_log) is fine, an unbounded vector
    decay is not, and a bounded one within the limit is."""
    import sympy

    import lmoec
    from lmoec.ir import expr as ex
    from lmoec.kinds import decay_reason, kind_of
    from lmoec.paths import SPECS

    for name, reason in (("gated_deltanet", ""), ("gated_delta_vector", "has no lower bound")):
        lsm = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm").ir.lsm()
        got = decay_reason(kind_of(lsm.recurrence), lsm.recurrence, lsm.decay.expr, lsm.chunk_size)
        assert (reason in got) if reason else got == "", got
    lsm = lmoec.compile_spec(SPECS / "lsm" / "gated_delta_vector.lsm").ir.lsm()
    bounded = -ex.function("sigmoid")(ex.linear(sympy.Symbol("x"), "W"))  # >= -1 a token: -64 a chunk of 64
    assert decay_reason(kind_of(lsm.recurrence), lsm.recurrence, bounded, 64) == ""
    assert "-128 a chunk" in decay_reason(kind_of(lsm.recurrence), lsm.recurrence, 2 * bounded, 64)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {name: check(name) for name in sys.argv[1:]}
    print(json.dumps(out))
