"""TTT-Linear's Triton kernels on a GPU (issue 18): check, then time, in one process, inside a time budget.

Parts (any subset, run in this order; default check bench):
  check   the Triton kernels on CUDA (bf16 inputs with tf32 and with ieee products, and fp32 inputs) against the torch
          chunkwise path in float64 on the same GPU (itself tested against the float64 oracle by tests/test_ttt.py), on
          the same rounded inputs: o, the final (W, b) and every gradient (q, k, v, theta, ln_weight, ln_bias, the
          initial state), with the output and its backward in their own kernels and in the walks; T no multiple of
          the mini-batch, a packed batch with a one-token sequence, initial states, K = V = 64 and 128;
          specs/lsm/ttt_linear.lsm (minibatch 16) and its per-token form, whose decode step runs token by token
          against the chunked forward.
  bench   median ms (triton.testing.do_bench), bf16 inputs, B*T = 32768 tokens, H = 16, K = V = 128 and 64 (the
          paper's), T in {2K, 8K, 32K}, forward and forward+backward: the Triton kernels (the default, then with the
          output and its backward where the default does not put them: in the walks or in their own kernels, CONFIG
          fuse_min_programs decides by the walks' count), the torch path, and fla's chunk_ttt_linear where fla
          imports (its learning rate is per chunk and its output norm a group norm: a timing peer, not the same
          function). The ratio is fla's time over ours.
  profile each kernel's GPU time in one forward+backward at T = 8K, D = 128 (torch.profiler).
  torch   the torch paths of Titans (per token, minibatch(64)) and TTT-Linear on CUDA (fp32, bf16) against float64 on
          CPU (what `backend="auto"` runs on a GPU until the kernels pass here).
  titans  fla's titans reference against lmoec's Titans Triton kernels at T = 2K, 8K (the issue's >= 10x target;
          bench/titans_gpu.py checks and times those kernels).

    python bench/ttt_gpu.py check bench --out $OUT                 (~5 minutes on an H100)
    python bench/ttt_gpu.py profile torch titans --out $OUT

--budget SECONDS (default $BUDGET or 540): a row that would start past it is skipped and says so, so one call ends
inside a 10-minute limit with what it measured. Writes ttt.md and ttt_log.txt to --out ($OUT when set) after every
row. `--smoke` runs this script's Python on CPU at tiny sizes under TRITON_INTERPRET=1 (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from lmoec.bench import (fwd_and_fwd_bwd_ms, kernel_profile, outputs_and_grads, relative_error as rel,  # noqa: E402
                         step_through, write_report)

TOKENS = 32768
LENGTHS = [2048, 8192, 32768]
PER_TOKEN = 'import "{}"\nlsm ttt_token_ln extends ttt_linear {{ update {{ gradient = token }} }}\n'
CHUNK_START = 'import "{}"\nlsm titans_chunk extends titans {{ update {{ gradient = minibatch(64) }} }}\n'
TOL = {"bfloat16": (2e-3, 1e-2), "float32": (1e-4, 1e-4)}  # (outputs, gradients): relative norm against float64
SMOKE = False
START = time.monotonic()
BUDGET = 540.0
OUT = "."
REPORT: list[str] = []
LOG: list[str] = []


def _flush():
    write_report(OUT, "ttt", REPORT, LOG)


def say(line=""):
    print(line, flush=True)
    REPORT.append(line)
    _flush()


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def left():
    return BUDGET - (time.monotonic() - START)


def over(need):
    """Whether less than `need` seconds of the budget are left (then the row is skipped, and the report says so)."""
    return not SMOKE and left() < need


def programs(folder):
    import lmoec
    from lmoec.paths import SPECS

    per_token = os.path.join(folder, "ttt_token_ln.lsm")
    with open(per_token, "w") as f:
        f.write(PER_TOKEN.format(SPECS / "lsm" / "ttt_linear.lsm"))
    return {"ttt_linear": lmoec.compile_spec(SPECS / "lsm" / "ttt_linear.lsm"), "ttt_token_ln": lmoec.compile_spec(per_token)}


def kernels(program):
    """The emitted Triton module of a program (its CONFIG is what the bench varies)."""
    return getattr(program.package, f"{program.ir.lsm().name}_triton")


def inputs(name, B, T, H, D, device, dtype, seed=0):
    """Op keyword arguments as the layers make them: L2-normalized keys (Titans), gates in (0, 1), lr / D (TTT)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, D)}
    if name.startswith("titans"):
        x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
        x.update(theta=torch.sigmoid(randn(B, T, H)), eta=torch.sigmoid(randn(B, T, H)),
                 alpha=torch.sigmoid(randn(B, T, H) - 4))
    else:
        x.update(theta=torch.sigmoid(randn(B, T, H)) / D, ln_weight=1 + 0.1 * randn(H, D), ln_bias=0.1 * randn(H, D))
    return {n: t.to(device=device, dtype=dtype) for n, t in x.items()}


