"""The op and decode-step contract (lmoec.runtime.contract) under bad arguments: seeded mutations of well-formed
calls of library specs' ops. Each call either runs and returns outputs of the contract's shapes, or raises one
ValueError naming the op (or a TypeError from Python's own argument binding); nothing else (an AttributeError,
a RuntimeError from deep inside a backend, a ZeroDivisionError) may escape. The explicit cases below are the ones
this fuzzing found: a non-tensor state or cu_seqlens, integer / boolean / complex gates and states that one
backend cast silently, tensors on another device, a zero head dim, a scale that is not a finite number, and a
decode step that checked only shapes (of some families only).
"""
from __future__ import annotations

import functools
import math
import random

import pytest
import torch

import lmoec
from conftest import cuda_like
from lmoec.bench import op_inputs
from lmoec.paths import SPECS

SPECS_FUZZED = ["gla", "gated_deltanet", "retnet", "rwkv6", "rwkv7", "mamba", "gfw", "titans", "ttt_linear", "bla"]
MUTANTS = 60  # per spec and entry point: about 20 s for the whole file on 2 cores
D, H = 8, 2


@functools.lru_cache(maxsize=None)
def _program(spec: str):
    return lmoec.compile_spec(SPECS / "lsm" / f"{spec}.lsm")


def _well_formed(rec, B: int, T: int) -> dict:
    """Keyword arguments of a valid op call (T tokens), with an initial state."""
    (q, k, v), extra = op_inputs(rec, B, T, H, D, torch.float32, "cpu")
    args = {"q": q.detach(), "k": k.detach(), "v": v.detach(), **{n: t.detach() for n, t in extra.items()}}
    rows, width = (D + 1, 1) if rec.update == "ttt" else (D, 2 if rec.update == "titans" else 1)
    args["initial_state"] = torch.randn(B, H, rows, width * D)
    return args


def _mutate(args: dict, rng: random.Random, per_token_dims: int) -> dict:
    """One random corruption of a call's arguments."""
    args = dict(args)
    name = rng.choice(sorted(args))
    t = args[name]
    kind = rng.choice(["shape", "dtype", "drop", "extra", "value", "device", "scale", "cu_seqlens", "empty"])
    if kind == "shape" and isinstance(t, torch.Tensor) and t.dim():
        shape = list(t.shape)
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([0, 1, shape[i] + 1, 3])
        args[name] = torch.randn(shape)
    elif kind == "dtype" and isinstance(t, torch.Tensor):
        args[name] = t.to(rng.choice([torch.float16, torch.float64, torch.int32, torch.bool, torch.complex64]))
    elif kind == "drop":
        args.pop(name)
    elif kind == "extra":
        args[rng.choice(["g", "beta", "u", "a", "b", "gv", "dt", "A", "theta", "eta", "alpha", "ln_weight"])] = torch.randn(2, 3)
    elif kind == "value":
        args[name] = rng.choice([None, 3, 2.5, "x", [0, 1]])
    elif kind == "device" and isinstance(t, torch.Tensor):
        args[name] = t.to("meta")
    elif kind == "scale":
        args["scale"] = rng.choice([0.0, -1.0, math.nan, math.inf, "a", torch.tensor(0.5), True])
    elif kind == "cu_seqlens" and per_token_dims == 2:
        T = args["q"].shape[1] if isinstance(args.get("q"), torch.Tensor) else 5
        args = {n: (x[:1] if isinstance(x, torch.Tensor) and x.dim() >= 3 else x) for n, x in args.items()}
        args["cu_seqlens"] = rng.choice([torch.tensor([0, 2, T]), torch.tensor([0, T, 2]), torch.tensor([0, T + 1]),
                                         torch.tensor([0.0, T]), torch.tensor([[0, T]]), [0, T], torch.tensor([0])])
    elif kind == "empty" and per_token_dims == 2:
        args = {n: (x[:, :0] if isinstance(x, torch.Tensor) and x.dim() >= 3 and n != "A" else x) for n, x in args.items()}
    return args


def _calls(spec: str):
    """(entry point, the call) of every mutant of the spec's op and, where it decodes, its step."""
    program = _program(spec)
    rng = random.Random(spec)
    for lsm_name, lsm in program.ir.lsms.items():
        rec = lsm.recurrence
        ops = getattr(program.package, f"{lsm_name}_ops")
        for i in range(MUTANTS):
            torch.manual_seed(i)
            args = _mutate(_well_formed(rec, 2, 5), rng, 2)
            yield f"{lsm_name}", lambda args=args: ops.op(**args, output_final_state=True, backend="torch")
            if rec.minibatch == 1:
                token = _well_formed(rec, 2, 1)
                token = {n: (x[:, 0] if x.dim() >= 3 and n not in ("A", "initial_state") else x) for n, x in token.items()}
                token["state"] = token.pop("initial_state")
                yield f"{lsm_name}.step", lambda args=_mutate(token, rng, 1): ops.step(**args)


