"""`lmoec export RUN_DIR -o HF_DIR`: a training run's checkpoint as a Hugging Face model folder."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..output import shown


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder",
        description="Write the model of a checkpoint written by `lmoec train` as a Hugging Face transformers folder: "
        "config.json (the spec's IR and the model's settings), model.safetensors, the package's code (auto_map, for "
        "trust_remote_code) and, for byte models, the byte-level tokenizer. Load it with "
        "AutoModelForCausalLM.from_pretrained(HF_DIR) after `import lmoec`, or with trust_remote_code=True.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR", help="checkpoint.pt or the run directory holding it")
    p.add_argument("-o", "--out", required=True, metavar="HF_DIR", help="the folder to create (must not exist, or be empty)")
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="use the checkpoint's package even if it is not what this lmoec emits from its IR")
    return p


def new_folder(out: Path, command: str) -> Path:
    """A temp folder beside `out` to write into, after checking `out` may be created (absent or an empty folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{shown(out)} exists and is not an empty folder: {command} writes a new one (choose another -o)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temp folder into place (all or nothing)."""
    if out.exists():
        out.rmdir()  # empty: checked by new_folder
    tmp.rename(out)


def run(args) -> int:
    from ..trainer.checkpoint import CheckpointError
    from ..trainer.generate import load_model

    out = Path(args.out)
    try:
        model, state = load_model(args.checkpoint, "cpu", trust_code=args.trust_checkpoint_code)
        tmp = new_folder(out, "lmoec export")
    except (CheckpointError, ValueError) as e:
        print(f"lmoec export: error: {e}", file=sys.stderr)
        return 2
    try:
        from ..runtime.hf import save_hf

        package = sys.modules[type(model).__module__.rpartition(".")[0]]
        save_hf(package, state["model_config"], model.state_dict(), tmp)
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {shown(out)}: load it with AutoModelForCausalLM.from_pretrained (after `import lmoec`, "
          "or trust_remote_code=True)")
    return 0