def state_shape(name, N, H, D):
    return (N, H, D, 2 * D) if name.startswith("titans") else (N, H, D + 1, D)


def check(progs, device):
    import torch

    say("## Check: Triton on the GPU vs the torch path in float64 (relative norm of the difference)")
    say("| spec | case | inputs | products, output and its backward | worst output / state | worst gradient | ok |")
    say("|---|---|---|---|---|---|---|")
    failures = 0
    H = 2
    if SMOKE:
        cases = {"ttt_linear": {"B=2 T=40 D=16": (2, 40, None, 16), "packed [25, 1, 14] D=16": (1, 40, [0, 25, 26, 40], 16)},
                 "ttt_token_ln": {"B=1 T=20 D=16": (1, 20, None, 16)}}
    else:
        cases = {"ttt_linear": {"B=2 T=1000 D=64": (2, 1000, None, 64),
                                "packed [700, 1, 299] D=64": (1, 1000, [0, 700, 701, 1000], 64),
                                "B=1 T=600 D=128": (1, 600, None, 128)},
                 "ttt_token_ln": {"B=2 T=300 D=128": (2, 300, None, 128)}}
    # (inputs, products of 16-bit inputs, where the output and its backward run): at these few walks their own kernels
    # by default (fuse_min_programs), in the walks as at the benchmark's short sequences
    f32, bf16 = torch.float32, torch.bfloat16
    variants = ([(f32, "ieee", "kernels"), (f32, "ieee", "walks")] if SMOKE else
                [(bf16, "tf32", "kernels"), (bf16, "tf32", "walks"), (bf16, "ieee", "kernels"), (f32, "ieee", "kernels"),
                 (f32, "ieee", "walks")])
    for name, program in progs.items():
        op, mod = program.op(), kernels(program)
        defaults = dict(mod.CONFIG)
        for label, (B, T, cu, D) in cases[name].items():
            n_seq = B if cu is None else len(cu) - 1
            gen = torch.Generator().manual_seed(T + D)
            h0 = 0.1 * torch.randn(state_shape(name, n_seq, H, D), generator=gen)
            do = torch.randn(B, T, H, D, generator=gen)
            dht = torch.randn(state_shape(name, n_seq, H, D), generator=gen)
            wanted = {}  # the float64 reference per input dtype
            for dtype, dot, place in variants:
                setting = f"{dot}, {'own kernels' if place == 'kernels' else 'in the walks'}"
                if over(30):
                    say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {setting} | skipped: budget | | |")
                    continue
                mod.CONFIG.update(defaults, dot_16bit=dot, **({"fuse_min_programs": 0} if place == "walks" else {}))
                x = inputs(name, B, T, H, D, "cpu", dtype, seed=T)  # the same rounded inputs on both sides
                try:
                    if dtype not in wanted:
                        wanted[dtype] = outputs_and_grads(op, x, h0, do, dht, cu, device, torch.float64, "torch")
                    want = wanted[dtype]
                    got = outputs_and_grads(op, x, h0, do, dht, cu, device, dtype, "triton")
                    errs = {n: rel(got[n], w) for n, w in want.items()}
                except Exception:  # noqa: BLE001 - a failed launch is a failed check, and the rest still runs
                    log(traceback.format_exc())
                    errs = {"o": float("inf"), "dq": float("inf")}
                worst_o = max(errs["o"], errs.get("final_state", 0.0))
                worst_g = max(e for n, e in errs.items() if n.startswith("d"))
                tol_o, tol_g = TOL[str(dtype).removeprefix("torch.")]
                ok = worst_o <= tol_o and worst_g <= tol_g
                failures += not ok
                log(name, label, dtype, setting, errs)
                say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {setting} | {worst_o:.2e} | "
                    f"{worst_g:.2e} | {'yes' if ok else 'NO'} |")
            mod.CONFIG.update(defaults)
    failures += check_decode(progs["ttt_token_ln"], device)
    say()
    return failures


