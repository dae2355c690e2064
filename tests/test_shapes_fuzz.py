"""Random shapes, the torch chunkwise backend against the float64 token-by-token oracle, for every family and kind.

The fixed-shape tests pick their shapes by hand; here a seeded generator draws them: T from 0 to past two chunks
(empty, one token, a chunk exactly, one over), 1 to 3 sequences or a packed batch of 1 to 4 sequences of which
some are empty, head dims 1 to 8 with K != V, chunk sizes 16 and 32, an initial state or none, the mini-batch
forms of Titans and TTT-Linear. Forward, final state and every gradient; all float64. About 15 s on 2 cores.
"""
from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

import lmoec
from conftest import RECURRENCES, _program, random_inputs
from lmoec.ir.nodes import SpecIR
from lmoec.paths import SPECS
from lmoec.program import compile_ir

# the kinds conftest's bare recurrences do not build: library specs, with the update's gradient point replaced
LIBRARY = {"titans": ("titans", None), "titans_minibatch4": ("titans", 4), "ttt_token": ("ttt_linear", 1),
           "ttt_minibatch4": ("ttt_linear", 4), "outer_sum": ("gfw", None), "outer_product": ("mamba", None)}
CASES = 96
TOL = 1e-8  # relative to the larger of the reference's magnitude and 1e-6 (a gradient that is exactly 0 in theory)


@functools.lru_cache(maxsize=None)
def _library_program(name: str, chunk: int):
    base, minibatch = LIBRARY[name]
    spec = lmoec.compile_spec(SPECS / "lsm" / f"{base}.lsm").ir.lsm()
    if minibatch is not None:
        spec = spec.model_copy(update={"update": spec.update.model_copy(update={"minibatch": minibatch})})
    spec = spec.model_copy(update={"chunk_size": chunk, "recurrence": None})
    return compile_ir(SpecIR(name=f"t_shapes_{name}_{chunk}", source="<test>", lsms={spec.name: spec}))


def _case(i: int):
    """(family, program, inputs, cu_seqlens) of case i, a pure function of i."""
    rng = random.Random(i)
    family = rng.choice(sorted(RECURRENCES) + sorted(LIBRARY))
    chunk = rng.choice([16, 32])
    program = _library_program(family, chunk) if family in LIBRARY else _program(RECURRENCES[family], chunk)
    rec = program.ir.lsm().recurrence
    H, K, V = rng.choice([1, 2]), rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 4, 7])
    if rec.update == "ttt":
        V = K = max(K, 4)  # K = V; LayerNorm over fewer values is so ill-conditioned that float64 roundoff grows
    cu = None
    if rng.random() < 0.4:  # a packed batch, some sequences empty
        lengths = [rng.choice([0, 1, 3, 16, 17, 20]) for _ in range(rng.randint(1, 4))]
        B, T, n_seq = 1, sum(lengths), len(lengths)
        cu = torch.tensor([0, *itertools.accumulate(lengths)])
    else:
        B, T = rng.randint(1, 3), rng.choice([0, 1, 2, 5, 15, 16, 17, 31, 33, 47, 65])
        n_seq = B
    x = random_inputs(rec, B=B, T=T, H=H, K=K, V=V, n_seq=n_seq, generator=torch.Generator().manual_seed(i))
    if T > 0 and rng.random() < 0.3:
        x.pop("initial_state")
    return family, program, x, cu


def _relative(got, want) -> float:
    if want is None:  # the oracle leaves empty inputs (T = 0) and unused per-head ones out of the graph
        return 0.0 if got is None or not got.any() else float("inf")
    if got is None:
        return float("inf")
    if want.numel() == 0:
        return 0.0 if got.shape == want.shape else float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("chunk_of_cases", range(4))
def test_random_shapes_match_the_oracle(chunk_of_cases):
    failures = []
    for i in range(chunk_of_cases, CASES, 4):
        family, program, x, cu = _case(i)
        op = program.op()
        results = []
        for backend in ("torch", "reference"):
            leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
            o, state = op(**leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
            gen = torch.Generator().manual_seed(1000 + i)
            w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
            w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)
            ((o * w_o).sum() + (state * w_s).sum()).backward()
            results.append({"o": o.detach(), "final_state": state.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}})
        errors = {what: _relative(results[0][what], results[1][what]) for what in results[0]}
        bad = {what: f"{e:.1e}" for what, e in errors.items() if not e <= TOL}
        if bad:
            shape = tuple(x["q"].shape), None if cu is None else cu.tolist(), "initial_state" in x
            failures.append((i, family, shape, bad))
    assert not failures, failures
