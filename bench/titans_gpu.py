"""Titans' Triton kernels on a GPU (issue 18): check, then time, in one process.

Parts (any subset, in this order):
  check  the Triton kernels on CUDA (bf16 inputs with tf32 and with ieee products, and fp32 inputs) against the torch
         chunkwise path in float64 on CPU (itself tested against the float64 oracle by tests/test_titans.py): o, the
         final joint state and every gradient (q, k, v, theta, eta, alpha, the initial state), T no multiple of the
         chunk, a packed batch with a one-token sequence, initial states, K = V = 64 and 128; Titans per token
         (specs/lsm/titans.lsm) and at chunk-start gradients (minibatch(64)); and the decode step token by token
         against the chunked forward on the GPU.
  bench  median ms (triton.testing.do_bench), bf16 inputs, B*T = 32768 tokens, H = 16, K = V = 128, T in {2K, 8K},
         forward and forward+backward: Titans' Triton kernels (per token at the walks' V block 16, 32, 64; chunk-start),
         Titans' torch path, lmoec's Gated DeltaNet Triton kernels (the issue's target: Titans <= 2x its time).
  profile  each Titans kernel's GPU time in one forward+backward at T = 8K (torch.profiler): where the time goes.
  fla    fla's chunk_gated_delta_rule at the same shapes, as a speed reference (run it last: fla autotunes and
         compiles for minutes; its backward is refused on Hopper with Triton < 3.7.1, the table then says so).

    python bench/titans_gpu.py check bench profile --out $OUT
    python bench/titans_gpu.py fla --out $OUT
Writes titans.md and titans_log.txt to --out ($OUT when set). `--smoke` runs this script's Python on CPU at tiny sizes
under TRITON_INTERPRET=1 (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from lmoec.bench import (fwd_and_fwd_bwd_ms, kernel_profile, outputs_and_grads, relative_error as rel,  # noqa: E402
                         step_through, write_report)

TOKENS = 32768
LENGTHS = [2048, 8192]
CHUNK_START = 'import "{}"\nlsm titans_chunk extends titans {{ update {{ gradient = minibatch(64) }} }}\n'
TOL = {"bfloat16": (2e-3, 1e-2), "float32": (1e-4, 1e-4)}  # (outputs, gradients): relative norm against float64
SMOKE = False
CASES = ""  # --cases: only the check cases whose label contains one of these (comma list)
REPORT: list[str] = []
LOG: list[str] = []


OUT_DIR = ""  # --out: the report and the log are rewritten there after every line (a call cut off keeps them)


def _flush():
    if OUT_DIR:
        write_report(OUT_DIR, "titans", REPORT, LOG)


def say(line=""):
    print(line, flush=True)
    REPORT.append(line)
    _flush()


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)
    _flush()


def programs(folder):
    import lmoec
    from lmoec.paths import SPECS

    chunk_start = os.path.join(folder, "titans_chunk.lsm")
    with open(chunk_start, "w") as f:
        f.write(CHUNK_START.format(SPECS / "lsm" / "titans.lsm"))
    return {"titans": lmoec.compile_spec(SPECS / "lsm" / "titans.lsm"),
            "titans_chunk": lmoec.compile_spec(chunk_start)}


def kernels(program):
    """The emitted Triton module of a program (its CONFIG is what the bench varies)."""
    return getattr(program.package, f"{program.ir.lsm().name}_triton")


def inputs(B, T, H, D, device, dtype, seed=0):
    """Op keyword arguments as the layer makes them: L2-normalized q and k, gates in (0, 1), small weight decay."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": F.normalize(randn(B, T, H, D), dim=-1), "k": F.normalize(randn(B, T, H, D), dim=-1),
         "v": randn(B, T, H, D), "theta": torch.sigmoid(randn(B, T, H)), "eta": torch.sigmoid(randn(B, T, H)),
         "alpha": torch.sigmoid(randn(B, T, H) - 4)}
    return {n: t.to(device=device, dtype=dtype) for n, t in x.items()}


