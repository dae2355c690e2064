"""Every emitted Triton kernel compiles for sm_90 (H100), checked on a machine without a GPU.

Triton's interpreter, which runs the kernels in the other tests, accepts code the GPU compiler rejects.
Here each family's emitted module has its `@triton.jit` kernels swapped for recorders, its host code
runs on CPU tensors at the benchmark's head dims (forward with initial and final state, backward, decode
step), and each distinct launch (kernel, constexprs, warps, stages) is compiled by Triton's own compiler
and ptxas for sm_90. Nothing is executed. The launch policies a benchmark may switch on (CONFIG) are
exercised too, so every kernel instance the benchmarks can launch has compiled before a GPU sees it.

Runs in a child process without TRITON_INTERPRET (the interpreter replaces the compiler when set).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED_BYTES = 227 * 1024  # an H100's shared memory per block

# the delta and DPLR walks: sequences cut into 1-chunk segments (augmented walks, prefix over segments) or not,
# at the V block halved for want of programs or not;
# the delta forward's output in the walk or in its own kernel
SEGMENTS = {"walk_programs": 10**9, "segment_chunks": 1}
HALVED = {"seq_programs": 1000}  # at B*H = 2 the walks' V block halves to 16
DELTA = [{}, SEGMENTS, HALVED, {"fuse_output": True, "fuse_min_programs": 0}, {"fuse_output": False}, {"fuse_output": False, **SEGMENTS},
         {"wu": "tiles"}, {"wu": "kernel"}, {"wu": "walk"}, {"wu": "walk", **SEGMENTS},
         {"ut_dot": "ieee", "BK_ut": 128, "BK_o": 128}]  # fp32 inputs' ieee UT tiles; the run-8 kernels (a sweep row)
# the decay families' walks with and without the output / dv fused, and sequences cut into 1-chunk segments
DECAY = [{}, {"fuse_output": False, "fuse_dv": False}, {"fuse_output": True, "fuse_dv": True},
         {"walk_programs": 10**9, "segment_chunks": 1}]
# the element-wise walks also at the run-12 default, a setting of the launch grid bench/elementwise_gpu.py sweeps (all
# of which ran on an H100 in run 13), and cut into segments of 2 scans (the segment policy forced)
SEGMENTED = {"walk_programs": 10**9, "segment_programs": 10**9, "segment_chunks": 2}
ELEMENTWISE = {"mamba": [{}, {"block_v": 16, "scan": 16, "num_warps": 4}, {"block_v": 4, "scan": 32, "num_warps": 2},
                         SEGMENTED],
               "gfw": [{}, {"block_v": 16}, SEGMENTED, {"form": "chunk"}, {"form": "chunk", "chunk_block_v": 32},
                       {"form": "chunk", "chunk_forward_tf32": False}, {"form": "chunk", **SEGMENTED, "segment_chunks": 1}]}
CASES = {  # spec: launch settings to exercise besides the defaults
    "bla": DECAY, "simple_gla": DECAY, "retnet": DECAY,
    "gla": DECAY + [{"grad_qk": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2}}],  # dq/dk in K blocks (a sweep row)
    "rwkv6": DECAY,
    "deltanet": DELTA, "gated_deltanet": DELTA, "gated_delta_vector": DELTA, "rwkv7": [{}, SEGMENTS, HALVED],
    **ELEMENTWISE,
    # the walks' V block 16 (halved at B * H = 2), 32 and 64 (bench/titans_gpu.py sweeps it)
    "titans": [{}, {"seq_programs": 0}, {"seq_programs": 0, "BV": 64, "BK_bwd": 64, "BV_bwd": 32},
               {"warps_bwd": 4, "dot_16bit": "ieee"}],
    # its walks hold the whole [D, D] state (the two head dims below are its variants); at B * H = 2 the output has its
    # own kernel by default, fuse_min_programs 0 forms it in the walk
    "ttt_linear": [{}, {"fuse_min_programs": 0}],
}
RUNTIME = "runtime short_conv"  # the kernels lmoec.runtime launches itself (not emitted per spec)
# the (K, V) the benchmarks run, where not (128, 128) alone; TTT-Linear at the paper's 64 as well (4 warps there)
HEAD_DIMS = {"mamba": [(16, 64)], "gfw": [(64, 128)], "ttt_linear": [(128, 128), (64, 64)]}


# ---- the child: record launches, compile them ------------------------------------


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _record_launches(module, run) -> list:
    from triton.runtime.jit import JITFunction

    launches: list = []
    kernels = {name: fn for name, fn in vars(module).items() if isinstance(fn, JITFunction)}
    for name, fn in kernels.items():
        setattr(module, name, _Recorder(fn, launches))
    try:
        run()
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    return launches


def _signature(fn, args, kwargs):
    """(signature, constexprs, compile options) of one launch, as triton.compile takes them."""
    import torch

    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
               torch.int64: "*i64"}
    bound = {p.name: p.default for p in fn.params if p.has_default}
    bound.update(zip(fn.arg_names, args))
    bound.update({n: v for n, v in kwargs.items() if n in fn.arg_names})
    options = {n: v for n, v in kwargs.items() if n not in fn.arg_names}
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = pointer[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32"
        else:
            signature[p.name] = "fp32"
    return signature, constexprs, options


def _inputs(module, decay: str, B=1, T=128, H=2, K=128, V=128, dtype="bfloat16"):
    """(chunk inputs, step inputs, state shape) for the module's chunk(q, k, v, <recurrence args>, ...), the
    activations in `dtype`."""
    import torch

    names = list(inspect.signature(module.chunk).parameters)
    extra = names[3:names.index("scale")]
    bf16 = dict(dtype=getattr(torch, dtype))
    g_shape = {"vector": (K,), "scalar": (), "constant": None}[decay] if decay != "none" else None
    seq = {"q": torch.randn(B, T, H, K, **bf16), "k": torch.randn(B, T, H, K, **bf16), "v": torch.randn(B, T, H, V, **bf16)}
    for name in extra:
        if name == "g":
            seq["g"] = torch.randn(H) if g_shape is None else -torch.rand(B, T, H, *g_shape)
        elif name == "beta":
            seq["beta"] = torch.rand(B, T, H, **bf16)
        elif name in ("a", "b"):
            seq[name] = torch.randn(B, T, H, K, **bf16)
        elif name == "u":
            seq["u"] = torch.randn(H, K, **bf16)
        elif name in ("gv", "dt"):  # element-wise gates: per value channel
            seq[name] = torch.randn(B, T, H, V, **bf16)
        elif name == "A":
            seq["A"] = -torch.rand(H, V, K)
        elif name in ("theta", "eta", "alpha"):  # Titans' and TTT's gates: per token and head, in (0, 1)
            seq[name] = torch.rand(B, T, H, **bf16)
        elif name in ("ln_weight", "ln_bias"):  # TTT-Linear's inner LayerNorm: per head
            seq[name] = torch.randn(H, V, **bf16)
        else:
            raise AssertionError(f"no input rule for chunk argument {name!r}")
    per_head = ("u", "A", "ln_weight", "ln_bias")
    token = {n: (t if n in per_head or (n == "g" and t.dim() == 1) else t[:, 0]) for n, t in seq.items()}
    return seq, token, (B, H, K, V)


def compile_spec_kernels(spec: str) -> dict:
    """{"launched": kernel names launched, "defined": the module's kernels (jit functions named *_kernel; the
    others are device helpers they call), "shared": {launch: bytes}}."""
    import torch

    import lmoec
    from lmoec.kinds import kind_of

    program = lmoec.compile_spec(ROOT / "specs" / "lsm" / f"{spec}.lsm")
    lsm = program.ir.lsm()
    module = getattr(program.package, f"{lsm.name}_triton")
    kind = kind_of(lsm.recurrence)  # a joint state is wider (Titans: M and S side by side) or taller

    def run(seq, token, state_shape):
        leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in seq.items()}
        h0 = torch.randn(state_shape).requires_grad_()
        o, ht = module.chunk(**leaves, initial_state=h0, output_final_state=True)
        (o.float().sum() + ht.sum()).backward()
        if getattr(module, "MINIBATCH", 1) == 1:  # a mini-batch update's step refuses (its test says so)
            module.step(**token, state=torch.randn(state_shape))

    launches = []
    defaults = dict(module.CONFIG)
    for K, V in HEAD_DIMS.get(spec, [(128, 128)]):
        # fp32 activations take other kernels (fp32 tiles, ieee products): at the default settings
        for dtype, configs in (("bfloat16", CASES[spec]), ("float32", [{}])):
            seq, token, state_shape = _inputs(module, lsm.recurrence.decay, K=K, V=V, dtype=dtype)
            state_shape = (*state_shape[:2], K + kind.state_rows, V * kind.state_width)
            for config in configs:
                module.CONFIG.update(defaults, **config)
                launches += _record_launches(module, lambda: run(seq, token, state_shape))
    module.CONFIG.update(defaults)
    return _compiled(module, launches)


def compile_runtime_kernels() -> dict:
    """compile_spec_kernels for lmoec.runtime.short_conv (the layers' short convolutions on the GPU): bf16 rows in
    packed segments with a state, and in equal-length segments without one, forward and backward, width 4."""
    import torch

    from lmoec.runtime import short_conv

    def run():
        for segments in ({"cu_seqlens": torch.tensor([0, 5, 5, 40]), "segment": torch.zeros(40, dtype=torch.long)},
                         {"length": 20}):
            x = torch.randn(40, 300, dtype=torch.bfloat16, requires_grad=True)
            weight = torch.randn(300, 4, requires_grad=True)
            state = torch.randn(3, 3, 300, requires_grad=True) if "cu_seqlens" in segments else None
            short_conv.conv_silu(x, weight, state, **segments).float().sum().backward()

    return _compiled(short_conv, _record_launches(short_conv, run))


def _compiled(module, launches) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    shared = {}
    for fn, args, kwargs in launches:
        signature, constexprs, options = _signature(fn, args, kwargs)
        key = f"{fn.__name__} {sorted(signature.items())} {sorted(constexprs.items(), key=str)} {sorted(options.items())}"
        if key not in shared:
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                    options=options)
            shared[key] = kernel.metadata.shared
    return {"launched": sorted({fn.__name__ for fn, _, _ in launches}),
            "defined": sorted(n for n, fn in vars(module).items() if isinstance(fn, JITFunction) and n.endswith("_kernel")),
            "shared": shared}


# ---- the tests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    """Each spec compiled in a child of its own, as many at once as there are cores (compiling is CPU-bound)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90")
    env = {n: x for n, x in os.environ.items() if n != "TRITON_INTERPRET"}
    pending, running, results = [*CASES, RUNTIME], [], {}
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            spec = pending.pop(0)
            running.append((spec, subprocess.Popen([sys.executable, __file__, spec], env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)))
        spec, proc = running.pop(0)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{spec}: {err[-4000:]}"
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("spec", [*CASES, RUNTIME])
def test_every_kernel_compiles_for_hopper(compiled, spec):
    result = compiled[spec]
    assert result["launched"] == result["defined"], "a kernel of the module was never launched, so never compiled"
    too_big = {launch: n for launch, n in result["shared"].items() if n > SM90_SHARED_BYTES}
    assert not too_big, f"shared memory beyond an H100's 227 KB per block: {too_big}"


if __name__ == "__main__":
    # python tests/test_hopper_compile.py [--dims K V] SPEC...: every launch of each spec compiled for sm_90
    # (--dims: at these head dims and the default settings only, e.g. to see whether K = V = 256 fits shared memory)
    sys.path.insert(0, str(ROOT))
    specs = sys.argv[1:]
    if specs[:1] == ["--dims"]:
        dims, specs = (int(specs[1]), int(specs[2])), specs[3:]
        HEAD_DIMS.update({spec: [dims] for spec in specs})
        CASES.update({spec: [{}] for spec in specs})
    print(json.dumps({spec: compile_runtime_kernels() if spec == RUNTIME else compile_spec_kernels(spec) for spec in specs}))
