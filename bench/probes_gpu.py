"""Diagnostic probes of emitted kernels on a GPU, for faults the family checks found (bench/results/run11).

  rwkv6         RWKV6's whole-chunk dq/dk (CONFIG bonus_whole_chunk) against its sub-chunk kernel on the same
                inputs, fp32 and bf16, K = V = 64 and 128, with and without packed sequences: dq's and dk's relative
                gap, and dk's by position in the chunk (quarters), by K block of 64 and by head. In run 11, with two
                passes over V (V block 64) dk drifted (1.8e-3 in fp32 against dq's 5.6e-4, worst in the first
                quarter); with one pass (V block 128, now the default) both agree.
  delta-vector  which buffer of the vector-decay delta kernels' backward goes non-finite (run 11: o, the final state
                and dq pass; dk, dv, dg, dbeta and dh0 are not finite in bf16). Each buffer the module allocates
                (its `_new`, which fills with NaN under POISON) is recorded in order, and after forward and backward
                each one's shape and NaN / inf counts are printed, for bf16 and fp32 inputs, with poison on and off
                (NaN only with poison on: an element no kernel writes; with it off too: arithmetic or a bad read), at
                the default settings and at wu = "kernel"; then, bf16 with poison, at the launch settings in which the
                spec differs from Gated DeltaNet (which passes), as fla found Triton 3.4-3.7.0 miscompiling delta-rule
                backward kernels on Hopper at some warp counts. One SUMMARY line per run names the gradients that
                are not finite. On CPU (the interpreter rounding as the GPU does) every run is finite, at this shape
                too.

    python bench/probes_gpu.py rwkv6 delta-vector [--out DIR] [--small]
--small runs tiny shapes, for the interpreter on CPU (this script's Python, not its numbers).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families_gpu as fg  # noqa: E402 (after the path)


def probe_rwkv6(small: bool) -> list:
    import torch

    tri, _, _ = fg.build("rwkv6")
    lines = ["| dtype | K | T | lens | dq | dk | dk by quarter of the chunk | dk by K block | dk by head |",
             "|---|---|---|---|---|---|---|---|---|"]
    shapes = (((32, 70, None), (32, 137, [10, 90, 37])) if small else
              ((128, 2085, None), (64, 2085, None), (128, 2337, [100, 1500, 37, 700])))
    dtypes = (torch.float32,) if small else (torch.float32, torch.bfloat16)
    default = tri.CONFIG["bonus_whole_chunk"]
    for dtype in dtypes:
        for K, T, lens in shapes:
            torch.manual_seed(0)
            B = 1 if lens else 2
            x = fg.make_inputs("rwkv6", tri, B, T, 4, K, K, dtype)
            cu = fg.cu_seqlens(lens)
            do = torch.randn(B, T, 4, K, device=fg.DEVICE, dtype=dtype)
            grads = {}
            for whole in (False, True):
                tri.CONFIG["bonus_whole_chunk"] = whole
                xs = {n: t.clone().requires_grad_(True) for n, t in x.items()}
                o, _ = fg.call(tri, xs, None, False, cu)
                grads[whole] = torch.autograd.grad((o.float() * do.float()).sum(), [xs["q"], xs["k"]])
            (dq0, dk0), (dq1, dk1) = grads[False], grads[True]
            dk0, dk1 = dk0.reshape(-1, 4, K).double(), dk1.reshape(-1, 4, K).double()
            pos = torch.arange(dk0.shape[0], device=fg.DEVICE)
            if lens:  # position within each sequence
                starts = torch.tensor([0] + lens, device=fg.DEVICE).cumsum(0)[:-1]
                pos = pos - starts[torch.bucketize(pos, starts, right=True) - 1]
            quarter = (pos % 64) // 16
            gap = lambda a, b: f"{((a - b).norm() / b.norm()).item():.1e}"
            by_q = " ".join(gap(dk1[quarter == i], dk0[quarter == i]) for i in range(4))
            by_k = " ".join(gap(dk1[..., j:j + 64], dk0[..., j:j + 64]) for j in range(0, K, 64))
            by_h = " ".join(gap(dk1[:, h], dk0[:, h]) for h in range(4))
            lines.append(f"| {str(dtype)[6:]} | {K} | {T} | {lens or ''} | {fg.rel(dq1, dq0):.1e} | "
                         f"{fg.rel(dk1, dk0):.1e} | {by_q} | {by_k} | {by_h} |")
            print(lines[-1], flush=True)
    tri.CONFIG["bonus_whole_chunk"] = default
    return lines


def probe_delta_vector(small: bool) -> list:
    import torch

    tri, _, _ = fg.build("gated_delta_vector")
    allocations, stage, new = [], ["forward"], tri._new

    def recording_new(shape, dtype, device):
        t = new(shape, dtype, device)
        allocations.append((stage[0], tuple(shape), str(dtype)[6:], t))
        return t

    tri._new = recording_new
    B, T, H, D = (1, 70, 1, 32) if small else (2, 2085, 4, 128)
    lines, defaults = [], dict(tri.CONFIG)
    # the launch settings that differ from Gated DeltaNet's (which passes): fla finds Triton 3.4-3.7.0 miscompiling
    # delta-rule backward kernels on Hopper at 4 and 8 warps (fla-org/flash-linear-attention#984, #988, #640)
    narrow = {"warps_dstate": 2, "warps_dqk": 2, "warps_wy_bwd": 2}
    runs = [(s, d, p) for s in ({}, {"wu": "kernel"}) for d in (torch.bfloat16, torch.float32) for p in (True, False)]
    runs += [(s, torch.bfloat16, True) for s in (narrow, {"warps_wy_bwd": 4}, {"stages": 1}, {"warps_ut": 1})]
    for setting, dtype, poison in runs:
        tri.CONFIG.update(defaults, **setting)
        fg.set_poison(tri, poison)
        torch.manual_seed(0)
        x = fg.make_inputs("gated_delta_vector", tri, B, T, H, D, D, dtype)
        xs = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        h0 = torch.randn(B, H, D, D, device=fg.DEVICE, requires_grad=True)
        allocations.clear()
        stage[0] = "forward"
        o, ht = fg.call(tri, xs, h0, True)
        stage[0] = "backward"
        loss = (o.float() * torch.randn_like(o.float())).sum() + (ht * torch.randn_like(ht)).sum()
        grads = torch.autograd.grad(loss, list(xs.values()) + [h0])
        lines.append(f"### {setting or 'defaults'}, {str(dtype)[6:]}, poison {poison}")
        for name, g in zip(list(xs) + ["h0"], grads):
            lines.append(f"- d{name}: NaN {int(torch.isnan(g).sum())}, inf {int(torch.isinf(g).sum())}")
        bad = [name for name, g in zip(list(xs) + ["h0"], grads) if not torch.isfinite(g).all()]
        print(f"SUMMARY {setting or 'defaults'} {str(dtype)[6:]} poison {poison}: not finite: {bad or 'none'}",
              flush=True)
        for i, (when, shape, dt, t) in enumerate(allocations):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            where = ""
            if nan and t.dim() >= 2:
                idx = torch.isnan(t).nonzero()
                where = f" first NaN at {idx[0].tolist()}, last at {idx[-1].tolist()}"
            lines.append(f"  - {when} buffer {i} {list(shape)} {dt}: NaN {nan}, inf {inf}{where}")
        print("\n".join(lines[-(len(allocations) + 9):]), flush=True)
    tri.CONFIG.update(defaults)
    fg.set_poison(tri, False)
    tri._new = new
    return lines


PROBES = {"rwkv6": probe_rwkv6, "delta-vector": probe_delta_vector}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", choices=list(PROBES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny shapes (the interpreter on CPU)")
    opts = ap.parse_args()
    if opts.small:
        fg.DEVICE = "cpu"
    for name in opts.probes:
        lines = PROBES[name](opts.small)
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, f"probe_{name}.md"), "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
