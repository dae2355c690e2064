"""The MoE layer's fused SwiGLU Triton kernels, on CPU under TRITON_INTERPRET=1, against float64 references.

CUDA runs them in place of eager silu(g) * up * weight; here a child process (TRITON_INTERPRET=1 must be
set before triton is first imported) forces them on CPU tensors. It checks the kernels alone (with and
without the per-row combine weights, widths that are not a multiple of the block) and then every layer
configuration of test_moe against its dense float64 reference, gradients included; the kernels alone also in bf16,
with the interpreter rounding bf16 as the GPU does (tests/interpreter_bf16.py), and on the GPU in bench/moe_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r'''
    import interpreter_bf16
    interpreter_bf16.install()
    import torch
    import torch.nn.functional as F
    from lmoec.runtime import moe
    from test_moe import CONFIGS, HIDDEN, check_against_reference, make_moe

    moe.fused_swiglu_applies = lambda gate: True
    torch.manual_seed(0)
    for weighted in (True, False):
        for rows, cols in ((37, 300), (5, 12), (1, 128)):
            g, u = (torch.randn(rows, cols, dtype=torch.float64, requires_grad=True) for _ in range(2))
            w = torch.rand(rows, dtype=torch.float64, requires_grad=True) if weighted else None
            h = moe.swiglu(g.float(), u.float(), None if w is None else w.float())
            assert type(h.grad_fn).__name__ == "_FusedSwiGLUBackward"
            ref = F.silu(g) * u * (w[:, None] if weighted else 1)
            dh = torch.randn_like(ref)
            inputs = [g, u] + ([w] if weighted else [])
            torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)
            for got, want in zip(torch.autograd.grad(h, inputs, dh.float()), torch.autograd.grad(ref, inputs, dh)):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            # bf16 inputs and outputs (fp32 inside): the reference on the same rounded inputs, within bf16's rounding
            gb, ub = (x.detach().bfloat16().requires_grad_() for x in (g, u))
            wb = None if w is None else w.detach().bfloat16().requires_grad_()
            hb = moe.swiglu(gb, ub, wb)
            assert hb.dtype == torch.bfloat16 and type(hb.grad_fn).__name__ == "_FusedSwiGLUBackward"
            exact = [x.detach().double().requires_grad_() for x in [gb, ub] + ([wb] if weighted else [])]
            ref = F.silu(exact[0]) * exact[1] * (exact[2][:, None] if weighted else 1)
            torch.testing.assert_close(hb.double(), ref, rtol=2 ** -8, atol=1e-6)
            for got, want in zip(torch.autograd.grad(hb, [gb, ub] + ([wb] if weighted else []), dh.bfloat16()),
                                 torch.autograd.grad(ref, exact, dh.bfloat16().double())):
                torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-3)
    for name, config in sorted(CONFIGS.items()):
        for backend in ("loop", "grouped"):
            layer = make_moe(dtype=torch.float32, grouped_backend=backend, **config)
            if layer.router.bias is not None:
                layer.router.bias.copy_(torch.randn(layer.experts) * 0.3)
            check_against_reference(layer, torch.randn(2, 13, HIDDEN), rtol=1e-5, atol=1e-5)
    print("ALL OK")
    '''
)


def test_fused_swiglu_kernels_match_reference():
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
