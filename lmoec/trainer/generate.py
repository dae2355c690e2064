"""Text generation from a checkpoint: one chunkwise prefill, then one-token recurrent steps.

LSM layers carry a fixed-size state [B, H, K, V] between steps, attention layers
a KV cache, so decoding a pure Linear-MoE stack costs the same memory and time
per token at any context length.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import sys
from typing import Iterator, Optional

import torch

from ..runtime.attention import Attention, KVCache, StaticKVCache
from ..runtime.loader import load_package
from . import checkpoint as ckpt
from .data import encode


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", trust_code: bool = False):
    """(model in eval mode, checkpoint payload) from a checkpoint file or run directory.

    The checkpoint's package is imported only if this lmoec emits it from the checkpoint's IR, or if
    trust_code (see lmoec.trainer.checkpoint.package)."""
    state = ckpt.load(path)
    name, files = ckpt.package(state, path, trust_code)
    try:
        package = load_package(name, files)
        model = package.model.CausalLM(state["model_config"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, SyntaxError, ImportError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ckpt.CheckpointError(f"{ckpt.resolve(path)} does not hold a usable model ({reason})") from None
    return model.to(device).eval(), state


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, vocab]; temperature 0 is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def reserve_cache(model, capacity: int) -> Optional[list]:
    """A cache to pass to the prefill: an empty KVCache with room for `capacity` positions for every attention
    layer (None for the others), so that decoding writes in place and never regrows; None for a model whose
    layers are not `model.blocks[i].mixer`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "mixer") for b in blocks):
        return None
    return [KVCache.reserve(capacity) if isinstance(b.mixer, Attention) else None for b in blocks]


class StaticDecoder:
    """Decode steps of one batch size over fixed storage, replayed as a CUDA graph on CUDA.

    Every step runs the same kernels on the same tensors: the recurrent states are copied into storage of
    the decoder's own after each step, attention layers write into a StaticKVCache, and the position is a
    device tensor. Nothing in a step reads a value back, so on CUDA the step is captured once and each token
    costs one graph replay instead of ~2,000 kernel launches issued from Python. Elsewhere (or with
    cuda_graph=False) the same step runs eagerly: that is what the CPU tests compare with the dynamic path.

        decoder = StaticDecoder(model, cache, position=T, steps=n)   # the cache the prefill of T tokens returned
        logits = decoder.step(tokens)   # tokens [B] -> last-position logits [B, vocab], valid until the next step

    compile_backend (e.g. "inductor") runs the step through torch.compile(fullgraph=True) before the capture, so
    the graph replays fused kernels instead of one per op (one step of A0.3B-2B is 1,840 aten ops).
    """

    def __init__(self, model, cache: list, position: int, steps: int, cuda_graph: Optional[bool] = None,
                 compile_backend: Optional[str] = None):
        if not isinstance(cache, list):
            raise ValueError("StaticDecoder: the cache must be the per-layer list the model's prefill returned")
        self.model = model
        device = next(model.parameters()).device
        self.position = torch.tensor([position], device=device)
        self.cache = [self._static(entry, steps) for entry in cache]
        self.batch = next(t.shape[0] for t in self._tensors(self.cache))
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.steps_left = steps  # counted on the host: a KV write past the storage is a device assert on CUDA
        self.graph = None
        self.logits: Optional[torch.Tensor] = None
        self._forward = self._model_step
        if compile_backend is not None:
            self._forward = torch.compile(self._model_step, fullgraph=True, dynamic=False, backend=compile_backend)
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and steps > 0:  # the warm-up writes the first step's KV slot: none exists without a step
            self._capture()

    def _static(self, entry, steps: int):
        if isinstance(entry, dict):  # a recurrent layer's state (and conv tails): storage of our own
            if not all(isinstance(t, torch.Tensor) for t in entry.values()):
                # a mini-batch update keeps its open mini-batch's inputs (one token longer at each step); a Liger
                # layer keeps its window's KV cache
                raise ValueError("StaticDecoder: a recurrent cache holds more than fixed-size tensors (a mini-batch "
                                 "update's open inputs, or an LSM layer's window attention cache)")
            return {key: t.clone() for key, t in entry.items()}
        if isinstance(entry, KVCache):
            return StaticKVCache.from_cache(entry, self.position, steps)
        raise ValueError(f"StaticDecoder: no static form for a {type(entry).__name__} cache entry")

    @staticmethod
    def _tensors(cache: list) -> list[torch.Tensor]:
        return [t for entry in cache for t in (entry.values() if isinstance(entry, dict) else (entry.k, entry.v))]

    def _model_step(self, tokens: torch.Tensor, cache: list):
        return self.model(tokens, cache=cache, use_cache=True)

    def _run(self) -> torch.Tensor:
        logits, new_cache = self._forward(self.tokens, self.cache)
        for mine, new in zip(self.cache, new_cache):
            if isinstance(mine, dict):
                for key, t in mine.items():
                    t.copy_(new[key])
        self.position += 1
        return logits[:, -1]

    def _warm_up(self, checked=contextlib.nullcontext) -> None:
        """Run the step twice, the second time inside `checked()`, putting the states and the position back
        after each run: a warm-up's key goes to the slot the first real step writes again, so warm-ups need
        no room in the KV storage (a decoder with room for one step captures too)."""
        mutable = [t for entry in self.cache if isinstance(entry, dict) for t in entry.values()] + [self.position]
        saved = [t.clone() for t in mutable]
        for context in (contextlib.nullcontext, checked):
            with context():
                self._run()
            for t, s in zip(mutable, saved):
                t.copy_(s)

    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.

        The second warm-up step runs with CUDA's sync debug mode raising (the first one compiles and allocates):
        a step that reads a value back (the per-expert loop of float32 MoE layers, say) fails there, before a
        capture it would invalidate."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self._warm_up(_sync_errors)
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps_left <= 0:
            raise ValueError("StaticDecoder: every step the decoder was built for has run (its KV storage is full); "
                             "build it with more steps")
        self.steps_left -= 1
        self.tokens.copy_(tokens.view(self.batch, 1))
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


