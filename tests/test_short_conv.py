"""The short convolution's Triton kernels (lmoec/runtime/short_conv.py) under Triton's interpreter.

conv_silu against a float64 loop written from the definition (each segment's window is its state, then its own
rows): packed segments with an empty one and ones shorter than the kernel, equal-length segments, with and without
a state, kernel widths 1, 2 and 4, the output and the gradients of the rows, the weight and the state; last_inputs
against the same windows. Then whole layers with the kernels on (ON_CPU) against the same layer on torch's conv1d
path: a plain Gated DeltaNet layer (equal-length rows, with a cache state) and the MoM layer (its (memory, batch)
segments), output, cache and every gradient; and a layer compiled with fullgraph=True, where the kernels are
registered ops (no graph break), equal to the eager layer. fp32 against float64: relative errors below 1e-5
(measured ~1e-7).
Outputs are not poisoned here: every kernel writes torch.empty buffers fully or the comparison fails on garbage.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from interpreted import interpreted

CHILD = r"""
import json
import torch
import torch.nn.functional as F
import lmoec
from lmoec.paths import SPECS
from lmoec.runtime import short_conv

torch.manual_seed(0)
rel = lambda a, b: float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def windows(x, weight, state, lens):
    out, start, W = [], 0, weight.shape[1]
    for i, L in enumerate(lens):
        before = state[i] if state is not None else x.new_zeros(W - 1, x.shape[1])
        win = torch.cat([before, x[start:start + L]])
        out += [F.silu(sum(win[t + W - 1 - s] * weight[:, W - 1 - s] for s in range(W))) for t in range(L)]
        start += L
    return torch.stack(out)


out = {}
for label, lens, equal, W, with_state in (("packed [5, 0, 1, 2, 9, 3], W=4, state", [5, 0, 1, 2, 9, 3], False, 4, True),
                                           ("packed [3, 1, 6], W=2, no state", [3, 1, 6], False, 2, False),
                                           ("3 rows of 7, W=4, state", [7, 7, 7], True, 4, True),
                                           ("2 rows of 5, W=1", [5, 5], True, 1, False)):
    C, S = 37, sum(lens)  # C: a partial channel block
    x = torch.randn(S, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, W, dtype=torch.float64, requires_grad=True)
    st = torch.randn(len(lens), W - 1, C, dtype=torch.float64, requires_grad=True) if with_state else None
    dy = torch.randn(S, C, dtype=torch.float64)
    leaves = [x, w] + ([st] if with_state else [])
    want = windows(x, w, st, lens)
    grads_want = torch.autograd.grad((want * dy).sum(), leaves)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    where = dict(length=lens[0]) if equal else dict(cu_seqlens=cu, segment=torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    got = short_conv.conv_silu(f32[0], f32[1], f32[2] if with_state else None, **where)
    grads = torch.autograd.grad((got * dy.float()).sum(), f32)
    errs = {"y": rel(got, want), **{n: rel(a, b) for n, a, b in zip(["dx", "dweight", "dstate"], grads, grads_want)}}
    if W > 1:
        tails = short_conv.last_inputs(x.detach(), None if st is None else st.detach(), W - 1,
                                       **({"length": lens[0]} if equal else {"cu_seqlens": cu}))
        start, exact = 0, True
        for i, L in enumerate(lens):
            before = st[i].detach() if st is not None else x.new_zeros(W - 1, C)
            exact &= torch.equal(tails[i], torch.cat([before, x.detach()[start:start + L]])[-(W - 1):])
            start += L
        errs["last_inputs"] = 0.0 if exact else float("inf")
    out[label] = errs

for name in ("gated_deltanet", "mom"):
    program = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm")
    torch.manual_seed(1)
    layer = program.layer(hidden=32, heads=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    xs, grad_out = torch.randn(2, 13, 32), torch.randn(2, 13, 32)
    results = []
    for on in (True, False):
        short_conv.ON_CPU = on
        x = xs.clone().requires_grad_(True)
        y, cache = layer(x, use_cache=True, backend="torch")
        y2, _ = layer(xs[:, :5], past=cache, use_cache=True, backend="torch")  # a second call from the cache's conv states
        grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)
        convs = {n: c for n, c in cache.items() if n.startswith("conv_")}
        results.append((y, y2, convs, grads))
    (y, y2, convs, g), (y_t, y2_t, convs_t, g_t) = results
    errs = {"o": rel(y, y_t), "o after the cache": rel(y2, y2_t)}
    errs.update({n: rel(convs[n], convs_t[n]) for n in convs_t})
    errs.update({"d" + n: rel(a, b) for (n, _), a, b in zip([("x", None), *layer.named_parameters()], g, g_t)})
    out[name + " layer"] = errs

# the kernels enter torch.compile's graph as registered ops: a Gated DeltaNet layer traces whole (fullgraph) and
# equals the eager layer, forward and gradients
from torch._dynamo.utils import counters
short_conv.ON_CPU = True
layer = lmoec.compile_spec(SPECS / "lsm" / "gated_deltanet.lsm").layer(hidden=32, heads=2)
graphs = []
def recording(graph_module, example_inputs):
    graphs.append(graph_module)
    return graph_module.forward
counters.clear()
runs = []
for model in (torch.compile(layer, fullgraph=True, backend=recording), layer):
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    y = model(x)
    runs.append((y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])))
