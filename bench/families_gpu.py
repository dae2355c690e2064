"""Every Triton family at the shapes users run, against its fla peer, in one process on one GPU (issue 22).

Parts (any subset, in this order):
  check    bf16 Triton kernels vs the same spec's float32 torch chunkwise backend (itself tested against the
           float64 reference): o, final state and every gradient, at a T that is no multiple of the chunk, with
           initial state, under the default launch settings, forced segmentation (LASP-2 within the GPU), varlen,
           and the head dims 48 and 96. Outputs are poisoned (NaN) before the kernels run.
  bench    median ms of forward (grad-enabled, as in training; and under no_grad) and forward+backward, lmoec vs
           fla 0.6.0 vs SDPA at every shape below; ratio = peer / lmoec (> 1: lmoec faster).
  sweep    the launch-setting variants of VARIANTS per family, timed at the shapes given.
  profile  CUDA time per kernel of one forward+backward at each shape given.

    python bench/families_gpu.py check bench [--families simple_gla,gla] [--shapes 2K,64K] [--out DIR]
Writes families.md and families_log.txt to --out ($OUT when set). fla's compile and autotuning results can be
carried between device calls: --cache DIR sets TRITON_CACHE_DIR and --save-cache FILE tars it afterwards.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

FAMILIES = ["bla", "retnet", "simple_gla", "gla", "rwkv6", "deltanet", "gated_deltanet", "rwkv7"]
# name: (B, T, H, K, V, sequence lengths of a packed batch or None)
VARLEN = [100, 13000, 2500, 7000, 300, 6000, 3868]  # 32768 tokens in 7 sequences
SHAPES = {
    "2K": (16, 2048, 16, 128, 128, None),
    "8K": (4, 8192, 16, 128, 128, None),
    "32K": (1, 32768, 16, 128, 128, None),
    "heads64": (8, 4096, 32, 64, 64, None),
    "64K": (1, 65536, 8, 128, 128, None),
    "varlen": (1, 32768, 16, 128, 128, VARLEN),
    "V256": (4, 8192, 16, 128, 256, None),
}
# launch-setting variants timed by `sweep` (CONFIG overrides of the emitted module)
DECAY_VARIANTS = {
    "default": {},
    "no segments": {"walk_programs": 0},
    "segment below 256 programs": {"walk_programs": 256},
    "256 segments": {"segment_programs": 256},
    "fused walks": {"fuse_output": True, "fuse_dv": True},
    "unfused walks": {"fuse_output": False, "fuse_dv": False},
    "fused walks + 8 warps": {"fuse_output": True, "fuse_dv": True, "walk_fused": dict(BV=64, num_warps=8, num_stages=2)},
    "bonus sub-chunk": {"bonus_whole_chunk": False},  # RWKV6: every chunk's dq/dk through the sub-chunk kernel (before run 11)
    # GLA: dq/dk over the whole head dim at K = 128 (its default before run 11: K blocks of 64)
    "dq/dk whole K": {"grad_qk": dict(BK=128, BV=64, num_warps=4, num_stages=2)},
}
DELTA_VARIANTS = {
    "default": {},
    "previous default": {"wu": "tiles", "warps_ut": 4, "stages_fwd": 2},
    "scalar decay's settings": {"wu": "auto", "warps_ut": 1, "stages_fwd": 3},  # what Gated DeltaNet's sweep chose
    "run 8 kernels": {"ut_dot": "ieee", "BK_ut": 128, "BK_o": 128},  # before the K loops and tf32 of the UT kernel
    "UT ieee": {"ut_dot": "ieee"},
    "UT K block 128": {"BK_ut": 128},
    "UT K block 32": {"BK_ut": 32},
    "output K block 128": {"BK_o": 128},
    "output 8 warps": {"warps_o": 8},
    "wu kernel": {"wu": "kernel"},
    "wu in walk": {"wu": "walk"},
    "wu tiles": {"wu": "tiles"},
    "UT 2 warps": {"warps_ut": 2},
    "forward stages 2": {"stages_fwd": 2},
    "output fused": {"fuse_output": True, "fuse_min_programs": 0},
    "output unfused": {"fuse_output": False},
    "output BV 64": {"BV_o": 64},
    "V block never halved": {"seq_programs": 0},
    "V block halved while < 256 programs": {"seq_programs": 256},
    "output unfused + V block halved while < 256 programs": {"fuse_output": False, "seq_programs": 256},
    "segments below 128 programs": {"walk_programs": 128},
    "walks 8 warps": {"warps_fwd": 8, "warps_dstate": 8},
}
DPLR_VARIANTS = {
    "default": {},
    "V block never halved": {"seq_programs": 0},
    "segments below 128 programs": {"walk_programs": 128},
    "walks 4 warps": {"warps_seq": 4},
}
VARIANTS = {**{f: DECAY_VARIANTS for f in ("bla", "retnet", "simple_gla", "gla", "rwkv6")},
            **{f: DELTA_VARIANTS for f in ("deltanet", "gated_deltanet")}, "rwkv7": DPLR_VARIANTS}

DEVICE = "cuda"  # "cpu" with TRITON_INTERPRET=1 smoke-tests this script's Python (not its numbers)
OUT_DIR = ""
OVERRIDES: dict = {}  # --set KEY=JSON: launch settings every part starts from (keys a module lacks are skipped)
SWEEP_ONLY: list[str] = []  # --variants: the sweep's variants to time (all when empty)
LOG: list[str] = []
REPORT: list[str] = []
START = time.time()


def log(*args):
    line = f"[{time.time() - START:5.0f} s] " + " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def say(line=""):
    """A line of families.md, written through at once: a call cut off at its time limit keeps what it measured."""
    REPORT.append(line)
    if OUT_DIR:
        with open(os.path.join(OUT_DIR, "families.md"), "w") as f:
            f.write("\n".join(REPORT) + "\n")


# ---- modules and inputs ------------------------------------------------------------------------


def build(spec):
    """(triton module, torch module, recurrence) of a library spec."""
    import lmoec

    program = lmoec.compile_spec(os.path.join(ROOT, "specs", "lsm", f"{spec}.lsm"))
    lsm = program.ir.lsm()
    pkg = program.package
    tri = getattr(pkg, f"{lsm.name}_triton")
    tri.CONFIG.update({key: value for key, value in OVERRIDES.items() if key in tri.CONFIG})
    ref = getattr(pkg, f"{lsm.name}_torch")
    RECURRENCE_OF.update({tri.__name__: lsm.recurrence, ref.__name__: lsm.recurrence})
    return tri, ref, lsm.recurrence


# the recurrence of each built backend module: make_inputs checks its inputs against the op's contract, which the
# backend modules (called directly here, to time the kernels alone) do not check (run 10's "illegal memory access"
# in the vector-decay delta spec was this harness feeding it a per-head gate where the kernels read one per key)
RECURRENCE_OF: dict = {}


def arg_names(module):
    names = list(inspect.signature(module.chunk).parameters)
    return names[3:names.index("scale")]


def make_inputs(spec, module, B, T, H, K, V, dtype):
    """Fresh random inputs of the kinds each model feeds its op (gates, L2-normalized delta keys, RWKV7's a, b)."""
    import torch
    import torch.nn.functional as F

    device = DEVICE
    rec_args = arg_names(module)
    delta = "beta" in rec_args or "a" in rec_args
    q = torch.randn(B, T, H, K, device=device)
    k = torch.randn(B, T, H, K, device=device)
    if delta:
        k = F.normalize(k, dim=-1) if "beta" in rec_args else k * K ** -0.5
    x = {"q": q.to(dtype), "k": k.to(dtype), "v": torch.randn(B, T, H, V, device=device).to(dtype)}
    for name in rec_args:
        if name == "g":
            if spec == "retnet":
                x["g"] = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device=device, dtype=torch.float32)))
            elif spec == "rwkv7":
                x["g"] = -0.6065 * torch.sigmoid(torch.randn(B, T, H, K, device=device))
            elif RECURRENCE_OF[module.__name__].decay == "vector":  # gla, rwkv6, gated_delta_vector
                x["g"] = F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16
            elif spec == "gated_deltanet":
                x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 3)
            else:
                x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device)) / 4
        elif name == "beta":
            x["beta"] = torch.sigmoid(torch.randn(B, T, H, device=device)).to(dtype)
        elif name == "u":
            x["u"] = (torch.randn(H, K, device=device) * 0.5).to(dtype)
        elif name in ("a", "b"):
            kk = F.normalize(torch.randn(B, T, H, K, device=device, generator=None), dim=-1)
            alpha = torch.sigmoid(torch.randn(B, T, H, 1, device=device))
            x["a"], x["b"] = (-alpha * kk).to(dtype), kk.to(dtype)
        else:
            raise AssertionError(f"no input rule for {name}")
    from lmoec.runtime.contract import check_op_args

    check_op_args(RECURRENCE_OF[module.__name__], spec, **x, scale=K ** -0.5)
    return x