@contextlib.contextmanager
def _sync_errors():
    """CUDA's sync debug mode set to raise, and put back after."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@torch.no_grad()
def generate_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                 static: Optional[bool] = None, compile_step: bool = False) -> Iterator[torch.Tensor]:
    """Yield next-token ids [B], one per step: prefill the prompt [B, T] at once, then decode step by step.

    static (default: on CUDA) decodes with a StaticDecoder, a CUDA graph on CUDA; a model whose cache has no
    static form, or whose step cannot be captured, decodes with the dynamic path (said on stderr). compile_step
    compiles the static step (inductor) before capturing it."""
    generator = torch.Generator().manual_seed(seed)
    # KV caches take the whole sequence's room once, at the prefill (the last token is sampled, never fed)
    steps = max(max_new_tokens - 1, 0)
    reserved = reserve_cache(model, prompt_ids.shape[1] + steps)
    logits, cache = model(prompt_ids, cache=reserved, use_cache=True)
    decoder = None
    if steps and (static if static is not None else prompt_ids.is_cuda):
        try:
            decoder = StaticDecoder(model, cache, prompt_ids.shape[1], steps,
                                    compile_backend="inductor" if compile_step else None)
        except (ValueError, RuntimeError) as e:  # RuntimeError: an op that cannot be captured
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"lmoec: decoding without a static step ({reason})", file=sys.stderr)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        if step + 1 < max_new_tokens:  # the last token needs no forward of its own
            if decoder is not None:
                logits = decoder.step(token)[:, None]
            else:
                logits, cache = model(token[:, None], cache=cache, use_cache=True)


def cache_nbytes(cache) -> int:
    """Bytes held by a decoding cache (recurrent states and KV caches, however nested; a KV cache counts its
    whole preallocated storage, not only the positions filled so far)."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (list, tuple)):
        return sum(cache_nbytes(c) for c in cache)
    if isinstance(cache, dict):
        return sum(cache_nbytes(c) for c in cache.values())
    if hasattr(cache, "__dict__"):
        return cache_nbytes(vars(cache))
    return 0


def generate_text(model, prompt: str | bytes, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                  static: Optional[bool] = None, compile_step: bool = False) -> Iterator[str]:
    """Yield decoded text pieces as they are generated (byte tokens; incomplete UTF-8 waits for its next byte);
    a bytes prompt is fed as it is (the models read bytes, UTF-8 or not); `static` and `compile_step` as in
    generate_ids."""
    device = next(model.parameters()).device
    ids = (list(prompt) if isinstance(prompt, bytes) else encode(prompt)) or [ord("\n")]
    prompt_ids = torch.tensor([ids], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, static, compile_step):
        piece = decoder.decode(bytes([int(token[0])]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


__all__ = ["load_model", "sample_next", "StaticDecoder", "generate_ids", "generate_text", "cache_nbytes", "reserve_cache"]
