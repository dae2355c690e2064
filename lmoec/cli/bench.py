"""`lmoec bench [SPEC]`: the paper's efficiency figures (training throughput, decoding cost, kernels) here."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="training tokens/s, decode latency and kernel throughput vs length: "
                                            "Markdown tables and PNG plots")
    p.add_argument("spec", metavar="SPEC", nargs="?", default=None,
                   help="base model spec: its LSM and pattern are swapped per variant (default: specs/models/tiny.lsm "
                        "for --size tiny, a0.3b-2b.lsm for paper); an lsm-only spec works with --what kernels")
    p.add_argument("--what", default="train,decode,kernels", help="figures to measure, comma-separated")
    p.add_argument("--size", default=None, help="tiny (default on CPU) or paper (A0.3B-2B shapes; default on CUDA)")
    p.add_argument("--lengths", default=None, help="training sequence lengths and kernel T, e.g. 2K,4K,8K,16K")
    p.add_argument("--tokens", type=flags.positive_int, default=None,
                   help="tokens per training step, batch = tokens // length (default: 2048 tiny, 16384 paper)")
    p.add_argument("--contexts", default=None, help="decode context lengths, e.g. 1K,16K,128K")
    p.add_argument("--variants", default=None, help="model variants by name, comma-separated (default: all)")
    p.add_argument("--budget", type=flags.positive_float, default=None, help="seconds; variants left when it runs out are skipped")
    p.add_argument("--iters", type=flags.positive_int, default=None, help="timed runs per point and round (default: 2 tiny, 3 paper)")
    p.add_argument("--rounds", type=flags.positive_int, default=None,
                   help="passes over all variants, best of each point kept (default: 3 on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=flags.positive_int, default=None,
                   help="CPU intra-op threads (default 1: on shared cores more threads measure the scheduler)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--note", default="", help="free text for the settings line (e.g. what else loads the machine)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: bench-<size>)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, parse_lengths, parse_what, resolve, run_bench, write_outputs

    flags.check_output_folder(args.out, "-o")
    cfg = BenchConfig(spec=args.spec, what=parse_what(args.what), size=args.size,
                      lengths=parse_lengths(args.lengths) if args.lengths else None,
                      contexts=parse_lengths(args.contexts) if args.contexts else None,
                      variants=[v.strip() for v in args.variants.split(",")] if args.variants else None,
                      tokens=args.tokens, budget=args.budget, iters=args.iters, rounds=args.rounds, threads=args.threads,
                      device=args.device, note=args.note)
    _, size, _ = resolve(cfg)  # bad arguments fail here, before the output folder exists
    out = Path(args.out or f"bench-{size.name}")
    written = write_outputs(run_bench(cfg), out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
