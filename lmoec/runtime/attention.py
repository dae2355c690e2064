"""Softmax attention for the N layers of a hybrid stack: causal, RoPE, GQA, a KV cache.

The heavy lifting is PyTorch's `scaled_dot_product_attention` (flash / memory-
efficient kernels on GPU, the math kernel on CPU and in float64). The layer
never knows about ranks: sequence parallelism (LASP-2H) wraps it from outside.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def rope_frequencies(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim/2] for the given absolute positions, computed in float32 (float64 if asked)."""
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of x [B, T, H, D] by the position angles (the rotate-half convention)."""
    x1, x2 = (x if x.dtype == torch.float64 else x.float()).chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values seen so far, [B, H_kv, T, D], and the absolute position of the next token.

    With a sliding window only the last `window` keys are kept, so memory stays bounded.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, next_pos: int):
        self.k, self.v, self.next_pos = k, v, next_pos


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) attention with rotary positions."""

    def __init__(self, hidden: int, heads: int, kv_heads: Optional[int] = None, rope_theta: float = 10000.0,
                 window: Optional[int] = None, layer_idx: int = 0):
        super().__init__()
        kv_heads = kv_heads or heads
        if hidden % heads:
            raise ValueError(f"attention: hidden = {hidden} is not divisible by heads = {heads}")
        if heads % kv_heads:
            raise ValueError(f"attention: heads = {heads} is not divisible by kv_heads = {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        if self.head_dim % 2:
            raise ValueError(f"attention: RoPE needs an even head dim, got {self.head_dim}")
        self.rope_theta, self.window, self.layer_idx = rope_theta, window, layer_idx
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None, use_cache: bool = False):
        """x [B, T, hidden] -> y [B, T, hidden], or (y, KVCache) with use_cache."""
        B, T, _ = x.shape
        start = past.next_pos if past is not None else 0
        positions = torch.arange(start, start + T, device=x.device)
        if x.dtype == torch.float64:
            positions = positions.double()
        cos, sin = rope_frequencies(self.head_dim, positions, self.rope_theta)
        q = apply_rope(self.q_proj(x).view(B, T, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        if past is not None:
            k = torch.cat((past.k.to(k.dtype), k), dim=2)
            v = torch.cat((past.v.to(v.dtype), v), dim=2)
        o = self._attend(q, k, v, start)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        if not use_cache:
            return y
        if self.window is not None:
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        return y, KVCache(k, v, start + T)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        gqa = self.heads != self.kv_heads
        if S == T and self.window is None:  # no cache: the fused causal kernels apply
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # queries sit at absolute positions start..start+T-1, keys at start+T-S..start+T-1
        q_pos = torch.arange(start, start + T, device=q.device)[:, None]
        k_pos = torch.arange(start + T - S, start + T, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if self.window is not None:
            mask = mask & (q_pos - k_pos < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
