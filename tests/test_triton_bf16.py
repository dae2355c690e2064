"""Every Triton family in bf16 on CPU: the interpreter made to round as the GPU does (tests/interpreter_bf16.py).

One library spec per transition family, bf16 inputs and outputs against the same spec's float32 torch chunkwise
backend (itself checked against the float64 oracle) on the same bf16-representable inputs: o, the final state and
every gradient, at a packed batch of three sequences (one of a single token) with initial states, T no multiple of
the chunk. The bounds are the GPU check's (bench/families_gpu.py: 1e-2 for o and the state, 2e-2 for gradients);
GFW's chunk form is held to DESIGN.md's 2e-3 / 1e-2, as bench/elementwise_gpu.py holds it. Before this, bf16 was
checked only on a GPU; a precision change to a template is now seen at commit time (the GPU check stays: the
interpreter sums in another order and cannot see what the GPU compiler does).

Why subprocesses: TRITON_INTERPRET=1 must be set before triton is first imported; the specs are dealt over one
child per core (this file run as a script), each printing one JSON line of relative errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    spec: str
    K: int = 32
    V: int = 32
    lens: tuple = (70, 1, 59)  # a packed batch of 130 tokens, one sequence of a single token
    settings: dict | None = None  # the Triton module's CONFIG
    bounds: tuple = (1e-2, 2e-2)  # o and the final state, gradients: the GPU check's (bench/families_gpu.py)
    slow_gates: bool = False  # log gates logsigmoid(x) / 16, as bench/elementwise_gpu.py draws them


# the interpreter runs the element-wise scan per element of the state: 8-token scans and a state of 4 x 16 (at 32 x 32
# and the default scan one spec took 90 s)
SCAN = dict(K=4, V=16, settings={"scan": 8})
# one library spec per family of the Triton backend (lmoec/kinds), named by its recurrence
CASES = {"additive": Case("bla"), "constant": Case("retnet"), "scalar": Case("simple_gla"), "vector": Case("gla"),
         "vector_bonus": Case("rwkv6"), "delta": Case("deltanet"), "delta_scalar": Case("gated_deltanet"),
         "delta_vector": Case("gated_delta_vector"), "dplr_vector": Case("rwkv7"),
         "elementwise_outer_product": Case("mamba", **SCAN), "elementwise_outer_sum": Case("gfw", **SCAN),
         "titans": Case("titans"), "ttt": Case("ttt_linear"),
         # GFW's chunk form at DESIGN.md's bounds, five chunks long: gate gradients summed over the whole sequence
         # (its previous revision) miss 1e-2 there, and bf16 products in the forward miss 2e-3 on o and the state;
         # cut into segments of two chunks (the segment policy forced), so the segments' maps and prefix are in it
         "elementwise_outer_sum, chunk form": Case("gfw", K=32, V=64, lens=(190, 1, 129), bounds=(2e-3, 1e-2),
                                                   settings={"form": "chunk", "walk_programs": 10**9,
                                                             "segment_programs": 10**9, "segment_chunks": 2},
                                                   slow_gates=True)}


def check(name: str) -> dict:
    """{tensor: relative norm error} of the case's Triton kernels in bf16 against the spec's torch backend in fp32."""
    import torch
    import torch.nn.functional as F

    import lmoec
    from conftest import random_inputs

    case = CASES[name]
    program = lmoec.compile_spec(ROOT / "specs" / "lsm" / f"{case.spec}.lsm")
    rec, op = program.ir.lsm().recurrence, program.op()
    module = getattr(program.package, f"{program.ir.lsm().name}_triton")
    module.POISON = True
    module.CONFIG.update(case.settings or {})
    H, T = 2, sum(case.lens)
    gen = torch.Generator().manual_seed(len(name))
    x = random_inputs(rec, B=1, T=T, H=H, K=case.K, V=case.V, dtype=torch.float32, n_seq=len(case.lens), generator=gen)
    if case.slow_gates:
        x.update({n: F.logsigmoid(torch.randn(x[n].shape, generator=gen)) / 16 for n in ("g", "gv")})
    state_names = ("initial_state", "A")  # fp32 in the op contract
    x = {n: t if n in state_names else t.bfloat16() for n, t in x.items()}
    cu = torch.tensor([0, *torch.tensor(case.lens).cumsum(0).tolist()], dtype=torch.int32)
    do = torch.randn(1, T, H, x["initial_state"].shape[-1], generator=gen)  # Titans' state is [K, 2V]: o reads V
    dht = torch.randn(x["initial_state"].shape, generator=gen)
    got = {}
    for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
        leaves = {n: t.detach().to(t.dtype if n in state_names else dtype).requires_grad_() for n, t in x.items()}
        o, ht = op(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
        ((o.float() * do[..., :o.shape[-1]]).sum() + (ht * dht).sum()).backward()
        got[backend] = {"o": o, "final_state": ht, **{f"d{n}": t.grad for n, t in leaves.items()}}

    def rel(a, b):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return {n: rel(got["triton"][n], want) for n, want in got["torch"].items()}


@pytest.fixture(scope="module")
def errors():
    from interpreted import interpreted_cases

    return interpreted_cases(__file__, list(CASES), cwd=ROOT)


@pytest.mark.parametrize("name", CASES)
def test_bf16_within_bounds(errors, name):
    errs, (bound_out, bound_grad) = errors[name], CASES[name].bounds
    assert {"o", "final_state", "dq", "dk", "dv", "dinitial_state"} <= errs.keys(), errs
    bad = {n: e for n, e in errs.items() if not e <= (bound_out if n in ("o", "final_state") else bound_grad)}
    assert not bad, f"{name}: relative errors above the bounds: {bad}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    import interpreter_bf16

    interpreter_bf16.install(tf32=True)
    print(json.dumps({name: check(name) for name in sys.argv[1:]}))