def check(progs, device):
    import torch

    say("## Check: Triton on the GPU vs the torch path in float64 on CPU (relative norm of the difference)")
    say("| spec | case | inputs | products | worst output / state | worst gradient | ok |")
    say("|---|---|---|---|---|---|---|")
    failures = 0
    H = 2
    cases = ({"B=2 T=40 D=16": (2, 40, None, 16), "packed [25, 1, 14] D=16": (1, 40, [0, 25, 26, 40], 16)} if SMOKE else
             {"B=2 T=1000 D=64": (2, 1000, None, 64), "packed [700, 1, 299] D=64": (1, 1000, [0, 700, 701, 1000], 64),
              "B=1 T=600 D=128": (1, 600, None, 128)})
    # the default products first; a row of the other setting is shown but does not decide the check (tf32: 2.2e-3
    # against the 2e-3 bound on an H100, run 10, so ieee became the default)
    default = kernels(next(iter(progs.values()))).CONFIG["dot_16bit"]
    other = "tf32" if default == "ieee" else "ieee"
    variants = [(torch.float32, "ieee")] if SMOKE else [(torch.bfloat16, default), (torch.float32, "ieee"),
                                                         (torch.bfloat16, other)]
    for name, program in progs.items():
        op, mod = program.op(), kernels(program)
        for label, (B, T, cu, D) in cases.items():
            if CASES and not any(w in label for w in CASES.split(",")):
                continue
            n_seq = B if cu is None else len(cu) - 1
            gen = torch.Generator().manual_seed(T + D)
            h0 = 0.1 * torch.randn(n_seq, H, D, 2 * D, generator=gen)
            do = torch.randn(B, T, H, D, generator=gen)
            dht = torch.randn(n_seq, H, D, 2 * D, generator=gen)
            for dtype, dot in variants:
                mod.CONFIG["dot_16bit"] = dot
                x = inputs(B, T, H, D, "cpu", dtype, seed=T)  # the same rounded inputs on both sides
                want = outputs_and_grads(op, x, h0, do, dht, cu, "cpu", torch.float64, "torch")
                try:
                    got = outputs_and_grads(op, x, h0, do, dht, cu, device, dtype, "triton")
                except Exception as e:  # noqa: BLE001 - a launch that fails (e.g. out of shared memory) is a failed row
                    failures += dtype == torch.float32 or dot == default
                    log(name, label, dtype, dot, traceback.format_exc())
                    say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {dot} | {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''} | | NO |")
                    continue
                errs = {n: rel(got[n], w) for n, w in want.items()}
                worst_o = max(errs["o"], errs["final_state"])
                worst_g = max(e for n, e in errs.items() if n.startswith("d"))
                tol_o, tol_g = TOL[str(dtype).removeprefix("torch.")]
                ok = worst_o <= tol_o and worst_g <= tol_g
                failures += not ok and (dtype == torch.float32 or dot == default)
                log(name, label, dtype, dot, errs)
                say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {dot}{'' if dot == default else ' (not the default)'} | "
                    f"{worst_o:.2e} | {worst_g:.2e} | {'yes' if ok else 'NO'} |")
            mod.CONFIG["dot_16bit"] = default
    failures += check_decode(progs["titans"], device)
    say()
    return failures


def check_decode(program, device):
    """The decode step token by token equals the chunked forward (both on the GPU, fp32 inputs)."""
    import torch

    mod = kernels(program)
    B, T, H, D = 2, 100, 2, (16 if SMOKE else 128)
    x = inputs(B, T, H, D, device, torch.float32, seed=7)
    state = 0.1 * torch.randn(B, H, D, 2 * D, device=device)
    o, ht = mod.chunk(**x, initial_state=state, output_final_state=True)
    o_step, state = step_through(mod.step, x, state, list(x))
    err = max(rel(o_step, o), rel(state, ht))
    ok = err <= 1e-4
    say(f"| titans | decode {T} tokens vs chunked, D={D} | float32 | ieee | {err:.2e} | | {'yes' if ok else 'NO'} |")
    return int(not ok)


def timed_rows(fn, grads):
    return fwd_and_fwd_bwd_ms(fn, grads, SMOKE, log)


def _fla_gated_delta():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        log("fla chunk_gated_delta_rule not importable:", repr(err))
        return None