@pytest.mark.parametrize("spec", SPECS_FUZZED)
def test_bad_arguments_get_one_clear_error(spec):
    outcomes = {"ran": 0, "rejected": 0}
    for entry, call in _calls(spec):
        try:
            o, state = call()
        except ValueError as err:
            assert str(err).startswith(f"{entry}:"), (entry, str(err))
            outcomes["rejected"] += 1
            continue
        except TypeError as err:  # Python's binding of the call: a missing or unexpected keyword
            assert "argument" in str(err), (entry, str(err))
            outcomes["rejected"] += 1
            continue
        assert isinstance(o, torch.Tensor) and isinstance(state, torch.Tensor), entry
        outcomes["ran"] += 1
    assert outcomes["ran"] > 0 and outcomes["rejected"] > 0, outcomes  # the mutants span both sides


def _gla():
    program = _program("gla")
    rec = program.ir.lsm().recurrence
    return program.package.gla_ops, _well_formed(rec, 1, 5)


@pytest.mark.parametrize("change, message", [
    (dict(g="int32"), r"gla: g must have a real floating dtype, got torch.int32"),
    (dict(g="complex64"), r"gla: g must have a real floating dtype"),
    (dict(initial_state="bool"), r"gla: initial_state must have a real floating dtype"),
    (dict(initial_state="a string"), r"gla: initial_state must be a tensor, got str"),
    (dict(g="meta"), r"gla: g is on meta, q on cpu"),
    (dict(cu_seqlens=[0, 5]), r"gla: cu_seqlens must be a 1-D int32/int64 tensor"),
    (dict(scale="a"), r"gla: scale must be a finite real number"),
    (dict(scale=math.nan), r"gla: scale must be a finite real number"),
    (dict(K=0), r"gla: the head dims must be at least 1, got K=0"),
])
def test_op_rejects(change, message):
    ops, args = _gla()
    for name, how in change.items():
        if name == "K":
            args["q"], args["k"], args["g"] = args["q"][..., :0], args["k"][..., :0], args["g"][..., :0]
        elif how == "meta":
            args[name] = args[name].to("meta")
        elif isinstance(how, str) and hasattr(torch, how):
            args[name] = args[name].to(getattr(torch, how))
        else:
            args[name] = how
    with pytest.raises(ValueError, match=message):
        ops.op(**args, backend="torch")


def test_step_checks_like_the_op():
    ops, args = _gla()
    token = {n: x[:, 0] for n, x in args.items() if n != "initial_state"}
    state = args["initial_state"]
    o, new = ops.step(**token, state=state)  # well-formed: runs
    assert o.shape == token["v"].shape and new.shape == state.shape
    with pytest.raises(ValueError, match=r"gla.step: g must have shape \[1, 2, 8\], got \[1, 2\]"):
        ops.step(**{**token, "g": token["g"][..., 0]}, state=state)
    with pytest.raises(ValueError, match=r"gla.step: state must be a tensor, got NoneType"):
        ops.step(**token, state=None)
    with pytest.raises(ValueError, match=r"gla.step: state must have a real floating dtype"):
        ops.step(**token, state=state.to(torch.complex64))
    with pytest.raises(ValueError, match=r"gla.step: q must be \[B, H, D\], got shape \[1, 5, 2, 8\]"):
        ops.step(**{**token, "q": args["q"]}, state=state)


def test_float64_never_reaches_the_triton_kernels():
    """The Triton kernels compute in fp32 at most, and some failed deep inside on float64 inputs (a KeyError, an
    operand dtype assertion): backend="triton" refuses float64 with one message, and "auto" sends float64 CUDA
    tensors to the torch path (checked here through backend_for)."""
    ops, args = _gla()
    with pytest.raises(ValueError, match=r"gla: backend='triton' takes float32, bfloat16 or float16 inputs, got float64"):
        ops.op(**{n: t.double() for n, t in args.items()}, backend="triton")
    assert ops.backend_for("auto", cuda_like(dtype=torch.float64))[0] == "torch"
    assert ops.backend_for("auto", cuda_like())[0] == "triton"


def test_fp32_beyond_head_dim_128_never_reaches_the_triton_kernels():
    """fp32 tiles at head dim 256 need up to 557 KB of shared memory (an H100 has 227 KB: the sm_90 compile of every
    family's kernels at --dims 256 256), which fails at launch: "auto" sends such inputs to the torch path and
    backend="triton" refuses them with one message; fp32 at 128 and bf16 at 256 keep the kernels."""
    ops, args = _gla()
    wide = {n: (t.repeat_interleave(32, -2 if n == "initial_state" else -1) if n in ("q", "k", "g", "initial_state")
                else t) for n, t in args.items()}  # K = 256
    with pytest.raises(ValueError, match=r"gla: backend='triton' takes fp32 inputs up to head dim 128"):
        ops.op(**wide, backend="triton")
    name, reason = ops.backend_for("auto", cuda_like(256, torch.float32))
    assert name == "torch" and "beyond head dim 128" in reason
    assert ops.backend_for("auto", cuda_like(128, torch.float32), cuda_like(256, torch.float32))[0] == "torch"  # V
    assert ops.backend_for("auto", cuda_like(128, torch.float32))[0] == "triton"
    assert ops.backend_for("auto", cuda_like(256, torch.bfloat16))[0] == "triton"
