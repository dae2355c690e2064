"""`lmoec generate CHECKPOINT --prompt TEXT`: sample text from a trained model (prefill, then recurrent steps)."""
from __future__ import annotations

import argparse
import os
import sys

from . import flags


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Load a checkpoint written by `lmoec train` (its file or its run directory), prefill the prompt "
        "with the chunkwise path, then decode token by token: LSM layers keep a fixed-size state, attention a KV cache.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or the run directory holding it")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=flags.nonneg_int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--temperature", type=flags.nonneg_float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=flags.positive_int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=flags.probability, help="sample only from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=flags.seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode step by step from Python on CUDA too (default there: one captured CUDA graph per token)")
    p.add_argument("--compile", action="store_true",
                   help="on CUDA, compile the decode step with torch.compile (inductor) before capturing it: fewer, fused kernels "
                   "per token; the first token waits for the compile")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="run the checkpoint's package even if it is not what this lmoec emits from its IR")
    return p


def run(args) -> int:
    from ..trainer.checkpoint import CheckpointError
    from ..trainer.generate import generate_text, load_model
    from ..trainer.train import pick_device

    def fail(message: str) -> int:
        print(f"lmoec generate: error: {message}", file=sys.stderr)
        return 2

    try:
        flags.check_device(args.device)
        model, _ = load_model(args.checkpoint, pick_device(args.device), trust_code=args.trust_checkpoint_code)
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    # the prompt's own bytes (a shell argument need not be UTF-8: Python holds such bytes as surrogate escapes)
    prompt = os.fsencode(args.prompt)
    sys.stdout.flush()
    sys.stdout.buffer.write(prompt)
    sys.stdout.buffer.flush()
    for piece in generate_text(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                               static=False if args.no_cuda_graph else None, compile_step=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
