"""The MoE layer: router, top-k, expert-grouped compute, shared experts, balancing losses.

For N tokens routed to k experts each there are N*k (token, expert) *slots*:

    route     logits = x W_r^T in fp32 -> scores -> k experts per token and their combine weights
    dispatch  the slots' tokens gathered in expert order (a stable sort: by position within an expert)
    experts   grouped GEMMs over the contiguous per-expert segments: (w * silu(x Wg) * (x Wu)) Wd,
              the slot's combine weight w applied inside the SwiGLU (one fused kernel on CUDA)
    combine   every slot's (already weighted) output gathered back to slot order, summed over the k slots

Expert parallel (lmoec.trainer.expert_parallel) only replaces `dispatch`/`experts` by an all_to_all
round trip; routing, losses and the combine (there a batched weighted sum) stay on the token's
rank, so the model code never knows about ranks.

Nothing here waits for the GPU in the dropless case: counts come from an index_add (bincount
reads its max back to the host) and grouped GEMMs take their offsets as a device tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager SwiGLU below serves every device then
    triton = None

# torch >= 2.9 exposes grouped_mm publicly; older releases (2.8) only as torch._grouped_mm.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

GroupedBackend = Literal["auto", "grouped", "loop"]
# experts_fn(rows, counts, row_weight or None) -> outputs, one row per input row
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def grouped_mm_available() -> bool:
    return _GROUPED_MM is not None


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, backend: GroupedBackend = "auto") -> torch.Tensor:
    """rows [M, K], grouped by expert in segments of `counts` [E]; weight [E, K, N] -> [M, N].

    "grouped" runs one grouped GEMM (torch grouped_mm / _grouped_mm), with no host sync. "loop"
    runs one matmul per segment. "auto" takes grouped GEMMs on CUDA in bf16, where torch has a
    kernel for them, and the loop elsewhere: torch's CPU grouped_mm accepts float32/bf16 only (not
    the float64 the tests' references use), wants 16-byte aligned strides, and on CPU a loop over
    the segments costs nothing extra. Both give the same result; tests check the grouped path on
    CPU in float32.
    """
    if _resolve(backend, rows) == "grouped" and rows.shape[0] > 0:
        n, pad = weight.shape[-1], _pad_to_16_bytes(weight.shape[-1], weight)
        out = _GROUPED_MM(rows, F.pad(weight, (0, pad)) if pad else weight, offs=torch.cumsum(counts, 0, dtype=torch.int32))
        return out[:, :n] if pad else out
    segments = torch.split(rows, counts.tolist())
    return torch.cat([seg @ weight[e] for e, seg in enumerate(segments)])


def grouped_weight_grad(rows: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, backend: GroupedBackend = "auto") -> torch.Tensor:
    """The gradient of grouped_matmul's weight: rows [M, K], grad [M, N] -> [E, K, N], expert e's rows^T grad."""
    if _resolve(backend, rows) == "grouped" and rows.shape[0] > 0:
        n, pad = grad.shape[-1], _pad_to_16_bytes(grad.shape[-1], grad)
        out = _GROUPED_MM(rows.t(), F.pad(grad, (0, pad)) if pad else grad, offs=torch.cumsum(counts, 0, dtype=torch.int32))
        return out[..., :n] if pad else out
    pairs = zip(torch.split(rows, counts.tolist()), torch.split(grad, counts.tolist()))
    return torch.stack([seg.t() @ g for seg, g in pairs])


def _resolve(backend: GroupedBackend, rows: torch.Tensor) -> str:
    """The path that runs: "auto" takes grouped GEMMs for bf16 on CUDA whose rows' width is 16-byte aligned (the
    kernel's stride rule; an output width that is not gets padded, _pad_to_16_bytes), else the loop."""
    if backend == "auto":
        aligned = rows.shape[-1] * rows.element_size() % 16 == 0
        return "grouped" if rows.is_cuda and rows.dtype == torch.bfloat16 and aligned and _GROUPED_MM is not None else "loop"
    return backend


