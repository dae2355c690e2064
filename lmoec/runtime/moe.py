"""The MoE layer: router, top-k, expert-grouped compute, shared experts, balancing losses.

For N tokens routed to k experts each there are N*k (token, expert) *slots*:

    route     logits = x W_r^T in fp32 -> scores -> k experts per token and their combine weights
    dispatch  the slots' tokens gathered in expert order (a stable sort: by position within an expert)
    experts   grouped GEMMs over the contiguous per-expert segments: (silu(x Wg) * (x Wu)) Wd
    combine   every slot's output gathered back to slot order, then a weighted sum over the k slots

Expert parallel (lmoec.runtime.expert_parallel) only replaces `dispatch`/`experts` by an all_to_all
round trip; routing, losses and the combine stay on the token's rank, so the model code never knows
about ranks.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

# torch >= 2.9 exposes grouped_mm publicly; older releases (2.8) only as torch._grouped_mm.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

GroupedBackend = Literal["auto", "grouped", "loop"]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    if backend == "auto":
        backend = "grouped" if rows.is_cuda and rows.dtype == torch.bfloat16 and _GROUPED_MM is not None else "loop"
    if backend == "grouped" and rows.shape[0] > 0:
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return _GROUPED_MM(rows, weight, offs=offsets)
    segments = torch.split(rows, counts.tolist())
    return torch.cat([seg @ weight[e] for e, seg in enumerate(segments)])


def swiglu_experts(rows, counts, w_gate, w_up, w_down, backend: GroupedBackend = "auto") -> torch.Tensor:
    """Expert i: (silu(x @ w_gate[i]) * (x @ w_up[i])) @ w_down[i], on rows grouped by expert.

    Under CUDA autocast, operands are cast to the autocast dtype here, as autocast does for
    matmuls (it does not know grouped_mm), so fp32 master weights still take the grouped kernel.
    """
    if rows.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        rows, w_gate, w_up, w_down = (t.to(dtype) for t in (rows, w_gate, w_up, w_down))
    gate = grouped_matmul(rows, w_gate, counts, backend)
    up = grouped_matmul(rows, w_up, counts, backend)
    return grouped_matmul(F.silu(gate) * up, w_down, counts, backend)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def capacity_of(capacity_factor: Optional[float], slots: int, experts: int) -> Optional[int]:
    """Switch-style capacity: ceil(factor * slots / experts) slots per expert; None is dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * slots / experts)


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
        grad_slots = grad.index_select(0, inverse).view(-1, ctx.repeats, grad.shape[1])
        summed = grad_slots.sum(1, dtype=torch.promote_types(grad.dtype, torch.float32))
        return summed.to(grad.dtype), None, None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    return _GatherRows.apply(source, index, inverse, repeats)


def run_grouped(
    source: torch.Tensor,
    repeats: int,
    row_expert: torch.Tensor,
    experts: int,
    capacity: Optional[int],
    experts_fn: ExpertsFn,
) -> torch.Tensor:
    """Run rows through their experts, grouped by expert; the result is in the rows' order.

    Row m is source[m // repeats] (repeats = top_k for a token's slots), for expert row_expert[m].
    Rows are sorted by expert with a stable sort, so an expert sees its rows in their given order,
    and with a capacity it keeps the first `capacity` of them: dropped rows come back as zeros
    (deterministic: by position).
    """
    order = torch.argsort(row_expert, stable=True)
    inverse = inverse_permutation(order)
    counts = torch.bincount(row_expert, minlength=experts)
    if capacity is None:
        out_sorted = experts_fn(gather_rows(source, order // repeats, inverse, repeats), counts)
        return gather_rows(out_sorted, inverse, order)
    sorted_expert = row_expert.index_select(0, order)
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - group_start.index_select(0, sorted_expert)
    kept = (rank_in_expert < capacity).nonzero().squeeze(1)
    out_kept = experts_fn(source.index_select(0, order.index_select(0, kept) // repeats), counts.clamp(max=capacity))
    # every sorted row reads its kept output, or the zero row appended at the end
    read = torch.full_like(order, kept.numel())
    read[kept] = torch.arange(kept.numel(), device=order.device)
    out_padded = torch.cat([out_kept, out_kept.new_zeros(1, out_kept.shape[1])])
    return out_padded.index_select(0, read.index_select(0, inverse))


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
        # set by lmoec.runtime.expert_parallel.shard_experts: this rank then holds a slice of the experts
        self.expert_parallel = None
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

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(rows, counts, self.w_gate, self.w_up, self.w_down, self.grouped_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden)
        n, k, e = tokens.shape[0], self.top_k, self.experts
        logits = self.router(tokens)
        chosen, weights, probs = self.route(logits)
        slot_expert = chosen.reshape(-1)
        counts = torch.bincount(slot_expert, minlength=e)
        ep = self.expert_parallel
        if ep is None:
            global_counts = counts
            capacity = capacity_of(self.capacity_factor, n * k, e)
            slot_out = run_grouped(tokens, k, slot_expert, e, capacity, self._experts)
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
        """Losses and stats of this call. Under EP, f_i is global and P_i local: the mean of the
        ranks' aux losses is the single-process aux loss over the whole batch."""
        f = global_counts.to(probs.dtype) / global_counts.sum().clamp(min=1)
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
