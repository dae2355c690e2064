"""The element-wise kind's Triton kernels on a GPU (issue 17): check, then time, in one process.

Parts (any subset, in this order):
  check  bf16 Triton (specs/lsm/mamba.lsm, gfw.lsm) vs the same spec's float32 torch chunkwise backend (itself tested
         against the float64 oracle on CPU): o, final state and every gradient, T no multiple of the scan, initial
         state, a packed batch with a one-token sequence; fp32 Triton too. Outputs are poisoned (NaN) first.
  sweep  Mamba's walk at the default segment policy, whole, and cut into segments of 512 to 8192 tokens (SWEEP), at
         T = 8K and 32K:
         forward, then fwd+bwd of the four fastest.
  bench  median ms (triton.testing.do_bench) at B*T = 32K tokens, T in {2K, 8K, 32K}, bf16:
         Mamba's selective scan (d_inner 2048 = 32 heads x V 64, N = K = 16) forward and forward+backward against the
         memory floor (u, dt, B, C, z read once and y written once, bf16, at 3.0 TB/s) and against mamba_ssm's CUDA
         selective_scan_fn where it imports; GFW (16 heads, K 64, V 128) against fla's chunk_gla at the same shape
         where fla imports. Each launch setting in SETTINGS is timed (tests/test_hopper_compile.py compiled them).

    python bench/elementwise_gpu.py check bench [--out DIR]
Writes elementwise.md and elementwise_log.txt to --out ($OUT when set). `--smoke` (with TRITON_INTERPRET=1, on CPU)
runs this script's Python at tiny sizes, with the interpreter rounding bf16 and tf32 as the GPU does
(tests/interpreter_bf16.py): its timings mean nothing, its check rows are the kernels' at those sizes.
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

from lmoec.bench import kernel_ms, write_report  # noqa: E402 (after the path)

TOKENS = 32768
LENGTHS = [2048, 8192, 32768]
MAMBA = dict(H=32, K=16, V=64)  # d_inner 2048, N 16
GFW = dict(H=16, K=64, V=128)
# the settings each op is timed at (run 16 timed the run-12 Mamba default and GFW at block_v 16: bench/results/run16)
SETTINGS = {"mamba": {"default": {}, "whole sequences (no segments)": {"walk_programs": 0}},
            "gfw": {"default": {}, "chunk form": {"form": "chunk"}, "chunk form, chunk_block_v 32": {"form": "chunk",
                    "chunk_block_v": 32}, "chunk form, bf16 forward products": {"form": "chunk",
                    "chunk_forward_tf32": False}, "chunk form, whole sequences": {"form": "chunk", "walk_programs": 0},
                    "whole sequences (no segments)": {"walk_programs": 0}}}
BANDWIDTH = 3.0e12  # H100 device copy, bytes/s (DESIGN.md)
TOL_O, TOL_GRAD = 2e-3, 1e-2  # bf16 against fp32 (DESIGN.md); fp32 Triton (ieee tl.dot in the chunk form) gets 1e-4

REPORT: list[str] = []
LOG: list[str] = []


OUT_DIR = ""  # --out: the report and the log are rewritten there after every line (a call cut off keeps them)


def _flush():
    if OUT_DIR:
        write_report(OUT_DIR, "elementwise", REPORT, LOG)


def say(line=""):
    print(line, flush=True)
    REPORT.append(line)
    _flush()


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)
    _flush()


def inputs(name, B, T, H, K, V, dtype, device, seed=0):
    """Op keyword arguments: Mamba's dt = softplus(.), A = -exp(.) (S4D-real-like); GFW's logsigmoid gates / 16."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    out = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if name == "mamba":
        out["q"], out["k"] = out["q"] / K ** 0.5, out["k"] / K ** 0.5
        out["dt"] = F.softplus(randn(B, T, H, V) - 3)
        out["A"] = -torch.arange(1, K + 1, dtype=torch.float32).expand(H, V, K).contiguous()
    else:
        out["g"] = F.logsigmoid(randn(B, T, H, K)) / 16
        out["gv"] = F.logsigmoid(randn(B, T, H, V)) / 16
    return {n: x.to(device=device, dtype=torch.float32 if n == "A" else dtype) for n, x in out.items()}


