"""`lmoec finetune FOLDER --lora r=8 ... -o OUT`: LoRA fine-tuning (peft) of an lmoec model's Hugging Face folder."""
from __future__ import annotations

import argparse
import sys

from . import flags
from ..output import shown


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="LoRA fine-tuning of a Hugging Face folder of an lmoec model (e.g. what `lmoec linearize` wrote)",
        description="Fine-tune with LoRA adapters (peft) on the linear maps named by --lora targets, the base frozen, on "
        "the default corpus (the Python standard library's sources) or --data. Writes OUT: the adapter folder, or with "
        "--merge the adapters folded in (a complete HF folder), and finetune.json with the held-out loss before and after.",
    )
    p.add_argument("folder", metavar="FOLDER", help="the model's Hugging Face folder (with model.lsm, its spec is built)")
    p.add_argument("--lora", nargs="+", default=[], metavar="KEY=VALUE",
                   help="r=N (rank, default 8), alpha=X (default 16), targets=NAME,... (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--data", help="a text file or folder (default: the Python standard library's sources)")
    p.add_argument("--steps", type=flags.positive_int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--seq-len", type=flags.positive_int, default=128, help="tokens per window (default 128)")
    p.add_argument("--batch", type=flags.positive_int, default=4, help="windows per step (default 4)")
    p.add_argument("--lr", type=flags.positive_float, default=1e-3, help="peak learning rate, cosine to 0 (default 1e-3)")
    p.add_argument("--seed", type=flags.seed, default=0, help="data and adapter init seed (default 0)")
    p.add_argument("--merge", action="store_true", help="fold the adapters into the weights: write a complete HF folder")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the folder to create (must not exist, or be empty)")
    return p


def run(args) -> int:
    from ..finetune import FinetuneConfig, FinetuneError, finetune, parse_lora
    from ..trainer.data import DataError

    try:
        config = FinetuneConfig(lora=parse_lora(args.lora), data=args.data, steps=args.steps, seq_len=args.seq_len,
                                batch=args.batch, lr=args.lr, seed=args.seed, merge=args.merge)
        finetune(args.folder, args.out, config)
    except (FinetuneError, DataError, ValueError) as e:  # ValueError: an -o folder that is in use
        print(f"lmoec finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {shown(args.out)}")
    return 0
