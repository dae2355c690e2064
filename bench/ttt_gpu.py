"""Test-time-training memories on a GPU (issue 18): check, then time, in one process.

The titans and ttt kinds have no Triton kernels yet; this measures their torch chunkwise paths on the GPU, which is
what `backend="auto"` runs there, against the peers the issue names, so the gap a kernel set must close is measured.

Parts (any subset, in this order):
  check  the torch path on CUDA (fp32 and bf16 inputs) against the same path in float64 on CPU (itself tested against
         the float64 oracle by tests/test_titans.py and tests/test_ttt.py): o, final state and every gradient, T no
         multiple of the chunk, a packed batch with a one-token sequence, initial states. Titans per token
         (specs/lsm/titans.lsm), Titans at chunk-start gradients (minibatch(64)), TTT-Linear (specs/lsm/ttt_linear.lsm).
  bench  median ms (triton.testing.do_bench), bf16 inputs, B*T = 32768 tokens, H = 16, K = V = 128 (TTT also at 64,
         the paper's head dim), T in {2K, 8K, 32K}, forward and forward+backward: lmoec Titans (both forms) and
         TTT-Linear on the torch path; peers in the same process: lmoec's own Gated DeltaNet Triton kernels (the
         issue's target: Titans <= 2x its time), fla's chunk_ttt_linear and its titans reference where fla imports
         (their gate conventions differ in detail: timing only), SDPA causal.

    python bench/ttt_gpu.py check bench [--out DIR]
Writes ttt.md and ttt_log.txt to --out ($OUT when set). `--smoke` runs this script's Python on CPU at tiny sizes
(its numbers mean nothing).
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

TOKENS = 32768
LENGTHS = [2048, 8192, 32768]
CHUNK_START = 'import "{}"\nlsm titans_chunk extends titans {{ update {{ gradient = minibatch(64) }} }}\n'
TOL_O, TOL_GRAD = 2e-3, 1e-2  # bf16 against float64 (DESIGN.md); fp32 inputs get 1e-4
SMOKE = False
REPORT: list[str] = []
LOG: list[str] = []


def say(line=""):
    print(line, flush=True)
    REPORT.append(line)


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def programs(folder):
    import lmoec
    from lmoec.paths import SPECS

    chunk_start = os.path.join(folder, "titans_chunk.lsm")
    with open(chunk_start, "w") as f:
        f.write(CHUNK_START.format(SPECS / "lsm" / "titans.lsm"))
    return {"titans": lmoec.compile_spec(SPECS / "lsm" / "titans.lsm"),
            "titans_chunk": lmoec.compile_spec(chunk_start),
            "ttt_linear": lmoec.compile_spec(SPECS / "lsm" / "ttt_linear.lsm")}


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


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    if not a.isfinite().all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(progs, device):
    import torch

    say("## Check: torch path on the GPU vs float64 on CPU (relative norm of the difference)")
    say("| spec | case | dtype | worst output / state | worst gradient | ok |")
    say("|---|---|---|---|---|---|")
    failures = 0
    H, D = 2, 64
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
                got = {}
                # the same (rounded) inputs in float64 on CPU and in `dtype` on the device
                x = inputs(name, B, T, H, D, "cpu", dtype, seed=T)
                for where, cast in (("cpu", torch.float64), (device, dtype)):
                    leaves = {n: t.to(where, cast).clone().requires_grad_() for n, t in x.items()}
                    state_dtype = torch.float64 if cast == torch.float64 else torch.float32
                    leaves["initial_state"] = h0.to(where, state_dtype).clone().requires_grad_()
                    cu_t = None if cu is None else torch.tensor(cu, device=where, dtype=torch.int32)
                    o, ht = op(**leaves, output_final_state=True, cu_seqlens=cu_t, backend="torch")
                    loss = (o.double() * do.to(where, torch.float64)).sum() + (ht.double() * dht.to(where, torch.float64)).sum()
                    loss.backward()
                    got["want" if cast == torch.float64 else "got"] = {
                        "o": o, "final_state": ht, **{f"d{n}": t.grad for n, t in leaves.items()}}
                want, got = got["want"], got["got"]
                errs = {n: rel(got[n], w) for n, w in want.items()}
                worst_o = max(errs["o"], errs["final_state"])
                worst_g = max(e for n, e in errs.items() if n.startswith("d"))
                tol_o, tol_g = (TOL_O, TOL_GRAD) if dtype == torch.bfloat16 else (1e-4, 1e-4)
                ok = worst_o <= tol_o and worst_g <= tol_g
                failures += not ok
                log(name, label, dtype, errs)
                say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {worst_o:.2e} | {worst_g:.2e} | "
                    f"{'yes' if ok else 'NO'} |")
    say()
    return failures


def ms(fn):
    import triton

    if SMOKE:  # CPU: one timed call (no CUDA events)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def timed(fn, grads):
    """(fwd ms, fwd+bwd ms) of fn() -> output tensor; 'failed' on an error (logged)."""
    try:
        t_f = ms(fn)
        t_fb = ms(lambda: fn().backward(grads))
        return f"{t_f:.3f}", f"{t_fb:.3f}", t_f, t_fb
    except Exception:  # noqa: BLE001 - record and go on
        log(traceback.format_exc())
        return "failed (log)", "", None, None


def _fla_peers():
    peers = {}
    try:
        from fla.ops.ttt import chunk_ttt_linear
        peers["fla chunk_ttt_linear"] = chunk_ttt_linear
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        log("fla ttt not importable:", repr(err))
    try:
        from fla.ops.titans.naive import chunk_titans_linear_ref
        peers["fla titans reference"] = chunk_titans_linear_ref
    except Exception as err:  # noqa: BLE001
        log("fla titans reference not importable:", repr(err))
    return peers


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


def bench(progs, device):
    import torch
    import torch.nn.functional as F

    import lmoec
    from lmoec.paths import SPECS

    gdn = lmoec.compile_spec(SPECS / "lsm" / "gated_deltanet.lsm").op()
    peers = _fla_peers()
    say("## Speed: median ms, bf16 inputs, B*T = 32768 tokens, H = 16")
    say("| op | D | T | fwd ms | fwd+bwd ms | fwd / GDN | fwd+bwd / GDN |")
    say("|---|---|---|---|---|---|---|")
    H = 4 if SMOKE else 16
    lengths = [64, 128] if SMOKE else LENGTHS
    tokens = 256 if SMOKE else TOKENS
    for D in ((16,) if SMOKE else (128, 64)):
        for T in lengths:
            B = tokens // T
            rows = []
            g = inputs("titans", B, T, H, D, device, torch.bfloat16)
            gd = {"q": g["q"], "k": g["k"], "v": g["v"], "g": F.logsigmoid(g["eta"].float() + 2).to(g["q"].dtype),
                  "beta": g["theta"]}
            do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
            leaves = {n: t.requires_grad_() for n, t in gd.items()}
            backend = "torch" if SMOKE else "triton"
            base = timed(lambda: gdn(**leaves, backend=backend)[0], do)
            rows.append((f"lmoec gated_deltanet ({backend})", base))
            for name, program in progs.items():
                op = program.op()
                leaves = {n: t.requires_grad_() for n, t in inputs(name, B, T, H, D, device, torch.bfloat16).items()}
                rows.append((f"lmoec {name} (torch path)", timed(lambda: op(**leaves, backend="torch")[0], do)))
            for peer, fn in peers.items():
                name = "ttt_linear" if "ttt" in peer else "titans"
                leaves = {n: t.requires_grad_() for n, t in inputs(name, B, T, H, D, device, torch.bfloat16).items()}
                rows.append((peer, timed(lambda: _call_fla(fn, leaves, D), do)))
            if T == lengths[-1]:
                qkv = [t.transpose(1, 2).detach().requires_grad_() for t in (g["q"], g["k"], g["v"])]
                rows.append(("SDPA causal", timed(lambda: F.scaled_dot_product_attention(*qkv, is_causal=True),
                                                  do.transpose(1, 2))))
            for label, (f_txt, fb_txt, t_f, t_fb) in rows:
                ratio_f = f"{t_f / base[2]:.2f}" if t_f and base[2] else ""
                ratio_fb = f"{t_fb / base[3]:.2f}" if t_fb and base[3] else ""
                say(f"| {label} | {D} | {T} | {f_txt} | {fb_txt} | {ratio_f} | {ratio_fb} |")
    say()
    say("Ratios are against lmoec's Gated DeltaNet Triton kernels at the same shape (the issue's target for Titans: "
        "<= 2x once it has Triton kernels; these rows are its torch path). fla's TTT gates its learning rate and "
        "LayerNorm slightly differently from specs/lsm/ttt_linear.lsm; both fla rows are timing peers only.")


def main():
    global SMOKE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", help="check and/or bench (default both)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: exercises the script, numbers mean nothing")
    args = p.parse_args()
    args.parts = args.parts or ["check", "bench"]
    if set(args.parts) - {"check", "bench"}:
        p.error(f"parts are check and bench, got {args.parts}")
    SMOKE = args.smoke
    import torch

    device = "cpu" if SMOKE else "cuda"
    os.makedirs(args.out, exist_ok=True)
    say(f"# issue 18: test-time-training memories on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}")
    say(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")
    say()
    failures = 0
    progs = programs(args.out)
    try:
        if "check" in args.parts:
            failures += check(progs, device)
        if "bench" in args.parts:
            bench(progs, device)
    finally:
        with open(os.path.join(args.out, "ttt.md"), "w") as f:
            f.write("\n".join(REPORT) + "\n")
        with open(os.path.join(args.out, "ttt_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