def call(module, x, h0=None, final=False, cu=None):
    args = [x[n] for n in ["q", "k", "v"] + arg_names(module)]
    return module.chunk(*args, scale=x["q"].shape[-1] ** -0.5, initial_state=h0, output_final_state=final, cu_seqlens=cu)


def cu_seqlens(lens):
    import torch

    return None if lens is None else torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                                                  device=DEVICE)


# ---- fla peers ---------------------------------------------------------------------------------


def fla_peer(spec):
    """fn(x, h0, final, cu) -> (o, ht) calling fla 0.6.0's op for the same recurrence, or None."""
    try:
        if spec in ("simple_gla", "retnet"):
            from fla.ops.simple_gla import chunk_simple_gla as op

            if spec == "retnet":
                return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], g_gamma=x["g"], initial_state=h0,
                                                                    output_final_state=final, cu_seqlens=cu)
            return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], g=x["g"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
        if spec == "gla":
            from fla.ops.gla import chunk_gla as op

            return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], g=x["g"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
        if spec == "rwkv6":
            from fla.ops.rwkv6 import chunk_rwkv6 as op

            return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], x["g"], x["u"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
        if spec == "deltanet":
            from fla.ops.delta_rule import chunk_delta_rule as op

            return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], x["beta"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
        if spec == "gated_deltanet":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as op

            return lambda x, h0=None, final=False, cu=None: op(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
        if spec == "rwkv7":
            from fla.ops.rwkv7 import chunk_rwkv7 as op

            # lmoec's DPLR transition is Diag(exp g) + a b^T; fla writes it with a and b swapped
            return lambda x, h0=None, final=False, cu=None: op(r=x["q"], w=x["g"].to(x["q"].dtype), k=x["k"], v=x["v"],
                                                                a=x["b"], b=x["a"], initial_state=h0,
                                                                output_final_state=final, cu_seqlens=cu)
    except Exception as e:  # noqa: BLE001 - no fla here: the table says so
        log(f"fla peer for {spec} unavailable: {type(e).__name__}: {e}")
    return None


# ---- check -------------------------------------------------------------------------------------


def rel(a, b):
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_poison(module, on):
    module.POISON = on
    os.environ["LMOEC_POISON"] = "1" if on else "0"


def check_one(spec, tri, ref, B, T, H, K, V, lens=None, label=""):
    """bf16 Triton vs float32 torch backend: {tensor: relative error}."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = make_inputs(spec, tri, B, T, H, K, V, torch.bfloat16)
    cu = cu_seqlens(lens)
    N = B if lens is None else len(lens)
    h0 = torch.randn(N, H, K, V, device=DEVICE)
    names = list(x) + ["h0"]
    leaves = list(x.values()) + [h0]
    xs = [t.clone().requires_grad_(True) for t in leaves]
    xa = dict(zip(names, xs))
    set_poison(tri, True)
    o, ht = call(tri, {n: xa[n] for n in x}, xa["h0"], True, cu)
    set_poison(tri, False)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), xs)
    ys = [t.float().clone().requires_grad_(True) for t in leaves]
    ya = dict(zip(names, ys))
    ro, rht = call(ref, {n: ya[n] for n in x}, ya["h0"], True, cu)
    rgrads = torch.autograd.grad((ro * do.float()).sum() + (rht * dht).sum(), ys)
    errs = {"o": rel(o, ro), "ht": rel(ht, rht)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, grads, rgrads)})
    return errs


def check_steps(spec, tri, B=2, T=40, H=4, K=128, V=128):
    """The decode step token by token against the chunked forward (bf16 inputs, fp32 states)."""
    import torch

    x = make_inputs(spec, tri, B, T, H, K, V, torch.bfloat16)
    h0 = torch.randn(B, H, K, V, device=DEVICE)
    with torch.no_grad():
        o, ht = call(tri, x, h0, True)
        S, outs = h0, []
        for t in range(T):
            tok = {n: (a if n == "u" or (n == "g" and a.dim() == 1) else a[:, t]) for n, a in x.items()}
            o_t, S = tri.step(*[tok[n] for n in ["q", "k", "v"] + arg_names(tri)], state=S, scale=K ** -0.5)
            outs.append(o_t)
    return {"o": rel(torch.stack(outs, 1), o), "ht": rel(S, ht)}


def part_check(families, opts):
    say("## Check: bf16 Triton vs the spec's float32 torch backend (tf32 off)")
    say()
    say("Norm-relative errors; bounds 1e-2 for o and the final state, 2e-2 for gradients (bf16 operands).")
    say()
    say("| spec | case | " + " | ".join(["o", "ht", "dq", "dk", "dv", "dg/dbeta/du/da/db", "dh0"]) + " | ok |")
    say("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for spec in families:
        tri, ref, _ = build(spec)
        defaults = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tri.CONFIG.items()}
        cases = [("T=2085, default settings", dict(B=2, T=2085, H=4, K=128, V=128), {}),
                 ("T=2085, segments of 4 chunks", dict(B=2, T=2085, H=4, K=128, V=128), "segments"),
                 ("varlen [100, 1500, 37, 700]", dict(B=1, T=2337, H=4, K=128, V=128, lens=[100, 1500, 37, 700]), {}),
                 ("varlen, segments of 4 chunks", dict(B=1, T=2337, H=4, K=128, V=128, lens=[100, 1500, 37, 700]), "segments"),
                 ("K=V=64, H=8", dict(B=2, T=1000, H=8, K=64, V=64), {}),
                 ("K=128, V=256", dict(B=1, T=1000, H=4, K=128, V=256), {})]
        cases += [(f"K=V={d}", dict(B=2, T=700, H=4, K=d, V=d), {}) for d in opts.head_dims]
        cases.append(("decode steps vs chunk", "steps", {}))
        if opts.cases:
            cases = [c for c in cases if any(w in c[0] for w in opts.cases.split(","))]
        for label, shape, setting in cases:
            if setting == "segments":
                setting = {"walk_programs": 10**9, "segment_chunks": 4}
            tri.CONFIG.update(setting)
            try:
                errs = check_steps(spec, tri) if shape == "steps" else check_one(spec, tri, ref, **shape)
            except Exception as e:  # noqa: BLE001 - a refusal or a crash is a failed row
                errs = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"}
                log(traceback.format_exc())
            finally:
                tri.CONFIG.clear()
                tri.CONFIG.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()})
            if "error" in errs:
                failures.append(f"{spec} {label}: {errs['error']}")
                say(f"| {spec} | {label} | {errs['error']} | | | | | | | FAIL |")
                log(f"check {spec} {label}: {errs['error']}")
                continue
            bad = [n for n, e in errs.items() if not e <= (1e-2 if n in ("o", "ht") else 2e-2)]
            failures += [f"{spec} {label}: {n} {errs[n]:.2e}" for n in bad]
            gates = [f"{n} {e:.1e}" for n, e in errs.items() if n in ("dg", "dbeta", "du", "da", "db")]
            cell = lambda n: f"{errs[n]:.1e}" if n in errs else ""
            say(f"| {spec} | {label} | {cell('o')} | {cell('ht')} | {cell('dq')} | {cell('dk')} | {cell('dv')} | "
                f"{', '.join(gates)} | {cell('dh0')} | {'yes' if not bad else 'NO'} |")
            log(f"check {spec} {label}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()) + (" FAIL" if bad else ""))
    say()
    say("**ALL PASS**" if not failures else "**FAILURES**: " + "; ".join(failures))
    say()
    return failures


# ---- timing ------------------------------------------------------------------------------------


def timed(fn, leaves, do):
    """(fwd ms grad-enabled, fwd ms no_grad, fwd+bwd ms, peak MiB of fwd+bwd): medians of do_bench; a refusal
    becomes text in its cell."""
    import torch
    import triton

    def refusal(e):
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"

    out = []
    try:
        out.append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as e:  # noqa: BLE001
        return [refusal(e)] * 4

    def no_grad():
        with torch.no_grad():
            fn()

    out.append(triton.testing.do_bench(no_grad, warmup=25, rep=100, return_mode="median"))

    def fwd_bwd():
        torch.autograd.backward(fn(), do)
        for t in leaves:
            t.grad = None

    try:
        out.append(triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        out.append((torch.cuda.max_memory_allocated() - base) / 2**20)
    except Exception as e:  # noqa: BLE001
        out += [refusal(e), None]
    return out


def fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))


def ratio(peer, ours):
    return f"{peer / ours:.2f}x" if isinstance(peer, float) and isinstance(ours, float) else "n/a"


def shape_inputs(spec, tri, shape):
    import torch

    B, T, H, K, V, lens = SHAPES[shape]
    torch.manual_seed(0)
    x = make_inputs(spec, tri, B, T, H, K, V, torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in x.values() if t.is_floating_point()]
    return x, leaves, cu_seqlens(lens)


def part_bench(families, shapes, sdpa=True, peers=True):
    import torch
    import torch.nn.functional as F

    say("## Speed: median ms (do_bench), bf16, chunk 64; ratio = peer time / lmoec time")
    say()
    say("fwd: grad-enabled forward (as in training: states kept for the backward); fwd (no grad): inference.")
    say()
    say("| shape | op | fwd | fwd (no grad) | fwd+bwd | peak MiB | fla fwd / no grad / fwd+bwd | ratio fwd / no grad / fwd+bwd |")
    say("|---|---|---|---|---|---|---|---|")
    results = {}
    for shape in shapes:
        B, T, H, K, V, lens = SHAPES[shape]
        if sdpa and lens is None and K == V:
            q, k, v = (torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            res = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], do)
            results[(shape, "sdpa")] = res
            say(f"| {shape} | SDPA causal (flash) | {fmt(res[0])} | {fmt(res[1])} | {fmt(res[2])} | {fmt(res[3])} | | |")
            log(f"bench {shape} sdpa {[fmt(r) for r in res]}")
            del q, k, v
        for spec in families:
            tri, _, _ = build(spec)
            x, leaves, cu = shape_inputs(spec, tri, shape)
            do = torch.randn_like(x["v"])
            ours = timed(lambda: call(tri, x, cu=cu)[0], leaves, do)
            peer_fn = fla_peer(spec) if peers else None
            peer = [None] * 4
            if peer_fn is not None:
                peer = timed(lambda: peer_fn(x, cu=cu)[0], leaves, do)
            results[(shape, spec)] = (ours, peer)
            say(f"| {shape} | lmoec {spec} | {fmt(ours[0])} | {fmt(ours[1])} | {fmt(ours[2])} | {fmt(ours[3])} | "
                f"{' / '.join(fmt(p) for p in peer[:3])} | **{ratio(peer[0], ours[0])} / {ratio(peer[1], ours[1])} / "
                f"{ratio(peer[2], ours[2])}** |")
            log(f"bench {shape} {spec}: lmoec {[fmt(r) for r in ours]} fla {[fmt(r) for r in peer]}")
            del x, leaves
            torch.cuda.empty_cache()
    say()
    sd = {s: r for (s, n), r in results.items() if n == "sdpa"}
    if sd:
        say("fwd+bwd speedup vs SDPA causal: " + "; ".join(
            f"{spec} {s} {ratio(sd[s][2], results[(s, spec)][0][2])}" for s in sd for spec in families if (s, spec) in results))
        say()
    return results


def part_sweep(families, shapes):
    import torch

    say("## Launch-setting variants (lmoec only): median ms fwd / fwd (no grad) / fwd+bwd")
    say()
    for spec in families:
        variants = VARIANTS.get(spec)
        if not variants:
            continue
        tri, _, _ = build(spec)
        defaults = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tri.CONFIG.items()}
        say(f"### {spec}")
        say()
        say("| variant | " + " | ".join(shapes) + " |")
        say("|---|" + "---|" * len(shapes))
        for name, setting in variants.items():
            if SWEEP_ONLY and name not in SWEEP_ONLY:
                continue
            cells = []
            for shape in shapes:
                tri.CONFIG.update(setting)
                try:
                    x, leaves, cu = shape_inputs(spec, tri, shape)
                    do = torch.randn_like(x["v"])
                    res = timed(lambda: call(tri, x, cu=cu)[0], leaves, do)
                    cells.append(" / ".join(fmt(r) for r in res[:3]))
                except Exception as e:  # noqa: BLE001
                    cells.append(f"{type(e).__name__}")
                    log(traceback.format_exc())
                finally:
                    tri.CONFIG.clear()
                    tri.CONFIG.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()})
            say(f"| {name} | " + " | ".join(cells) + " |")
            log(f"sweep {spec} {name}: {cells}")
        say()


def _device_us(event) -> float:
    """Self CUDA time of a profiler row in us (the attribute's name changed across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


def kernel_times(run, calls: int = 5) -> dict[str, float]:
    """{kernel: CUDA us per call of `run()`}, mean of `calls` calls after two warm-ups, slowest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # compile, autotune and warm up outside the profile
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if _device_us(e) > 0), key=_device_us, reverse=True)
    return {e.key: _device_us(e) / calls for e in events}


def part_profile(families, shapes, forward_only=False, peers=True):
    import torch

    what = "one forward (no grad)" if forward_only else "one forward+backward"
    say(f"## CUDA time per kernel, {what} (us)")
    say()
    for spec in families:
        tri, _, _ = build(spec)
        peer_fn = fla_peer(spec) if peers else None
        for shape in shapes:
            x, leaves, cu = shape_inputs(spec, tri, shape)
            do = torch.randn_like(x["v"])
            for name, op in [("lmoec", lambda: call(tri, x, cu=cu)[0])] + (
                    [("fla", lambda: peer_fn(x, cu=cu)[0])] if peer_fn else []):
                def run():
                    if forward_only:
                        with torch.no_grad():
                            op()
                        return
                    torch.autograd.backward(op(), do)
                    for t in leaves:
                        t.grad = None

                try:
                    times = kernel_times(run)
                except Exception as e:  # noqa: BLE001 - fla refuses some backwards on Hopper: the table says so
                    say(f"### {name} {spec} {shape}: refused ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                    say()
                    continue
                say(f"### {name} {spec} {shape}: {sum(times.values()) / 1000:.3f} ms of kernels")
                say()
                say("| kernel | us |")
                say("|---|---|")
                for key, us in list(times.items())[:14]:
                    say(f"| {key[:70]} | {us:.1f} |")
                say()
                log(f"profile {name} {spec} {shape}: " + json.dumps({k[:40]: round(v, 1) for k, v in list(times.items())[:10]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["check", "bench", "sweep", "profile"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep-shapes", default="2K,32K,64K")
    ap.add_argument("--profile-shapes", default="32K")
    ap.add_argument("--profile-fwd", action="store_true", help="profile one forward without grad (default: fwd+bwd)")
    ap.add_argument("--head-dims", default="48,96")
    ap.add_argument("--no-peers", action="store_true", help="time lmoec (and SDPA) only: fla's autotuning takes minutes")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--cases", default="", help="check only the cases whose label contains one of these (comma list)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a launch setting of every emitted module (CONFIG key), e.g. --set fuse_output=true")
    ap.add_argument("--variants", default="", help="the sweep's variants to time, by name (comma list; default all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    opts = ap.parse_args()
    for item in opts.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = json.loads(value)
    SWEEP_ONLY.extend(name for name in opts.variants.split(",") if name)
    opts.head_dims = [int(d) for d in opts.head_dims.split(",") if d]
    global OUT_DIR
    OUT_DIR = opts.out
    os.makedirs(OUT_DIR, exist_ok=True)
    import torch
    import triton

    families = opts.families.split(",")
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    try:
        import fla

        versions += f", fla {fla.__version__}"
    except Exception:  # noqa: BLE001
        versions += ", fla not installed"
    say(f"# lmoec Triton families vs peers ({datetime.date.today()})")
    say()
    say(f"GPU: {torch.cuda.get_device_name()}; {versions}. Command: `python bench/families_gpu.py {' '.join(sys.argv[1:])}`")
    say()
    log(f"GPU {torch.cuda.get_device_name()} {versions}")
    try:
        if "check" in opts.parts:
            part_check(families, opts)
        if "bench" in opts.parts:
            part_bench(families, opts.shapes.split(","), sdpa=not opts.no_sdpa, peers=not opts.no_peers)
        if "sweep" in opts.parts:
            part_sweep(families, opts.sweep_shapes.split(","))
        if "profile" in opts.parts:
            part_profile(families, opts.profile_shapes.split(","), forward_only=opts.profile_fwd, peers=not opts.no_peers)
    finally:
        with open(os.path.join(opts.out, "families_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        print("\n".join(REPORT))


if __name__ == "__main__":
    main()
