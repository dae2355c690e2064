"""The emitted Titans Triton kernels (templates/triton/titans.py.j2) against the float64 token-by-token oracle, on CPU
under TRITON_INTERPRET=1.

As in tests/test_triton_delta.py, Triton reads TRITON_INTERPRET when it is imported, so the checks run in one
subprocess (this file run as a script) with that variable and LMOEC_POISON set; each test asserts one check's result.
Shapes are tiny (K = 16 or 20, V = 24, T = 24 at chunk 16, T = 70 at chunk 64: the last chunk partial) and fp32
(the interpreter's fp32 dot is exact); bf16 runs in tests/test_triton_bf16.py, bf16 and the benchmark's shapes in
bench/titans_gpu.py on the GPU, the sm_90 compile in tests/test_hopper_compile.py.
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
    update: str  # the spec's update block, under `lsm ... extends titans`
    varlen: bool
    K: int = 16
    V: int = 24
    config: dict | None = None  # launch settings other than the defaults
    eta_zero: bool = False  # a momentum of exactly 0 (Titans is then a gated delta rule): no division by a gate
    H: int = 1
    chunk: int = 16
    T: int = 24  # without varlen
    final_only: bool = False  # the loss reads the final state alone: o's gradient arrives as zeros, ht's expanded


FULL = "gradient = token"
MINIBATCH = "gradient = minibatch(4)"
NO_MOMENTUM = "momentum = none"
NO_DECAY = "weight_decay = none\n gradient = minibatch(4)"
LR_ONLY = "momentum = none\n weight_decay = none\n gradient = minibatch(4)"  # (per token, lr alone is the delta kind)
# the walks' V block halves to 16 at these few rows, and the chunk-parallel backward's BV_bwd is 16: V = 24 in two
# blocks by default; WHOLE_V runs every kernel in one V block, SPLIT also K = 20 in two in the chunk-parallel backward
WHOLE_V = {"seq_programs": 0, "BV_bwd": 32}
SPLIT = {"BK_bwd": 16}
# every template branch (momentum, weight decay, mini-batch) and host path (varlen, V blocks, K not a power of two)
# once; the decode step on the first case
CASES = {
    "token": Case(FULL, False, H=2),
    "token_varlen_dims_20_split": Case(FULL, True, K=20, config=SPLIT, H=2),
    "token_eta_zero_whole_v": Case(FULL, False, eta_zero=True, config=WHOLE_V),
    "minibatch_varlen": Case(MINIBATCH, True),
    "no_momentum_final_state_loss": Case(NO_MOMENTUM, False, final_only=True),
    "no_decay_minibatch_split": Case(NO_DECAY, False, config=SPLIT),
    "lr_only_minibatch_varlen": Case(LR_ONLY, True),
    "token_chunk64": Case(FULL, False, chunk=64, T=70),  # the library spec's chunk, the second chunk partial
}


def _build(update: str, chunk: int = 16):
    """The Titans library spec at this chunk size and update, compiled; its emitted Triton module and recurrence."""
    import tempfile

    import lmoec

    folder = Path(tempfile.mkdtemp())
    spec = folder / f"titans{chunk}.lsm"
    spec.write_text(f'import "{ROOT / "specs" / "lsm" / "titans.lsm"}"\n'
                    f"lsm titans{chunk} extends titans {{\n chunk_size = {chunk}\n update {{\n {update}\n }}\n}}\n")
    program = lmoec.compile_spec(spec)
    lsm = program.ir.lsm()
    assert f"{lsm.name}_triton.py" in program.files, "the Titans spec must get Triton kernels"
    return getattr(program.package, f"{lsm.name}_triton"), lsm.recurrence


def _inputs(case: Case, args: list[str]):
    import torch
    import torch.nn.functional as F

    B, H = 2, case.H
    if case.varlen:
        B, cu = 1, torch.tensor([0, 13, 33, 36], dtype=torch.int32)  # lengths 13, 20, 3: partial chunks
        T, N = 36, 3
    else:
        T, cu, N = case.T, None, B
    inputs = {"q": torch.randn(B, T, H, case.K), "k": F.normalize(torch.randn(B, T, H, case.K), dim=-1),
              "v": torch.randn(B, T, H, case.V), "theta": torch.sigmoid(torch.randn(B, T, H)),
              "eta": torch.zeros(B, T, H) if case.eta_zero else torch.sigmoid(torch.randn(B, T, H)),
              "alpha": torch.sigmoid(torch.randn(B, T, H) - 2)}
    inputs = {n: inputs[n] for n in ("q", "k", "v", *args)}
    inputs["initial_state"] = torch.randn(N, H, case.K, 2 * case.V) * 0.5
    return inputs, cu


def check(name: str) -> dict:
    """Forward, final state and every gradient of one case (and the decode step on the first)."""
    import torch

    from lmoec.backends.reference import recurrent_reference

    case = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    mod, rec = _build(case.update, case.chunk)
    assert mod.CHUNK == case.chunk
    if case.config:
        mod.CONFIG.update(case.config)
    gate_names = ["theta"] + (["eta"] if rec.momentum else []) + (["alpha"] if rec.weight_decay else [])
    args, cu = _inputs(case, gate_names)
    scale = 0.3
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    refs = {n: t.double().requires_grad_() for n, t in args.items()}
    o, ht = mod.chunk(**ours, scale=scale, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = recurrent_reference(rec, **refs, scale=scale, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    if case.final_only:
        ht.sum().backward()
        ht_ref.sum().backward()
    else:
        ((o * do.float()).sum() + (ht * dht.float()).sum()).backward()
        ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    errors = {"o": _rel(o, o_ref), "final_state": _rel(ht, ht_ref)}
    errors.update({f"d{n}": _rel(ours[n].grad, refs[n].grad) for n in args if not (case.final_only and n == "q")})
    if name == "token":
        errors.update(_decode_errors(mod, args, scale))
    return errors


def _decode_errors(mod, args, scale) -> dict:
    """Decoding token by token from the initial state equals the chunked forward."""
    import torch

    from lmoec.bench import step_through

    per_token = [n for n in args if n != "initial_state"]
    o_step, state = step_through(mod.step, args, args["initial_state"], per_token, scale=scale)
    with torch.no_grad():
        o_chunk, ht_chunk = mod.chunk(**args, scale=scale, output_final_state=True)
    return {"step_o": _rel(o_step, o_chunk.double()), "step_state": _rel(state, ht_chunk.double())}


# ---- the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    return interpreted_cases(__file__, list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(results, name):
    errors = results[name]
    case = CASES[name]
    expected = {"o", "final_state", "dk", "dv", "dtheta", "dinitial_state"} | (set() if case.final_only else {"dq"})
    expected |= {"deta"} if case.update not in (NO_MOMENTUM, LR_ONLY) else set()
    expected |= {"dalpha"} if case.update not in (NO_DECAY, LR_ONLY) else set()
    if name == "token":
        expected |= {"step_o", "step_state"}
    assert set(errors) >= expected
    bad = {what: err for what, err in errors.items() if not err <= TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"


def test_minibatch_step_refuses():
    """gradient = minibatch(N) has no one-token decode step: it says so instead of decoding wrongly."""
    import torch

    mod, _ = _build(MINIBATCH)
    B, H, K, V = 1, 1, 16, 16
    token = [torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V)] + [torch.rand(B, H) for _ in range(3)]
    with pytest.raises(ValueError, match="minibatch"):
        mod.step(*token, state=torch.zeros(B, H, K, 2 * V))


def test_auto_takes_the_kernels_per_token(tmp_path):
    """The per-token kernels passed every row of their GPU check (H100, run 11), so backend="auto" takes them for CUDA
    tensors; at chunk-start gradients only D = 128 ran there, so "auto" keeps those on the torch path and says why;
    backend="triton" forces them."""
    from conftest import cuda_like

    import lmoec

    per_token = lmoec.compile_spec(ROOT / "specs" / "lsm" / "titans.lsm").package.titans_ops
    assert per_token.backend_for("auto", cuda_like(64))[0] == "triton"
    spec = tmp_path / "titans_mb.lsm"
    spec.write_text(f'import "{ROOT / "specs" / "lsm" / "titans.lsm"}"\n'
                    f'lsm titans_mb extends titans {{ update {{ gradient = minibatch(16) }} }}\n')
    chunk_start = lmoec.compile_spec(spec).package.titans_mb_ops
    name, reason = chunk_start.backend_for("auto", cuda_like(64))
    assert name == "torch" and "chunk-start gradients" in reason
    assert chunk_start.backend_for("triton", cuda_like(64))[0] == "triton"


def test_chunk_above_64_runs_on_torch(tmp_path):
    """Beyond chunk 64 the walks' tiles outgrow an H100's shared memory: no Triton module, and forcing it says why."""
    import torch

    import lmoec

    spec = tmp_path / "titans128.lsm"
    spec.write_text(f'import "{ROOT / "specs" / "lsm" / "titans.lsm"}"\nlsm titans128 extends titans {{ chunk_size = 128 }}\n')
    program = lmoec.compile_spec(spec)
    assert "titans128_triton.py" not in program.files
    x = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="chunk_size <= 64"):
        program.op()(x, x, x, theta=torch.rand(1, 4, 1), eta=torch.rand(1, 4, 1), alpha=torch.rand(1, 4, 1),
                     backend="triton")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    out = {name: check(name) for name in sys.argv[1:]}
    print(json.dumps(out))
