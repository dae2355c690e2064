"""Checks of command-line values shared by the subcommands, so that a bad one stops a command before any work.

The argparse types (`positive_int`, ...) reject a value while the command line is parsed: exit 2 with the
flag's name. The other checks need the file system or torch and run first thing in a subcommand's `run`.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
from pathlib import Path
from typing import Callable, Optional


def _number(kind: Callable, what: str, ok: Callable) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
nonneg_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a positive finite number", lambda v: math.isfinite(v) and v > 0)
nonneg_float = _number(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
seed = _number(int, "a seed in [0, 2**32)", lambda v: 0 <= v < 2**32)  # batches are seeded with seed * 1_000_003 + step


def spec_file(path: str | os.PathLike) -> Path:
    """The path of a spec file the user named; FileNotFoundError or IsADirectoryError naming it otherwise."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    return p


def check_device(name: str) -> None:
    """A device torch knows and this machine has (`auto` always works); ValueError otherwise."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: lmoec runs on cpu or cuda")


def check_output_folder(path: Optional[str], flag: str = "--out") -> None:
    """An output folder that is not a file (nor under one): ValueError otherwise."""
    if path is None:
        return
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is a file, not a folder")
            return
