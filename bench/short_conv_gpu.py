"""The short convolution's kernels (lmoec/runtime/short_conv.py) on a GPU: check, then time against torch's path.

check  conv_silu in fp32 and bf16 against torch's path (lmoec.runtime.memories.segment_conv without the kernels)
       in float64 on the same inputs: packed segments like a MoM layer's (lengths 0, 1, 2, 3 and long ones) with a
       state, and equal-length rows without one; the output and the gradients of rows, weight and state, relative
       norm of the difference (bf16 <= 1e-2 as the kernels' checks, fp32 <= 1e-5).
bench  median ms (do_bench), bf16: one MoM-sized call (98,304 rows = 32K tokens x (top-2 + shared), 2,048 channels,
       width 4, 12 segments) and one plain-layer call (B 4, T 8192, 2,048 channels): forward and fwd+bwd of the
       kernels against torch's path (segment_conv's conv1d over the transposed rows; the layer's conv1d of
       [B, C, T]).

    python bench/short_conv_gpu.py check bench [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import types

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from lmoec.bench import kernel_ms, write_report  # noqa: E402

REPORT: list[str] = []


def say(line="", out="."):
    REPORT.append(line)
    write_report(out, "short_conv", REPORT, [])


def torch_path(rows, weight, state, cu):
    """segment_conv with the kernels off: torch's conv1d over the packed rows, the segment starts made again."""
    from lmoec.runtime import memories, short_conv

    slots = types.SimpleNamespace(segments=cu.numel() - 1, cu_seqlens=cu)
    fused, short_conv.fused = short_conv.fused, lambda x: False
    try:
        return memories.segment_conv(rows, weight[:, None, :], slots, state)[0]
    finally:
        short_conv.fused = fused


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def check(out):
    import torch

    from lmoec.runtime.short_conv import conv_silu

    say("## Check: conv_silu vs torch's path in float64 (relative norm of the difference)", out)
    say("| case | dtype | y | d rows | d weight | d state | ok |", out)
    say("|---|---|---|---|---|---|---|", out)
    failures = 0
    cases = {"packed [0, 1, 2, 3, 900, 1500, 37]": [0, 1, 2, 3, 900, 1500, 37], "2 rows of 1000, no state": [1000, 1000]}
    for label, lens in cases.items():
        torch.manual_seed(0)
        C, S, W = 2048, sum(lens), 4
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
        x = torch.randn(S, C, device="cuda", dtype=torch.float64)
        w = torch.randn(C, W, device="cuda", dtype=torch.float64) * 0.5
        st = None if "no state" in label else torch.randn(len(lens), W - 1, C, device="cuda", dtype=torch.float64)
        dy = torch.randn(S, C, device="cuda", dtype=torch.float64)
        leaves = [t.requires_grad_() for t in (x, w, st) if t is not None]
        want = torch_path(x, w, st, cu)
        want_grads = torch.autograd.grad((want * dy).sum(), leaves)
        segments = ({"length": lens[0]} if "no state" in label else
                    {"cu_seqlens": cu, "segment": torch.repeat_interleave(torch.arange(len(lens), device="cuda"),
                                                                          torch.tensor(lens, device="cuda"))})
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            cast = [t.detach().to(dtype if i != 1 else torch.float32).requires_grad_() for i, t in enumerate(leaves)]
            y = conv_silu(cast[0], cast[1], cast[2] if st is not None else None, **segments)
            grads = torch.autograd.grad((y.float() * dy.float()).sum(), cast)
            errs = [rel(y, want)] + [rel(g, w_) for g, w_ in zip(grads, want_grads)]
            ok = all(e <= tol for e in errs) and torch.isfinite(y).all().item()
            failures += not ok
            cells = " | ".join(f"{e:.1e}" for e in errs) + (" | |" if st is None else " |")
            say(f"| {label} | {str(dtype).removeprefix('torch.')} | {cells} {'yes' if ok else 'NO'} |", out)
    say("", out)
    return failures


def bench(out):
    import torch
    import torch.nn.functional as F

    from lmoec.runtime.short_conv import conv_silu

    say("## Speed: median ms, bf16, width 4", out)
    say("| call | kernels fwd | kernels fwd+bwd | torch fwd | torch fwd+bwd | torch / kernels (fwd, fwd+bwd) |", out)
    say("|---|---|---|---|---|---|", out)
    C, W = 2048, 4
    lens = torch.full((12,), 8192).tolist()
    S = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    seg = torch.repeat_interleave(torch.arange(12, device="cuda"), torch.tensor(lens, device="cuda"))
    x = torch.randn(S, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(C, W, device="cuda", requires_grad=True)
    st = torch.randn(12, W - 1, C, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(S, C, device="cuda", dtype=torch.bfloat16)
    rows = {"MoM rows (98,304 x 2,048, 12 segments, state)":
            (lambda: conv_silu(x, w, st, cu_seqlens=cu, segment=seg), lambda: torch_path(x, w.to(x.dtype), st, cu))}
    xb = torch.randn(4, 8192, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wc = w.detach().view(C, 1, W).requires_grad_()

    def layer_torch():
        window = torch.cat([xb.new_zeros(4, W - 1, C), xb], 1)
        return F.silu(F.conv1d(window.transpose(1, 2), wc.to(xb.dtype), groups=C).transpose(1, 2)).contiguous()

    rows["plain layer (B 4, T 8192, 2,048 channels)"] = (
        lambda: conv_silu(xb.view(-1, C), w, None, length=8192), layer_torch)
    for label, (kernels, reference) in rows.items():
        times = []
        for fn in (kernels, reference):
            times.append(kernel_ms(fn, False, warmup=10, rep=50))
            y = fn()
            grad = dy if y.shape == dy.shape else torch.randn_like(y)
            times.append(kernel_ms(lambda: fn().backward(grad), False, warmup=10, rep=50))
        say(f"| {label} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | {times[3]:.3f} | "
            f"**{times[2] / times[0]:.2f}x, {times[3] / times[1]:.2f}x** |", out)
    say("", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["check", "bench"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    opts = ap.parse_args()
    import torch
    import triton

    os.makedirs(opts.out, exist_ok=True)
    say(f"# Short convolution kernels on {torch.cuda.get_device_name()} ({datetime.date.today()})", opts.out)
    say(f"torch {torch.__version__}, triton {triton.__version__}", opts.out)
    say("", opts.out)
    failures = check(opts.out) if "check" in opts.parts else 0
    if "bench" in opts.parts:
        bench(opts.out)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