def check_decode(program, device):
    """The decode step token by token equals the chunked forward (both on the GPU, fp32 inputs)."""
    import torch

    mod = kernels(program)
    B, T, H, D = 2, 100, 2, (16 if SMOKE else 128)
    x = inputs("ttt_token_ln", B, T, H, D, device, torch.float32, seed=7)
    state = 0.1 * torch.randn(B, H, D + 1, D, device=device)
    try:
        o, ht = mod.chunk(**x, initial_state=state, output_final_state=True)
        o_step, state = step_through(mod.step, x, state, ("q", "k", "v", "theta"), ln_weight=x["ln_weight"],
                                     ln_bias=x["ln_bias"])
        err = max(rel(o_step, o), rel(state, ht))
    except Exception:  # noqa: BLE001
        log(traceback.format_exc())
        err = float("inf")
    ok = err <= 1e-4
    say(f"| ttt_token_ln | decode {T} tokens vs chunked, D={D} | float32 | ieee | {err:.2e} | | {'yes' if ok else 'NO'} |")
    return int(not ok)


def timed(fn, grads):
    return fwd_and_fwd_bwd_ms(fn, grads, SMOKE, log)


def _fla(path, name):
    """fla's op `name` from module `path`, or None (logged) where it does not import."""
    try:
        module = __import__(path, fromlist=[name])
        return getattr(module, name)
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        log(f"{path}.{name} not importable:", repr(err))
        return None


def _call_fla(fn, x, D):
    """Call an fla op with the keyword arguments its signature names (its layout: [B, T, H, D] unless head_first)."""
    import torch

    params = inspect.signature(fn).parameters
    kw = {}
    gates = {"w": x.get("ln_weight"), "b": x.get("ln_bias"), "eta": x["theta"][..., None], "theta": x["theta"][..., None],
             "alpha": x.get("alpha", x["theta"])[..., None], "scale": 1.0, "eps": 1e-6, "chunk_size": 16,
             "mini_batch_size": 16, "head_first": False, "output_final_state": False}
    for name in params:
        if name in ("q", "k", "v"):
            kw[name] = x[name]
        elif name in gates and gates[name] is not None:
            kw[name] = gates[name]
        elif name in ("w", "b"):
            kw[name] = torch.ones(x["q"].shape[2], D, device=x["q"].device, dtype=x["q"].dtype) if name == "w" else \
                torch.zeros(x["q"].shape[2], D, device=x["q"].device, dtype=x["q"].dtype)
    out = fn(**kw)
    return out[0] if isinstance(out, tuple) else out


def _fmt(t):
    return "failed (log)" if t is None else f"{t:.3f}"


