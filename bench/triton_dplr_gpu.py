"""GPU check and benchmark of the emitted DPLR (RWKV7) Triton kernels.

1. Correctness at B=4, T=8192, H=16, K=V=128 in bf16 against a float32 token-by-token torch recurrence
   (lmoec.backends.reference's step over the whole batch, checkpointed per segment so its backward
   fits): outputs, final state and every gradient (q, k, v, g, a, b, initial state); the decode step
   token by token against the chunked forward; fla's chunk_rwkv7 on the same inputs, for the record.
2. Speed side by side in one process: lmoec vs fla 0.6.0 (fla.ops.rwkv7.chunk_rwkv7, by default and with
   lower_bound = -0.606531, which lets fla use chunk 64) vs SDPA causal, B*T = 32K, T in {2K, 8K, 32K},
   H=16, K=V=128, bf16, forward and forward+backward, peak memory.
3. --profile: CUDA time per kernel (torch.profiler) of one forward+backward of lmoec and of fla at B=4, T=8K.

Inputs are RWKV7's: a = -alpha kk, b = kk (kk L2-normalized, alpha in (0, 1)), log decay in [-0.6065, 0).
fla writes the same recurrence with the roles of a and b swapped (its `a` is the read vector, its `b` the
removal): lmoec's (a, b) go to fla as (b, a).

    python bench/triton_dplr_gpu.py [--skip-bench] [--skip-check] [--skip-fla] [--fla-default-only] [--bench-T 2048,8192,32768] [--tune]
                                    [--profile] [--bg-warm] [--out DIR]
    python bench/triton_dplr_gpu.py --warm

fla compiles its DPLR kernels for minutes on first use. `--warm` only runs fla's op (forward + backward, both
variants) at the benchmark's shapes, untimed, filling Triton's on-disk cache; `--bg-warm` starts that in a
child process at once and waits for it to end before the first timing, so it overlaps the (untimed) check.
One call for everything: `python bench/triton_dplr_gpu.py --bg-warm --profile`.

Writes DIR/triton_dplr.md (default $OUT, else .), rewritten after every line so a run stopped at its time
limit still leaves its tables; logs timestamped lines to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_bench import fmt, kernel_profile, ratio, rel, timed  # noqa: E402

DEV = "cuda"
LOG_W_MIN = -0.606531  # RWKV7's bound on the log decay per token
START = time.time()
LINES: list[str] = []
OUT_FILE = "triton_dplr.md"
OPTS = argparse.Namespace(out=".")


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.time() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def say(line: str = "") -> None:
    """Print and rewrite the results file."""
    print(line, flush=True)
    LINES.append(line)
    with open(os.path.join(OPTS.out, OUT_FILE), "w") as f:
        f.write("\n".join(LINES) + "\n")


def build(chunk: int = 64):
    """The emitted Triton module of a vector-decay DPLR spec (RWKV7's recurrence), imported from a real file."""
    import sympy

    from lmoec.backends import triton as triton_backend
    from lmoec.backends.context import lsm_context
    from lmoec.ir.nodes import Decay, DPLRTerms, LSMSpec, SpecIR
    from lmoec.program import compile_ir

    x = sympy.Symbol("x")
    lsm = LSMSpec(name="mem", decay=Decay(kind="vector", expr=x), dplr=DPLRTerms(a=x, b=x), chunk_size=chunk)
    program = compile_ir(SpecIR(source="bench_dplr.lsm", name="bench_dplr", lsms={"mem": lsm}))
    ctx = lsm_context(program.ir, program.ir.lsm())
    path = os.path.join(tempfile.mkdtemp(), "mem_dplr_triton.py")
    with open(path, "w") as f:
        f.write(triton_backend.emit(ctx, "# bench build"))
    spec = importlib.util.spec_from_file_location("mem_dplr_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ctx.rec


def inputs(B, T, H=16, D=128, dtype=torch.bfloat16, seed=0):
    """RWKV7-like inputs; g stays fp32 (the kernels read the log decay in fp32)."""
    torch.manual_seed(seed)
    kk = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1)
    alpha = torch.sigmoid(torch.randn(B, T, H, 1, device=DEV))
    return {
        "q": torch.randn(B, T, H, D, device=DEV).to(dtype),
        "k": (torch.randn(B, T, H, D, device=DEV) * D ** -0.5).to(dtype),
        "v": torch.randn(B, T, H, D, device=DEV).to(dtype),
        "g": LOG_W_MIN * torch.sigmoid(torch.randn(B, T, H, D, device=DEV)),
        "a": (-alpha * kk).to(dtype),
        "b": kk.to(dtype),
    }


def recurrent_fp32(rec, q, k, v, g, a, b, initial_state, scale, segment=256):
    """Token by token in fp32 over the whole batch (the reference's step), checkpointed per segment."""
    from torch.utils.checkpoint import checkpoint

    from lmoec.backends.reference import _step

    T = q.shape[1]
    S = initial_state.float()

    def run(S, *xs):
        q, k, v, g, a, b = xs
        outs = []
        for t in range(q.shape[1]):
            S, o = _step(rec, S, q[:, t], k[:, t], v[:, t], g[:, t], None, None, a[:, t], b[:, t], scale)
            outs.append(o)
        return torch.stack(outs, 1), S

    outs = []
    for lo in range(0, T, segment):
        xs = [x[:, lo : lo + segment].float() for x in (q, k, v, g, a, b)]
        o, S = checkpoint(run, S, *xs, use_reentrant=False)
        outs.append(o)
    return torch.cat(outs, 1), S



def fla_rwkv7():
    if OPTS.skip_fla:
        return None
    try:
        from fla.ops.rwkv7 import chunk_rwkv7

        return chunk_rwkv7
    except Exception as e:  # noqa: BLE001 - no fla on this machine
        log(f"fla unavailable: {type(e).__name__}: {e}")
        return None


def fla_call(op, x, h0=None, lower_bound=None, output_final_state=False):
    """fla's RWKV7 op on lmoec's arguments (a and b swapped, see the module docstring; g in q's dtype, as fla takes it)."""
    extra = {} if lower_bound is None else {"lower_bound": lower_bound}
    return op(r=x["q"], w=x["g"].to(x["q"].dtype), k=x["k"], v=x["v"], a=x["b"], b=x["a"], scale=x["scale"], initial_state=h0,
              output_final_state=output_final_state, **extra)


def check_correctness(mod, rec):
    say("## Correctness: B=4, T=8192, H=16, K=V=128, bf16 kernels vs float32 token-by-token recurrence")
    say()
    say("Same bf16 inputs (g fp32) for both; errors are max|err|/max|ref| and ||err||/||ref|| per tensor.")
    say("DESIGN.md tolerances: outputs 2e-3, gradients 1e-2 (relative; judged on the norm).")
    say()
    say("| op | tensor | max rel | norm rel | within |")
    say("|---|---|---|---|---|")
    B, T, H, D = 4, 8192, 16, 128
    scale = D ** -0.5
    args = inputs(B, T)
    h0 = torch.randn(B, H, D, D, device=DEV) * 0.1
    ours = {n: t.clone().requires_grad_() for n, t in args.items()}
    ours["initial_state"] = h0.clone().requires_grad_()
    refs = {n: t.detach().float().requires_grad_() for n, t in ours.items()}
    log("check: lmoec forward + backward")
    o, ht = mod.chunk(**ours, scale=scale, output_final_state=True)
    do = torch.randn(o.shape, device=DEV)
    dht = torch.randn(ht.shape, device=DEV) * 0.1
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    torch.cuda.synchronize()
    log("check: float32 reference forward + backward (token by token)")
    o_ref, ht_ref = recurrent_fp32(rec, **refs, scale=scale)
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    torch.cuda.synchronize()
    pairs = [("o", o, o_ref), ("final_state", ht, ht_ref)] + [(f"d{n}", ours[n].grad, refs[n].grad) for n in ours]
    ok_all = True
    for name, x, r in pairs:
        mx, nr = rel(x, r)
        tol = 2e-3 if name in ("o", "final_state") else 1e-2
        ok_all &= nr <= tol
        say(f"| lmoec | {name} | {mx:.2e} | {nr:.2e} | {'yes' if nr <= tol else 'NO'} |")
    refs_by_name = {n: r for n, _, r in pairs}
    del ours, o, ht

    op = fla_rwkv7()
    if op is not None:
        log("check: fla chunk_rwkv7 on the same inputs")
        xs = {n: t.clone().requires_grad_() for n, t in args.items()}
        x0 = h0.clone().requires_grad_()
        try:
            o, ht = fla_call(op, dict(xs, scale=scale), x0, output_final_state=True)
            found = [("o", o), ("final_state", ht)]
            try:
                ((o.float() * do).sum() + (ht.float() * dht).sum()).backward()
                found += [(f"d{n}", x.grad) for n, x in xs.items()] + [("dinitial_state", x0.grad)]
            except Exception as e:  # noqa: BLE001
                say(f"| fla chunk_rwkv7 | backward refused: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |")
            for name, x in found:
                mx, nr = rel(x, refs_by_name[name])
                say(f"| fla chunk_rwkv7 (peer, same inputs) | {name} | {mx:.2e} | {nr:.2e} | |")
        except Exception as e:  # noqa: BLE001
            say(f"| fla chunk_rwkv7 | refused: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |")
        del xs, x0
    del refs, refs_by_name, o_ref, ht_ref
    torch.cuda.empty_cache()

    # decode: the step kernel token by token equals the chunked forward (T = 200, not a multiple of 64)
    log("check: step vs chunk")
    small = {n: t[:2, :200].contiguous() for n, t in args.items()}
    o_c, s_c = mod.chunk(**small, scale=scale, initial_state=h0[:2].contiguous(), output_final_state=True)
    S = h0[:2].contiguous()
    steps = []
    for t in range(200):
        o_t, S = mod.step(**{n: x[:, t] for n, x in small.items()}, state=S, scale=scale)
        steps.append(o_t)
    for name, x, r in (("o", torch.stack(steps, 1), o_c), ("final_state", S, s_c)):
        mx, nr = rel(x, r)
        ok_all &= nr <= 2e-3
        say(f"| lmoec step vs chunk (200 tokens) | {name} | {mx:.2e} | {nr:.2e} | {'yes' if nr <= 2e-3 else 'NO'} |")
    say()
    say(f"All within tolerance: {'yes' if ok_all else 'NO'}")
    say()



def tune(mod):
    """Greedy search of the launch settings by fwd+bwd time at B=4, T=8K: each change is kept if it helps."""
    args = inputs(4, 8192)
    ins = {n: t.clone().requires_grad_() for n, t in args.items()}
    do = torch.randn(4, 8192, 16, 128, device=DEV, dtype=torch.bfloat16)
    changes = ({"seq_programs": 256}, {"seq_programs": 512}, {"BV": 128, "seq_programs": 0}, {"BV_chunk": 32},
               {"BV_chunk": 128}, {"warps_chunk": 8}, {"warps_dv": 4}, {"BV_dv": 64}, {"BV_dqk": 64}, {"BK_dqk": 64},
               {"BK_dqk": 128}, {"warps_dqk": 4}, {"warps_ut": 4}, {"warps_seq": 8}, {"stages": 3})
    say("| launch settings tried (fwd+bwd, B=4, T=8K) | ms |")
    say("|---|---|")
    current = dict(mod.CONFIG)
    _, best, _ = timed(lambda: mod.chunk(**ins)[0], list(ins.values()), do)
    say(f"| defaults {current} | {fmt(best)} |")
    for change in changes:
        mod.CONFIG.update(dict(current, **change))
        _, t, _ = timed(lambda: mod.chunk(**ins)[0], list(ins.values()), do)
        say(f"| {change} | {fmt(t)} |")
        if isinstance(t, float) and (not isinstance(best, float) or t < best):
            best, current = t, dict(mod.CONFIG)
    mod.CONFIG.update(current)
    say()
    return best, current


def warm_fla(Ts):
    """fla's op forward + backward at the benchmark's shapes, both variants, untimed: only fills the compile cache."""
    op = fla_rwkv7()
    if op is None:
        return
    for T in Ts:
        B = max(1, 32768 // T)
        ins = {n: t.requires_grad_() for n, t in inputs(B, T).items()}
        for bound in (None, LOG_W_MIN):
            log(f"warm: fla T={T} lower_bound={bound}")
            try:
                fla_call(op, dict(ins, scale=128 ** -0.5), lower_bound=bound)[0].sum().backward()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - the benchmark reports refusals itself
                log(f"warm: fla T={T} lower_bound={bound}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
        del ins
        torch.cuda.empty_cache()


def profile(mod):
    """CUDA time per kernel of one forward+backward at B=4, T=8K, H=16, K=V=128 bf16: lmoec, then fla."""
    say("## CUDA time per kernel, one forward+backward, B=4, T=8192, H=16, K=V=128, bf16 (torch.profiler)")
    say()
    args = inputs(4, 8192)
    ins = {n: t.clone().requires_grad_() for n, t in args.items()}
    do = torch.randn(4, 8192, 16, 128, device=DEV, dtype=torch.bfloat16)
    op = fla_rwkv7()
    runs = [("lmoec", lambda: mod.chunk(**ins, scale=128 ** -0.5)[0])]
    if op is not None:
        runs.append(("fla chunk_rwkv7", lambda: fla_call(op, dict(ins, scale=128 ** -0.5))[0]))
    for name, fn in runs:
        def once():
            torch.autograd.backward(fn(), do)
            for t in ins.values():
                t.grad = None
        try:
            lines = kernel_profile(name, once, rows=25)
        except Exception as e:  # noqa: BLE001
            lines = [f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", ""]
        for line in lines:
            say(line)


def run_benchmarks(mod, Ts):
    try:
        import fla

        fla_version = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        fla_version = "missing"
    op = fla_rwkv7()
    if OPTS.tune:
        best = tune(mod)
        say(f"Launch settings chosen (fwd+bwd at B=4, T=8K): {best}")
        say()
    say(f"## Speed: B*T = 32K tokens, H=16, K=V=128, bf16, median ms (fla {fla_version}); ratio = peer time / lmoec time")
    say()
    say(f"lmoec CONFIG: {mod.CONFIG}")
    say()
    say("| T | op | fwd ms | fwd+bwd ms | peak MB fwd+bwd | fwd ratio | fwd+bwd ratio |")
    say("|---|---|---|---|---|---|---|")
    for T in Ts:
        B = max(1, 32768 // T)
        mine = None

        def row(name, result):
            f, fb, peak = result
            say(f"| {T} | {name} | {fmt(f)} | {fmt(fb)} | {fmt(peak)} | {ratio(f, mine[0]) if mine else ''} | "
                f"{ratio(fb, mine[1]) if mine else ''} |")

        args = inputs(B, T)
        ins = {n: t.clone().requires_grad_() for n, t in args.items()}
        do = torch.randn(B, T, 16, 128, device=DEV, dtype=torch.bfloat16)
        log(f"bench T={T}: lmoec")
        result = timed(lambda: mod.chunk(**ins, scale=128 ** -0.5)[0], list(ins.values()), do)
        row("lmoec dplr (rwkv7)", result)
        mine = result
        if op is not None:
            variants = [("fla chunk_rwkv7", None)]
            if not OPTS.fla_default_only:
                variants.append((f"fla chunk_rwkv7 lower_bound={LOG_W_MIN}", LOG_W_MIN))
            for label, bound in variants:
                log(f"bench T={T}: {label}")
                row(label, timed(lambda: fla_call(op, dict(ins, scale=128 ** -0.5), lower_bound=bound)[0],
                                 list(ins.values()), do))
        del ins, args, do
        log(f"bench T={T}: SDPA")
        q = torch.randn(B, 16, T, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k, v = torch.randn_like(q).requires_grad_(), torch.randn_like(q).requires_grad_()
        row("SDPA causal (flash)", timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v],
                                          torch.randn_like(q)))
        del q, k, v
        torch.cuda.empty_cache()
    say()
    say("Ratios > 1 mean lmoec is faster.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--skip-bench", action="store_true", help="skip the timings")
    ap.add_argument("--bench-T", default="2048,8192,32768", help="sequence lengths to time at B*T = 32K (default %(default)s)")
    ap.add_argument("--skip-fla", action="store_true", help="leave fla out (its first calls compile and autotune for minutes)")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of the emitted kernels (default %(default)s)")
    ap.add_argument("--tune", action="store_true", help="first pick the fastest launch settings at T=8K")
    ap.add_argument("--profile", action="store_true", help="last, CUDA time per kernel of lmoec and fla at T=8K")
    ap.add_argument("--fla-default-only", action="store_true",
                    help="time fla's op as called by default only, not also with lower_bound (which compiles apart)")
    ap.add_argument("--warm", action="store_true", help="only compile fla's op at the benchmark's shapes, untimed")
    ap.add_argument("--bg-warm", action="store_true", help="run --warm in a child process during the check")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for triton_dplr.md (default $OUT, else .)")
    opts = ap.parse_args(argv)
    OPTS.__dict__.update(vars(opts))
    Ts = [int(t) for t in opts.bench_T.split(",")]
    if opts.warm:
        warm_fla(Ts)
        log("warm: done")
        return
    os.makedirs(opts.out, exist_ok=True)
    warmer = None
    if opts.bg_warm and not opts.skip_fla:
        warmer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm", "--bench-T", opts.bench_T])
        log(f"fla warm-up started in process {warmer.pid}")
    import triton

    props = torch.cuda.get_device_properties(0)
    say("# lmoec DPLR (RWKV7) Triton kernels on the GPU")
    say()
    say(f"GPU: {props.name}; torch {torch.__version__}; Triton {triton.__version__}; date {datetime.date.today()}")
    say()
    mod, rec = build(opts.chunk)
    say(f"Kernels emitted at chunk size {opts.chunk}.")
    say()

    def wait_warm():
        if warmer.poll() is None:
            log("waiting for the fla warm-up to end before timing")
            warmer.wait()
        log(f"fla warm-up ended, exit status {warmer.returncode}")

    for enabled, fn in ((not opts.skip_check, lambda: check_correctness(mod, rec)),
                        (warmer is not None, wait_warm),
                        (not opts.skip_bench, lambda: run_benchmarks(mod, Ts)),
                        (opts.profile, lambda: profile(mod))):
        if enabled:
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep what was measured, show what failed
                say("```")
                say(traceback.format_exc())
                say("```")
    log("done")


if __name__ == "__main__":
    main()
