"""A batch of empty sequences (T = 0) through the Triton kernels of the kinds whose host code packs [B, T, H, D] by
reshape: the output is empty, the final state is the initial state and its gradient passes through unchanged.
Run under the interpreter in a child process (tests/interpreted.py), as the other Triton tests."""
from __future__ import annotations

import json
import sys

import pytest

from interpreted import interpreted

SPECS = ["ttt_linear", "titans", "mamba", "gfw"]


def check(name: str) -> dict:
    import torch

    import lmoec
    from test_elementwise import _inputs

    B, H, D = 2, 2, 16
    if name in ("mamba", "gfw"):
        x = _inputs(name, B, 0, H, D, D, dtype=torch.float32, seed=0)
    else:
        x = {n: torch.randn(B, 0, H, D) for n in ("q", "k", "v")}
        gates = ("theta",) if name == "ttt_linear" else ("theta", "eta", "alpha")
        x.update({n: torch.rand(B, 0, H) for n in gates})
        if name == "ttt_linear":
            x.update(ln_weight=torch.ones(H, D), ln_bias=torch.zeros(H, D))
    op = lmoec.compile_spec(f"specs/lsm/{name}.lsm").op()
    shape = {"ttt_linear": (B, H, D + 1, D), "titans": (B, H, D, 2 * D)}.get(name, (B, H, D, D))
    h0 = torch.randn(shape, requires_grad=True)
    dht = torch.randn(shape)
    o, ht = op(**x, initial_state=h0, output_final_state=True, backend="triton")
    (ht * dht).sum().backward()
    return {"o_shape": list(o.shape), "state": (ht - h0).abs().max().item(), "grad": (h0.grad - dht).abs().max().item()}


@pytest.fixture(scope="module")
def results():
    return interpreted([__file__, *SPECS])


@pytest.mark.parametrize("name", SPECS)
def test_empty_batch_keeps_the_state(results, name):
    got = results[name]
    assert got["o_shape"][1] == 0
    assert got["state"] == 0.0 and got["grad"] == 0.0, got


if __name__ == "__main__":
    print(json.dumps({name: check(name) for name in sys.argv[1:]}))
