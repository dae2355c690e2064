"""The emitted ops as `torch.library` custom ops: what lets `torch.compile` trace a whole layer in one graph.

Every LSM of a package registers, per backend (torch, triton):

    <lsm>_<backend>_chunk           (q, k, v, g?, beta?, u?, a?, b?, gv?, dt?, A?, theta?, eta?, alpha?, ln_weight?, ln_bias?, scale, initial_state?, output_final_state,
                                     cu_seqlens?) -> (o, final state; empty when not asked for)
    <lsm>_<backend>_chunk_backward  the same inputs, grad_o, grad_final? -> gradients of the tensors given
    <lsm>_<backend>_step            (q, k, v, g?, ..., state, scale) -> (o, new state)

each with a fake (meta) implementation, so the compiler sees shapes and dtypes without running a kernel,
and the chunk op with its autograd formula (`register_autograd`). The implementation stays the emitted
code: the custom op is one opaque node, so host-side work inside it (layout tables, a data-dependent
choice of formula) never breaks the graph. The backward recomputes the forward with autograd on and
differentiates it: the op's residuals (chunk states, WY factors) never cross the op boundary.

Eager calls take the emitted code directly (the op modules check `torch.compiler.is_compiling()`), so eager
training keeps its one forward; compiled graphs pay one extra op forward in the backward.

Namespaces are per package (`lmoec_<package>`: a content digest for packages lmoec loads), and a package
imported again in the same process (a recompiled or edited package of the same name) gets a fresh
namespace (`..._2`), never a re-registration error. Op names come from the lsm's name, which must be a
name (`lmoec.backends.literal.check_name`): nothing else of a spec reaches the registry.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Optional

import torch

from ..backends.literal import check_name

TENSOR_ARGS = ("g", "beta", "u", "a", "b", "gv", "dt", "A", "theta", "eta", "alpha", "ln_weight", "ln_bias")  # the contract's optional tensors, in its order
_EXTRAS = ", ".join(f"Tensor? {a}" for a in TENSOR_ARGS)
_CHUNK_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, {_EXTRAS}, float scale, Tensor? initial_state, "
                 "bool output_final_state, Tensor? cu_seqlens) -> (Tensor, Tensor)")
_BACKWARD_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, {_EXTRAS}, float scale, Tensor? initial_state, "
                    "Tensor? cu_seqlens, Tensor grad_o, Tensor? grad_final) -> Tensor[]")
_STEP_SCHEMA = f"(Tensor q, Tensor k, Tensor v, {_EXTRAS}, Tensor state, float scale) -> (Tensor, Tensor)"

# the dtype of the states each backend returns, from the inputs' dtype
STATE_DTYPE: dict[str, Callable[[torch.dtype], torch.dtype]] = {
    "torch": lambda dtype: torch.promote_types(dtype, torch.float32),
    "triton": lambda dtype: torch.float32,
}

_NAMESPACES: set[str] = set()
_NOT_WORD = re.compile(r"\W", re.ASCII)


def namespace_for(package: str) -> str:
    """A torch.library namespace of this process's own for `package` (a module name): `lmoec_...`, with a
    counter when a package of that name registered before (imported again after a recompile)."""
    base = _NOT_WORD.sub("_", package)
    base = base if base.startswith("lmoec_") else "lmoec_" + base
    namespace, n = base, 2
    while namespace in _NAMESPACES:
        namespace, n = f"{base}_{n}", n + 1
    _NAMESPACES.add(namespace)
    return namespace


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd back on inside a custom op's implementation, which the dispatcher runs below autograd: the
    backward op differentiates its recomputed forward there (autocast stays off, as the dispatcher set it).
    The dispatch-key guards are private torch API, unchanged since torch 2.0 (functorch is built on them)."""
    C, key = torch._C, torch._C.DispatchKey
    excluded = C._dispatch_tls_local_exclude_set()
    for autograd in (key.AutogradFunctionality, key.AutogradOther, key.AutogradNestedTensor):
        excluded = excluded.remove(autograd)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), excluded):
        yield


