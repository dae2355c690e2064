"""Causal depthwise short convolution and SiLU over packed rows, in Triton (the GPU path of the layers' short convs).

rows x [S, C] (channels last, as the projections write them) fall into consecutive segments: B sequences of one
length (`length`), or any lengths given by `cu_seqlens` [segments + 1] with each row's `segment` [S] (a memory
layer's (memory, batch) segments). Row r at position p of its segment computes, for the convolution's W taps,

    y[r] = silu(sum_s weight[:, W-1-s] * (x[r - s] if p >= s else state[segment, W-1 + p - s]))

so a row never reads another segment's rows; `state` [segments, W-1, C] holds the inputs before each segment
(None: zeros). One kernel reads x once and writes y once, where torch's conv1d wants [B, C, T] and a copy each way
(run 13: the MoM layer's three convolutions took 10 of its 19 ms forward, bench/results/run13/mom_profile.md).

Backward: `_dz_kernel` recomputes the pre-activation, writes dz = dy * silu'(z) and sums the weight's gradient
per program (the host adds the programs' partial sums); `_dx_kernel` gives dx[r] = sum_s weight[:, W-1-s] dz[r + s]
within the segment, and `_dstate_kernel` the state's gradient from each segment's first W-1 rows of dz.
"""
# (no `from __future__ import annotations`: torch.library reads the registered ops' annotations as objects; as
# strings it would compile them when a generated package imports this module)
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_C = 32, 128  # a program's tile
ROWS_PER_WEIGHT_SUM = 1024  # rows each program of the backward sums the weight's gradient over (then the host)


@triton.jit
def _place(r, m_r, cu, segment, LENGTH, EQUAL: tl.constexpr):
    """(segment, position in it, its length) of rows r."""
    if EQUAL:
        seg = r // LENGTH
        start = seg * LENGTH
        length = tl.zeros_like(r) + LENGTH
    else:
        seg = tl.load(segment + r, mask=m_r, other=0).to(tl.int64)
        start = tl.load(cu + seg, mask=m_r, other=0).to(tl.int64)
        length = tl.load(cu + seg + 1, mask=m_r, other=0).to(tl.int64) - start
    return seg, r - start, length


