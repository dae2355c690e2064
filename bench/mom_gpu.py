"""The Mixture-of-Memories layer (issue 19) against fla's MomAttention and a plain Gated DeltaNet layer, one GPU.

Parts (any subset, in this order):
  check  the lmoec MoM layer (specs/lsm/mom.lsm) in bf16 on the Triton kernels against the same layer in float32
         on the torch backend (itself tested against a float64 reference in tests/test_memories.py): output and
         every parameter's gradient, T = 1000 (no multiple of 64), a memory that gets no token; prefill then
         token-by-token decode against the full forward. Kernel outputs are poisoned (NaN) before they run.
  bench  median ms (do_bench) of forward (grad-enabled, as in training) and forward+backward at B*T = 32K,
         hidden 1024, T in 2K / 8K / 32K, bf16 parameters and inputs: the lmoec MoM layer (Gated DeltaNet,
         4 memories, top-2, shared memory; 8 heads, K = 128, V = 256) vs fla 0.6.0's MomAttention of the same
         shape (num_memories 4, topk 2, shared_mem, head_dim 128, 8 heads, expand_v 2, short conv 4, output
         gate) vs lmoec's plain Gated DeltaNet layer of the same shape. Ratios: fla / lmoec MoM (> 1: lmoec
         faster) and lmoec MoM / plain GDN (the cost of the memories). A refusal (fla's gated backward on
         Hopper with Triton < 3.7.1) is written in its cell.

    python bench/mom_gpu.py check bench [--shapes 2K,8K,32K] [--out DIR]
Writes mom.md and mom_log.txt to --out ($OUT when set), a line at a time (a call cut off keeps what it measured).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

DEVICE = "cuda"  # "cpu" with TRITON_INTERPRET=1 smoke-tests this script's Python (not its numbers)
HIDDEN, HEADS = 1024, 8  # K = 128, V = 256 (expand_v 2), as fla's MoM layer with head_dim 128
T_CHECK = 1000
CHECK_DTYPE = "bfloat16"  # the Triton run's dtype ("float32" for a smoke test: the interpreter has no bf16)
SHAPES = {"2K": (16, 2048), "8K": (4, 8192), "32K": (1, 32768)}  # B * T = 32K tokens
OUT_DIR = ""
LOG: list[str] = []
REPORT: list[str] = []
START = time.time()


def _flush():
    if OUT_DIR:
        from lmoec.bench import write_report

        write_report(OUT_DIR, "mom", REPORT, LOG)


def log(*args):
    line = f"[{time.time() - START:5.0f} s] " + " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)
    _flush()


def say(line=""):
    REPORT.append(line)
    _flush()


def lmoec_layer(spec, hidden, heads, dtype):
    import lmoec
    import torch

    torch.manual_seed(0)
    program = lmoec.compile_spec(os.path.join(ROOT, "specs", "lsm", f"{spec}.lsm"))
    return program, program.layer(hidden=hidden, heads=heads).to(device=DEVICE, dtype=dtype)


def fla_mom(hidden, heads, dtype):
    """fla's MomAttention of the lmoec MoM layer's shape, or the reason it is unavailable."""
    import torch

    try:
        try:
            from fla.layers import MomAttention
        except ImportError:
            from fla.layers.mom import MomAttention
        torch.manual_seed(0)
        layer = MomAttention(hidden_size=hidden, head_dim=hidden // heads, num_heads=heads, expand_v=2, mode="chunk",
                             use_output_gate=True, use_short_conv=True, conv_size=4, num_memories=4, topk=2,
                             shared_mem=True, layer_idx=0)
        return layer.to(device=DEVICE, dtype=dtype), None
    except Exception as e:  # noqa: BLE001 - no fla here: the table says so
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def rel(a, b):
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_poison(program, on):
    """NaN-fill kernel outputs before the kernels write them (the emitted Triton modules read POISON)."""
    os.environ["LMOEC_POISON"] = "1" if on else "0"
    for name in dir(program.package):
        module = getattr(program.package, name)
        if hasattr(module, "POISON"):
            module.POISON = on


# ---- check -------------------------------------------------------------------------------------


def part_check():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    say("## Check: bf16 Triton MoM layer vs the same layer in float32 on the torch backend (tf32 off)")
    say()
    say("Norm-relative errors; bounds 1e-2 for the output, 2e-2 for gradients (bf16 operands). hidden 256, 2 heads "
        f"(K = 128, V = 256), B = 2, T = {T_CHECK}; memory 1 gets no token.")
    say()
    failures = []
    dtype = getattr(torch, CHECK_DTYPE)
    program, layer = lmoec_layer("mom", 256, 2, dtype)  # both runs read these rounded values
    with torch.no_grad():
        layer.router.weight[1] = 0
        layer.router.weight[1, 0] = -50
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(2, T_CHECK, 256, device=DEVICE, generator=gen).to(dtype)
    x[..., 0] = x[..., 0].abs() + 1  # memory 1's logit is -50 x[..., 0]: always the lowest
    dy = torch.randn(2, T_CHECK, 256, device=DEVICE, generator=gen)
    results = {}
    for backend, run_dtype in (("torch", torch.float32), ("triton", dtype)):
        layer.to(run_dtype)
        xs = x.to(run_dtype).requires_grad_(True)
        set_poison(program, backend == "triton")
        y = layer(xs, backend=backend)
        set_poison(program, False)
        grads = torch.autograd.grad(y, [xs, *layer.parameters()], dy.to(run_dtype))
        results[backend] = (y, grads, layer.last_tokens_per_memory.clone())
    (y_ref, g_ref, _), (y, g, counts) = results["torch"], results["triton"]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    errs = {"y": rel(y, y_ref), **{f"d{n}": rel(a, b) for n, a, b in zip(names, g, g_ref)}}
    if int(counts[1]) != 0:
        failures.append(f"memory 1 got {int(counts[1])} tokens")
    bad = [n for n, e in errs.items() if not e <= (1e-2 if n == "y" else 2e-2)]
    failures += [f"{n} {errs[n]:.2e}" for n in bad]
    say("| tensor | error | ok |")
    say("|---|---|---|")
    for n, e in errs.items():
        say(f"| {n} | {e:.1e} | {'yes' if n not in bad else 'NO'} |")
    log("check forward/backward: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))

    # decode: prefill, then 20 single-token steps (only the routed states change) vs the full forward
    layer.to(dtype)
    prefill = T_CHECK - 20
    with torch.no_grad():
        full = layer(x)
        y0, cache = layer(x[:, :prefill], use_cache=True)
        outs = [y0]
        for t in range(prefill, T_CHECK):
            yt, cache = layer(x[:, t : t + 1], past=cache, use_cache=True)
            outs.append(yt)
    err = rel(torch.cat(outs, 1)[:, prefill:], full[:, prefill:])
    ok = err <= 1e-2
    failures += [] if ok else [f"decode {err:.2e}"]
    say(f"| decode: prefill {prefill} + 20 steps vs full forward (last 20 tokens) | {err:.1e} | {'yes' if ok else 'NO'} |")
    log(f"check decode: {err:.1e}")
    say()
    say("**ALL PASS**" if not failures else "**FAILURES**: " + "; ".join(failures))
    say()
    return failures


# ---- bench -------------------------------------------------------------------------------------


def fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))


def ratio(a, b):
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "n/a"


def timed(fn, params):
    """(fwd ms, fwd+bwd ms, peak MiB of fwd+bwd); a refusal becomes text in its cells."""
    import torch
    import triton

    def refusal(e):
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"

    try:
        fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001
        log(traceback.format_exc())
        return [refusal(e)] * 3
    dy = torch.randn_like(fn())

    def fwd_bwd():
        torch.autograd.backward(fn(), dy)
        for p in params:
            p.grad = None

    try:
        both = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50, return_mode="median")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        return [fwd, both, (torch.cuda.max_memory_allocated() - base) / 2**20]
    except Exception as e:  # noqa: BLE001
        log(traceback.format_exc())
        return [fwd, refusal(e), None]


def part_bench(shapes):
    import torch

    say(f"## Speed: median ms (do_bench), bf16, hidden {HIDDEN}, {HEADS} heads (K = 128, V = 256), B*T = 32K")
    say()
    say("| T | layer | fwd | fwd+bwd | peak MiB | ratio (fwd, fwd+bwd) |")
    say("|---|---|---|---|---|---|")
    _, mom = lmoec_layer("mom", HIDDEN, HEADS, torch.bfloat16)
    _, gdn = lmoec_layer("gated_deltanet", HIDDEN, HEADS, torch.bfloat16)
    fla, why = fla_mom(HIDDEN, HEADS, torch.bfloat16)
    if fla is None:
        log(f"fla MomAttention unavailable: {why}")
    for shape in shapes:  # each row as soon as it is measured (fla compiles for minutes: its row comes last)
        B, T = SHAPES[shape]
        x = torch.randn(B, T, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        ours = timed(lambda: mom(x), [x, *mom.parameters()])
        say(f"| {shape} | lmoec MoM (4 memories, top-2, shared) | {fmt(ours[0])} | {fmt(ours[1])} | {fmt(ours[2])} | |")
        plain = timed(lambda: gdn(x), [x, *gdn.parameters()])
        say(f"| {shape} | lmoec Gated DeltaNet (plain) | {fmt(plain[0])} | {fmt(plain[1])} | {fmt(plain[2])} | "
            f"MoM / plain: **{ratio(ours[0], plain[0])}, {ratio(ours[1], plain[1])}** |")
        peer = timed(lambda: fla(x)[0], [x, *fla.parameters()]) if fla is not None else [f"n/a ({why})"] * 3
        say(f"| {shape} | fla MomAttention (same shape) | {fmt(peer[0])} | {fmt(peer[1])} | {fmt(peer[2])} | "
            f"fla / MoM: **{ratio(peer[0], ours[0])}, {ratio(peer[1], ours[1])}** |")
        log(f"bench {shape}: mom {[fmt(r) for r in ours]} fla {[fmt(r) for r in peer]} gdn {[fmt(r) for r in plain]}")
        del x
        torch.cuda.empty_cache()
    say()
    say("Issue 19 asks for fla / lmoec MoM >= 1.2x and lmoec MoM / plain GDN <= 1.5x.")
    say()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["check", "bench"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    opts = ap.parse_args()
    global OUT_DIR
    OUT_DIR = opts.out
    os.makedirs(OUT_DIR, exist_ok=True)
    import torch
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    try:
        import fla

        versions += f", fla {fla.__version__}"
    except Exception:  # noqa: BLE001
        versions += ", fla not installed"
    say(f"# lmoec Mixture-of-Memories layer vs fla MomAttention ({datetime.date.today()})")
    say()
    say(f"GPU: {torch.cuda.get_device_name()}; {versions}. Command: `python bench/mom_gpu.py {' '.join(sys.argv[1:])}`")
    say()
    log(f"GPU {torch.cuda.get_device_name()} {versions}")
    if "check" in opts.parts:
        try:
            part_check()
        except Exception as e:  # noqa: BLE001 - the timings still run
            say(f"**check crashed**: {type(e).__name__}: {e}")
            log(traceback.format_exc())
    if "bench" in opts.parts:
        part_bench(opts.shapes.split(","))

if __name__ == "__main__":
    main()
