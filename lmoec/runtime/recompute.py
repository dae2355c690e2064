"""Activation memory for numerics: recompute cheap chains in the backward instead of keeping them.

`recompute(fn, *inputs)` keeps only `inputs` (and fn's output, if the next op keeps it) for the
backward and runs fn again there, under the autocast it ran under: elementwise chains (short conv ->
SiLU -> feature maps, norm * gate) hold several tensors of the activations' size each, but cost one
memory pass to redo. The recomputed graph is the original one, so values and gradients are the ones
of the plain path. Unlike torch.utils.checkpoint, the inputs are saved with save_for_backward, where
saved-tensor hooks (lmoec.memory) see them.

`linear_cross_entropy(x, weight, targets)` is cross_entropy(x @ weight.T, targets) over rows of at
most LOSS_CHUNK_BYTES of float32 logits at a time, with the gradients formed in the same pass. With a
50K vocabulary the float32 logits, their log-softmax and their gradient would each take 200 KB a token.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

LOSS_CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk of rows


def _autocasts() -> list[tuple[str, torch.dtype]]:
    return [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]


@contextlib.contextmanager
def _autocast_as(autocasts: list[tuple[str, torch.dtype]]):
    with contextlib.ExitStack() as stack:
        for device, dtype in autocasts:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn, ctx.autocasts = fn, _autocasts()
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad(), _autocast_as(ctx.autocasts):
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, [t for t, need in zip(inputs, needs) if need], grad))
        return (None, *(next(grads) if need else None for need in needs))


def recompute(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs), one tensor, with fn's intermediates made again in the backward instead of kept.

    fn must be deterministic and read tensors needing gradients only through `inputs` (pass parameters
    explicitly). Without autograd (no_grad, decoding) it is a plain call; so it is under torch.compile, whose
    partitioner chooses what to keep and what to recompute across the whole graph.
    """
    if torch.compiler.is_compiling():
        return fn(*inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recompute.apply(fn, *inputs)
    return fn(*inputs)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype where autocast is on for its device, else x: a tensor that feeds several linears
    is then cast once, where autocast would cast (and autograd keep) one copy per linear."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


class _LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of x @ weight.T, and with `grads` its gradients as well, in one pass over the
    chunks: d(mean CE)/d logits = (softmax - onehot) / count is known as soon as a chunk's log-softmax is, so
    the forward makes dx and dw there and the backward only scales them by the incoming gradient (1 in
    training: exact). Against making each chunk's logits again in the backward, that saves one head GEMM and
    two float32 passes over the chunk's logits (a cast and a scaling; the backward's softmax becomes the
    forward's exp of the log-softmax), and keeps one head-weight-sized gradient from the forward to the backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows, dtype, grads):
        w = weight.to(dtype)
        loss_dtype = torch.promote_types(dtype, torch.float32)
        total = x.new_zeros((), dtype=loss_dtype)
        kept_all = targets != -100
        scale = 1 / kept_all.sum().clamp(min=1).to(loss_dtype)
        dx = torch.empty_like(x) if grads and ctx.needs_input_grad[0] else None  # x is in `dtype` already
        dw = torch.zeros_like(weight) if grads and ctx.needs_input_grad[1] else None
        for start in range(0, x.shape[0], rows):
            xc, tc = x[start : start + rows], targets[start : start + rows]
            logits = F.linear(xc, w).to(loss_dtype)
            if dx is None and dw is None:
                total += F.cross_entropy(logits, tc, reduction="sum")
                continue
            kept = kept_all[start : start + rows]
            logp = torch.log_softmax(logits, -1)
            picked = tc.clamp(min=0)[:, None]
            total -= (logp.gather(1, picked).squeeze(1) * kept).sum()
            # softmax - onehot on kept rows, zero on ignored ones (-100), divided by the kept count
            dlogits = logp.exp_().scatter_add_(1, picked, -kept[:, None].to(loss_dtype))
            dlogits = (dlogits * (kept[:, None] * scale)).to(dtype)
            if dx is not None:
                dx[start : start + rows] = dlogits @ w
            if dw is not None:
                dw += dlogits.t() @ xc
        ctx.save_for_backward(dx, dw)
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad.to(dx.dtype), None if dw is None else dw * grad.to(dw.dtype),
                None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits x @ weight.T [N, V] against targets [N] (-100: ignored), in float32
    at least, without the [N, V] logits in memory: LOSS_CHUNK_BYTES of them at a time.

    The logits are computed as F.linear under autocast computes them (in its dtype where it is on, then
    float32), so the loss is the one of the plain head + F.cross_entropy up to the order of its sums.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(x.dtype, weight.dtype)
    rows = max(1, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # none for evaluation
    return _LinearCrossEntropy.apply(x.to(dtype), weight, targets, rows, dtype, grads)
