"""`lmoec sweep MANIFEST --task mqar|corpus --steps N`: train each variant briefly and compare them."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="train every variant of a manifest on one task; table and plot of the results")
    p.add_argument("manifest", metavar="MANIFEST", help="manifest.json written by `lmoec variants` (or its folder)")
    p.add_argument("--task", choices=("mqar", "corpus"), default="mqar")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=_learning_rates, default=(3e-3,), help="a learning rate, or several (comma-separated): each variant trains at each and keeps its best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (both tasks)")
    p.add_argument("--pairs", type=int, default=8, help="MQAR key-value pairs per sequence")
    p.add_argument("--vocab", type=int, default=256, help="MQAR vocabulary")
    p.add_argument("--data", default=None, help="corpus task: a text file or folder (default: the embedded corpus)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once in worker processes (CPU threads are shared out)")
    p.add_argument("-o", "--out", default=None, help="results folder (default: <manifest folder>/sweep-<task>)")
    return p


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a learning rate or comma-separated list of them: {text!r}") from None
    if min(lrs) <= 0:
        raise argparse.ArgumentTypeError(f"learning rates must be positive: {text!r}")
    return lrs


def run(args: argparse.Namespace) -> int:
    from ..sweep import SweepConfig, run_sweep
    from ..tasks.mqar import MQARConfig

    if args.steps < 1 or args.batch < 1 or args.jobs < 1:
        raise ValueError("--steps, --batch and --jobs must be positive")
    cfg = SweepConfig(task=args.task, steps=args.steps, batch=args.batch, lrs=args.lr, seed=args.seed,
                      mqar=MQARConfig(seq_len=args.seq_len, num_pairs=args.pairs, vocab=args.vocab),
                      seq_len=args.seq_len, data=args.data, device=args.device)
    manifest = Path(args.manifest)
    folder = manifest if manifest.is_dir() else manifest.parent
    out = Path(args.out) if args.out else folder / f"sweep-{args.task}"
    run_sweep(manifest, cfg, out, jobs=args.jobs)
    print(f"wrote {out}/results.md, results.csv, results.png")
    return 0
