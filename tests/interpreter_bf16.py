"""Make bf16 mean under Triton's CPU interpreter what it means on a GPU, so the kernels' bf16 checks run on a CPU.

The interpreter keeps bf16 tensors as their uint16 bit patterns, and two of its operations differ from the GPU:
- `create_dot` hands bf16 operands to `np.matmul` unconverted, so a bf16 dot multiplies the bit patterns (values
  near 1e10; triton-lang/triton#11584, closed upstream as not supported). The GPU multiplies the values: each
  bf16 product is exact in fp32 and the sum is fp32. Converting the operands to float32 (exact: bf16 is
  float32's upper half) and summing in float32 is that, up to the order of the sum.
- a float32 -> bf16 cast (`.to`, or a store into a bf16 tensor) truncates the mantissa; the GPU rounds to
  nearest even, with half the error and no bias. A bf16 output checked against float32 shows the difference.
The emitted kernels do no other bf16 arithmetic (they load bf16, compute in fp32, and cast to bf16 for dots and
stores), so these two are all a bf16 check needs.
- (a third, not a bug) an fp32 dot at the default precision, tf32, sees only the operands' upper 19 bits on the
  GPU; the interpreter multiplies them exactly. `install(tf32=True)` drops the lower 13 bits of such operands (the
  tensor cores' reading of fp32 registers, the worse of truncation and rounding), so a kernel that keeps
  operands in fp32 for accuracy is checked at the accuracy the GPU gives it. fp32 checks at ieee-level bounds
  leave it off.

`install()` patches the first two only when a probe shows the bug, so a fixed interpreter is left alone.
"""
from __future__ import annotations

import numpy as np


def _bf16_to_float32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(data: np.ndarray) -> np.ndarray:
    """Round to nearest even (NaN stays NaN), as the GPU's cvt.rn.bf16.f32."""
    bits = data.astype(np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)


def _probes() -> tuple[bool, bool]:
    """(dot is wrong, cast is wrong): a 16x16 bf16 dot of small integers (exact in any precision), and a cast
    of values whose nearest bf16 differs from the truncated one."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    @triton.jit
    def cast16(x_ptr, y_ptr):
        r = tl.arange(0, 16)
        tl.store(y_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-2, 3, (16, 16), generator=gen).bfloat16()
    b = torch.randint(-2, 3, (16, 16), generator=gen).bfloat16()
    c = torch.full((16, 16), float("nan"))
    dot16[(1,)](a, b, c)
    x = 1 + torch.arange(16, dtype=torch.float32) * 2.0 ** -10 - 2.0 ** -12  # every rounding case around 1
    y = torch.full((16,), float("nan"), dtype=torch.bfloat16)
    cast16[(1,)](x, y)
    return not torch.equal(c, a.float() @ b.float()), not torch.equal(y, x.bfloat16())


def _tf32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def install(tf32: bool = False) -> list[str]:
    """Patch what the probes find wrong (and tf32 dots when asked); the names of the patched operations."""
    import triton.language as tl
    from triton.runtime import interpreter

    dot_wrong, cast_wrong = _probes()
    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _bf16_to_float32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_to_float32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        if tf32 and input_precision.name == "TF32" and a.dtype.scalar == tl.float32 == b.dtype.scalar:
            out = np.matmul(_tf32(a.data), _tf32(b.data), dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_float32_to_bf16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    patched = []
    if dot_wrong or tf32:
        builder.create_dot = create_dot
        patched.append("create_dot")
    if cast_wrong:
        builder.cast_impl = cast_impl
        patched.append("cast_impl")
    if any(_probes()):
        raise RuntimeError("the bf16 patches did not take: the interpreter's builder has changed")
    return patched
