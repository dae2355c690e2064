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


def rope_frequencies(rotary_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim/2] for the given absolute positions, computed in float32 (float64 if asked); the
    frequencies are spread over the rotated dims only (rotary_dim: the head dim, or fewer for partial RoPE)."""
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=dtype) / rotary_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+R/2}) of the first R = 2 * cos.shape[-1] dims of x [B, T, H, D] by the position angles
    (the rotate-half convention); the dims from R on pass through unrotated (partial RoPE, R < D)."""
    rotated = 2 * cos.shape[-1]
    wide = x if x.dtype == torch.float64 else x.float()
    x1, x2 = wide[..., :rotated].chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    parts = (x1 * cos - x2 * sin, x2 * cos + x1 * sin) + ((wide[..., rotated:],) if rotated < x.shape[-1] else ())
    return torch.cat(parts, dim=-1).to(x.dtype)


class KVCache:
    """Keys and values seen so far and the absolute position of the next token.

    `k`, `v` are preallocated storage [B, H_kv, capacity, D]; decoding writes each new key and value in
    place, so a step copies nothing of the context and peak memory stays at the cache's own size. The
    positions held are the `length` ones before `next_pos`:

    - without a window, the prefix `k[:, :, :length]` (`keys` / `values`); when a step does not fit, the
      storage grows geometrically (reserve the capacity up front, `KVCache.reserve(n)`, to never grow);
    - with a sliding `window`, a ring of `window` slots, position p in slot p % window, so memory stays
      bounded and a step overwrites the one key that just left the window.

    The cache a step returns shares storage with the one passed in (a step consumes its `past`); the old
    object still reads its own positions without a window, but not after a ring slot was overwritten.
    """

    def __init__(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], next_pos: int,
                 length: Optional[int] = None, window: Optional[int] = None, reserved: int = 0):
        self.k, self.v, self.next_pos = k, v, next_pos
        self.length = (0 if k is None else k.shape[2]) if length is None else length
        self.window, self.reserved = window, reserved
        if k is not None and not 0 <= self.length <= k.shape[2]:
            raise ValueError(f"KVCache: length {self.length} outside the storage's capacity {k.shape[2]}")

    @classmethod
    def reserve(cls, capacity: int, next_pos: int = 0) -> "KVCache":
        """An empty cache that allocates room for `capacity` positions at its first write (dtype and shape
        then come from the keys written). A sliding-window layer keeps its ring of `window` slots instead."""
        return cls(None, None, next_pos, length=0, reserved=capacity)

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Storage slots of absolute positions held in this cache."""
        if self.window is not None:
            return positions % self.window
        return positions - (self.next_pos - self.length)

    @property
    def keys(self) -> torch.Tensor:
        """The held keys [B, H_kv, length, D] in position order (a view without a window, a copy of <= window with)."""
        return self._ordered(self.k)

    @property
    def values(self) -> torch.Tensor:
        return self._ordered(self.v)

    def _ordered(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if self.window is None:
            return t[:, :, : self.length]
        positions = torch.arange(self.next_pos - self.length, self.next_pos, device=t.device)
        return t[:, :, self.slots(positions)]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """This cache plus k, v [B, H_kv, T, D] at positions next_pos.. (no window): written in place into
        the storage, which is allocated or grown (geometrically) only when they do not fit."""
        if self.window is not None:
            raise ValueError("KVCache.append: a sliding-window cache is written by its layer's ring steps")
        n, T = self.length, k.shape[2]
        K, V = self.k, self.v
        if K is None or n + T > K.shape[2]:
            old = 0 if K is None else K.shape[2]
            grown = old + max(old // 2, 64) if old else 0  # 1.5x: amortized O(1) copies per token
            capacity = max(n + T, self.reserved, grown)
            B, H, _, D = k.shape
            # zeros, not empty: a static decode step attends over the whole storage under a mask, and an
            # uninitialized NaN in a slot not written yet would still leak through its zero weight (0 * NaN)
            K, V = k.new_zeros(B, H, capacity, D), v.new_zeros(B, H, capacity, v.shape[-1])
            if n:
                K[:, :, :n], V[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
        K[:, :, n : n + T] = k
        V[:, :, n : n + T] = v
        return KVCache(K, V, self.next_pos + T, n + T, reserved=self.reserved)


class StaticKVCache:
    """A KV cache whose every step has the same shapes and reads no value back: what a CUDA graph replays.

    `k`, `v` [B, H_kv, capacity, D] are fixed storage (a ring of `window` slots for a sliding window) and
    `position` a one-element device tensor, the absolute position of the next token, shared by all layers
    (the decoder advances it after each step). A step writes its key at slot position (mod window) with
    index_copy_ and attends to the whole storage under a mask of the slots written so far.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, window: Optional[int] = None):
        self.k, self.v, self.position, self.window = k, v, position, window

    @classmethod
    def from_cache(cls, cache: KVCache, position: torch.Tensor, steps: int) -> "StaticKVCache":
        """The static view of a prefilled cache, with room for `steps` more tokens (its storage as it is when
        that fits, else copied into storage that does); a ring keeps its slots."""
        if cache.k is None:
            raise ValueError("StaticKVCache: the cache holds no keys (prefill first)")
        if cache.window is not None:
            return cls(cache.k, cache.v, position, cache.window)
        n = cache.length
        k, v = cache.k, cache.v
        if cache.next_pos - n != 0:
            raise ValueError("StaticKVCache: the cache does not start at position 0")
        if k.shape[2] < n + steps:
            k = k.new_zeros(*k.shape[:2], n + steps, k.shape[3])
            v = v.new_zeros(*v.shape[:2], n + steps, v.shape[3])
            k[:, :, :n], v[:, :, :n] = cache.k[:, :, :n], cache.v[:, :, :n]
        return cls(k, v, position)