def rel(a, b):
    a, b = a.double(), b.double()
    if not a.isfinite().all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(programs, device):
    import torch

    say("## Check: Triton vs the float32 torch chunkwise backend (relative norm of the difference)")
    say("| spec | case | dtype | worst output / state | worst gradient | ok |")
    say("|---|---|---|---|---|---|")
    failures = 0
    for name, program in programs.items():
        op = program.op()
        module = getattr(program.package, f"{name}_triton")
        module.POISON = True
        dims = MAMBA if name == "mamba" else GFW
        cases = ({"B=2 T=40": (2, 40, None), "packed [25, 1, 14]": (1, 40, [0, 25, 26, 40])} if SMOKE else
                 {"B=2 T=1000": (2, 1000, None), "packed [700, 1, 299]": (1, 1000, [0, 700, 701, 1000])})
        cases = {label: (*shape, {}) for label, shape in cases.items()}
        if name == "gfw":  # the outer sum's chunk form (CONFIG "form": "chunk") at the same shapes
            cases.update({f"{label}, chunk form": (*shape[:3], {"form": "chunk"}) for label, shape in cases.items()})
        if not SMOKE:  # one sequence: the default segment policy cuts it (LASP-2 within the GPU)
            rows = module._layout(1, 3000, dims["H"], dims["V"], None, device)
            cases[f"B=1 T=3000 in {rows.bounds.numel() - 1} segments"] = (1, 3000, None, {})
            if name == "gfw":
                rows = module._os_rows(1, 3000, dims["H"], dims["V"], None, device)
                cases[f"B=1 T=3000, chunk form in {rows.bounds.numel() - 1} segments"] = (1, 3000, None, {"form": "chunk"})
        defaults = dict(module.CONFIG)
        for label, (B, T, cu, setting) in cases.items():
            module.CONFIG.update(defaults, **setting)
            for dtype in (torch.bfloat16, torch.float32):
                x = inputs(name, B, T, dims["H"], dims["K"], dims["V"], dtype, device, seed=T)
                n_seq = B if cu is None else len(cu) - 1
                x["initial_state"] = torch.randn(n_seq, dims["H"], dims["K"], dims["V"], device=device)
                cu_t = None if cu is None else torch.tensor(cu, device=device, dtype=torch.int32)
                do = torch.randn(B, T, dims["H"], dims["V"], device=device)
                dht = torch.randn(n_seq, dims["H"], dims["K"], dims["V"], device=device)
                got = {}
                for backend, cast in (("triton", dtype), ("torch", torch.float32)):
                    leaves = {n: t.detach().to(torch.float32 if n in ("A", "initial_state") else cast).requires_grad_()
                              for n, t in x.items()}
                    o, ht = op(**leaves, output_final_state=True, cu_seqlens=cu_t, backend=backend)
                    ((o.float() * do).sum() + (ht * dht).sum()).backward()
                    got[backend] = {"o": o, "final_state": ht, **{f"d{n}": t.grad for n, t in leaves.items()}}
                errs = {n: rel(got["triton"][n], want) for n, want in got["torch"].items()}
                worst_o = max(errs["o"], errs["final_state"])
                worst_g = max(e for n, e in errs.items() if n.startswith("d"))
                tol_o, tol_g = (TOL_O, TOL_GRAD) if dtype == torch.bfloat16 else (1e-4, 1e-4)
                ok = worst_o <= tol_o and worst_g <= tol_g
                failures += not ok
                log(name, label, dtype, errs)
                say(f"| {name} | {label} | {str(dtype).removeprefix('torch.')} | {worst_o:.2e} | {worst_g:.2e} | "
                    f"{'yes' if ok else 'NO'} |")
        module.CONFIG.update(defaults)
        module.POISON = False
    say()
    return failures


SMOKE = False


def ms(fn):
    return kernel_ms(fn, SMOKE, warmup=25, rep=100)


