"""The static decode step (what a CUDA graph replays on CUDA) equals the dynamic one, run eagerly on CPU."""
import pytest
import torch

import lmoec
from lmoec.paths import SPECS
from lmoec.runtime.attention import KVCache, StaticKVCache
from lmoec.runtime.moe import MoE
from lmoec.trainer.generate import StaticDecoder, generate_ids, reserve_cache
from lmoec.trainer.syncs import HostSyncs

# gated DeltaNet with short convolutions (conv tails in the cache) and a sliding-window attention layer whose
# ring wraps during the test's decode
CONV_WINDOW = """\
import "{lsm}"
lsm conv extends gated_deltanet {{ short_conv = 4 }}
model conv_window {{
    vocab = 64  hidden = 32  layers = 2  heads = 2  pattern = "LN"  lsm = conv
    attention {{ window = 4 }}
    moe {{ experts = 4 top_k = 2 expert_ffn = 32 }}
    max_seq_len = 64
}}
"""


def _model(spec, dtype=torch.float64):
    torch.manual_seed(0)
    model = lmoec.compile_spec(spec).model().to(dtype).eval()
    with torch.no_grad():  # off the init, so that every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def conv_window_spec(tmp_path):
    path = tmp_path / "conv_window.lsm"
    path.write_text(CONV_WINDOW.format(lsm=(SPECS / "lsm" / "gated_deltanet.lsm").as_posix()))
    return path


@pytest.mark.parametrize("which,reserve", [("tiny", True), ("tiny", False), ("conv_window", True), ("minimax-tiny", True)])
def test_static_step_equals_dynamic_step(which, reserve, conv_window_spec):
    """Step by step against the dynamic path, fresh random tokens each step; without a reserved KV cache the
    decoder copies the prefill's keys into storage with room. minimax-tiny's attention has heads wider than
    hidden / heads and partial RoPE, its blocks post-norm residuals."""
    spec = conv_window_spec if which == "conv_window" else SPECS / "models" / f"{which}.lsm"
    model = _model(spec)
    vocab = model.embed.num_embeddings
    gen = torch.Generator().manual_seed(1)
    prompt, steps = torch.randint(0, vocab, (3, 7), generator=gen), 6
    with torch.no_grad():
        reserved = reserve_cache(model, 7 + steps) if reserve else None
        _, cache = model(prompt, cache=reserved, use_cache=True)
        decoder = StaticDecoder(model, cache, position=7, steps=steps)
        assert decoder.graph is None  # CPU: the same step, eagerly
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (3,), generator=gen)
            want, cache = model(tokens[:, None], cache=cache, use_cache=True)
            torch.testing.assert_close(decoder.step(tokens), want[:, -1], rtol=1e-10, atol=1e-12)
    assert int(decoder.position) == 7 + steps
    attention = [c for c in decoder.cache if isinstance(c, StaticKVCache)]
    assert attention and all(c.position is decoder.position for c in attention)


def test_generate_with_the_static_step_equals_dynamic():
    model = _model(SPECS / "models" / "tiny.lsm", torch.float32)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    dynamic = list(generate_ids(model, prompt, 8, temperature=0.8, top_k=20, seed=3, static=False))
    static = list(generate_ids(model, prompt, 8, temperature=0.8, top_k=20, seed=3, static=True))
    assert torch.equal(torch.stack(static), torch.stack(dynamic))


def test_static_step_reads_nothing_back():
    model = _model(SPECS / "models" / "tiny.lsm", torch.float32)
    for m in model.modules():
        if isinstance(m, MoE):
            m.grouped_backend = "grouped"  # the experts CUDA runs in bf16
    prompt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        _, cache = model(prompt, cache=reserve_cache(model, 8), use_cache=True)
        decoder = StaticDecoder(model, cache, position=5, steps=3)
        with HostSyncs() as syncs:
            decoder.step(prompt[:, 0])
    assert syncs.calls == []


def test_a_cache_without_static_form_is_refused():
    model = _model(SPECS / "models" / "tiny.lsm", torch.float32)
    with pytest.raises(ValueError, match="no static form for a tuple"):
        StaticDecoder(model, [(1, 2)], position=0, steps=1)
    with pytest.raises(ValueError, match="prefill first"):
        StaticKVCache.from_cache(KVCache.reserve(8), torch.zeros(1, dtype=torch.long), 1)


def test_warm_up_takes_no_room_and_steps_stop_at_the_reserved_room():
    """What the CUDA path runs before capturing (two warm-up steps) leaves the states, the position and the KV
    storage as they were: a decoder with room for exactly one step still equals the dynamic step after it. A
    step past the room is refused on the host (on CUDA the KV write would be a device-side assert)."""
    model = _model(SPECS / "models" / "tiny.lsm")
    vocab = model.embed.num_embeddings
    gen = torch.Generator().manual_seed(4)
    prompt, tokens = torch.randint(0, vocab, (2, 6), generator=gen), torch.randint(0, vocab, (2,), generator=gen)
    with torch.no_grad():
        _, cache = model(prompt, cache=reserve_cache(model, 7), use_cache=True)
        decoder = StaticDecoder(model, cache, position=6, steps=1)
        decoder._warm_up()
        assert int(decoder.position) == 6
        want, _ = model(tokens[:, None], cache=cache, use_cache=True)
        torch.testing.assert_close(decoder.step(tokens), want[:, -1], rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="every step the decoder was built for has run"):
            decoder.step(tokens)
        # no room at all (generate's last token needs no step): nothing to warm up or capture, every step refused
        empty = StaticDecoder(model, cache, position=7, steps=0)
        with pytest.raises(ValueError, match="every step the decoder was built for has run"):
            empty.step(tokens)


def test_compiled_static_step_equals_the_eager_one():
    """StaticDecoder(compile_backend=...) traces the whole step in one graph (fullgraph: a break is an error) and
    equals the eager static step, through the warm-up the CUDA path runs before capturing. bf16 with the grouped
    experts: the MoE path CUDA takes (the float loop reads counts back and cannot be one graph)."""
    model = _model(SPECS / "models" / "tiny.lsm", torch.bfloat16)
    for m in model.modules():
        if isinstance(m, MoE):
            m.grouped_backend = "grouped"
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (2, 6), generator=gen)
    tokens = [torch.randint(0, 256, (2,), generator=gen) for _ in range(3)]
    with torch.no_grad():
        logits = []
        for backend in (None, "aot_eager"):
            _, cache = model(prompt, cache=reserve_cache(model, 9), use_cache=True)
            decoder = StaticDecoder(model, cache, position=6, steps=3, compile_backend=backend)
            decoder._warm_up()
            logits.append(torch.stack([decoder.step(t).clone() for t in tokens]))
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