@triton.jit
def _tap(x, state, r, c, seg, p, m_r, m_c, s, C, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """The input tap s reads for rows r: x[r - s] inside the segment, else the segment's state row (or 0)."""
    inside = p >= s
    value = tl.load(x + (r - s)[:, None] * C + c[None, :], mask=(m_r & inside)[:, None] & m_c[None, :], other=0.0)
    value = value.to(tl.float32)
    if HAS_STATE:
        row = seg * (W - 1) + (W - 1) + p - s
        value += tl.load(state + row[:, None] * C + c[None, :], mask=(m_r & ~inside)[:, None] & m_c[None, :],
                         other=0.0).to(tl.float32)
    return value


@triton.jit
def _pre_activation(x, w, state, r, c, seg, p, m_r, m_c, C, W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                    HAS_STATE: tl.constexpr):
    z = tl.zeros([BR, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        tap = tl.load(w + c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        z += _tap(x, state, r, c, seg, p, m_r, m_c, s, C, W, HAS_STATE) * tap[None, :]
    return z


@triton.jit
def _fwd_kernel(x, w, state, cu, segment, y, S, C, LENGTH, W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                HAS_STATE: tl.constexpr, EQUAL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r, m_c = r < S, c < C
    seg, p, _ = _place(r, m_r, cu, segment, LENGTH, EQUAL)
    z = _pre_activation(x, w, state, r, c, seg, p, m_r, m_c, C, W, BR, BC, HAS_STATE)
    tl.store(y + r[:, None] * C + c[None, :], (z * tl.sigmoid(z)).to(y.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _dz_kernel(x, w, state, cu, segment, dy, dz, dw, S, C, LENGTH, W: tl.constexpr, BR: tl.constexpr,
               BC: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr, HAS_STATE: tl.constexpr, EQUAL: tl.constexpr):
    """dz = dy * silu'(z) for ROWS rows, and this program's share of the weight's gradient: dw [programs, W, C]."""
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = c < C
    o_w = tl.arange(0, BW)
    acc = tl.zeros([BW, BC], dtype=tl.float32)  # row k: the gradient of weight[:, k]
    for i in range(0, ROWS // BR):
        r = tl.program_id(0).to(tl.int64) * ROWS + i * BR + tl.arange(0, BR)
        m_r = r < S
        m = m_r[:, None] & m_c[None, :]
        seg, p, _ = _place(r, m_r, cu, segment, LENGTH, EQUAL)
        z = _pre_activation(x, w, state, r, c, seg, p, m_r, m_c, C, W, BR, BC, HAS_STATE)
        sig = tl.sigmoid(z)
        g = tl.load(dy + r[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32) * sig * (1 + z * (1 - sig))
        tl.store(dz + r[:, None] * C + c[None, :], g, mask=m)
        for s in tl.static_range(W):
            part = tl.sum(g * _tap(x, state, r, c, seg, p, m_r, m_c, s, C, W, HAS_STATE), axis=0)
            acc += tl.where(o_w[:, None] == W - 1 - s, part[None, :], 0.0)
    tl.store(dw + (tl.program_id(0) * W + o_w[:, None]) * C + c[None, :], acc, mask=(o_w < W)[:, None] & m_c[None, :])


@triton.jit
def _dx_kernel(dz, w, cu, segment, dx, S, C, LENGTH, W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
               EQUAL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r, m_c = r < S, c < C
    _, p, length = _place(r, m_r, cu, segment, LENGTH, EQUAL)
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for s in tl.static_range(W):  # row r is tap s of row r + s, in the same segment
        tap = tl.load(w + c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        m = (m_r & (p + s < length))[:, None] & m_c[None, :]
        acc += tl.load(dz + (r + s)[:, None] * C + c[None, :], mask=m, other=0.0) * tap[None, :]
    tl.store(dx + r[:, None] * C + c[None, :], acc.to(dx.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _dstate_kernel(dz, w, cu, dstate, C, LENGTH, W: tl.constexpr, BC: tl.constexpr, EQUAL: tl.constexpr):
    """State row j of a segment is tap s = p + W-1 - j of its row p, for p <= j (and p inside the segment)."""
    seg = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = c < C
    if EQUAL:
        start, length = seg * LENGTH, LENGTH
    else:
        start = tl.load(cu + seg).to(tl.int64)
        length = tl.load(cu + seg + 1).to(tl.int64) - start
    for j in tl.static_range(W - 1):
        acc = tl.zeros([BC], dtype=tl.float32)
        for p in range(0, j + 1):
            tap = tl.load(w + c * W + (j - p), mask=m_c, other=0.0).to(tl.float32)  # weight[:, W-1-s]
            acc += tl.load(dz + (start + p) * C + c, mask=m_c & (c * 0 + p < length), other=0.0) * tap
        tl.store(dstate + (seg * (W - 1) + j) * C + c, acc, mask=m_c)


def _forward(x, weight, state, cu_seqlens, segment, length):
    S, C = x.shape
    y = torch.empty_like(x)
    _fwd_kernel[(triton.cdiv(S, BLOCK_ROWS), triton.cdiv(C, BLOCK_C))](
        x, weight, state, cu_seqlens, segment, y, S, C, length, W=weight.shape[1], BR=BLOCK_ROWS, BC=BLOCK_C,
        HAS_STATE=state is not None, EQUAL=cu_seqlens is None)
    return y


def _backward(dy, x, weight, state, cu_seqlens, segment, length, segments, state_grad):
    S, C = x.shape
    W, equal = weight.shape[1], cu_seqlens is None
    dz = torch.empty(S, C, device=x.device, dtype=torch.float32)
    programs = triton.cdiv(S, ROWS_PER_WEIGHT_SUM)
    dw = torch.empty(programs, W, C, device=x.device, dtype=torch.float32)
    _dz_kernel[(programs, triton.cdiv(C, BLOCK_C))](
        x, weight, state, cu_seqlens, segment, dy.contiguous(), dz, dw, S, C, length, W=W, BR=BLOCK_ROWS, BC=BLOCK_C,
        BW=triton.next_power_of_2(W), ROWS=ROWS_PER_WEIGHT_SUM, HAS_STATE=state is not None, EQUAL=equal)
    dx = torch.empty_like(x)
    _dx_kernel[(triton.cdiv(S, BLOCK_ROWS), triton.cdiv(C, BLOCK_C))](
        dz, weight, cu_seqlens, segment, dx, S, C, length, W=W, BR=BLOCK_ROWS, BC=BLOCK_C, EQUAL=equal)
    dstate = torch.empty(segments if state_grad else 0, W - 1, C, device=x.device, dtype=torch.float32)
    if state_grad:
        _dstate_kernel[(segments, triton.cdiv(C, BLOCK_C))](
            dz, weight, cu_seqlens, dstate, C, length, W=W, BC=BLOCK_C, EQUAL=equal)
    # contiguous, as the fake says: a compiled graph asserts it (.to() alone keeps the transpose, or is a no-op)
    dweight = dw.sum(0).t().contiguous().to(weight.dtype)
    return dx, dweight, dstate.to(x.dtype if state is None else state.dtype)


# Registered ops (torch.library, as the emitted ops are: lmoec.runtime.library), so torch.compile traces a layer
# with a short conv as one graph; their fakes give the compiler shapes without a kernel.
@torch.library.custom_op("lmoec_runtime::conv_silu", mutates_args=())
def _conv_silu_op(x: torch.Tensor, weight: torch.Tensor, state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  segment: Optional[torch.Tensor], length: int) -> torch.Tensor:
    return _forward(x, weight, state, cu_seqlens, segment, length)


@_conv_silu_op.register_fake
def _(x, weight, state, cu_seqlens, segment, length):
    return torch.empty_like(x)


@torch.library.custom_op("lmoec_runtime::conv_silu_backward", mutates_args=())
def _conv_silu_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, state: Optional[torch.Tensor],
                           cu_seqlens: Optional[torch.Tensor], segment: Optional[torch.Tensor], length: int,
                           segments: int, state_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dstate: [0, W-1, C] unless state_grad)."""
    return _backward(dy, x, weight, state, cu_seqlens, segment, length, segments, state_grad)


@_conv_silu_backward_op.register_fake
def _(dy, x, weight, state, cu_seqlens, segment, length, segments, state_grad):
    dstate = x.new_empty(segments if state_grad else 0, weight.shape[1] - 1, x.shape[1],
                         dtype=x.dtype if state is None else state.dtype)
    return torch.empty_like(x), torch.empty_like(weight), dstate


def _setup_context(ctx, inputs, output):
    x, weight, state, cu_seqlens, segment, length = inputs
    ctx.save_for_backward(x, weight, state, cu_seqlens, segment)
    ctx.length = length
    ctx.segments = (x.shape[0] // length if length else 0) if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _conv_silu_grad(ctx, dy):
    x, weight, state, cu_seqlens, segment = ctx.saved_tensors
    state_grad = state is not None and ctx.needs_input_grad[2]
    dx, dweight, dstate = _conv_silu_backward_op(dy, x, weight, state, cu_seqlens, segment, ctx.length, ctx.segments,
                                                 state_grad)
    return dx, dweight, dstate if state_grad else None, None, None, None


_conv_silu_op.register_autograd(_conv_silu_grad, setup_context=_setup_context)


ON_CPU = False  # tests (under TRITON_INTERPRET=1): CPU tensors take the kernels too


def fused(x: torch.Tensor) -> bool:
    """Whether activations x take this module's kernels: on the GPU (or ON_CPU), in a dtype the kernels compute in
    fp32 (float64 keeps torch's path: the reference backend stays float64 throughout)."""
    return x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (x.is_cuda or ON_CPU)


def last_inputs(x: torch.Tensor, state: Optional[torch.Tensor], keep: int, *, length: int = 0,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[segments, keep, C]: each segment's last `keep` inputs, its own rows where it has them and its state's (or
    zeros) before, in x's dtype; without concatenating the state and the rows (a copy of every row)."""
    C = x.shape[1]
    if cu_seqlens is None:
        ends = torch.arange(1, x.shape[0] // length + 1, device=x.device) * length
        lengths = torch.full_like(ends, length)
    else:
        ends, lengths = cu_seqlens[1:], cu_seqlens[1:] - cu_seqlens[:-1]
    segments = ends.numel()
    if x.shape[0] == 0:  # every segment empty: its state (or zeros) is all it has seen
        return x.new_zeros(segments, keep, C) if state is None else state.to(x.dtype)
    back = torch.arange(-keep, 0, device=x.device)
    p = lengths[:, None] + back  # each kept input's position in its segment: < 0 in the state
    own = x.index_select(0, (ends[:, None] + back).clamp_min(0).reshape(-1)).view(segments, keep, C)
    if state is None:
        return torch.where((p >= 0)[..., None], own, 0)
    rows = torch.arange(segments, device=x.device)[:, None] * keep + keep + p.clamp_max(-1)
    before = state.to(x.dtype).reshape(-1, C).index_select(0, rows.reshape(-1)).view(segments, keep, C)
    return torch.where((p >= 0)[..., None], own, before)


def conv_silu(x: torch.Tensor, weight: torch.Tensor, state: Optional[torch.Tensor] = None, *, length: int = 0,
              cu_seqlens: Optional[torch.Tensor] = None, segment: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(causal depthwise conv) of rows x [S, C] within their segments -> y [S, C] in x's dtype.

    weight [C, W] (an nn.Conv1d's weight viewed [C, W]); segments: `length` rows each, or `cu_seqlens` with each
    row's `segment`; state [segments, W-1, C] or None (zeros). Differentiable in x, weight and state.
    """
    has_state = state is not None and weight.shape[1] > 1
    return _conv_silu_op(x.contiguous(), weight.contiguous(), state.contiguous() if has_state else None, cu_seqlens,
                         segment, length)