def bench(programs, device):
    import torch

    say("## Speed: median ms, bf16, B*T = 32768 tokens")
    say(f"Mamba: d_inner {MAMBA['H'] * MAMBA['V']} (H {MAMBA['H']} x V {MAMBA['V']}), N = K = {MAMBA['K']}. Floor: u, dt, "
        "B, C, z read once, y written once (bf16) at 3.0 TB/s; bwd floor: those read again plus do read and du, "
        "ddt, dB, dC, dz written once.")
    say()
    say("| op | setting | T | fwd ms | fwd+bwd ms | fwd / floor | fwd+bwd / floor | peer fwd | peer fwd+bwd |")
    say("|---|---|---|---|---|---|---|---|---|")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        selective_scan_fn = None
        log("mamba_ssm not importable:", repr(err))
    try:
        from fla.ops.gla import chunk_gla
    except Exception as err:  # noqa: BLE001
        chunk_gla = None
        log("fla not importable:", repr(err))
    for name, program in programs.items():
        op = program.op()
        module = getattr(program.package, f"{name}_triton")
        dims = MAMBA if name == "mamba" else GFW
        H, K, V = dims["H"], dims["K"], dims["V"]
        defaults = dict(module.CONFIG)
        for T in LENGTHS:
            B = TOKENS // T
            x = inputs(name, B, T, H, K, V, torch.bfloat16, device)
            leaves = {n: t.requires_grad_() for n, t in x.items()}
            do = torch.randn(B, T, H, V, device=device, dtype=torch.bfloat16)
            d_inner = H * V
            if name == "mamba":
                fwd_bytes = TOKENS * (4 * d_inner + 2 * K) * 2
                floor = fwd_bytes / BANDWIDTH * 1e3
                # backward: u, dt, z, do, B, C read; du, ddt, dz, dB, dC written
                floor_fb = floor + TOKENS * (4 * d_inner + 2 * K + 3 * d_inner + 2 * K) * 2 / BANDWIDTH * 1e3
            else:
                floor = TOKENS * H * (3 * K + 3 * V) * 2 / BANDWIDTH * 1e3  # q, k, g, v, gv read; o written
                floor_fb = floor * 3
            peer = ("", "")
            if name == "mamba" and selective_scan_fn is not None:
                peer = _mamba_peer(selective_scan_fn, x, B, T, H, K, V, device)
            if name == "gfw" and chunk_gla is not None:
                peer = _gla_peer(chunk_gla, x, do)
            for label, setting in SETTINGS[name].items():
                module.CONFIG.update(defaults, **setting)
                try:
                    t_f = ms(lambda: op(**leaves, backend="triton"))
                    t_fb = ms(lambda: op(**leaves, backend="triton")[0].backward(do))
                    say(f"| {name} | {label} | {T} | {t_f:.3f} | {t_fb:.3f} | {t_f / floor:.2f} | {t_fb / floor_fb:.2f} | "
                        f"{peer[0]} | {peer[1]} |")
                except Exception:  # noqa: BLE001 - record and go on to the next setting
                    log(traceback.format_exc())
                    say(f"| {name} | {label} | {T} | failed (log) | | | | | |")
            module.CONFIG.update(defaults)
    say()
    say("Peers: mamba_ssm selective_scan_fn (u, delta with delta_bias and softplus, A, B, C, D, z) for Mamba; fla "
        "chunk_gla (q, k, v, g at the same K, V; no value gate) for GFW. Empty: the peer did not import (log).")


