"""Checkpoints: one self-contained file per run, written atomically.

A checkpoint holds the emitted package's files (so `lmoec generate` rebuilds
the exact model without the spec), the model and optimizer state, the step,
RNG states and the data position. It is written to a temp file in the same
directory and moved into place with `os.replace`: a crash mid-write leaves
the previous checkpoint intact, never a half-written one.

The package files are code that `lmoec generate` and `--resume` import, so a checkpoint from someone
else would run whatever it holds: `package` hands them out only if the installed lmoec emits exactly
them from the checkpoint's own IR (ir.json), unless the user trusts the checkpoint's code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "lmoec-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not an lmoec checkpoint."""


def resolve(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    p = Path(path)
    return p / FILENAME if p.is_dir() else p


def save(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's payload (memory-mapped: reading it twice is cheap); CheckpointError with one clear line if it can't be used."""
    file = resolve(path)
    if not file.exists():
        where = f"{path} holds no {FILENAME}" if Path(path).is_dir() else f"{file} does not exist"
        raise CheckpointError(f"checkpoint not found: {where}")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is corrupt or not a checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an lmoec checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{file} has checkpoint version {payload.get('version')}; this lmoec reads version {VERSION}")
    return payload


def package(state: dict[str, Any], path: str | os.PathLike, trust_code: bool = False) -> tuple[str, dict[str, str]]:
    """(package name, package files) of a loaded checkpoint; CheckpointError naming the first file that differs
    from what this lmoec emits from the checkpoint's ir.json, unless trust_code (`--trust-checkpoint-code`)."""
    file = resolve(path)
    stored = state.get("package")
    name, files = (stored.get("name"), stored.get("files")) if isinstance(stored, dict) else (None, None)
    if not isinstance(name, str) or not isinstance(files, dict) or not all(isinstance(x, str) for item in files.items() for x in item):
        raise CheckpointError(f"{file} holds no package (a name and files of text)")
    if trust_code:
        return name, files
    if not isinstance(files.get("ir.json"), str):
        raise CheckpointError(f"{file}: its package has no ir.json to check its code against (--trust-checkpoint-code runs it unchecked)")
    from .. import __version__
    from ..backends.emit import emit_package
    from ..ir.nodes import SpecIR

    try:
        expected = emit_package(SpecIR.model_validate_json(files["ir.json"]))
    except Exception as e:  # anything an IR from elsewhere makes the validators or emitters raise
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{file}: lmoec {__version__} can't emit its package's ir.json ({reason})") from None
    differing = next((f for f in sorted(set(files) | set(expected)) if files.get(f) != expected.get(f)), None)
    if differing is not None:
        raise CheckpointError(
            f"{file}: its package file {differing!r} differs from what lmoec {__version__} emits from its ir.json "
            "(edited, from another lmoec version, or tampered with); it would run as code: pass "
            "--trust-checkpoint-code (trust_code=True) only if you trust who made the checkpoint")
    return name, files


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
