"""Seeded mutation fuzzing of every library spec (mutators and workers: tests/fuzz_lsm.py).

For every mutant: no exception but the diagnostic type (SpecError), no hang, neither `check` nor
`compile` over 2 s of CPU time, `check` and `compile` agree, every emitted .py file parses, and for a sample
of the accepted mutants each LSM's op and layer run forward on CPU with finite results wherever
the inputs are finite and the numbers are the compiler's (see fuzz_lsm._forward).

The default run takes a few hundred mutants (about half a minute on 2 cores). More:

    LMOEC_FUZZ_N=5000 python -m pytest tests/test_fuzz.py -s      # every accepted mutant runs forward
    LMOEC_FUZZ_SEED=7 ...                                          # another seed
"""
from __future__ import annotations

import os
import shutil

from fuzz_lsm import ROOT, Pool, failures, mutant, summarize

SEED = int(os.environ.get("LMOEC_FUZZ_SEED", "0"))
N = int(os.environ.get("LMOEC_FUZZ_N", "240"))
FORWARD_EVERY = 1 if "LMOEC_FUZZ_N" in os.environ else 4  # the default run forwards every 4th mutant it accepts
WORKERS = 2


def _run(tmp_path, mutants) -> tuple[list, list]:
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    pool = Pool(WORKERS, tmp_path / "specs", tmp_path / "cache")
    try:
        cases = [(m, i % FORWARD_EVERY == 0) for i, m in enumerate(mutants)]
        results = pool.run(cases)
    finally:
        pool.close()
    return cases, results


def _report(cases, results) -> dict:
    totals = summarize(cases, results)
    print(f"\nfuzz seed {SEED}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in totals.items()))
    return totals


def test_mutants_of_the_library(tmp_path):
    cases, results = _run(tmp_path, [mutant(SEED, i) for i in range(N)])
    totals = _report(cases, results)
    bad = failures(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} mutants failed (reproduce: python tests/fuzz_lsm.py SEED INDEX):\n" + "\n".join(bad[:20])
    # the run means something: both verdicts occur, and accepted mutants ran forward
    assert totals["accepted"] and totals["rejected"] and totals["layers_run"]


def test_hostile_doc_comments(tmp_path):
    """Doc comments are copied into generated docstrings and headers: whatever they hold, every .py file parses."""
    cases, results = _run(tmp_path, [mutant(SEED, i, docs=True) for i in range(max(N // 8, 30))])
    _report(cases, results)
    bad = failures(cases, results)
    assert not bad, "\n".join(bad[:20])
