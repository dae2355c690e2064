"""The KV cache is preallocated and written in place: a decode step copies nothing of the context.

Results equal the former cache (torch.cat of the old keys and the new ones each step, the last `window`
kept), which is re-implemented here as the reference.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from lmoec.bench import long_cache
from lmoec.ir.nodes import AttentionSpec, DenseFFNSpec, ModelSpec, SpecIR
from lmoec.program import compile_ir
from lmoec.runtime.attention import Attention, KVCache, apply_rope, rope_frequencies
from lmoec.trainer.generate import cache_nbytes, generate_ids, reserve_cache


def old_forward(attn: Attention, x: torch.Tensor, past: Optional[tuple]):
    """The former Attention.forward with use_cache: (y, (k, v, next_pos)), the cache grown by torch.cat."""
    B, T, _ = x.shape
    start = past[2] if past is not None else 0
    positions = torch.arange(start, start + T, device=x.device).to(x.dtype)
    cos, sin = rope_frequencies(attn.head_dim, positions, attn.rope_theta)
    q = apply_rope(attn.q_proj(x).view(B, T, attn.heads, attn.head_dim), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(B, T, attn.kv_heads, attn.head_dim), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    if past is not None:
        k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
    S = k.shape[2]
    q_pos = torch.arange(start, start + T)[:, None]
    k_pos = torch.arange(start + T - S, start + T)[None, :]
    mask = k_pos <= q_pos
    if attn.window is not None:
        mask = mask & (q_pos - k_pos < attn.window)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.heads != attn.kv_heads)
    y = attn.o_proj(o.transpose(1, 2).reshape(B, T, attn.heads * attn.head_dim))
    if attn.window is not None:
        k, v = k[:, :, -attn.window :], v[:, :, -attn.window :]
    return y, (k, v, start + T)


def layer(kv_heads=None, window=None):
    torch.manual_seed(0)
    return Attention(32, 4, kv_heads=kv_heads, window=window).double()


@pytest.mark.parametrize("kv_heads, window", [(None, None), (2, None), (None, 5), (1, 3), (None, 64)])
@pytest.mark.parametrize("reserve", [None, 40])
def test_steps_and_chunks_equal_the_cat_cache(kv_heads, window, reserve):
    """Prefill, one-token steps and multi-token chunks after a past: outputs and held keys as before."""
    attn = layer(kv_heads, window)
    x = torch.randn(2, 31, 32, dtype=torch.float64)
    cache = KVCache.reserve(reserve) if reserve else None
    old = None
    t = 0
    for size in (4, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 5):
        chunk = x[:, t : t + size]
        y, cache = attn(chunk, past=cache, use_cache=True)
        y_old, old = old_forward(attn, chunk, old)
        t += size
        torch.testing.assert_close(y, y_old, rtol=1e-12, atol=1e-12)
        assert cache.next_pos == old[2] == t
        torch.testing.assert_close(cache.keys, old[0], rtol=0, atol=0)
        torch.testing.assert_close(cache.values, old[1], rtol=0, atol=0)
        if window is not None:
            assert cache.capacity == window
    # read-only use of a past (no use_cache) leaves it alone
    held = cache.keys.clone()
    y = attn(x[:, :2], past=cache)
    torch.testing.assert_close(y, old_forward(attn, x[:, :2], old)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(cache.keys, held)


@pytest.mark.parametrize("window", [None, 4])
def test_decode_step_writes_in_place(window):
    """Under capacity (or in a window's ring), every step returns the same storage: no reallocation, no copy."""
    attn = layer(window=window)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    _, cache = attn(x[:, :5], past=KVCache.reserve(20), use_cache=True)
    ptrs = {(cache.k.data_ptr(), cache.v.data_ptr())}
    capacity = cache.capacity
    for t in range(5, 20):
        _, cache = attn(x[:, t : t + 1], past=cache, use_cache=True)
        ptrs.add((cache.k.data_ptr(), cache.v.data_ptr()))
    assert len(ptrs) == 1 and cache.capacity == capacity == (20 if window is None else window)
    assert cache.length == (20 if window is None else window)


def test_unreserved_cache_grows_geometrically():
    attn = layer()
    x = torch.randn(1, 400, 32, dtype=torch.float64)
    _, cache = attn(x[:, :8], use_cache=True)
    assert cache.capacity == 8
    reallocations, ptr = 0, cache.k.data_ptr()
    for t in range(8, 400):
        _, cache = attn(x[:, t : t + 1], past=cache, use_cache=True)
        if cache.k.data_ptr() != ptr:
            reallocations, ptr = reallocations + 1, cache.k.data_ptr()
    assert cache.length == 400 and cache.capacity >= 400
    assert reallocations <= 6  # 8 -> 72 -> 136 -> 232 -> 376 -> 600


def test_old_cache_still_reads_its_positions():
    """Without a window a step writes past the old cache's length only, so the old object stays valid."""
    attn = layer()
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    _, cache = attn(x[:, :6], past=KVCache.reserve(16), use_cache=True)
    keys, values = cache.keys.clone(), cache.values.clone()
    y1, _ = attn(x[:, 6:7], past=cache, use_cache=True)
    y2, _ = attn(x[:, 7:8], past=cache, use_cache=True)  # the same past again, another token
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values) and cache.length == 6
    fresh, _ = attn(x[:, 7:8], past=KVCache(keys, values, 6), use_cache=True)
    assert torch.equal(y2, fresh)
    assert torch.equal(y1, attn(x[:, 6:7], past=cache, use_cache=True)[0])


