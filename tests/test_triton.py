"""The decay-family Triton kernels (issue 3) under Triton's CPU interpreter, against the float64 reference.

Why a subprocess: TRITON_INTERPRET=1 must be set before triton is first imported, and another test of
this session may import triton first (or need it uncompiled). Each case below therefore runs in a
fresh `python -c` child with the variable set, which prints one JSON line of relative errors; the
parent asserts. One child per family keeps the interpreter's start-up cost (a few seconds) amortized
over all of that family's cases. bf16: tests/test_triton_bf16.py, and bench/families_gpu.py on the GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r'''
    import importlib, json, sys
    import sympy, torch
    import torch.nn.functional as F
    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.backends.reference import recurrent_reference
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import Decay, LSMSpec, SpecIR
    from lmoec.passes import run_passes
    from lmoec.runtime.loader import load_package

    instance = sys.argv[1]
    kind = {"additive": "none", "vector_bonus": "vector"}.get(instance, instance)
    if kind == "none":
        decay = Decay()
    elif kind == "constant":
        decay = Decay(kind="constant", expr=sympy.log(1 - sympy.Integer(2) ** (-5 - sympy.Symbol("h"))))
    else:
        decay = Decay(kind=kind, expr=ex.function("logsigmoid")(ex.linear(sympy.Symbol("x"), "W_g")))
    lsm = LSMSpec(name="lsm", decay=decay, bonus_u=instance == "vector_bonus", chunk_size=16)
    ir = run_passes(SpecIR(source="test.lsm", name=f"test_triton_{instance}", lsms={"lsm": lsm}))
    rec = ir.lsms["lsm"].recurrence
    src = triton_backend.emit(lsm_context(ir, ir.lsms["lsm"]), "# test")
    pkg = load_package(ir.name, {"__init__.py": "", "lsm_triton.py": src})
    mod = importlib.import_module(pkg.__name__ + ".lsm_triton")
    mod.POISON = True  # every output starts as NaN: an element no kernel writes fails
    torch.manual_seed(0)

    def make(B, T, H, K, V, dtype, strong=False):
        q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        args = {}
        if kind == "constant":
            args["g"] = torch.log(1 - 2.0 ** (-1 - torch.arange(H, dtype=torch.float64)))
        elif kind == "scalar":
            args["g"] = F.logsigmoid(torch.randn(B, T, H)) * (30 if strong else 1)
        elif kind == "vector":
            # strong: ~-30 per token, so exp(-b) over one chunk would be ~e^480 (overflows fp32);
            # "one": a single strong token, so one chunk takes the sub-chunk kernels and the others do not
            args["g"] = F.logsigmoid(torch.randn(B, T, H, K)) * (30 if strong is True else 1)
            if strong == "one":
                args["g"][:, T // 2] *= 200
        if instance == "vector_bonus":
            args["u"] = torch.randn(H, K)
        return [x.to(dtype) for x in (q, k, v)], {n: x.to(dtype) for n, x in args.items()}

    def rel(a, b):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def case(B, T, H, K, V, dtype, lens=None, h0=True, strong=False, state_sum=False):
        (q, k, v), args = make(B, T, H, K, V, dtype, strong)
        n_seq = B if lens is None else len(lens)
        cu = None if lens is None else torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        init = torch.randn(n_seq, H, K, V) if h0 else None
        leaves = [q, k, v, *args.values()] + ([init] if h0 else [])
        names = ["q", "k", "v", *args] + (["h0"] if h0 else [])
        xs = [x.clone().requires_grad_(True) for x in leaves]
        xa = dict(zip(names, xs))
        o, ht = mod.chunk(xa["q"], xa["k"], xa["v"], *[xa[n] for n in args], initial_state=xa.get("h0"),
                          output_final_state=True, cu_seqlens=cu)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        if state_sum:  # the loss reads ht.sum(): its gradient arrives expanded, with stride 0
            dht = torch.ones_like(ht)
        state_term = ht.sum() if state_sum else (ht * dht).sum()
        grads = torch.autograd.grad((o.float() * do.float()).sum() + state_term, xs)
        ys = [x.double().requires_grad_(True) for x in leaves]
        ya = dict(zip(names, ys))
        ro, rht = recurrent_reference(rec, ya["q"], ya["k"], ya["v"], g=ya.get("g"), u=ya.get("u"),
                                      initial_state=ya.get("h0"), output_final_state=True, cu_seqlens=cu)
        rgrads = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), ys)
        errs = {"o": rel(o, ro), "final_state": rel(ht, rht)}
        errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, grads, rgrads)})
        return errs

    def step_case(dtype):
        B, T, H, K, V = 2, 20, 2, 16, 32
        (q, k, v), args = make(B, T, H, K, V, dtype)
        S0 = torch.randn(B, H, K, V)
        o, ht = mod.chunk(q, k, v, *args.values(), initial_state=S0, output_final_state=True)
        S, outs = S0, []
        for t in range(T):
            at = [x if (x.dim() <= 2) else x[:, t] for x in args.values()]
            ot, S = mod.step(q[:, t], k[:, t], v[:, t], *at, state=S)
            outs.append(ot)
        return {"o": rel(torch.stack(outs, 1), o), "final_state": rel(S, ht)}

    out = {
        "fp32 T=40 (not a multiple of 16), initial state": case(2, 40, 2, 16, 16, torch.float32),
        "fp32 no initial state, K=16 V=32": case(1, 33, 1, 16, 32, torch.float32, h0=False),
        "fp32 head dims K=24 V=40 (padded tiles)": case(1, 33, 2, 24, 40, torch.float32),
        "fp32 head dims K=8 V=12": case(1, 20, 1, 8, 12, torch.float32),
        "fp32 varlen [7, 16, 1, 21]": case(1, 45, 2, 16, 16, torch.float32, lens=[7, 16, 1, 21]),
        "fp32 varlen with an empty sequence [5, 0, 30]": case(1, 35, 2, 16, 16, torch.float32, lens=[5, 0, 30]),
        "fp16 T=40": case(1, 40, 2, 16, 16, torch.float16),
        "fp32 loss on ht.sum() (expanded gradient)": case(1, 20, 2, 16, 16, torch.float32, state_sum=True),
        "step fp32": step_case(torch.float32),
    }
    if kind in ("scalar", "vector"):
        out["strong decay fp32"] = case(1, 48, 1, 16, 16, torch.float32, strong=True)
    if kind == "vector":
        out["strong decay at one token fp32"] = case(2, 48, 2, 16, 16, torch.float32, strong="one")
    # the other launch settings: sequences cut into segments of 1 or 2 chunks (LASP-2 within the device), the output /
    # dv in their own kernels or in the walks (the defaults differ by decay)
    defaults = {key: (dict(val) if isinstance(val, dict) else val) for key, val in mod.CONFIG.items()}
    settings = {
        "segments of 1 chunk": dict(walk_programs=10**9, segment_chunks=1),
        "segments of 2 chunks, unfused": dict(walk_programs=10**9, segment_chunks=2, fuse_output=False, fuse_dv=False),
        "unfused, K split": dict(fuse_output=False, fuse_dv=False, walk=dict(BK=16, BV=16, num_warps=4, num_stages=2)),
        "fused walks": dict(fuse_output=True, fuse_dv=True),
    }
    if kind == "vector":  # dq/dk in K blocks of 16 (two at K = 32)
        settings["unfused, K split"]["grad_qk"] = dict(BK=16, BV=64, num_warps=4, num_stages=2)
    if "bonus_whole_chunk" in mod.CONFIG:  # RWKV6's dq/dk: the setting other than the default, in K blocks of 16
        settings["bonus_whole_chunk flipped"] = dict(bonus_whole_chunk=not defaults["bonus_whole_chunk"],
                                                     grad_qk=dict(BK=16, BV=64, num_warps=4, num_stages=2))
        # a V block below V: the whole-chunk kernel would need two passes over V, so every chunk takes the sub-chunk one
        settings["bonus V block below V"] = dict(bonus_whole_chunk=True, grad_qk=dict(BK=16, BV=8, num_warps=4, num_stages=2))
    for label, setting in settings.items():
        mod.CONFIG.update(setting)
        out[f"fp32 T=40, {label}"] = case(2, 40, 2, 16, 16, torch.float32)
        out[f"fp32 varlen [7, 40, 1, 33], {label}"] = case(1, 81, 2, 32, 16, torch.float32, lens=[7, 40, 1, 33])
        if kind in ("scalar", "vector"):
            out[f"strong decay fp32, {label}"] = case(1, 48, 1, 16, 16, torch.float32, strong=True)
        if label.startswith("bonus"):
            out[f"strong decay at one token fp32, {label}"] = case(2, 48, 2, 16, 16, torch.float32, strong="one")
        mod.CONFIG.clear()
        mod.CONFIG.update(defaults)
    print("RESULT " + json.dumps(out))
    '''
)

# Relative-error bounds (norm of the difference over the norm of the float64 reference), by case kind.
# "strong": log decays ~-30 per token make cumulative decays ~1e3 whose fp32 rounding (~1e-4 absolute)
# exp() turns into ~1e-4..1e-3 relative error; the case exists to show nothing overflows (NaN/inf fail).
TOL = {"fp32": 1e-5, "fp16": 5e-3, "step": 1e-5, "strong": 5e-3}
# Constant decay's dg is one number per head, summed over every token: cancellation in that sum
# amplifies rounding, so it gets 10x (fp32) and 4x (fp16) the elementwise bound.
TOL_CONSTANT_DG = {"fp32": 1e-4, "fp16": 2e-2}


def run_child(instance: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, instance], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("instance", ["additive", "constant", "scalar", "vector", "vector_bonus"])
def test_family_matches_reference(instance):
    """Outputs, final state and every gradient (q, k, v, g, u, initial state) vs float64."""
    results = run_child(instance)
    expected = {"fp32 T=40 (not a multiple of 16), initial state", "fp32 no initial state, K=16 V=32",
                "fp32 varlen [7, 16, 1, 21]", "fp16 T=40", "step fp32", "fp32 loss on ht.sum() (expanded gradient)"}
    assert expected <= set(results)
    if instance in ("scalar", "vector"):
        assert "strong decay fp32" in results
    if instance.startswith("vector"):
        assert "strong decay at one token fp32" in results
    n_grads = 3 + (instance != "additive") + (instance == "vector_bonus") + 1
    assert len(results["fp32 T=40 (not a multiple of 16), initial state"]) == 2 + n_grads
    bad = []
    for name, errs in results.items():
        kind = name.split()[0]
        for what, err in errs.items():
            tol = TOL_CONSTANT_DG[kind] if instance == "constant" and what == "dg" else TOL[kind]
            if not err <= tol:  # NaN/inf fail too
                bad.append(f"{name}: {what} rel err {err:.3g} > {tol:g}")
    assert not bad, "\n".join(bad)


def test_supports_and_specialization():
    """Each decay family is emitted; code for absent features is not (no exp without decay, no u without bonus)."""
    import sympy

    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir import expr as ex
    from lmoec.ir.nodes import Decay, LSMSpec, SpecIR
    from lmoec.passes import run_passes

    def ctx_of(decay, bonus=False, chunk=64):
        lsm = LSMSpec(name="lsm", decay=decay, bonus_u=bonus, chunk_size=chunk)
        ir = run_passes(SpecIR(source="t.lsm", name="t", lsms={"lsm": lsm}))
        return lsm_context(ir, ir.lsms["lsm"])

    gated = Decay(kind="vector", expr=ex.function("logsigmoid")(ex.linear(sympy.Symbol("x"), "W_g")))
    additive = triton_backend.emit(ctx_of(Decay()), "# h")
    assert triton_backend.supports(ctx_of(Decay())) == (True, "")
    assert "exp2" not in additive and "LOG2E" not in additive and "b_u" not in additive
    assert "CHUNK = 64" in additive
    rwkv6 = triton_backend.emit(ctx_of(gated, bonus=True), "# h")
    assert "b_u" in rwkv6 and "SUB = 16" in rwkv6
    compile(rwkv6, "rwkv6_triton.py", "exec")
    compile(additive, "additive_triton.py", "exec")
