"""Interpreter checks run in a child process: TRITON_INTERPRET must be set before triton is imported, and every
kernel output is poisoned (NaN) first (LMOEC_POISON), so an element a kernel fails to write fails the check."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def interpreted(argv: list[str], cwd=None) -> dict:
    """Run `python argv...` under the interpreter; the JSON its last stdout line prints."""
    env = dict(os.environ, TRITON_INTERPRET="1", LMOEC_POISON="1")
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_relative_error(x, ref) -> float:
    """max |x - ref| / max |ref| (ref in float64); inf when x is missing or holds a NaN or inf."""
    import torch

    if x is None or not torch.isfinite(x).all():
        return float("inf")
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def interpreted_cases(script: str, names: list[str], cwd=None) -> dict:
    """interpreted([script, *names]) for a script that prints {name: result}, with the names dealt round-robin
    over one child per core, run at once: the same checks in a fraction of the wall time."""
    env = dict(os.environ, TRITON_INTERPRET="1", LMOEC_POISON="1")
    parts = max(1, min(os.cpu_count() or 1, len(names)))
    shares = [names[i::parts] for i in range(parts)]
    children = [subprocess.Popen([sys.executable, script, *share], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=cwd) for share in shares]
    results = {}
    for child in children:
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, err[-4000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results
