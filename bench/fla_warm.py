"""Fill Triton's on-disk compile cache with fla's kernels, in a process of its own.

fla 0.6.0 autotunes chunk_gla over many launch configurations, and compiling them takes minutes: longer
than a device call has left after lmoec's own rows. Run this in the background while the (untimed) check
of bench/triton_gpu.py runs; when the benchmark then meets fla it still autotunes in its own process
(the configurations are timed there, on an idle GPU), but every compile is a cache hit.

    python bench/fla_warm.py [--T 2048,8192,32768]
Nothing here is timed or reported: it only compiles (and runs) fla's ops at the benchmark's shapes.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="2048,8192,32768")
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    opts = ap.parse_args()
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    t0 = time.time()
    for T in (int(t) for t in opts.T.split(",")):
        B, H, D = 32768 // T, opts.H, opts.D
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        for strength in (1, 16):  # the benchmark's normal and strong-decay gates
            g = (F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16 * strength).requires_grad_(True)
            chunk_gla(q, k, v, g=g, scale=D ** -0.5)[0].sum().backward()
        gs = F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 4
        with torch.no_grad():
            chunk_simple_gla(q, k, v, g=gs, scale=D ** -0.5)
        try:
            gs.requires_grad_(True)
            chunk_simple_gla(q, k, v, g=gs, scale=D ** -0.5)[0].sum().backward()
        except Exception as e:  # noqa: BLE001 - its gated backward refuses on Hopper with Triton 3.6
            print(f"fla_warm: chunk_simple_gla backward: {type(e).__name__}", flush=True)
        torch.cuda.synchronize()
        print(f"fla_warm: T={T} compiled, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