# Mamba's forward sat at 19x its memory floor in run 12 at the tile walk's two timed settings; run 13 timed a grid of
# launch settings (bench/results/run13/mamba_sweep_*.md: the default since is its fastest). Run 16 found segments
# (docs/STATE_PASS.md) decisive at one 32K sequence and harmful at 8K (2,048 tokens: 4.61 -> 2.63 ms and 1.38 -> 2.56 ms
# forward); the policy by program count set from those two points (CONFIG walk_programs) is the default, and this
# sweep times it against whole sequences and forced segment lengths at 8K and 32K. (Run 16 also timed a forward walked
# token by token: slower at all 20 of its settings; not kept.)
FORCED = dict(walk_programs=10**9, segment_programs=10**9)
SWEEP = [{}, dict(walk_programs=0)] + [dict(FORCED, segment_chunks=n // 16) for n in (512, 1024, 2048, 4096, 8192)]


def _label(setting, defaults):
    config = dict(defaults, **setting)
    cut = ("policy" if not setting else "never" if not config["walk_programs"]
           else f"{config['segment_chunks'] * config['scan']} tokens")
    return " | ".join(str(config[key]) for key in ("scan", "block_v", "num_warps")) + f" | {cut}"


def sweep(programs, device):
    """Mamba's walk at the SWEEP settings, T = 8K and 32K: forward ms of each, then fwd+bwd of the four fastest."""
    import torch

    program = programs["mamba"]
    op, module = program.op(), getattr(program.package, "mamba_triton")
    H, K, V = MAMBA["H"], MAMBA["K"], MAMBA["V"]
    defaults = dict(module.CONFIG)
    lengths = [64] if SMOKE else [8192, 32768]
    say(f"## Mamba's walk: launch settings (median ms, bf16, B*T = {TOKENS} tokens)")
    say()
    say("| scan | block_v | warps | segments | " + " | ".join(f"fwd ms T={T} | fwd+bwd ms T={T}" for T in lengths) + " |")
    say("|---|---|---|---|" + "---|---|" * len(lengths))
    data = {}
    for T in lengths:
        leaves = {n: t.requires_grad_() for n, t in inputs("mamba", TOKENS // T, T, H, K, V, torch.bfloat16, device).items()}
        data[T] = leaves, torch.randn(TOKENS // T, T, H, V, device=device, dtype=torch.bfloat16)
    timed = []
    for setting in (SWEEP[:3] if SMOKE else SWEEP):
        module.CONFIG.update(defaults, **setting)
        try:
            forward = [ms(lambda: op(**data[T][0], backend="triton")) for T in lengths]
        except Exception:  # noqa: BLE001 - a setting that does not compile or run: logged, the next one
            log(setting, traceback.format_exc())
            continue
        timed.append((sum(forward), setting))
        say(f"| {_label(setting, defaults)} | " + " | ".join(f"{t:.3f} | " for t in forward) + " |")
    for _, setting in sorted(timed, key=lambda r: r[0])[:4]:
        module.CONFIG.update(defaults, **setting)
        cells = []
        for T in lengths:
            leaves, do = data[T]
            try:
                cells.append(f"{ms(lambda: op(**leaves, backend='triton')):.3f} | "
                             f"{ms(lambda: op(**leaves, backend='triton')[0].backward(do)):.3f}")
            except Exception:  # noqa: BLE001
                log(setting, traceback.format_exc())
                cells.append("failed (log) |")
        say(f"| {_label(setting, defaults)} | " + " | ".join(cells) + " |")
    module.CONFIG.update(defaults)
    say()
    say(f"Default: {defaults}. Forward rows first, then forward and fwd+bwd of the four fastest forwards.")


def _mamba_peer(selective_scan_fn, x, B, T, H, K, V, device):
    """(fwd ms, fwd+bwd ms) of mamba_ssm's CUDA selective scan on the same tokens: u, delta [B, D, T], B, C [B, N, T]."""
    import torch

    D = H * V
    u = x["v"].permute(0, 2, 3, 1).reshape(B, D, T).detach().contiguous().requires_grad_()
    delta = x["dt"].permute(0, 2, 3, 1).reshape(B, D, T).detach().contiguous().requires_grad_()
    A = x["A"].reshape(D, K).detach().contiguous().requires_grad_()
    Bm = x["k"][:, :, 0].transpose(1, 2).detach().contiguous().requires_grad_()
    Cm = x["q"][:, :, 0].transpose(1, 2).detach().contiguous().requires_grad_()
    Dskip = torch.ones(D, device=device, requires_grad=True)
    z = torch.randn_like(u).requires_grad_()
    bias = torch.zeros(D, device=device, requires_grad=True)
    dy = torch.randn_like(u)

    def run():
        return selective_scan_fn(u, delta, A, Bm, Cm, Dskip, z, bias, delta_softplus=True)

    try:
        return f"{ms(run):.3f}", f"{ms(lambda: run().backward(dy)):.3f}"
    except Exception:  # noqa: BLE001
        log(traceback.format_exc())
        return "failed", ""


def _gla_peer(chunk_gla, x, do):
    q, k, v, g = (x[n].detach().requires_grad_() for n in ("q", "k", "v", "g"))

    def run():
        return chunk_gla(q, k, v, g)[0]

    try:
        return f"{ms(run):.3f}", f"{ms(lambda: run().backward(do)):.3f}"
    except Exception:  # noqa: BLE001
        log(traceback.format_exc())
        return "failed", ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=["check", "bench", "sweep"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: the script's Python only")
    args = parser.parse_args()
    import torch
    import triton

    import lmoec

    global SMOKE, TOKENS, LENGTHS, OUT_DIR
    device = "cuda"
    os.makedirs(args.out, exist_ok=True)
    OUT_DIR = args.out
    if args.smoke:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import interpreter_bf16

        interpreter_bf16.install(tf32=True)
        SMOKE, TOKENS, LENGTHS, device = True, 64, [32, 64], "cpu"
        MAMBA.update(H=2, K=4, V=8)
        GFW.update(H=2, K=4, V=8)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run: no meaningful numbers)"
    say(f"# Element-wise kind on {gpu} ({datetime.date.today()})")
    say(f"torch {torch.__version__}, triton {triton.__version__}")
    say()
    programs = {name: lmoec.compile_spec(os.path.join(ROOT, "specs", "lsm", f"{name}.lsm")) for name in ("mamba", "gfw")}
    failures = 0
    start = time.time()
    if "check" in args.parts:
        failures = check(programs, device)
    if "bench" in args.parts:
        bench(programs, device)
    if "sweep" in args.parts:
        sweep(programs, device)
    log(f"took {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