out["compiled layer"] = {"graph breaks": sum(counters["graph_break"].values()),
                         "conv ops in the graph": sum(str(n.target).startswith("lmoec_runtime.conv_silu")
                                                      for g in graphs for n in g.graph.nodes),
                         **{f"{i}": rel(a, b) for i, (a, b) in enumerate(zip(*runs))}}
# torch.library.opcheck of both registered ops: fakes give the kernels' shapes, dtypes and strides (a compiled
# training step asserts the strides; the weight's gradient once came back transposed), autograd is registered.
# The weight is fp32, as the master weights under autocast are (where the cast of the gradient is a no-op).
short_conv.ON_CPU = True
x, w = torch.randn(9, 37, requires_grad=True), torch.randn(37, 4, requires_grad=True)
st = torch.randn(2, 3, 37, requires_grad=True)
cu, seg = torch.tensor([0, 4, 9]), torch.tensor([0] * 4 + [1] * 5)
checks = {"conv_silu": (short_conv._conv_silu_op, (x, w, st, cu, seg, 0)),
          "conv_silu_backward": (short_conv._conv_silu_backward_op,
                                 (torch.randn(9, 37), x.detach(), w.detach(), st.detach(), cu, seg, 0, 2, True))}
out["opcheck"] = {name: [f"{test}: {result}" for test, result in torch.library.opcheck(op, args, raise_exception=False).items()
                         if result != "SUCCESS"] for name, (op, args) in checks.items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton", reason="the kernels need triton installed")
    return interpreted(["-c", CHILD], cwd=Path(__file__).resolve().parents[1])


def test_conv_kernels_match_the_definition(results):
    cases = {k: v for k, v in results.items() if not k.endswith(" layer") and k != "opcheck"}
    assert len(cases) == 4 and all({"y", "dx", "dweight"} <= set(e) for e in cases.values())
    assert "dstate" in cases["packed [5, 0, 1, 2, 9, 3], W=4, state"]
    bad = {f"{case}: {n}": e for case, errs in cases.items() for n, e in errs.items() if not e <= 1e-5}
    assert not bad, bad


def test_layer_with_the_kernels_compiles_in_one_graph(results):
    errs = dict(results["compiled layer"])
    assert errs.pop("graph breaks") == 0
    assert errs.pop("conv ops in the graph") == 3  # q, k, v: each one registered op
    bad = {n: e for n, e in errs.items() if not e <= 1e-6}
    assert len(errs) > 10 and not bad, bad


@pytest.mark.parametrize("name", ["gated_deltanet", "mom"])
def test_layers_with_the_kernels_equal_torch_conv1d(results, name):
    errs = results[name + " layer"]
    assert {"o", "o after the cache", "dx"} <= set(errs) and any(n.startswith("conv_") for n in errs)
    bad = {n: e for n, e in errs.items() if not e <= 1e-5}
    assert not bad, bad


def test_registered_ops_pass_opcheck(results):
    """Schema, fake tensors (shapes, dtypes, strides), autograd registration, dynamic-shape AOT dispatch."""
    assert set(results["opcheck"]) == {"conv_silu", "conv_silu_backward"}
    bad = {name: failed for name, failed in results["opcheck"].items() if failed}
    assert not bad, bad
