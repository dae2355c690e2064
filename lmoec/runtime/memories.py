"""Mixture-of-Memories at run time (Du et al., 2025): tokens routed to memory states and back.

A layer with M memories (and, optionally, one shared memory every token visits with weight 1) routes
each token to top_k of them. Each (token, memory) pair is a *slot*. The slots are put in segment order
(memory-major, then batch, then time), so the tokens memory m gets from sequence b are one contiguous
segment, in their order: that segment is the memory's own sequence. Then

    one call of the family's op with `cu_seqlens` over all (memory, batch) segments runs every
    memory's recurrence at once (an empty segment's state passes through unchanged),
    per-memory projections are grouped GEMMs over the memory-major rows,
    short convolutions run within each segment (a memory never sees another memory's tokens),
    the way back is a weighted sum over each token's slots.

The grouping and the way back are the MoE layer's (`lmoec.runtime.moe`: gather_rows / sum_rows with
their deterministic backward, grouped_matmul), with (memory, batch) segments in place of experts.
Nothing here loops over memories in Python or pads a segment.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import short_conv
from .moe import (
    count_per_expert,
    gather_rows,
    grouped_matmul,
    grouped_weight_grad,
    inverse_permutation,
    sum_rows,
)


def route_memories(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, M] -> (chosen [N, k] int64, weights [N, k], probs [N, M]): softmax, top-k, renormalised.

    Ties go to the lower memory index (a stable descending sort), on every device.
    """
    probs = torch.softmax(logits, -1)
    chosen = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, chosen)
    return chosen, weights / weights.sum(-1, keepdim=True), probs


