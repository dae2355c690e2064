"""`lmoec train SPEC_OR_PACKAGE`: train a compiled model on byte-level text, with checkpoints and exact resume."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from ..trainer.train_config import TrainConfig
from . import flags

_DEFAULTS = TrainConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model spec (or a compiled package) on text",
        description="Train the model of a .lsm spec or of a compiled package directory. With no --data, the Python "
        "standard library's own sources, byte-level tokenized. Writes checkpoint.pt, log.jsonl and loss.png to --out.",
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `lmoec train`, shared with `python -m lmoec.train` (the torchrun entry)."""
    p.add_argument("target", metavar="SPEC_OR_PACKAGE", help="a .lsm model spec, or a package directory `lmoec compile` wrote")
    p.add_argument("--data", help="a text file, or a directory (every text file under it); default: the Python stdlib sources")
    p.add_argument("--steps", type=flags.positive_int, help=f"optimizer steps (default {_DEFAULTS.steps}); with --resume, may extend the run")
    p.add_argument("--seq-len", type=flags.positive_int, help=f"tokens per sequence (default {_DEFAULTS.seq_len})")
    p.add_argument("--batch", type=flags.positive_int, help=f"sequences per step (default {_DEFAULTS.batch})")
    p.add_argument("--lr", type=flags.positive_float, help=f"peak learning rate (default {_DEFAULTS.lr})")
    p.add_argument("--warmup", type=flags.nonneg_int, help=f"linear warmup steps before the cosine decay (default {_DEFAULTS.warmup})")
    p.add_argument("--weight-decay", type=flags.nonneg_float, help=f"AdamW weight decay (default {_DEFAULTS.weight_decay})")
    p.add_argument("--grad-clip", type=flags.positive_float, help=f"gradient norm clip (default {_DEFAULTS.grad_clip})")
    p.add_argument("--eval-every", type=flags.positive_int, help=f"steps between held-out evaluations (default {_DEFAULTS.eval_every})")
    p.add_argument("--save-every", type=flags.positive_int, help=f"steps between checkpoints (default {_DEFAULTS.save_every})")
    p.add_argument("--seed", type=flags.seed, help=f"seed of the init and the batch order (default {_DEFAULTS.seed})")
    p.add_argument("--out", help="run directory (default runs/<model name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, exactly")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="with --resume: run the checkpoint's package even if it is not what this lmoec emits from its IR")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model and losses around the emitted ops (single process; the first steps compile)")
    p.add_argument("--recompute", action="store_true", default=None,
                   help="keep only each block's input and run its forward again in the backward (activation "
                        "checkpointing): less memory for about one more forward")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--dp", type=flags.positive_int, default=1, help="data-parallel degree (default: what is left of the world size after sp * ep)")
    p.add_argument("--sp", type=flags.positive_int, default=1, help="sequence-parallel degree: LASP-2 / LASP-2H over contiguous slices of T")
    p.add_argument("--ep", type=flags.positive_int, default=1, help="expert-parallel degree: the experts are split over this many ranks")


def load_target(target: str) -> tuple[str, dict[str, str]]:
    """(package name, package files) of a .lsm spec (compiled now) or of a package directory."""
    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"{target} does not exist")
    if path.is_dir():
        if not (path / "model.py").is_file():
            raise FileNotFoundError(f"{target} is not a compiled model package (no model.py); pass a .lsm spec or `lmoec compile` output")
        files = {f.name: f.read_text() for f in sorted(path.iterdir()) if f.is_file() and f.suffix in (".py", ".json")}
        name = json.loads(files["ir.json"])["name"] if "ir.json" in files else path.name
        return name, files
    from ..errors import SpecError
    from ..program import compile_spec

    program = compile_spec(path)
    if program.ir.model is None:
        raise SpecError(f"{target} defines no model (only lsms {sorted(program.ir.lsms)}); `lmoec train` needs a model spec")
    return program.ir.name, program.files


def distributed_run(args) -> bool:
    """Under torchrun (WORLD_SIZE set), or asked for a parallel layout; without torchrun that is an error."""
    asked = any(getattr(args, d, 1) != 1 for d in ("dp", "sp", "ep"))
    if "WORLD_SIZE" in os.environ:
        return True
    if asked:
        from ..trainer.train import RunError

        raise RunError("--dp / --sp / --ep need several processes: launch with "
                       "`torchrun --nproc-per-node N -m lmoec.train SPEC --sp 2 ...`")
    return False


def run(args) -> int:
    import torch

    from ..errors import SpecError
    from ..ir.nodes import ParallelSpec
    from ..trainer.checkpoint import CheckpointError
    from ..trainer.checkpoint import load as load_checkpoint
    from ..trainer.data import DataError, check_path
    from ..trainer.train import Interrupted, RunError, saved_config, train

    rank0 = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank fails alike: say it once

    def fail(message: str, status: int = 2) -> int:
        if rank0:
            print(f"lmoec train: {message}", file=sys.stderr)
        return status

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    try:  # every flag before any work (the numbers were checked by the parser)
        flags.check_device(args.device)
        check_path(args.data)
        flags.check_output_folder(args.out)
    except (ValueError, DataError) as e:
        return fail(f"error: {e}")
    out = None
    try:
        name, files = load_target(args.target)
        out = Path(args.out) if args.out else Path("runs") / name
        # a resumed run keeps its settings: start from them, apply what was asked on the command line
        cfg = replace(saved_config(load_checkpoint(out)), **given) if args.resume else TrainConfig(**given)
        torch.set_flush_denormal(True)  # on CPU, decays underflowing to denormals cost up to 1.5x per step
        started = time.perf_counter()
        if distributed_run(args):
            from ..trainer.distributed import train_distributed

            parallel = ParallelSpec(dp=args.dp, sp=args.sp, ep=args.ep)
            result = train_distributed(files, name, cfg, out, parallel, resume=args.resume, device=args.device,
                                       progress=not args.no_progress, trust_code=args.trust_checkpoint_code)
            if not rank0:  # rank 0 reports for the run
                return 0
        else:
            result = train(files, name, cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                           stop_on_interrupt=True, trust_code=args.trust_checkpoint_code)
    except Interrupted as stop:
        again = f"lmoec train {args.target}" + (f" --out {args.out}" if args.out else "") + " --resume"
        return fail(f"interrupted: stopped after step {stop.step}, saved in {stop.checkpoint}; continue with `{again}`", 130)
    except KeyboardInterrupt:
        saved = out is not None and (out / "checkpoint.pt").is_file()
        return fail("interrupted" + (f"; {out / 'checkpoint.pt'} holds the last saved step, intact" if saved else ""), 130)
    except SpecError as e:
        return fail(f"error: {e.loc}: {e.message}" if e.loc else f"error: {e.message}")
    except (FileNotFoundError, DataError, CheckpointError, RunError) as e:
        return fail(f"error: {e}")
    except (ValueError, OSError) as e:  # a spec the emitters reject, a model config that doesn't build, a full disk
        return fail(f"error: {type(e).__name__}: {e}")
    losses, evals = result.losses(), result.eval_losses()
    minutes, seconds = divmod(int(time.perf_counter() - started), 60)
    if losses:
        print(f"done in {minutes}m{seconds:02d}s: train loss {losses[0]:.3f} -> {losses[-1]:.3f}"
              + (f", held-out loss {evals[-1]:.3f}" if evals else ""))
    print(f"checkpoint {result.checkpoint}, log {out / 'log.jsonl'}" + (f", loss plot {result.plot}" if result.plot else ""))
    print(f"try: lmoec generate {out} --prompt 'def '")
    return 0