def bench(progs, device, parts):
    import torch
    import torch.nn.functional as F

    import lmoec
    from lmoec.paths import SPECS

    gdn = lmoec.compile_spec(SPECS / "lsm" / "gated_deltanet.lsm").op()
    fla_gdn = _fla_gated_delta() if "fla" in parts else None
    say("## Speed: median ms, bf16 inputs, B*T = 32768 tokens, H = 16, K = V = 128")
    say("| op | T | fwd ms | fwd+bwd ms | fwd / GDN | fwd+bwd / GDN |")
    say("|---|---|---|---|---|---|")
    H, D = (2, 16) if SMOKE else (16, 128)
    tokens = 128 if SMOKE else TOKENS
    mod = kernels(progs["titans"])
    titans, titans_chunk = progs["titans"].op(), progs["titans_chunk"].op()
    for T in ([64] if SMOKE else LENGTHS):
        B = tokens // T
        x = inputs(B, T, H, D, device, torch.bfloat16)
        do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        gd = {"q": x["q"], "k": x["k"], "v": x["v"], "g": F.logsigmoid(x["eta"].float() + 2).to(x["q"].dtype),
              "beta": x["theta"]}
        leaves = {n: t.clone().requires_grad_() for n, t in gd.items()}
        base = timed_rows(lambda: gdn(**leaves, backend="triton")[0], do)

        def row(label, times):  # each row as soon as it is measured: a call cut off keeps the rows before
            fmt = lambda t: "failed (log)" if t is None else f"{t:.3f}"
            ratio = lambda t, b: f"{t / b:.2f}" if t and b else ""
            say(f"| {label} | {T} | {fmt(times[0])} | {fmt(times[1])} | {ratio(times[0], base[0])} | {ratio(times[1], base[1])} |")

        row("lmoec gated_deltanet (triton)", base)
        if "bench" in parts:
            leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
            for bv in (32, 16, 64):
                mod.CONFIG["BV"] = bv
                row(f"lmoec titans (triton, walk BV {bv})", timed_rows(lambda: titans(**leaves, backend="triton")[0], do))
            mod.CONFIG["BV"] = 32
            row("lmoec titans minibatch(64) (triton)", timed_rows(lambda: titans_chunk(**leaves, backend="triton")[0], do))
        if fla_gdn is not None:
            fleaves = {n: t.clone().requires_grad_() for n, t in gd.items()}
            row("fla chunk_gated_delta_rule", timed_rows(lambda: fla_gdn(**fleaves)[0], do))
        if "bench" in parts:  # last: minutes a row at these sizes
            row("lmoec titans (torch path)", timed_rows(lambda: titans(**leaves, backend="torch")[0], do))
    say()
    say("Ratios are against lmoec's Gated DeltaNet Triton kernels at the same shape (the issue's target for Titans: "
        "<= 2x; the joint state (M, S) doubles the state traffic).")


def profile(progs, device):
    """GPU time per kernel of one Titans forward+backward (per token, Triton) at T = 8K, after a warm-up call."""
    import torch

    H, D = (2, 16) if SMOKE else (16, 128)
    T = 64 if SMOKE else 8192
    B = (128 if SMOKE else TOKENS) // T
    op = progs["titans"].op()
    leaves = {n: t.requires_grad_() for n, t in inputs(B, T, H, D, device, torch.bfloat16).items()}
    do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    run = lambda: op(**leaves, backend="triton")[0].backward(do)
    run()
    table = kernel_profile(run, device, rows=15)
    say(f"## Profile: Titans (Triton, per token) forward+backward, bf16, B={B} T={T} H={H} K=V={D}")
    say("```")
    say(table)
    say("```")
    say()


def main():
    global SMOKE, CASES, OUT_DIR
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", help="check, bench, profile and/or fla (default check bench)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (TRITON_INTERPRET=1): exercises the script")
    p.add_argument("--cases", default="", help="check only the cases whose label contains one of these (comma list)")
    args = p.parse_args()
    args.parts = args.parts or ["check", "bench"]
    if set(args.parts) - {"check", "bench", "profile", "fla"}:
        p.error(f"parts are check, bench, profile and fla, got {args.parts}")
    SMOKE, CASES = args.smoke, args.cases
    import torch

    device = "cpu" if SMOKE else "cuda"
    os.makedirs(args.out, exist_ok=True)
    OUT_DIR = args.out
    import triton

    say(f"# issue 18: Titans' Triton kernels on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}")
    say(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    say()
    failures = 0
    progs = programs(args.out)
    if "check" in args.parts:
        failures += check(progs, device)
    if "bench" in args.parts or "fla" in args.parts:
        bench(progs, device, args.parts)
    if "profile" in args.parts:
        profile(progs, device)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
