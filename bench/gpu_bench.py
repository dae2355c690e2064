"""What the kernel benchmark scripts on the GPU share: timing with do_bench, error measures, table cells and a
per-kernel CUDA profile. Imported by bench/triton_delta_gpu.py and bench/triton_dplr_gpu.py (their folder is
on sys.path when run as scripts)."""
from __future__ import annotations

import torch


def rel(x, ref) -> tuple[float, float]:
    """(max |err| / max |ref|, ||err|| / ||ref||); inf where x is not finite."""
    x, ref = x.float(), ref.float()
    if not torch.isfinite(x).all():
        return float("inf"), float("inf")
    err = x - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


def _refusal(e: Exception) -> str:
    return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def timed(fn, grad_of=None, do=None):
    """(median ms fwd, median ms fwd+bwd, peak MB of fwd+bwd beyond the inputs). An op that refuses to run
    (fla's gated backward on Hopper with Triton < 3.7.1) is reported as text in its cell."""
    import triton

    try:
        fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - the table shows the refusal
        return _refusal(e), None, None
    if grad_of is None:
        return fwd, None, None

    def fwd_bwd():
        torch.autograd.backward(fn(), do)
        for t in grad_of:
            t.grad = None

    try:
        both = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001
        return fwd, _refusal(e), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    return fwd, both, (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else (x if x is not None else "n/a")


def ratio(peer, ours) -> str:
    """peer time / lmoec time: > 1 means lmoec is faster."""
    return f"{peer / ours:.2f}x" if isinstance(peer, float) and isinstance(ours, float) else "n/a"


def _device_us(event) -> float:
    """Self CUDA time of a profiler row in us (the attribute's name changed across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


def kernel_times(run, calls: int = 5) -> dict[str, float]:
    """{kernel: CUDA us per call of `run()`}, mean of `calls` calls after two warm-ups, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # compile, autotune and warm up outside the profile
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if _device_us(e) > 0), key=_device_us, reverse=True)
    return {e.key: _device_us(e) / calls for e in events}


def kernel_profile(name: str, run, calls: int = 5, rows: int = 12) -> list[str]:
    """Markdown lines: CUDA time per kernel of `run()` (one fwd+bwd), mean of `calls` calls after two warm-ups."""
    times = kernel_times(run, calls)
    lines = [f"### {name}: {sum(times.values()) / 1000:.3f} ms of kernels per call", "", "| kernel | us per call |",
             "|---|---|"]
    lines += [f"| {key[:70]} | {us:.1f} |" for key, us in list(times.items())[:rows]]
    return lines + [""]


def kernel_resources(module, names=("BV", "BK", "FUSE_OUTPUT")) -> list[str]:
    """Markdown lines: registers, spilled bytes and shared memory of every kernel of `module` compiled so far
    (what ptxas made of each launch setting), read from Triton's per-device kernel caches."""
    from triton.runtime.jit import JITFunction

    lines = ["| kernel | settings | warps | registers | spill bytes | shared bytes |", "|---|---|---|---|---|---|"]
    for name, fn in vars(module).items():
        if not isinstance(fn, JITFunction):
            continue
        for caches in fn.device_caches.values():
            kernels = next((c for c in caches if isinstance(c, dict) and c), {})
            for kernel in kernels.values():
                kernel._init_handles()
                constants = getattr(kernel.src, "constants", {}) or {}
                shown = {}
                for key, value in constants.items():
                    arg = fn.arg_names[key[0]] if isinstance(key, tuple) else key
                    if arg in names:
                        shown[arg] = value
                lines.append(f"| {name} | {shown} | {kernel.metadata.num_warps} | {kernel.n_regs} | {kernel.n_spills} | "
                             f"{kernel.metadata.shared} |")
    return lines + [""]
