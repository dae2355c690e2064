"""The emitted TTT-Linear Triton kernels (templates/triton/ttt.py.j2) against the float64 token-by-token oracle, on CPU
under TRITON_INTERPRET=1.

As in tests/test_triton_titans.py, the checks run in one child process (this file run as a script, tests/interpreted.py)
with the interpreter and LMOEC_POISON set; each test asserts one check's result. Shapes are tiny (K = V = 16 or 20,
H = 2, T = 10 or a packed [3, 9, 1]) and fp32 (the interpreter's fp32 dot is exact); bf16 runs in
tests/test_triton_bf16.py, bf16 and the benchmark's shapes in bench/ttt_gpu.py on the GPU, the sm_90 compile in
tests/test_hopper_compile.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from interpreted import interpreted_cases, max_relative_error as _rel

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32 kernels against float64: max |err| / max |ref| per tensor


class Case(NamedTuple):
    minibatch: int  # the spec's gradient point (1: gradient = token)
    varlen: bool = False
    D: int = 16  # K = V
    final_state: bool = True  # the loss reads the final state as well (False: its gradient never arrives)
    T: int = 10  # without varlen: not a multiple of the mini-batch
    config: dict | None = None  # launch settings other than the defaults


# at these few walks the output has its own kernel by default; FUSED forms it in the walk
FUSED = {"fuse_min_programs": 0}


# every host path once: batch and varlen (a one-token sequence, partial last mini-batches), D padded to a tile, the
# mini-batch of one (tiles of 16 rows, one valid) with the decode step (whose walk forms the output), the library
# spec's mini-batch of 16, the backward without the final state's gradient; the output in the walk and in its kernel
CASES = {
    "mb4_fused": Case(4, config=FUSED),
    "mb4_varlen": Case(4, varlen=True),
    "mb4_dims_20_no_final_state": Case(4, D=20, final_state=False),
    "token": Case(1),
    "mb16_varlen_dims_20_fused": Case(16, varlen=True, D=20, config=FUSED),
}


def _build(minibatch: int):
    """specs/lsm/ttt_linear.lsm at this mini-batch (chunk 16), compiled: its emitted Triton module and recurrence."""
    import tempfile

    import lmoec

    gradient = "token" if minibatch == 1 else f"minibatch({minibatch})"
    spec = Path(tempfile.mkdtemp()) / f"ttt_mb{minibatch}.lsm"
    spec.write_text(f'import "{ROOT / "specs" / "lsm" / "ttt_linear.lsm"}"\n'
                    f"lsm ttt_mb{minibatch} extends ttt_linear {{\n chunk_size = 16\n"
                    f" update {{ gradient = {gradient} }}\n}}\n")
    program = lmoec.compile_spec(spec)
    lsm = program.ir.lsm()
    assert f"{lsm.name}_triton.py" in program.files, "the TTT-Linear spec must get Triton kernels"
    return getattr(program.package, f"{lsm.name}_triton"), lsm.recurrence


def _inputs(case: Case):
    """Fresh random op inputs as the layer makes them (learning rates sigmoid / D, here x 4), LayerNorm params near
    (1, 0), an initial (W, b) per sequence."""
    import torch

    H, D = 2, case.D
    if case.varlen:
        B, T, cu = 1, 13, torch.tensor([0, 3, 12, 13], dtype=torch.int32)  # lengths 3, 9, 1
        N = 3
    else:
        B, T, cu, N = 2, case.T, None, 2
    inputs = {"q": torch.randn(B, T, H, D), "k": torch.randn(B, T, H, D), "v": torch.randn(B, T, H, D),
              "theta": torch.sigmoid(torch.randn(B, T, H)) / D * 4, "ln_weight": 1 + 0.2 * torch.randn(H, D),
              "ln_bias": 0.2 * torch.randn(H, D), "initial_state": 0.3 * torch.randn(N, H, D + 1, D)}
    return inputs, cu


def check(name: str) -> dict:
    """Forward, final state and every gradient of one case (and the decode step with a mini-batch of one)."""
    import torch

    from lmoec.backends.reference import recurrent_reference

    case = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    mod, rec = _build(case.minibatch)
    assert mod.MINIBATCH == case.minibatch
    if case.config:
        mod.CONFIG.update(case.config)
    args, cu = _inputs(case)
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.double().requires_grad_() for n, t in args.items()}
    o, ht = mod.chunk(**ours, output_final_state=case.final_state, cu_seqlens=cu)
    o_ref, ht_ref = recurrent_reference(rec, **refs, scale=1.0, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    if case.final_state:
        ((o * do.float()).sum() + (ht * dht.float()).sum()).backward()
        ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    else:
        (o * do.float()).sum().backward()
        (o_ref * do).sum().backward()
    errors = {"o": _rel(o, o_ref)}
    if case.final_state:
        errors["final_state"] = _rel(ht, ht_ref)
    errors.update({f"d{n}": _rel(ours[n].grad, refs[n].grad) for n in args})
    if case.minibatch == 1:
        errors.update(_decode_errors(mod, args))
    return errors


def _decode_errors(mod, args) -> dict:
    """Decoding token by token from the initial state equals the chunked forward."""
    import torch

    from lmoec.bench import step_through

    o_step, state = step_through(mod.step, args, args["initial_state"], ("q", "k", "v", "theta"),
                                 ln_weight=args["ln_weight"], ln_bias=args["ln_bias"])
    with torch.no_grad():
        o_chunk, ht_chunk = mod.chunk(**args, output_final_state=True)
    return {"step_o": _rel(o_step, o_chunk.double()), "step_state": _rel(state, ht_chunk.double())}


# ---- the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    return interpreted_cases(__file__, list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(results, name):
    errors = results[name]
    case = CASES[name]
    expected = {"o", "dq", "dk", "dv", "dtheta", "dln_weight", "dln_bias", "dinitial_state"}
    expected |= {"final_state"} if case.final_state else set()
    expected |= {"step_o", "step_state"} if case.minibatch == 1 else set()
    assert set(errors) >= expected
    bad = {what: err for what, err in errors.items() if not err <= TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"


def test_minibatch_step_refuses():
    """gradient = minibatch(N) has no one-token decode step: it says so instead of decoding wrongly."""
    import torch

    mod, _ = _build(4)
    B, H, D = 1, 1, 16
    x = torch.randn(B, H, D)
    with pytest.raises(ValueError, match="minibatch"):
        mod.step(x, x, x, torch.rand(B, H), torch.ones(H, D), torch.zeros(H, D), state=torch.zeros(B, H, D + 1, D))


def test_head_dims_above_128_refuse():
    """The walks hold W [D, D] in one program: beyond D = 128 the op says so before any launch."""
    import torch

    mod, _ = _build(4)
    x = torch.randn(1, 4, 1, 136)
    with pytest.raises(ValueError, match="up to 128"):
        mod.chunk(x, x, x, torch.rand(1, 4, 1), torch.ones(1, 136), torch.zeros(1, 136))


def test_epsilon_is_the_oracle_s():
    from lmoec.kinds import ttt

    mod, _ = _build(4)
    assert mod.EPS == ttt.EPS


def test_minibatch_above_64_runs_on_torch(tmp_path):
    """A mini-batch beyond 64 tokens outgrows the walks' register tiles: no Triton module, and forcing it says why."""
    import torch

    import lmoec

    spec = tmp_path / "ttt128.lsm"
    spec.write_text(f'import "{ROOT / "specs" / "lsm" / "ttt_linear.lsm"}"\n'
                    "lsm ttt128 extends ttt_linear { chunk_size = 128 update { gradient = minibatch(128) } }\n")
    program = lmoec.compile_spec(spec)
    assert "ttt128_triton.py" not in program.files
    x = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="N <= 64"):
        program.op()(x, x, x, theta=torch.rand(1, 4, 1), ln_weight=torch.ones(1, 16), ln_bias=torch.zeros(1, 16),
                     backend="triton")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    out = {name: check(name) for name in sys.argv[1:]}
    print(json.dumps(out))


def test_auto_takes_the_kernels_where_they_run():
    """The kernels passed their GPU check (H100, 2026-12-07), so backend="auto" takes them for CUDA tensors, but
    runs the torch path where the walks cannot hold W [D, D] (D > 128) instead of the Triton module's error, for
    float64, and off CUDA; backend="triton" forces them."""
    import torch
    from conftest import cuda_like

    import lmoec

    ops = lmoec.compile_spec(ROOT / "specs" / "lsm" / "ttt_linear.lsm").package.ttt_linear_ops
    assert ops.backend_for("auto", cuda_like(64))[0] == "triton"
    assert ops.backend_for("auto", cuda_like(128, torch.float32))[0] == "triton"
    name, reason = ops.backend_for("auto", cuda_like(256))
    assert name == "torch" and "up to 128" in reason
    assert ops.backend_for("auto", cuda_like(64, torch.float64))[0] == "torch"
    assert ops.backend_for("auto", torch.empty(1, 8, 2, 64))[0] == "torch"
    assert ops.backend_for("triton", torch.empty(1, 8, 2, 64))[0] == "triton"