def _pad_to_16_bytes(width: int, x: torch.Tensor) -> int:
    """Columns to add so that rows of `width` elements of x's dtype span a multiple of 16 bytes: grouped_mm wants
    16-byte aligned strides, which a narrow output (a per-memory decay projection to H heads) does not have."""
    per = 16 // x.element_size()
    return -width % per


# ---- SwiGLU: one Triton kernel each way on CUDA -------------------------------------------
#
# Eager `silu(g) * u * w` is three passes over [M, ffn] forward and five backward, and autograd
# keeps silu(g) as well; the kernels read g, u (and dh) once, compute in fp32, recompute silu in
# the backward and sum the combine weight's gradient per row on the way.

_SWIGLU_BLOCK_M, _SWIGLU_BLOCK_N = 8, 128

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, w_ptr, h_ptr, rows, cols, HAS_WEIGHT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        offs = r.to(tl.int64)[:, None] * cols + c[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        if HAS_WEIGHT:
            h = h * tl.load(w_ptr + r, mask=r < rows, other=0.0).to(tl.float32)[:, None]
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, u_ptr, w_ptr, dh_ptr, dg_ptr, du_ptr, dw_ptr, rows, cols, HAS_WEIGHT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = r < rows
        if HAS_WEIGHT:
            w = tl.load(w_ptr + r, mask=row_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, cols, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (c < cols)[None, :]
            offs = r.to(tl.int64)[:, None] * cols + c[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            if HAS_WEIGHT:
                dw += tl.sum(dh * silu * u, axis=1)
                dh = dh * w[:, None]
            tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(dg_ptr + offs, (dh * u * s * (1 + g * (1 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(dw_ptr + r, dw.to(dw_ptr.dtype.element_ty), mask=row_ok)


class _FusedSwiGLU(torch.autograd.Function):
    """h = silu(gate) * up * weight[:, None] (weight [M] or None) by the Triton kernels above."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        gate, up = gate.contiguous(), up.contiguous()
        weight = None if weight is None else weight.contiguous()
        ctx.save_for_backward(gate, up, weight)
        h = torch.empty_like(gate)
        rows, cols = gate.shape
        grid = (triton.cdiv(rows, _SWIGLU_BLOCK_M), triton.cdiv(cols, _SWIGLU_BLOCK_N))
        _swiglu_fwd_kernel[grid](gate, up, gate if weight is None else weight, h, rows, cols, HAS_WEIGHT=weight is not None,
                                 BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up, weight = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        dweight = None if weight is None else torch.empty_like(weight)
        rows, cols = gate.shape
        _swiglu_bwd_kernel[(triton.cdiv(rows, _SWIGLU_BLOCK_M),)](
            gate, up, gate if weight is None else weight, dh.contiguous(), dgate, dup, gate if dweight is None else dweight,
            rows, cols, HAS_WEIGHT=weight is not None, BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N)
        return dgate, dup, dweight


def fused_swiglu_applies(gate: torch.Tensor) -> bool:
    """Whether `swiglu` runs the Triton kernels: on CUDA, for the dtypes they compute in fp32."""
    return triton is not None and gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16, torch.float32)


def swiglu(gate: torch.Tensor, up: torch.Tensor, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) * up [M, ffn], each row scaled by row_weight [M] when given (under torch.compile the plain
    composition, which the compiler fuses itself)."""
    if gate.shape[0] > 0 and fused_swiglu_applies(gate) and not torch.compiler.is_compiling():
        return _FusedSwiGLU.apply(gate, up, row_weight)
    h = F.silu(gate) * up
    return h if row_weight is None else (h * row_weight.unsqueeze(1)).to(h.dtype)


def _swiglu_grads(gate, up, row_weight, dh) -> list[torch.Tensor]:
    """[dgate, dup] (+ [drow_weight] with row weights) of swiglu, in fp32 as the fused kernels compute them."""
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    silu = g * s
    grads = []
    if row_weight is not None:
        grads.append((d * silu * u).sum(1).to(row_weight.dtype))
        d = d * row_weight.float()[:, None]
    return [(d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * silu).to(up.dtype)] + grads


class _SwiGLUExperts(torch.autograd.Function):
    """The expert MLPs of swiglu_experts, keeping rows, gate, up and the row weights for the backward.

    Autograd over the plain composition also keeps the SwiGLU output [M, ffn] (for the down projection's
    weight gradient) and the autocast copies of the three expert weights (a whole layer's experts in bf16,
    at any token count); the backward here makes both again, one elementwise pass and three casts, and runs
    the same products autograd would.
    """

    @staticmethod
    def forward(ctx, rows, w_gate, w_up, w_down, row_weight, counts, backend, dtype):
        ctx.backend, ctx.dtype = backend, dtype
        cast = lambda w: w if dtype is None else w.to(dtype)
        gate = grouped_matmul(rows, cast(w_gate), counts, backend)
        up = grouped_matmul(rows, cast(w_up), counts, backend)
        ctx.save_for_backward(rows, gate, up, row_weight, w_gate, w_up, w_down, counts)
        return grouped_matmul(swiglu(gate, up, row_weight), cast(w_down), counts, backend)

    @staticmethod
    def backward(ctx, dout):
        rows, gate, up, row_weight, w_gate, w_up, w_down, counts = ctx.saved_tensors
        backend, cast = ctx.backend, (lambda w: w if ctx.dtype is None else w.to(ctx.dtype))
        wg, wu, wd = cast(w_gate), cast(w_up), cast(w_down)
        dh = grouped_matmul(dout, wd.transpose(-2, -1), counts, backend)
        if torch.compiler.is_compiling():  # the formulas written out: traced and fused with the rest
            h = swiglu(gate, up, row_weight)
            dgate, dup, *drw = _swiglu_grads(gate, up, row_weight, dh)
        else:
            with torch.enable_grad():
                leaves = [t if t is None else t.detach().requires_grad_() for t in (gate, up, row_weight)]
                h = swiglu(*leaves)
            dgate, dup, *drw = torch.autograd.grad(h, [t for t in leaves if t is not None], dh)
        dw_down = grouped_weight_grad(h.detach(), dout, counts, backend)
        drows = grouped_matmul(dgate, wg.transpose(-2, -1), counts, backend) + grouped_matmul(dup, wu.transpose(-2, -1), counts, backend)
        dw_gate = grouped_weight_grad(rows, dgate, counts, backend)
        dw_up = grouped_weight_grad(rows, dup, counts, backend)
        return (drows, dw_gate.to(w_gate.dtype), dw_up.to(w_up.dtype), dw_down.to(w_down.dtype),
                drw[0] if drw else None, None, None, None)


def swiglu_experts(rows, counts, w_gate, w_up, w_down, backend: GroupedBackend = "auto", row_weight=None) -> torch.Tensor:
    """Expert i: (silu(x @ w_gate[i]) * (x @ w_up[i])) @ w_down[i], on rows grouped by expert,
    each row's SwiGLU output scaled by row_weight [M] when given.

    Under autocast, operands are cast to the autocast dtype here, as autocast does for
    matmuls (it does not know grouped_mm), so fp32 master weights still take the grouped kernel.
    The row weights stay as they are: the fused SwiGLU multiplies in fp32.

    Gate and up stay two grouped GEMMs: one over torch.cat([w_gate, w_up], -1) would cost a
    copy of both weights every forward (and of their gradients in the backward) for about the
    time it saves, and makes the forward GEMMs slower at A0.3B-2B's shape (bench/moe_gpu.py).
    """
    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is not None:
        rows = rows.to(dtype)
    return _SwiGLUExperts.apply(rows, w_gate, w_up, w_down, row_weight, counts, backend, dtype)


# ---- dispatch and combine -------------------------------------------------------------------


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def count_per_expert(row_expert: torch.Tensor, experts: int) -> torch.Tensor:
    """bincount(row_expert, minlength=experts) without its host sync (it reads the max back), as int64.

    Summed in int32: torch.compile has no atomic add for int64 and runs an int64 index_add as a sort-based
    index_put (1.1 ms per call for 131K slots on an H100, run 14); int32 becomes one atomic-add kernel."""
    ones = torch.ones_like(row_expert, dtype=torch.int32)
    return torch.zeros(experts, dtype=torch.int32, device=row_expert.device).index_add_(0, row_expert, ones).long()


def capacity_of(capacity_factor: Optional[float], slots: int, experts: int) -> Optional[int]:
    """Switch-style capacity: ceil(factor * slots / experts) slots per expert; None is dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * slots / experts)


def _take_sum(t: torch.Tensor, index: torch.Tensor, repeats: int) -> torch.Tensor:
    """t's rows in the order `index`, every `repeats` consecutive ones summed. One reduction in
    t's dtype: torch accumulates bf16/fp16 sums in fp32, with no fp32 copy of the rows."""
    t = t.index_select(0, index)
    return t if repeats == 1 else t.view(-1, repeats, *t.shape[1:]).sum(1)


class _GatherRows(torch.autograd.Function):
    """rows = source.index_select(0, index), where every source row is read `repeats` times.

    The backward puts the gradient back in slot order with the inverse permutation and sums each
    source row's `repeats` slots: deterministic and free of the atomics of index_select's own
    backward (an index_add) on CUDA.
    """

    @staticmethod
    def forward(ctx, source, index, inverse, repeats):
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take_sum(grad, inverse, ctx.repeats), None, None, None


class _SumRows(torch.autograd.Function):
    """The transpose of _GatherRows: rows back in slot order by `inverse`, every `repeats` summed.

    Its backward is a plain gather: each row's gradient is its source row's, read by `index`.
    """

    @staticmethod
    def forward(ctx, rows, inverse, index, repeats):
        ctx.save_for_backward(index)
        return _take_sum(rows, inverse, repeats)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    return _GatherRows.apply(source, index, inverse, repeats)


def sum_rows(rows: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    return _SumRows.apply(rows, inverse, index, repeats)


def run_grouped(
    source: torch.Tensor,
    repeats: int,
    row_expert: torch.Tensor,
    experts: int,
    capacity: Optional[int],
    experts_fn: ExpertsFn,
    row_weight: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run rows through their experts, grouped by expert.

    Row m is source[m // repeats] (repeats = top_k for a token's slots), for expert row_expert[m].
    Rows are sorted by expert with a stable sort, so an expert sees its rows in their given order,
    and with a capacity it keeps the first `capacity` of them: dropped rows come back as zeros
    (deterministic: by position). Without `row_weight` the result is [M, hidden] in the rows'
    order. With row_weight [M] (the combine weights) the experts scale each row by its weight and
    each source row gets the sum of its `repeats` rows, [M / repeats, hidden]: the combine is then
    the way back to slot order, with no weighted pass of its own. `counts` (count_per_expert of row_expert),
    when the caller has it already.
    """
    order = torch.argsort(row_expert, stable=True)
    inverse = inverse_permutation(order)
    counts = count_per_expert(row_expert, experts) if counts is None else counts
    source_row = order // repeats
    if capacity is None:
        weight = None if row_weight is None else gather_rows(row_weight, order, inverse)
        out_sorted = experts_fn(gather_rows(source, source_row, inverse, repeats), counts, weight)
        if row_weight is None:
            return gather_rows(out_sorted, inverse, order)
        return sum_rows(out_sorted, inverse, source_row, repeats)
    sorted_expert = row_expert.index_select(0, order)
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - group_start.index_select(0, sorted_expert)
    kept = (rank_in_expert < capacity).nonzero().squeeze(1)
    kept_rows = order.index_select(0, kept)
    weight = None if row_weight is None else row_weight.index_select(0, kept_rows)
    out_kept = experts_fn(source.index_select(0, kept_rows // repeats), counts.clamp(max=capacity), weight)
    # every sorted row reads its kept output, or the zero row appended at the end
    read = torch.full_like(order, kept.numel())
    read[kept] = torch.arange(kept.numel(), device=order.device)
    out_padded = torch.cat([out_kept, out_kept.new_zeros(1, out_kept.shape[1])])
    out = out_padded.index_select(0, read.index_select(0, inverse))
    return out if row_weight is None else out.view(-1, repeats, out.shape[1]).sum(1)


class Router(nn.Module):
    """Linear scores over experts; `bias` [E] (aux-loss-free balancing) shifts selection only.

    The bias is a parameter without gradient: it is updated by `MoE.update_bias` from the load,
    not by the optimizer (DeepSeek-V3's rule), and checkpoints save it with the weights.
    """

    def __init__(self, hidden: int, experts: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(experts, device=device, dtype=torch.float32), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 at least: softmax, top-k and the z-loss are sensitive to bf16 rounding."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.weight.to(dtype))


class SharedExperts(nn.Module):
    """`count` always-on experts of width `ffn`, summed: one SwiGLU MLP of width count * ffn."""

    def __init__(self, hidden: int, ffn: int, count: int, device=None, dtype=None):
        super().__init__()
        width = ffn * count
        self.w_gate = nn.Parameter(torch.empty(hidden, width, device=device, dtype=dtype))
        self.w_up = nn.Parameter(torch.empty(hidden, width, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(width, hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class MoE(nn.Module):
    """A Mixture-of-Experts SwiGLU layer: forward(x [B, T, hidden]) -> y [B, T, hidden].

    After each call: `last_aux_loss` = E * sum_i f_i P_i (f_i: share of the N*k slots routed to
    expert i before any capacity drop, P_i: mean router probability of expert i),
    `last_z_loss` = mean(logsumexp(logits)^2), both unscaled and differentiable;
    `balancing_loss()` weighs them with the spec's coefficients. Router stats:
    `last_tokens_per_expert` [E] (slots routed, before drops; over the whole EP group) and
    `last_dropped_tokens` (slots over capacity).

    Top-k ties go to the lower expert index. Softmax scores with order "topk_softmax" pick on
    logits and softmax over the k picked (always normalized); sigmoid scores are normalized over
    the k picked when `normalize_topk`. The router bias shifts selection, never the weights.
    """

    def __init__(
        self,
        hidden: int,
        experts: int,
        top_k: int,
        expert_ffn: int,
        shared_experts: int = 0,
        score: Literal["softmax", "sigmoid"] = "softmax",
        order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk",
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        aux_loss: float = 0.01,
        z_loss: float = 0.001,
        capacity_factor: Optional[float] = None,
        normalize_topk: bool = True,
        init_std: float = 0.02,
        grouped_backend: GroupedBackend = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0 < top_k <= experts:
            raise ValueError(f"top_k = {top_k} must be between 1 and experts = {experts}")
        self.hidden, self.experts, self.top_k, self.expert_ffn = hidden, experts, top_k, expert_ffn
        self.score, self.order, self.normalize_topk = score, order, normalize_topk
        self.bias_update_rate = bias_update_rate
        self.aux_loss_coef, self.z_loss_coef = aux_loss, z_loss
        self.capacity_factor = capacity_factor
        self.init_std = init_std
        self.grouped_backend: GroupedBackend = grouped_backend
        self.router = Router(hidden, experts, bias_balancing, device=device, dtype=dtype)
        self.w_gate = nn.Parameter(torch.empty(experts, hidden, expert_ffn, device=device, dtype=dtype))
        self.w_up = nn.Parameter(torch.empty(experts, hidden, expert_ffn, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(experts, expert_ffn, hidden, device=device, dtype=dtype))
        self.shared = SharedExperts(hidden, expert_ffn, shared_experts, device=device, dtype=dtype) if shared_experts else None
        # set by lmoec.trainer.expert_parallel.shard_experts: this rank then holds a slice of the experts
        self.expert_parallel = None
        # set by lmoec.trainer.parallelize.apply_sequence_parallel: the ranks holding the other slices of the
        # sequence, whose routed slots count in the aux loss's f_i
        self.sequence_group = None
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.last_dropped_tokens: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=self.init_std)

    # ---- routing ------------------------------------------------------------------

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [N, E] -> (experts [N, k] int64, weights [N, k], probs [N, E] for the aux loss)."""
        bias = self.router.bias
        if self.score == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
            selection = scores
        else:
            probs = scores = torch.softmax(logits, -1)
            selection = logits if self.order == "topk_softmax" else scores
        if bias is not None:
            selection = selection + bias.to(selection.dtype)
        # a stable descending sort breaks ties towards the lower expert index, on every device
        chosen = torch.sort(selection.detach(), dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        if self.score == "softmax" and self.order == "topk_softmax":
            weights = torch.softmax(logits.gather(1, chosen), -1)
        else:
            weights = scores.gather(1, chosen)
            if self.normalize_topk:
                weights = weights / weights.sum(-1, keepdim=True)
        return chosen, weights, probs

    # ---- forward ------------------------------------------------------------------

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return swiglu_experts(rows, counts, self.w_gate, self.w_up, self.w_down, self.grouped_backend, row_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden)
        n, k, e = tokens.shape[0], self.top_k, self.experts
        logits = self.router(tokens)
        chosen, weights, probs = self.route(logits)
        slot_expert = chosen.reshape(-1)
        counts = count_per_expert(slot_expert, e)
        ep = self.expert_parallel
        if ep is None:
            global_counts = counts
            capacity = capacity_of(self.capacity_factor, n * k, e)
            # the experts apply the combine weights and their rows come back summed per token
            y = run_grouped(tokens, k, slot_expert, e, capacity, self._experts, weights.reshape(-1), counts)
        else:
            counts_by_rank = ep.exchange_counts(counts)
            global_counts = counts_by_rank.sum(0)
            capacity = capacity_of(self.capacity_factor, int(global_counts.sum()), e)
            slot_out = ep.dispatch_combine(tokens, slot_expert, k, counts_by_rank, capacity, self._experts)
            y = torch.bmm(weights.to(tokens.dtype).unsqueeze(1), slot_out.view(n, k, self.hidden)).squeeze(1)
        if self.shared is not None:
            y = y + self.shared(tokens)
        self._record(logits, probs, global_counts)
        return y.view(shape)

    def _record(self, logits, probs, global_counts) -> None:
        """Losses and stats of this call. Under EP and SP, f_i is global and P_i local: the mean of the
        ranks' aux losses is the single-process aux loss over the whole batch."""
        counts = global_counts
        if self.sequence_group is not None:
            counts = global_counts.clone()
            torch.distributed.all_reduce(counts, group=self.sequence_group)
        f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
        self.last_aux_loss = self.experts * (f * probs.mean(0)).sum()
        self.last_z_loss = torch.logsumexp(logits, -1).square().mean()
        self.last_tokens_per_expert = global_counts.detach()
        if self.capacity_factor is None:
            self.last_dropped_tokens = torch.zeros((), dtype=torch.long, device=global_counts.device)
        else:  # no host sync in the dropless case
            capacity = capacity_of(self.capacity_factor, int(global_counts.sum()), self.experts)
            self.last_dropped_tokens = (global_counts - capacity).clamp(min=0).sum()

    def balancing_loss(self) -> torch.Tensor:
        """The last call's losses weighted by the spec's coefficients: add this to the task loss."""
        return self.aux_loss_coef * self.last_aux_loss + self.z_loss_coef * self.last_z_loss

    def router_stats(self) -> dict[str, torch.Tensor]:
        return {
            "tokens_per_expert": self.last_tokens_per_expert,
            "dropped_tokens": self.last_dropped_tokens,
            "aux_loss": self.last_aux_loss.detach(),
            "z_loss": self.last_z_loss.detach(),
        }

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded.

        Call once per optimizer step (after it), with the load summed over the data-parallel
        group if tokens differ across ranks; default: the last call's load.
        """
        if self.router.bias is None:
            raise ValueError("this MoE layer has no router bias (bias_balancing is off)")
        load = (self.last_tokens_per_expert if tokens_per_expert is None else tokens_per_expert).float()
        self.router.bias.add_(self.bias_update_rate * torch.sign(load.mean() - load).to(self.router.bias.device))
