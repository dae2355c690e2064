"""`lmoec sweep MANIFEST --task mqar|corpus --steps N`: train each variant briefly and compare them."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="train every variant of a manifest on one task; table and plot of the results")
    p.add_argument("manifest", metavar="MANIFEST", help="manifest.json written by `lmoec variants` (or its folder)")
    p.add_argument("--task", choices=("mqar", "corpus"), default="mqar")
    p.add_argument("--steps", type=flags.positive_int, default=300)
    p.add_argument("--batch", type=flags.positive_int, default=32)
    p.add_argument("--lr", type=_learning_rates, default=(3e-3,), help="a learning rate, or several (comma-separated): each variant trains at each and keeps its best")
    p.add_argument("--seed", type=flags.seed, default=0)
    p.add_argument("--seq-len", type=flags.positive_int, default=128, help="sequence length (both tasks)")
    p.add_argument("--pairs", type=flags.positive_int, default=8, help="MQAR key-value pairs per sequence")
    p.add_argument("--vocab", type=flags.positive_int, default=256, help="MQAR vocabulary")
    p.add_argument("--data", default=None, help="corpus task: a text file or folder (default: the embedded corpus)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=flags.positive_int, default=1, help="variants trained at once in worker processes (CPU threads are shared out)")
    p.add_argument("-o", "--out", default=None, help="results folder (default: <manifest folder>/sweep-<task>)")
    return p


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a learning rate or comma-separated list of them: {text!r}") from None
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"learning rates must be positive finite numbers: {text!r}")
    return lrs


def run(args: argparse.Namespace) -> int:
    from ..trainer.data import check_path
    from ..sweep import SweepConfig, run_sweep
    from ..tasks.mqar import MQARConfig
    from ..variants import load_manifest

    flags.check_device(args.device)
    if args.data is not None and args.task != "corpus":
        raise ValueError("--data is for --task corpus (MQAR makes its own sequences)")
    check_path(args.data)
    flags.check_output_folder(args.out)
    mqar = MQARConfig(seq_len=args.seq_len, num_pairs=args.pairs, vocab=args.vocab) if args.task == "mqar" else MQARConfig()
    cfg = SweepConfig(task=args.task, steps=args.steps, batch=args.batch, lrs=args.lr, seed=args.seed, mqar=mqar,
                      seq_len=args.seq_len, data=args.data, device=args.device)
    manifest = Path(args.manifest)
    folder, _ = load_manifest(manifest)
    out = Path(args.out) if args.out else folder / f"sweep-{args.task}"
    runs = sorted((out / "runs").glob("*/checkpoint.pt")) if args.task == "corpus" else []
    if runs:  # each corpus run keeps its checkpoint: a second sweep into the same folder would stop at the first
        raise ValueError(f"{out} already holds the runs of a corpus sweep ({runs[0].parent.name}, ...); choose another -o")
    run_sweep(manifest, cfg, out, jobs=args.jobs)
    print(f"wrote {out}/results.md, results.csv, results.png")
    return 0
