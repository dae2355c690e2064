"""Test cases run on several gloo processes: each rank records every case's failures, the parent merges them.

A case is a function returning a list of error strings (empty: it passed). One crashing case is recorded
as its exception and does not hide the others; a stuck collective times out instead of hanging the suite.
"""
from __future__ import annotations

import contextlib
import json
import socket
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmoec.trainer.distributed import shutdown_process_group

Record = Callable[..., None]


@contextlib.contextmanager
def recording_rank(rank: int, world: int, port: int, out_dir: str) -> Iterator[Record]:
    """Join the gloo group; yield record(case, fn, *args); write this rank's results to out_dir/rank<r>.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results: dict[str, list[str]] = {}

    def record(case: str, fn: Callable[..., list[str]], *args) -> None:
        try:
            results[case] = fn(*args)
        except Exception as e:
            results[case] = [f"raised {type(e).__name__}: {e}"]

    try:
        yield record
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        shutdown_process_group()


def run_ranks(worker: Callable, world: int, out_dir: Path, *args) -> dict[str, list[str]]:
    """mp.spawn worker(rank, world, port, str(out_dir), *args) on `world` ranks; {case: failures, each prefixed by its rank}."""
    mp.spawn(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world, join=True)
    merged: dict[str, list[str]] = {}
    for rank in range(world):
        for case, errors in json.loads(Path(out_dir, f"rank{rank}.json").read_text()).items():
            merged.setdefault(case, []).extend(f"rank {rank}: {e}" for e in errors)
    return merged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