def bench(progs, device):
    import torch

    fla_ttt = None if SMOKE else _fla("fla.ops.ttt", "chunk_ttt_linear")
    say("## Speed: median ms, bf16 inputs, B*T = 32768 tokens, H = 16")
    say("| op | D | T | fwd ms | fwd+bwd ms | fla / ours fwd | fla / ours fwd+bwd |")
    say("|---|---|---|---|---|---|---|")
    H = 2 if SMOKE else 16
    tokens = 64 if SMOKE else TOKENS
    op, mod = progs["ttt_linear"].op(), kernels(progs["ttt_linear"])
    for D in ((16,) if SMOKE else (128, 64)):
        for T in ([32] if SMOKE else LENGTHS):
            B = tokens // T
            x = inputs("ttt_linear", B, T, H, D, device, torch.bfloat16)
            do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
            rows = {}
            defaults = dict(mod.CONFIG)
            fused = B * H >= defaults["fuse_min_programs"]  # the default at this shape; the other is a row too
            where = lambda f: "output in the walk" if f else "output kernel"
            variants = [(f"{where(fused)}", {})]
            variants.append((f"{where(not fused)}", {"fuse_min_programs": 0} if not fused else {"fuse_output": False}))
            for name, config in variants:
                label = f"lmoec ttt_linear (triton, {name})"
                if over(40):
                    rows[label] = "skipped"
                    continue
                mod.CONFIG.update(defaults, **config)
                leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
                rows[label] = timed(lambda: op(**leaves, backend="triton")[0], do)
            mod.CONFIG.update(defaults)
            if fla_ttt is not None:
                if over(40):
                    rows["fla chunk_ttt_linear"] = "skipped"
                else:
                    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
                    rows["fla chunk_ttt_linear"] = timed(lambda: _call_fla(fla_ttt, leaves, D), do)
            # the torch path last: it is the slowest and the least wanted row
            if over(90):
                rows["lmoec ttt_linear (torch path)"] = "skipped"
            else:
                leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
                rows["lmoec ttt_linear (torch path)"] = timed(lambda: op(**leaves, backend="torch")[0], do)
            peer = rows.get("fla chunk_ttt_linear")
            for label, times in rows.items():
                if times == "skipped":
                    say(f"| {label} | {D} | {T} | skipped: budget | | | |")
                    continue
                ratio = lambda i: (f"{peer[i] / times[i]:.2f}" if isinstance(peer, tuple) and peer[i] and times[i]
                                   else "")
                say(f"| {label} | {D} | {T} | {_fmt(times[0])} | {_fmt(times[1])} | {ratio(0)} | {ratio(1)} |")
            del x, do
            if device == "cuda":
                torch.cuda.empty_cache()
    say()
    say("fla / ours > 1 means lmoec is faster (the issue's target: >= 1.0). fla's chunk_ttt_linear scales each chunk's "
        "update by its last token's learning rate and normalizes its output by a group norm, so it is a timing peer "
        "at the same shapes, not the same function.")
    say()


def profile(progs, device):
    """GPU time per kernel of one TTT-Linear forward+backward (Triton) at T = 8K, D = 128, after a warm-up call."""
    import torch

    if over(60):
        say("## Profile: skipped (budget)")
        return
    H, D = (2, 16) if SMOKE else (16, 128)
    T = 32 if SMOKE else 8192
    B = (64 if SMOKE else TOKENS) // T
    op = progs["ttt_linear"].op()
    leaves = {n: t.requires_grad_() for n, t in inputs("ttt_linear", B, T, H, D, device, torch.bfloat16).items()}
    do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    run = lambda: op(**leaves, backend="triton")[0].backward(do)
    run()
    table = kernel_profile(run, device, rows=12)
    say(f"## Profile: TTT-Linear (Triton) forward+backward, bf16, B={B} T={T} H={H} K=V={D}")
    say("```")
    say(table)
    say("```")
    say()


def check_torch_paths(device):
    """The torch paths on CUDA (fp32, bf16) against the same path in float64 on CPU: what `auto` runs on a GPU."""
    import lmoec
    import torch
    from lmoec.paths import SPECS

    chunk_start = os.path.join(OUT, "titans_chunk.lsm")
    with open(chunk_start, "w") as f:
        f.write(CHUNK_START.format(SPECS / "lsm" / "titans.lsm"))
    progs = {"titans": lmoec.compile_spec(SPECS / "lsm" / "titans.lsm"), "titans_chunk": lmoec.compile_spec(chunk_start),
             "ttt_linear": lmoec.compile_spec(SPECS / "lsm" / "ttt_linear.lsm")}
    say("## Check: torch path on the GPU vs float64 on CPU (relative norm of the difference)")
    say("| spec | case | dtype | worst output / state | worst gradient | ok |")
    say("|---|---|---|---|---|---|")
    failures = 0
    H, D = 2, (16 if SMOKE else 64)
    cases = ({"B=2 T=40": (2, 40, None), "packed [25, 1, 14]": (1, 40, [0, 25, 26, 40])} if SMOKE else
             {"B=2 T=1000": (2, 1000, None), "packed [700, 1, 299]": (1, 1000, [0, 700, 701, 1000])})
    for name, program in progs.items():
        op = program.op()
        for label, (B, T, cu) in cases.items():
            n_seq = B if cu is None else len(cu) - 1
            gen = torch.Generator().manual_seed(T)
            h0 = 0.1 * torch.randn(state_shape(name, n_seq, H, D), generator=gen)
            do = torch.randn(B, T, H, D, generator=gen)
            dht = torch.randn(state_shape(name, n_seq, H, D), generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                if over(30):
                    say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | skipped: budget | | |")
                    continue
                x = inputs(name, B, T, H, D, "cpu", dtype, seed=T)
                want = outputs_and_grads(op, x, h0, do, dht, cu, "cpu", torch.float64, "torch")
                got = outputs_and_grads(op, x, h0, do, dht, cu, device, dtype, "torch")
                errs = {n: rel(got[n], w) for n, w in want.items()}
                worst_o = max(errs["o"], errs["final_state"])
                worst_g = max(e for n, e in errs.items() if n.startswith("d"))
                tol_o, tol_g = TOL[str(dtype).removeprefix("torch.")]
                ok = worst_o <= tol_o and worst_g <= tol_g
                failures += not ok
                log(name, label, dtype, errs)
                say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {worst_o:.2e} | {worst_g:.2e} | "
                    f"{'yes' if ok else 'NO'} |")
    say()
    return failures


