"""`lmoec generate CHECKPOINT --prompt TEXT`: sample text from a trained model (prefill, then recurrent steps)."""
from __future__ import annotations

import argparse
import sys

from ..runtime.checkpoint import CheckpointError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Load a checkpoint written by `lmoec train` (its file or its run directory), prefill the prompt "
        "with the chunkwise path, then decode token by token: LSM layers keep a fixed-size state, attention a KV cache.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or the run directory holding it")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample only from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="run the checkpoint's package even if it is not what this lmoec emits from its IR")
    return p


def run(args) -> int:
    from ..runtime.generate import generate_text, load_model
    from ..runtime.train import pick_device

    def fail(message: str) -> int:
        print(f"lmoec generate: error: {message}", file=sys.stderr)
        return 2

    if args.max_new_tokens < 0:
        return fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return fail(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        model, _ = load_model(args.checkpoint, pick_device(args.device), trust_code=args.trust_checkpoint_code)
    except CheckpointError as e:
        return fail(str(e))
    sys.stdout.write(args.prompt)
    for piece in generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
