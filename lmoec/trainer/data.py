"""Training text as byte tokens (vocab 256), split into train and held-out parts, sampled reproducibly.

The default corpus is the Python standard library's own `.py` files: every
machine with Python has them, so `lmoec train` works offline on a fresh
install. Batches are a pure function of (seed, split, step): resuming at step
n needs only n, which is the data position a checkpoint stores.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

BYTE_VOCAB = 256
_HEAD = 4096  # bytes read to tell text from binary
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", ".git"}


class DataError(ValueError):
    """The data path is missing, unreadable, or holds too little text."""


@dataclass
class TokenData:
    train: torch.Tensor  # uint8 [N_train]
    eval: torch.Tensor  # uint8 [N_eval], the held-out tail of the corpus
    source: str  # what was read, for logs
    digest: str  # sha256 of all tokens: a resumed run checks it sees the same data


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return found


def _text_files(folder: Path) -> list[Path]:
    def unreadable(e: OSError):
        raise DataError(f"cannot read {e.filename}: {e.strerror or e}")

    found = []
    for sub, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(sub) / f for f in sorted(files) if not f.startswith(".")]
    return found


def _looks_binary(head: bytes) -> bool:
    """A NUL byte early on: an image, an archive, a compiled file, UTF-16 text; not text to train bytes on."""
    return b"\0" in head[:_HEAD]


def _head(f: Path) -> bytes:
    try:
        with open(f, "rb") as fh:
            return fh.read(_HEAD)
    except OSError as e:
        raise DataError(f"cannot read {f}: {e.strerror or e}") from None


def _read(files: list[Path], skip_binary: bool) -> bytes:
    parts = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror or e}") from None
        if skip_binary and _looks_binary(data):
            continue
        parts.append(data)
    return b"\n".join(parts)


def check_path(path: Optional[str | os.PathLike]) -> None:
    """What load_bytes would refuse, found without reading the corpus: a missing path, a file that is empty,
    binary or not a regular file, a folder without a text file. Raises DataError."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_dir():
        if not any(not _looks_binary(_head(f)) for f in _text_files(p)):
            raise DataError(f"no text files under {p} (files with a NUL byte in their first {_HEAD} bytes are skipped)")
        return
    if not p.is_file():
        raise DataError(f"data path {p} is not a regular file or a folder")
    head = _head(p)
    if not head:
        raise DataError(f"data file {p} is empty")
    if _looks_binary(head):
        raise DataError(f"data file {p} looks binary (a NUL byte in its first {_HEAD} bytes); --data takes text")


def load_bytes(path: Optional[str | os.PathLike]) -> tuple[bytes, str]:
    """(corpus bytes, description). None: the standard library; a file; or every text file under a directory."""
    if path is None:
        files = _stdlib_files()
        return _read(files, skip_binary=False), f"python stdlib sources ({len(files)} files under {sysconfig.get_paths()['stdlib']})"
    check_path(path)
    p = Path(path)
    if p.is_dir():
        files = _text_files(p)
        data = _read(files, skip_binary=True)
        return data, f"{len(files)} files under {p}"
    return _read([p], skip_binary=False), str(p)


def load_tokens(path: Optional[str | os.PathLike], seq_len: int, eval_fraction: float = 0.05) -> TokenData:
    """Byte tokens, the last `eval_fraction` held out; both parts must fit at least one window of seq_len + 1."""
    data, source = load_bytes(path)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    n_eval = max(int(len(tokens) * eval_fraction), seq_len + 1)
    if len(tokens) - n_eval < seq_len + 1:
        raise DataError(f"{source}: {len(tokens)} bytes is too little text for seq_len {seq_len} "
                        f"(need {2 * (seq_len + 1)} at least)")
    return TokenData(train=tokens[:-n_eval], eval=tokens[-n_eval:], source=source,
                     digest=hashlib.sha256(data).hexdigest())


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [batch, seq_len] from random windows; the same (seed, step) gives the same batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=gen)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if 0 <= t < BYTE_VOCAB).decode("utf-8", errors="replace")
