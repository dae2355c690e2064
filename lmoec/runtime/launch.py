"""Launch settings the emitted Triton modules share."""
from __future__ import annotations

import torch


def fp32_stages(x: torch.Tensor, stages: int) -> int:
    """Pipeline stages for a kernel whose loops load tiles of x's dtype: `stages` for 16-bit inputs, one for fp32.

    fp32 tiles take twice the shared memory of 16-bit ones, and multi-buffered they exceed an H100's 227 KB per
    block in some kernels at head dim 128 (tests/test_hopper_compile.py compiles both dtypes)."""
    return stages if x.dtype in (torch.float16, torch.bfloat16) else 1