class MemorySlots:
    """The routing plan of one call: which rows go to which (memory, batch) segment, and the way back.

    chosen [N, k] memories and their weights [N, k] for N = batch * length tokens (token n is
    (n // length, n % length)); with `shared`, memory `memories` is added to every token with weight 1.
    Attributes, all on the tokens' device:
        segments       memories' * batch, segment s = memory * batch + b (memories' counts the shared one)
        token [S]      the token each row (slot in segment order) reads
        segment [S]    the segment of each row; position [S] its index within the segment
        weight [S]     each row's routing weight (differentiable: the router learns through it)
        cu_seqlens     [segments + 1] offsets of the segments in the rows
        memory_counts  [memories'] rows per memory: the groups of a grouped GEMM
        memory [S]     the memory of each row
    `decode`: one token per sequence, so each segment holds at most one row; the per-memory projections and
    convolutions then index by row (memory_linear, segment_conv_step) instead of grouping rows, which would
    read the counts back to the host (a CUDA graph of the decode step allows no such sync).
    """

    def __init__(self, chosen: torch.Tensor, weights: torch.Tensor, batch: int, memories: int, shared: bool,
                 decode: bool = False):
        n, k = chosen.shape
        if shared:
            chosen = torch.cat([chosen, chosen.new_full((n, 1), memories)], 1)
            weights = torch.cat([weights, weights.new_ones(n, 1)], 1)
            memories, k = memories + 1, k + 1
        self.memories, self.batch, self.repeats, self.decode = memories, batch, k, decode
        self.segments = memories * batch
        length = n // batch
        seq = torch.arange(n, device=chosen.device) // length
        flat = (chosen * batch + seq[:, None]).reshape(-1)
        # a stable sort keeps each segment's slots in token order: the memory's tokens, in order
        self.order = torch.argsort(flat, stable=True)
        self.inverse = inverse_permutation(self.order)
        self.token = self.order // k
        self.segment = flat.index_select(0, self.order)
        counts = count_per_expert(flat, self.segments)
        self.cu_seqlens = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.memory_counts = counts.view(memories, batch).sum(1)
        self.memory = torch.div(self.segment, batch, rounding_mode="floor")
        self.position = torch.arange(flat.numel(), device=flat.device) - self.cu_seqlens.index_select(0, self.segment)
        self.weight = weights.reshape(-1).index_select(0, self.order)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, ...] -> rows [S, ...] in segment order (backward: each token's slots summed)."""
        return gather_rows(tokens, self.token, self.inverse, self.repeats)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [S, ...] -> [N, ...]: each token's slots, weighted by their routing weights, summed."""
        weight = self.weight.to(rows.dtype).view(-1, *[1] * (rows.dim() - 1))
        return sum_rows(rows * weight, self.inverse, self.token, self.repeats)


class _GroupedLinear(torch.autograd.Function):
    """rows [S, in] grouped by memory (counts [M]) times weight [M, in, out]: the MoE experts' GEMMs."""

    @staticmethod
    def forward(ctx, rows, weight, counts):
        ctx.save_for_backward(rows, weight, counts)
        return grouped_matmul(rows, weight, counts)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, counts = ctx.saved_tensors
        grad = grad.contiguous()
        drows = grouped_matmul(grad, weight.transpose(-2, -1), counts)
        return drows, grouped_weight_grad(rows, grad, counts).to(weight.dtype), None


class MemoryLinear(nn.Module):
    """A projection each memory owns: forward(x [..., in], slots) applies memory m's weight to m's rows."""

    def __init__(self, in_features: int, out_features: int, memories: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(memories, in_features, out_features))

    def forward(self, x: torch.Tensor, slots: MemorySlots) -> torch.Tensor:
        rows, weight = x.reshape(-1, self.in_features), self.weight
        device = rows.device.type
        if torch.is_autocast_enabled(device):  # autocast does not know grouped GEMMs: cast as it would
            dtype = torch.get_autocast_dtype(device)
            rows, weight = rows.to(dtype), weight.to(dtype)
        else:
            weight = weight.to(rows.dtype)
        if slots.decode:  # a few rows: each times its memory's weight, no grouping
            out = torch.bmm(rows[:, None, :], weight.index_select(0, slots.memory))[:, 0]
        else:
            out = _GroupedLinear.apply(rows.contiguous(), weight, slots.memory_counts)
        return out.view(*x.shape[:-1], self.out_features)


def segment_conv(rows: torch.Tensor, weight: torch.Tensor, slots: MemorySlots,
                 state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of a causal depthwise convolution within each segment: (y [S, C], new state [segments, W-1, C]).

    weight [C, 1, W] (an nn.Conv1d's); state [segments, W-1, C]: the last W-1 inputs each segment saw
    before (None: zeros). A row at position p of its segment reads the p - s-th row of its own segment
    for tap s, or the segment's state where p < s: never a row of another segment, so each memory's
    convolution sees only its own tokens (fla's training path convolves across them). The new state is
    each segment's last W-1 inputs (the old state's rows where the segment is shorter).

    On the GPU, one kernel (lmoec.runtime.short_conv) reads each row once. Elsewhere one depthwise conv1d runs over
    the packed rows as if they were one sequence: right for every row at least W-1 into its segment. The first W-1
    rows of each segment (at most W-1 per segment) are then made again from the segment's own rows and state, and
    written over.
    """
    width, channels = weight.shape[-1], rows.shape[1]
    keep, segments = width - 1, slots.segments
    if short_conv.fused(rows):
        y = short_conv.conv_silu(rows, weight.view(channels, width), state, cu_seqlens=slots.cu_seqlens,
                                 segment=slots.segment)
        return y, short_conv.last_inputs(rows, state, keep, cu_seqlens=slots.cu_seqlens)
    if state is None:
        state = rows.new_zeros(segments, keep, channels)
    packed = F.conv1d(F.pad(rows.t()[None], (keep, 0)), weight.to(rows.dtype), groups=channels)[0].t()
    ext = torch.cat([state.to(rows.dtype).reshape(-1, channels), rows])  # the states' rows, then the rows
    lengths = slots.cu_seqlens[1:] - slots.cu_seqlens[:-1]
    seg, pos = (torch.arange(keep, device=rows.device)[None, :] < lengths[:, None]).nonzero(as_tuple=True)
    row = slots.cu_seqlens.index_select(0, seg) + pos  # the rows near a segment's start
    near = None
    for s in range(width):
        index = torch.where(pos >= s, row - s + segments * keep, seg * keep + keep + pos - s)
        term = ext.index_select(0, index) * weight[:, 0, width - 1 - s].to(rows.dtype)
        near = term if near is None else near + term
    y = packed.index_copy(0, row, near.to(packed.dtype))
    return F.silu(y), short_conv.last_inputs(rows, state, keep, cu_seqlens=slots.cu_seqlens)


def segment_conv_step(rows: torch.Tensor, weight: torch.Tensor, slots: MemorySlots,
                      state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_conv for a decode step (slots.decode: at most one row per segment): each row's window is its
    segment's state and the row itself; only the routed segments' states move on."""
    window = torch.cat([state.index_select(0, slots.segment).to(rows.dtype), rows[:, None]], 1)  # [S, W, C]
    y = (window * weight[:, 0, :].t().to(rows.dtype)).sum(1)
    return F.silu(y), state.index_copy(0, slots.segment, window[:, 1:].to(state.dtype))


def segment_tails(rows: torch.Tensor, slots: MemorySlots, keep: int) -> torch.Tensor:
    """[segments, keep, C]: each segment's last `keep` rows, zeros in front where it has fewer."""
    return short_conv.last_inputs(rows, None, keep, cu_seqlens=slots.cu_seqlens)


def minibatch_segments(run: Callable, tokens: dict, slots: MemorySlots, minibatch: int, state: Optional[torch.Tensor],
                       past_open: Optional[dict], use_cache: bool):
    """A mini-batch update (`gradient = minibatch(N)`) over the call's (memory, batch) segments, continuing the
    mini-batches the cache left open: (o [S, ...] of the call's rows, state at each segment's last closed
    mini-batch, the open mini-batches for the cache or None).

    tokens: the op's per-token inputs, rows [S, ...] in segment order; run(part, cu_seqlens, initial_state,
    output_final_state) calls the op on packed rows. past_open: {"count": [segments], name: [segments, N - 1, ...]},
    each segment's inputs since its last closed mini-batch. Each segment's rows are that open part, then the
    call's rows; its complete mini-batches run first (their end is the new state) and the rest from there, whose
    inputs become the new open part: a token's gradient point is the state at its mini-batch's start, counted from
    the memory's first token, however the tokens arrive. Without a cache the rows run in one call.
    """
    if past_open is None and not use_cache:
        o, _ = run(tokens, slots.cu_seqlens, state, False)
        return o, None, None
    device, segments, keep = slots.cu_seqlens.device, slots.segments, minibatch - 1
    new = slots.cu_seqlens[1:] - slots.cu_seqlens[:-1]
    count = torch.zeros_like(new) if past_open is None else past_open["count"].to(new)
    length = count + new
    closed = torch.div(length, minibatch, rounding_mode="floor") * minibatch
    seg = torch.repeat_interleave(torch.arange(segments, device=device), length)
    start = torch.cumsum(length, 0) - length
    pos = torch.arange(seg.numel(), device=device) - start.index_select(0, seg)  # within the segment's rows
    opened = pos < count.index_select(0, seg)
    # each row's source in (the open parts, [segments * keep], then the call's rows)
    source = torch.where(opened, seg * keep + pos,
                         segments * keep + slots.cu_seqlens[:-1].index_select(0, seg) + pos - count.index_select(0, seg))

    def rows(name):
        x = tokens[name]
        before = (x.new_zeros(segments * keep, *x.shape[1:]) if past_open is None
                  else past_open[name].to(x.dtype).reshape(segments * keep, *x.shape[1:]))
        return torch.cat([before, x]).index_select(0, source)

    combined = {name: rows(name) for name in tokens}
    in_closed = pos < closed.index_select(0, seg)
    first, rest = in_closed.nonzero()[:, 0], (~in_closed).nonzero()[:, 0]
    offsets = lambda n: torch.cat([n.new_zeros(1), torch.cumsum(n, 0)])
    o_first, state = run({n: x.index_select(0, first) for n, x in combined.items()}, offsets(closed), state, True)
    o_rest, _ = run({n: x.index_select(0, rest) for n, x in combined.items()}, offsets(length - closed), state, False)
    o = torch.cat([o_first, o_rest]).index_select(0, inverse_permutation(torch.cat([first, rest])))
    o = o.index_select(0, (~opened).nonzero()[:, 0])  # the call's rows, in segment order
    if not use_cache:
        return o, state, None
    slot = seg.index_select(0, rest) * keep + pos.index_select(0, rest) - closed.index_select(0, seg.index_select(0, rest))
    open_next = {"count": length - closed}
    for name, x in combined.items():
        padded = x.new_zeros(segments * keep, *x.shape[1:]).index_copy(0, slot, x.index_select(0, rest))
        open_next[name] = padded.view(segments, keep, *x.shape[1:])
    return o, state, open_next


def balancing_losses(logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor, memories: int,
                     sequence_group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(aux, z, tokens per memory [M]): aux = M * sum_m f_m P_m (f_m: share of the routed slots memory m
    gets, P_m: its mean router probability), z = mean(logsumexp(logits)^2): the MoE router's losses.
    With `sequence_group` (sequence parallel) f_m counts every rank's slots, so the mean of the ranks' aux
    losses is the whole sequence's."""
    counts = count_per_expert(chosen.reshape(-1), memories)
    if sequence_group is not None:
        torch.distributed.all_reduce(counts, group=sequence_group)
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    aux = memories * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return aux, z, counts.detach()
