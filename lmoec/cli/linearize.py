"""`lmoec linearize PATH --lsm gla|hgrn2 [--attention window=64 mix=0.5] -o OUT`: a softmax-attention LLM as an LSM model."""
from __future__ import annotations

import argparse
import sys

from ..output import shown


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "linearize",
        help="turn a Llama / Mistral / Qwen2 / Qwen3 checkpoint into a gated linear-recurrent model (Liger)",
        description="Read a Hugging Face checkpoint folder (Llama, Mistral, Qwen2 or Qwen3: config.json and weights) and write OUT: "
        "an editable spec (model.lsm) whose LSM layers reuse each attention layer's q, k, v and o projections "
        "(GLA gates from the key projection, softmax feature maps), and the HF folder of its compiled package with the "
        "mapped weights. --attention makes the layers Liger Attention: sliding-window softmax attention mixed in.",
    )
    p.add_argument("path", metavar="PATH", help="the Hugging Face model folder")
    p.add_argument("--lsm", default="gla", help="the recurrence to map to: gla (gate from the key projection) or hgrn2 (the key tied to that gate)")
    p.add_argument("--attention", nargs="+", metavar="KEY=VALUE",
                   help="Liger Attention: window=N (sliding window, tokens) and mix=W (attention's weight, default 0.5)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the folder to create (must not exist, or be empty)")
    return p


def run(args) -> int:
    from ..linearize import LinearizeError, linearize, parse_attention

    try:
        out = linearize(args.path, args.out, args.lsm, parse_attention(args.attention))
    except (LinearizeError, ValueError) as e:  # ValueError: an -o folder that is in use
        print(f"lmoec linearize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {shown(out)}: model.lsm (the spec) and its Hugging Face folder; `lmoec finetune {shown(out)}` trains it")
    return 0