def tiny_attention_model(window=None, pattern="NLN"):
    from lmoec.paths import SPECS
    from lmoec.program import compile_spec

    source = compile_spec(SPECS / "lsm" / "gla.lsm").ir
    lsms = {name: spec.model_copy(update={"recurrence": None, "heads": None}) for name, spec in source.lsms.items()}
    model = ModelSpec(name=f"kv_{pattern.lower()}_{window}", vocab=256, hidden=32, layers=len(pattern), heads=2,
                      pattern=pattern, lsm="gla", attention=AttentionSpec(window=window), ffn=DenseFFNSpec(ffn=64))
    torch.manual_seed(0)
    return compile_ir(SpecIR(source="<kv cache test>", name=model.name, lsms=lsms, model=model)).model().double().eval()


@pytest.mark.parametrize("window", [None, 3])
def test_generate_reserves_once_and_matches_full_forward(window, monkeypatch):
    model = tiny_attention_model(window)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append([(c.k.data_ptr(), c.capacity) for c in out[1] if isinstance(c, KVCache)])
        return out

    monkeypatch.setattr(model, "forward", recording)
    new = torch.stack(list(generate_ids(model, prompt, max_new_tokens=9, temperature=0)), dim=1)
    assert len(seen) == 9  # the prefill and 8 steps: the last token needs no forward
    assert all(s == seen[0] for s in seen) and len(seen[0]) == 2
    assert {cap for _, cap in seen[0]} == {7 + 8 if window is None else window}
    with torch.no_grad():
        full = forward(torch.cat([prompt, new], dim=1))
    assert torch.equal(full[:, prompt.shape[1] - 1 : -1].argmax(-1), new)


def test_reserve_cache_layout():
    model = tiny_attention_model(pattern="NLN")
    cache = reserve_cache(model, 32)
    assert [type(c).__name__ if c is not None else None for c in cache] == ["KVCache", None, "KVCache"]
    assert cache_nbytes(cache) == 0  # nothing allocated before the prefill
    with torch.no_grad():
        _, out = model(torch.randint(0, 256, (1, 5)), cache=cache, use_cache=True)
    assert cache_nbytes([out[0], out[2]]) == 2 * 2 * 32 * 32 * 8  # 2 layers x (k, v), 32 positions x hidden, float64


def test_bench_long_cache_is_allocated_once():
    model = tiny_attention_model(pattern="NN")
    with torch.no_grad():
        _, short = model(torch.randint(0, 256, (2, 4)), use_cache=True)
        cache = long_cache(short, 50)
        token = torch.randint(0, 256, (2, 1))
        logits, new = model(token, cache=cache, use_cache=True)
        again, _ = model(token, cache=cache, use_cache=True)  # the bench times the same step repeatedly
    assert torch.equal(logits, again)
    for old, fresh in zip(cache, new):
        assert fresh.k.data_ptr() == old.k.data_ptr() and old.capacity == 51 and fresh.length == 51
