"""The element-wise kind's Triton kernels (templates/triton/elementwise.py.j2) under Triton's interpreter.

Mamba (outer-product gate), GFW (outer-sum gate) and a value gate alone (`decay value`, no key side) against the
float64 oracle: the output, the final state and every gradient (q, k, v, the gates, the initial state); Mamba with packed sequences (one of a single token), two V blocks and
K, V not multiples of the tiles, GFW with a batch, T not a multiple of the scan and a token of log gates near -50;
both cut into segments walked at once (the segment policy forced); both with the decode step against the torch step;
GFW's chunk form (CONFIG "form": "chunk") at packed sequences with an empty and a one-token one, a strong gate, three
V blocks, without a final state, and cut into one-chunk segments. Outputs start as NaN (POISON), so an element no
kernel writes fails. fp32 here; bf16 in tests/test_triton_bf16.py (the interpreter rounding as the GPU does) and on
the GPU (bench/elementwise_gpu.py).

Why a subprocess: TRITON_INTERPRET=1 must be set before triton is first imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmoec

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r'''
    import json, sys
    import torch
    import lmoec
    sys.path.insert(0, "tests")
    from test_elementwise import _inputs

    name = sys.argv[1]
    if name == "value_gate":  # `decay value` alone: an outer sum with no key side (no library spec has it)
        import pathlib, tempfile
        spec = pathlib.Path(tempfile.mkdtemp()) / "value_gate.lsm"
        spec.write_text("lsm value_gate {\n    decay value = logsigmoid(x @ W_gv[16] @ W_gv2) / 16\n}\n")
        program = lmoec.compile_spec(spec)
    else:
        program = lmoec.compile_spec(f"specs/lsm/{name}.lsm")
    op = program.op()
    triton_mod = getattr(program.package, f"{name}_triton")
    torch_mod = getattr(program.package, f"{name}_torch")
    triton_mod.POISON = True
    # small tiles: the interpreter calls the scan's combine once per element and step (8-token scans, V blocks of 8)
    triton_mod.CONFIG.update(scan=8, block_v=8)

    def rel(a, b):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def make_inputs(*shape, **kwargs):
        inputs = _inputs("gfw" if name == "value_gate" else name, *shape, **kwargs)
        if name == "value_gate":
            del inputs["g"]
        return inputs

    def case(B, T, H, K, V, lens=None, strong=False, final=True):
        inputs = make_inputs(B, T, H, K, V, dtype=torch.float32, seed=T)
        if strong:  # one token with log gates down to about -50: the state before it is wiped out, nothing overflows
            if name == "mamba":
                inputs["dt"][:, T // 2] = 60.0
            else:
                inputs["gv"][:, T // 2] *= 50
                if "g" in inputs:
                    inputs["g"][:, T // 2] *= 50
        cu = None if lens is None else torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        inputs["initial_state"] = torch.randn(B if lens is None else len(lens), H, K, V)
        do = torch.randn(B, T, H, V, dtype=torch.float64)
        dht = torch.randn(inputs["initial_state"].shape, dtype=torch.float64)
        results = {}
        for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
            leaves = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
            o, ht = op(**leaves, output_final_state=final, cu_seqlens=cu, backend=backend)
            ((o * do.to(dtype)).sum() + ((ht * dht.to(ht.dtype)).sum() if final else 0)).backward()
            results[backend] = {"o": o, **({"final_state": ht} if final else {}),
                                **{f"d{n}": x.grad for n, x in leaves.items()}}
        return {n: rel(results["triton"][n], want) for n, want in results["reference"].items()}

    def step_case(B=2, H=2, K=3, V=12):
        inputs = make_inputs(B, 1, H, K, V, dtype=torch.float32)
        token = {n: (x if n == "A" else x[:, 0]) for n, x in inputs.items()}
        state = torch.randn(B, H, K, V)
        o, new = triton_mod.step(**token, state=state)
        o_ref, new_ref = torch_mod.step(**token, state=state)
        return {"o": rel(o, o_ref), "state": rel(new, new_ref)}

    if name == "value_gate":  # _gate's own branch in the scan, and the chunk form's kernels without g
        triton_mod.CONFIG.update(form="chunk", walk_programs=10**9, segment_programs=10**9, segment_chunks=1)
        chunk_form = case(1, 150, 2, 5, 20, lens=[70, 0, 1, 79], strong=True)
        triton_mod.CONFIG.update(form="scan", walk_programs=0)
        print("RESULT " + json.dumps({"batch B=2 T=19, a strong gate, K=4 V=8": case(2, 19, 1, 4, 8, strong=True),
                                      "chunk form: packed [70, 0, 1, 79] in one-chunk segments": chunk_form,
                                      "step": step_case()}))
        sys.exit(0)
    # the walks' layout code is the same for both gates (only _gate differs): each spec takes one layout
    if name == "mamba":
        out = {"varlen [20, 0, 1, 3], K=3 V=12 (two V blocks, padded tiles, an empty sequence)":
           case(1, 24, 1, 3, 12, lens=[20, 0, 1, 3])}
    else:
        out = {"batch B=2 T=19, a strong gate, K=4 V=8": case(2, 19, 1, 4, 8, strong=True)}
    # one long sequence per row cut into segments walked at once (the segment policy forced): 37 tokens in 16s (2 scans)
    defaults = dict(triton_mod.CONFIG)
    cut, whole = dict(walk_programs=10**9, segment_programs=10**9, segment_chunks=2), dict(walk_programs=0)
    triton_mod.CONFIG.update(cut)
    assert triton_mod._layout(2, 37, 1, 12, None, "cpu").segments.tolist() == [[0, 3], [3, 3]]
    out["B=2 T=37 in segments of 16 tokens, K=3 V=12"] = case(2, 37, 1, 3, 12, strong=name == "gfw")
    # a packed batch: 2, 1 (empty) and 1 segments, each sequence with its own initial state
    out["packed [25, 0, 15] in segments of 16 tokens"] = case(1, 40, 1, 3, 12, lens=[25, 0, 15])
    for B, T in ((0, 40), (2, 5), (2, 0)):  # no sequence, shorter than a segment, empty: the plain walk's results
        x = _inputs(name, B, T, 1, 3, 12, dtype=torch.float32)
        got = [op(**x, output_final_state=True, backend="triton") for setting in (cut, whole)
               if not triton_mod.CONFIG.update(setting)]
        out[f"B={B} T={T} segmented in 16s"] = {
            what: 0.0 if torch.equal(a, b) else float("inf") for what, a, b in zip(("o", "final_state"), *got)}
    triton_mod.CONFIG.update(defaults)
    if name == "gfw":  # the outer sum's chunk form (CONFIG "form"): 64-token chunks of 16-row sub-chunks
        triton_mod.CONFIG.update(form="chunk")
        out["chunk form: packed [70, 0, 1, 79], K=5 V=20, a strong gate"] = case(1, 150, 2, 5, 20, lens=[70, 0, 1, 79],
                                                                                strong=True)
        out["chunk form: B=2 T=64, no final state"] = case(2, 64, 1, 16, 16, final=False)
        triton_mod.CONFIG.update(chunk_block_v=16)
        out["chunk form: packed [100, 30], K=3 V=40 in three V blocks"] = case(1, 130, 1, 3, 40, lens=[100, 30])
        # segments of one chunk walked at once (the segment policy forced): maps, the prefix, exit gradients
        triton_mod.CONFIG.update(defaults, form="chunk", **dict(cut, segment_chunks=1))
        assert triton_mod._os_rows(1, 300, 1, 20, torch.tensor([0, 140, 140, 141, 300]), "cpu").segments.tolist() == [
            [0, 3], [3, 1], [4, 1], [5, 3]]
        out["chunk form: packed [140, 0, 1, 159] in segments of 64 tokens, a strong gate"] = case(
            1, 300, 1, 5, 20, lens=[140, 0, 1, 159], strong=True)
        triton_mod.CONFIG.update(defaults)
    out["step"] = step_case()
    print("RESULT " + json.dumps(out))
    '''
)

TOL = 1e-5  # fp32 against float64: relative norm of the difference (measured: below 3e-7)


@pytest.mark.parametrize("name", ["mamba", "gfw", "value_gate"])
def test_triton_matches_oracle(name):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    errors = json.loads(lines[-1][len("RESULT "):])
    assert errors["step"]
    for case, errs in errors.items():
        if case != "step" and "segmented in" not in case:
            final = set() if "no final state" in case else {"final_state"}
            assert errs.keys() >= {"o", "dq", "dk", "dv", "dinitial_state"} | final, case
    assert sum(case.startswith("chunk form") for case in errors) == {"gfw": 4, "value_gate": 1}.get(name, 0)
    assert sum("segmented in" in case for case in errors) == (0 if name == "value_gate" else 3)
    bad = {f"{case}: {n}": e for case, errs in errors.items() for n, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_segment_policy_cuts_only_an_idle_walk():
    """The default rule at the shapes run 16 timed (Mamba, d_inner 2048 = 32 heads x V 64): one 32K sequence (256
    programs) is cut into 2,048-token segments, four 8K sequences (1,024 programs) are walked whole; a packed batch
    whose long sequence would walk alone is cut too."""
    triton_mod = getattr(lmoec.compile_spec(ROOT / "specs/lsm/mamba.lsm").package, "mamba_triton")
    rows = triton_mod._layout(1, 32768, 32, 64, None, "cpu")
    assert rows.bounds.tolist() == list(range(0, 32769, 2048)) and rows.segments.tolist() == [[0, 16]]
    assert triton_mod._layout(4, 8192, 32, 64, None, "cpu").segments is None
    # a packed batch: its longest sequence sets the walk's length (three sequences keep 768 / 30 * 32 programs busy)
    packed = triton_mod._layout(1, 32768, 32, 64, torch.tensor([0, 30720, 31744, 32768]), "cpu")
    assert packed.segments.tolist() == [[0, 15], [15, 1], [16, 1]] and packed.bounds[15].item() == 30720


def test_unknown_form_is_one_clear_error():
    """A mistyped CONFIG["form"] names the module and the choices (no silent fallback to the scan)."""
    triton_mod = getattr(lmoec.compile_spec(ROOT / "specs/lsm/gfw.lsm").package, "gfw_triton")
    triton_mod.CONFIG["form"] = "chunks"
    x = [torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 3)]
    with pytest.raises(ValueError, match=r"gfw: CONFIG\['form'\] must be 'scan' or 'chunk', got 'chunks'"):
        triton_mod.chunk(*x, torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 3))