def titans_reference(device):
    """fla's titans reference against lmoec's Titans Triton kernels (per token), bf16, H = 16, K = V = 128."""
    import lmoec
    import torch
    from lmoec.paths import SPECS

    ref = None if SMOKE else _fla("fla.ops.titans.naive", "chunk_titans_linear_ref")
    op = lmoec.compile_spec(SPECS / "lsm" / "titans.lsm").op()
    say("## Speed: Titans, median ms, bf16 inputs, B*T = 32768 tokens, H = 16, K = V = 128")
    say("| op | T | fwd ms | fwd+bwd ms | reference / ours fwd | reference / ours fwd+bwd |")
    say("|---|---|---|---|---|---|")
    H, D = (2, 16) if SMOKE else (16, 128)
    for T in ([32] if SMOKE else LENGTHS[:2]):
        B = (64 if SMOKE else TOKENS) // T
        x = inputs("titans", B, T, H, D, device, torch.bfloat16)
        do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        if over(60):
            say(f"| lmoec titans (triton) | {T} | skipped: budget | | | |")
            continue
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        ours = timed(lambda: op(**leaves, backend="triton")[0], do)
        say(f"| lmoec titans (triton) | {T} | {_fmt(ours[0])} | {_fmt(ours[1])} | | |")
        if ref is not None and not over(60):
            leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
            theirs = timed(lambda: _call_fla(ref, leaves, D), do)
            ratio = lambda i: f"{theirs[i] / ours[i]:.2f}" if theirs[i] and ours[i] else ""
            say(f"| fla titans reference | {T} | {_fmt(theirs[0])} | {_fmt(theirs[1])} | {ratio(0)} | {ratio(1)} |")
    say()


def main():
    global SMOKE, BUDGET, OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", help="check, bench, profile, torch and/or titans (default check bench)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 540)),
                   help="seconds this call may use: rows that would start past it are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (TRITON_INTERPRET=1): exercises the script")
    args = p.parse_args()
    args.parts = args.parts or ["check", "bench"]
    if set(args.parts) - {"check", "bench", "profile", "torch", "titans"}:
        p.error(f"parts are check, bench, profile, torch and titans, got {args.parts}")
    SMOKE, BUDGET, OUT = args.smoke, args.budget, args.out
    import torch
    import triton

    device = "cpu" if SMOKE else "cuda"
    os.makedirs(OUT, exist_ok=True)
    say(f"# issue 18: TTT-Linear's Triton kernels on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}")
    say(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"triton {triton.__version__}, budget {BUDGET:.0f} s")
    say()
    failures = 0
    progs = programs(OUT)
    try:
        if "check" in args.parts:
            failures += check(progs, device)
        if "bench" in args.parts:
            bench(progs, device)
        if "profile" in args.parts:
            profile(progs, device)
        if "torch" in args.parts:
            failures += check_torch_paths(device)
        if "titans" in args.parts:
            titans_reference(device)
    finally:
        say(f"({time.monotonic() - START:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
