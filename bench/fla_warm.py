"""Fill Triton's on-disk compile cache with fla's kernels, in a process of its own.

fla 0.6.0 autotunes its ops over many launch configurations, and compiling them takes minutes: longer than a
device call has left after lmoec's own work. Run this in the background while bench/families_gpu.py checks
lmoec's kernels (untimed); when the benchmark then meets fla it still autotunes in its own process (the
configurations are timed there, on an idle GPU: this process runs with FLA_CACHE_RESULTS=0 so that none of its
choices, timed on a busy GPU, is kept), but every compile is a cache hit.

    FLA_CACHE_RESULTS=0 python bench/fla_warm.py [--families simple_gla,gla] [--shapes 2K,64K]
Nothing here is timed or reported: it only compiles (and runs) fla's ops at the benchmark's shapes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import families_gpu as fg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(fg.FAMILIES))
    ap.add_argument("--shapes", default=",".join(fg.SHAPES))
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="cap this process's share of GPU memory (many warm-ups at once beside a foreground check)")
    opts = ap.parse_args()
    import torch

    if opts.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(opts.memory_fraction)

    t0 = time.time()
    for shape in opts.shapes.split(","):
        for spec in opts.families.split(","):
            peer = fg.fla_peer(spec)
            if peer is None:
                continue
            tri, _, _ = fg.build(spec)
            x, leaves, cu = fg.shape_inputs(spec, tri, shape)
            try:
                peer(x, cu=cu)[0].float().sum().backward()
            except Exception as e:  # noqa: BLE001 - fla's gated backwards refuse on Hopper with Triton < 3.7.1
                print(f"fla_warm: {spec} {shape}: {type(e).__name__}", flush=True)
                with torch.no_grad():
                    peer(x, cu=cu)
            torch.cuda.synchronize()
            print(f"fla_warm: {spec} {shape} compiled, {time.time() - t0:.0f} s", flush=True)
            del x, leaves


if __name__ == "__main__":
    main()