class LSMOps:
    """The registered ops of one LSM: `chunk(backend, ...)` and `step(backend, ...)` call them.

    `args`: the tensors the spec declares, in the order the backends' `chunk(q, k, v, *args, ...)` take them;
    `backends`: name -> module with `chunk` and `step` (the emitted torch / Triton code).
    """

    def __init__(self, package: str, name: str, args: tuple[str, ...], backends: dict, state_width: int = 1,
                 state_rows: int = 0):
        check_name(name)
        unknown = set(args) - set(TENSOR_ARGS)
        if unknown:
            raise ValueError(f"{name}: unknown op arguments {sorted(unknown)}")
        self.name, self.args = name, tuple(args)
        # states are [N, H, K + state_rows, state_width * V] (lmoec.kinds: Kind.state_width, Kind.state_rows)
        self.state_width, self.state_rows = state_width, state_rows
        self.namespace = namespace_for(package)
        self._chunk, self._backward, self._step = {}, {}, {}
        for backend, impl in backends.items():
            check_name(backend)
            self._chunk[backend] = self._register_chunk(backend, impl)
            self._step[backend] = self._register_step(backend, impl)

    # ---- the calls the op module makes ---------------------------------------------

    def chunk(self, backend: str, q, k, v, extras: dict, scale: float, initial_state, output_final_state: bool,
              cu_seqlens) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The registered chunk op: (o, final state or None)."""
        o, final = self._chunk[backend](q, k, v, *(extras.get(a) for a in TENSOR_ARGS), float(scale),
                                        initial_state, bool(output_final_state), cu_seqlens)
        return o, (final if output_final_state else None)

    def step(self, backend: str, q, k, v, extras: dict, state, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step[backend](q, k, v, *(extras.get(a) for a in TENSOR_ARGS), state, float(scale))

    # ---- registration --------------------------------------------------------------

    def _qualname(self, backend: str, what: str) -> str:
        return f"{self.namespace}::{self.name}_{backend}_{what}"

    def _positional(self, extras: dict) -> list:
        """The declared tensors in the backend's positional order."""
        return [extras[a] for a in self.args]

    def _register_chunk(self, backend: str, impl):
        state_dtype = STATE_DTYPE[backend]

        def forward(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, scale, initial_state, output_final_state, cu_seqlens):
            extras = dict(g=g, beta=beta, u=u, a=a, b=b, gv=gv, dt=dt, A=A, theta=theta, eta=eta, alpha=alpha, ln_weight=ln_weight, ln_bias=ln_bias)
            o, final = impl.chunk(q, k, v, *self._positional(extras), scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
            if final is None:
                final = q.new_empty(0, dtype=state_dtype(q.dtype))
            elif initial_state is not None and final.data_ptr() == initial_state.data_ptr():
                final = final.clone()  # a custom op's outputs may not alias its inputs
            return o.contiguous(), final.contiguous()  # the layout the fake implementation promises

        def fake(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, scale, initial_state, output_final_state, cu_seqlens):
            B, T, H, K = q.shape
            V = v.shape[-1]
            n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
            final_shape = (n_seq, H, K + self.state_rows, self.state_width * V) if output_final_state else (0,)
            return v.new_empty(B, T, H, V), q.new_empty(final_shape, dtype=state_dtype(q.dtype))

        def backward_impl(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, scale, initial_state, cu_seqlens, grad_o, grad_final):
            extras = dict(g=g, beta=beta, u=u, a=a, b=b, gv=gv, dt=dt, A=A, theta=theta, eta=eta, alpha=alpha, ln_weight=ln_weight, ln_bias=ln_bias)
            inputs = [q, k, v, *self._positional(extras)] + ([initial_state] if initial_state is not None else [])
            with _autograd_inside_op(), torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in inputs]
                given = len(leaves) - (initial_state is not None)
                o, final = impl.chunk(*leaves[:given], scale=scale,
                                      initial_state=leaves[-1] if initial_state is not None else None,
                                      output_final_state=grad_final is not None, cu_seqlens=cu_seqlens)
                outputs, grads = [o], [grad_o]
                if grad_final is not None:
                    outputs.append(final)
                    grads.append(grad_final)
                found = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
            # contiguous, as the fake implementation says: the compiled backward graph relies on those strides
            return [torch.zeros_like(x, memory_format=torch.contiguous_format) if d is None else d.contiguous()
                    for x, d in zip(leaves, found)]

        def backward_fake(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, scale, initial_state, cu_seqlens, grad_o, grad_final):
            extras = dict(g=g, beta=beta, u=u, a=a, b=b, gv=gv, dt=dt, A=A, theta=theta, eta=eta, alpha=alpha, ln_weight=ln_weight, ln_bias=ln_bias)
            inputs = [q, k, v, *self._positional(extras)] + ([initial_state] if initial_state is not None else [])
            return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]

        chunk_op = torch.library.custom_op(self._qualname(backend, "chunk"), forward, mutates_args=(),
                                           schema=_CHUNK_SCHEMA)
        chunk_op.register_fake(fake)
        backward_op = torch.library.custom_op(self._qualname(backend, "chunk_backward"), backward_impl,
                                              mutates_args=(), schema=_BACKWARD_SCHEMA)
        backward_op.register_fake(backward_fake)
        self._backward[backend] = backward_op

        def setup_context(ctx, inputs, output):
            q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, scale, initial_state, output_final_state, cu_seqlens = inputs
            ctx.save_for_backward(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, initial_state, cu_seqlens)
            ctx.scale, ctx.output_final_state = scale, output_final_state

        def backward(ctx, grad_o, grad_final):
            q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, initial_state, cu_seqlens = ctx.saved_tensors
            grads = iter(backward_op(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, ctx.scale, initial_state, cu_seqlens, grad_o,
                                     grad_final if ctx.output_final_state else None))
            dq, dk, dv = next(grads), next(grads), next(grads)
            declared = {a: next(grads) for a in self.args}
            d_initial = next(grads) if initial_state is not None else None
            return (dq, dk, dv, *(declared.get(a) for a in TENSOR_ARGS), None, d_initial, None, None)

        chunk_op.register_autograd(backward, setup_context=setup_context)
        return chunk_op

    def _register_step(self, backend: str, impl):
        state_dtype = STATE_DTYPE[backend]

        def forward(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, state, scale):
            extras = dict(g=g, beta=beta, u=u, a=a, b=b, gv=gv, dt=dt, A=A, theta=theta, eta=eta, alpha=alpha, ln_weight=ln_weight, ln_bias=ln_bias)
            o, new = impl.step(q, k, v, *self._positional(extras), state=state, scale=scale)
            new = new.clone() if new.data_ptr() == state.data_ptr() else new
            return o.contiguous(), new.contiguous()

        def fake(q, k, v, g, beta, u, a, b, gv, dt, A, theta, eta, alpha, ln_weight, ln_bias, state, scale):
            B, H, K = q.shape
            return v.new_empty(B, H, v.shape[-1]), q.new_empty(B, H, K + self.state_rows, self.state_width * v.shape[-1],
                                                                dtype=state_dtype(q.dtype))

        step_op = torch.library.custom_op(self._qualname(backend, "step"), forward, mutates_args=(),
                                          schema=_STEP_SCHEMA)
        step_op.register_fake(fake)
        return step_op


__all__ = ["LSMOps", "namespace_for", "TENSOR_ARGS", "STATE_DTYPE"]
