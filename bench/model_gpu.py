"""A0.3B-2B on one GPU: training tokens/s and peak memory per sequence length, and decoding cost per context.

The shape of Linear-MoE's Table 3 and Fig. 5 (Sun et al., 2025), all variants in one process:

    training   (seq 2K, batch 8), (4K, 4), (8K, 2), (16K, 1): 16K tokens per step at every length.
               One full `lmoec train` step: bf16 autocast forward, cross-entropy + MoE aux losses,
               backward, grad clipping, AdamW (fp32 master weights).
    variants   pure Linear-MoE with GLA, Gated DeltaNet and BLA (L * 12), the hybrid GLA stack
               LLLN * 3, and the all-attention MoE baseline (N * 12, SDPA flash attention).
    decoding   batch 16, one new token after a context of 1K .. 128K: latency and memory per token.
               LSM layers carry a fixed-size state; attention a KV cache of the whole context
               (filled with random keys and values: the cost of a step does not depend on them).

A thin wrapper over lmoec.bench (`lmoec bench --size paper --what train,decode` measures the same,
plus the kernel figure). Writes markdown to --out (default $OUT/model.md) and train.png / decode.png
beside it. `--smoke` runs tiny shapes on CPU to check the script itself.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmoec.bench import BenchConfig, run_bench, write_outputs

VARIANTS = ["GLA", "attention baseline", "hybrid GLA LLLN", "Gated DeltaNet", "BLA"]  # run in this order, until --budget
DECODE_VARIANTS = ["GLA", "attention baseline", "hybrid GLA LLLN"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "model.md"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--budget", type=float, default=330, help="seconds; variants left when it runs out are skipped")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    smoke = dict(device="cpu", size="tiny", lengths=[64, 128], contexts=[64, 256], iters=1)
    cfg = BenchConfig(what=("train", "decode"), variants=names, decode_variants=[n for n in DECODE_VARIANTS if n in names],
                      budget=args.budget, **(smoke if args.smoke else dict(device="cuda", size="paper")))
    out = Path(args.out)
    title = "A0.3B-2B on one GPU: training throughput and decoding cost" + (" (smoke run)" if args.smoke else "")
    write_outputs(run_bench(cfg), out.parent, md_name=out.name, title=title)
    print((out).read_text())


if __name__ == "__main__":
    main()