class HeadAttention(nn.Module):
    """Causal softmax attention over heads already projected: RoPE, GQA, a sliding window, a KV cache; no
    parameters. `Attention` puts projections around it; an LSM layer with `window_attention` (Liger) runs it on
    its own q, k, v."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rope_theta: float = 10000.0,
                 window: Optional[int] = None, layer_idx: int = 0, rotary_dim: Optional[int] = None):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"attention: heads = {heads} is not divisible by kv_heads = {kv_heads}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"attention: RoPE needs an even rotary dim from 2 to head_dim = {head_dim}, got {rotary_dim}")
        self.heads, self.kv_heads, self.head_dim, self.rotary_dim = heads, kv_heads, head_dim, rotary_dim
        self.rope_theta, self.window, self.layer_idx = rope_theta, window, layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Optional[KVCache] = None,
                use_cache: bool = False, mask: Optional[torch.Tensor] = None):
        """q [B, T, H, D], k and v [B, T, H_kv, D] before RoPE -> o [B, T, H, D], or (o, KVCache) with use_cache.

        With use_cache the new keys and values are written into `past`'s storage (see KVCache), and the
        returned cache shares it; without, `past` is only read.

        mask [B, past positions + T] (True or 1: a real token), over every absolute position from 0, hides padded
        keys (a left-padded batch). Positions stay shared by the batch: RoPE scores depend only on the distance
        between query and key, so a row's real tokens attend as they would unpadded.
        """
        B, T = q.shape[:2]
        start = past.next_pos if past is not None else 0
        positions = torch.arange(start, start + T, device=q.device)
        if q.dtype == torch.float64:
            positions = positions.double()
        cos, sin = rope_frequencies(self.rotary_dim, positions, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        n = past.length if past is not None else 0
        if mask is not None and tuple(mask.shape) != (B, start + T):
            raise ValueError(f"attention: mask must be [B, positions] = [{B}, {start + T}], got {list(mask.shape)}")
        real = None if mask is None else mask.bool()
        cache = None
        if self.window is not None and use_cache and n and T == 1:
            o, cache = self._ring_step(q, k, v, past, real)
        elif self.window is None and use_cache:
            cache = (past if past is not None else KVCache.reserve(0)).append(k, v)
            o = self._attend(q, *self._as(q, cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]), start, real)
        else:  # no cache to write, or a window's prefill: the held keys (<= window of them) then these
            if n:
                pk, pv = self._as(k, past.keys, past.values)
                keys, values = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            else:
                keys, values = k, v
            o = self._attend(q, keys, values, start, real)
            if use_cache:  # window: keep the last `window` positions in the ring
                cache = self._ring_write(past, keys, values, start + T)
        o = o.transpose(1, 2)
        return (o, cache) if use_cache else o

    @staticmethod
    def _as(like: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v in `like`'s dtype (a cache filled in another dtype, e.g. before autocast, is cast once per use)."""
        return k.to(like.dtype), v.to(like.dtype)

    def _ring_write(self, past: Optional[KVCache], keys: torch.Tensor, values: torch.Tensor, next_pos: int) -> KVCache:
        """The window cache holding the last `window` of keys / values [B, H_kv, S, D] (positions ..next_pos - 1),
        in past's ring storage when it has one, else in a new ring of `window` slots."""
        w, S = self.window, keys.shape[2]
        keep = min(S, w)
        if past is not None and past.k is not None and past.window == w and past.k.shape[:2] == keys.shape[:2]:
            K, V = past.k, past.v
        else:
            B, H, _, D = keys.shape
            # zeros: slots not written yet are masked out, but an uninitialized NaN would still leak (0 * NaN)
            K, V = keys.new_zeros(B, H, w, D), values.new_zeros(B, H, w, values.shape[-1])
        slots = torch.arange(next_pos - keep, next_pos, device=keys.device) % w
        K[:, :, slots] = keys[:, :, S - keep :]
        V[:, :, slots] = values[:, :, S - keep :]
        return KVCache(K, V, next_pos, keep, window=w)

    def _ring_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: KVCache,
                   real: Optional[torch.Tensor] = None):
        """One token with a sliding window: its key overwrites the slot of the one key that leaves the window,
        then it attends to the ring in place (slot order does not matter once RoPE is applied); `real` [B, positions]
        hides the slots that hold padding."""
        w, pos = self.window, past.next_pos
        if past.window != w or past.k is None:  # a cache from elsewhere: reorder it into a ring once
            past = self._ring_write(None, *self._as(k, past.keys, past.values), pos)
        K, V = past.k, past.v
        K[:, :, pos % w] = k[:, :, 0]
        V[:, :, pos % w] = v[:, :, 0]
        cache = KVCache(K, V, pos + 1, min(past.length + 1, w), window=w)
        mask = None
        slot = torch.arange(w, device=q.device)
        held = pos - (pos - slot) % w  # the latest position <= pos in each slot
        if cache.length < w:  # a ring not yet full: only the slots written so far
            mask = (held > pos - cache.length)[None, :]
        if real is not None:  # and not padding (the new token's own slot always: it is real)
            padded = real[:, held.clamp(min=0)] | (held == pos)
            mask = padded[:, None, None, :] if mask is None else mask & padded[:, None, None, :]
        keys, values = self._as(q, K, V)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return o, cache

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries at start..start+T-1 over the last S positions' keys; `real` [B, positions] hides padded keys
        (a padded query keeps its own key, so that its row is never empty: its output is unused but finite)."""
        T, S = q.shape[2], k.shape[2]
        gqa = self.heads != self.kv_heads
        if real is not None:
            q_pos = torch.arange(start, start + T, device=q.device)[:, None]
            k_pos = torch.arange(start + T - S, start + T, device=q.device)[None, :]
            visible = k_pos <= q_pos
            if self.window is not None:
                visible = visible & (q_pos - k_pos < self.window)
            visible = (visible[None] & real[:, None, start + T - S:]) | (k_pos == q_pos)[None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=gqa)
        if S == T and self.window is None:  # no cache: the fused causal kernels apply
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1 and self.window is None:  # one query after the whole context: every key is visible
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # queries sit at absolute positions start..start+T-1, keys at start+T-S..start+T-1
        q_pos = torch.arange(start, start + T, device=q.device)[:, None]
        k_pos = torch.arange(start + T - S, start + T, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if self.window is not None:
            mask = mask & (q_pos - k_pos < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(HeadAttention):
    """Causal multi-head (or grouped-query) attention with rotary positions: projections around HeadAttention."""

    def __init__(self, hidden: int, heads: int, kv_heads: Optional[int] = None, rope_theta: float = 10000.0,
                 window: Optional[int] = None, layer_idx: int = 0, head_dim: Optional[int] = None,
                 rotary_dim: Optional[int] = None):
        """head_dim: the per-head width of q, k and v (None: hidden / heads); rotary_dim: how many of its leading
        dims RoPE rotates (None: all)."""
        kv_heads = kv_heads or heads
        if head_dim is None and hidden % heads:
            raise ValueError(f"attention: hidden = {hidden} is not divisible by heads = {heads}")
        super().__init__(heads, kv_heads, head_dim or hidden // heads, rope_theta, window, layer_idx, rotary_dim)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None, use_cache: bool = False,
                mask: Optional[torch.Tensor] = None):
        """x [B, T, hidden] -> y [B, T, hidden], or (y, KVCache) with use_cache; past and mask as in HeadAttention."""
        if isinstance(past, StaticKVCache):
            if mask is not None:
                raise ValueError("attention: a StaticKVCache step takes no padding mask")
            y = self._static_step(x, past)
            return (y, past) if use_cache else y
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        o = super().forward(q, k, v, past, use_cache, mask)
        o, cache = o if use_cache else (o, None)
        y = self.o_proj(o.reshape(B, T, self.heads * self.head_dim))
        return (y, cache) if use_cache else y

    def _static_step(self, x: torch.Tensor, past: StaticKVCache):
        """One token per sequence (x [B, 1, hidden]) into static storage: see StaticKVCache."""
        B, T, _ = x.shape
        if T != 1:
            raise ValueError(f"attention: a StaticKVCache takes one token per step, got T={T}")
        position = past.position.double() if x.dtype == torch.float64 else past.position
        cos, sin = rope_frequencies(self.rotary_dim, position, self.rope_theta)
        q = apply_rope(self.q_proj(x).view(B, 1, self.heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, 1, self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        slot = past.position if past.window is None else past.position % past.window
        past.k.index_copy_(2, slot, k.to(past.k.dtype))
        past.v.index_copy_(2, slot, v.to(past.v.dtype))
        # slots written so far: those up to the position (a full ring: all)
        mask = (torch.arange(past.k.shape[2], device=x.device) <= past.position)[None, :]
        keys, values = self._as(q, past.k, past.v)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, self.heads * self.head_dim))
