"""`lmoec inspect SPEC [--ir | --graph | --plan | --kernels [--stats ...]]`: look inside a compiled spec."""
from __future__ import annotations

import argparse

SEQ_LENS = (4096, 32768)
LSM_ONLY_HIDDEN, LSM_ONLY_HEADS = 1024, 8  # sizes assumed for a spec without a model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="show a spec's IR, layer graph, comm plan or emitted code")
    p.add_argument("spec", metavar="SPEC", help=".lsm spec file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ir", action="store_true", help="the IR as JSON")
    mode.add_argument("--graph", action="store_true", help="the layer graph with total/active parameters")
    mode.add_argument("--plan", action="store_true", help="the LASP-2 / EP communication plan per layer")
    mode.add_argument("--kernels", action="store_true", help="the emitted code of each lsm")
    p.add_argument("--stats", action="store_true", help="with --kernels: FLOPs/bytes/roofline of the kernels")
    p.add_argument("--shape", default="1,4096,16,128,128", metavar="B,T,H,K,V",
                   help="shape for --stats, and for --plan of a spec without a model (default %(default)s)")
    p.add_argument("--gpu", default="h100", help="GPU for --stats (default %(default)s)")
    return p


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 1:
        raise ValueError(f"--shape expects five positive integers B,T,H,K,V, got {text!r}")
    return dims


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def nx_is_chain(g) -> bool:
    """The table lists nodes in order; that is the graph only while it is a single path."""
    return all(g.out_degree(n) <= 1 and g.in_degree(n) <= 1 for n in g.nodes)


def _memories_note(lsm, per_memory: int) -> str:
    """`, 4 memories + shared, 0.52M each, top-2` for an lsm with memories; '' without."""
    mem = lsm.memories
    if mem is None:
        return ""
    present = {"k": not lsm.tie_k_to_decay and lsm.key is None, "v": True, "beta": lsm.delta is not None,
               "decay": lsm.decay.kind in ("scalar", "vector")}  # the parts this layer has to own
    owned = [part for part in mem.per_memory if present[part]]
    return (f", {mem.count} memories{' + shared' if mem.shared else ''}, {_count(per_memory)} each"
            f" ({', '.join(owned) or 'nothing'}), top-{mem.top_k}")


def show_graph(ir) -> None:
    from ..ir.graph import embedding_params, layer_graph, lsm_param_split, lsm_params, param_counts

    if ir.model is None:
        print(f"{ir.source}: no model block; each lsm as one layer at hidden={LSM_ONLY_HIDDEN}, "
              f"heads={LSM_ONLY_HEADS} (where the lsm does not set heads):")
        for name, lsm in ir.lsms.items():
            print(f"  {name:<20} {lsm.recurrence.family.value:<9} {_count(lsm_params(lsm, LSM_ONLY_HIDDEN, LSM_ONLY_HEADS)):>10} params"
                  + _memories_note(lsm, lsm_param_split(lsm, LSM_ONLY_HIDDEN, LSM_ONLY_HEADS)[1]))
        return
    g = layer_graph(ir)
    print(f"model {ir.model.name} ({ir.source}): pattern {ir.model.pattern}")
    print(f"  {'node':<22} {'kind':<10} {'total':>10} {'active':>10}")
    for node in g.nodes:
        d = g.nodes[node]
        extra = f"  [{d['lsm']}: {ir.lsms[d['lsm']].recurrence.family.value}]" if d.get("lsm") else ""
        if "params_per_memory" in d:
            extra += _memories_note(ir.lsms[d["lsm"]], d["params_per_memory"])
        print(f"  {node:<22} {d['kind']:<10} {_count(d['params_total']):>10} {_count(d['params_active']):>10}{extra}")
    print("  (a chain: each node feeds the next row)" if nx_is_chain(g) else "  edges: " + ", ".join(f"{a}->{b}" for a, b in g.edges))
    total, active = param_counts(ir)
    emb = embedding_params(ir)
    print(f"  total {total:,} ({_count(total)}), active {active:,} ({_count(active)})")
    print(f"  without embeddings/head: total {total - emb:,} ({_count(total - emb)}), "
          f"active {active - emb:,} ({_count(active - emb)})")


def show_plan(ir, shape: tuple[int, ...]) -> None:
    import sympy

    from ..passes import comm

    B, T, H, K, V = shape
    fixed = {comm.B: B, comm.act: 2}
    if ir.model is None:
        fixed.update({comm.H: H, comm.K: K, comm.V: V})
        print(f"{ir.source}: no model; per lsm at B={B}, H={H}, K={K}, V={V}")
    else:
        print(f"model {ir.model.name}: sp={ir.parallel.sp}, ep={ir.parallel.ep}; B={B}, activations 2 bytes")
    header = f"  {'layer':>5} {'kind':<9} {'dir':<8} {'collective':<14} {'bytes per rank (formula)':<34}" + "".join(
        f" {'T=' + str(t):>12}" for t in SEQ_LENS)
    print(header)
    lsm_flat = True
    for s in ir.comm.steps:
        f = s.bytes_per_rank.subs(fixed)
        nums = [int(sympy.Integer(f.subs(comm.T, t))) if not f.subs(comm.T, t).free_symbols else None for t in SEQ_LENS]
        shown = "".join(f" {n:>12,}" if n is not None else f" {'?':>12}" for n in nums)
        print(f"  {s.layer:>5} {s.kind:<9} {s.direction:<8} {s.collective:<14} {str(s.bytes_per_rank):<34}{shown}  {s.what}")
        if s.kind == "lsm" and len(set(nums)) != 1:
            lsm_flat = False
    if any(s.kind == "lsm" for s in ir.comm.steps):
        print("  LSM payloads (A_r, M_r) do not depend on T: " + ("confirmed at " + " and ".join(
            f"T={t}" for t in SEQ_LENS) if lsm_flat else "VIOLATED"))
    if any(s.depends_on_seq_len for s in ir.comm.steps):
        print("  attention (LASP-2H) and MoE all-to-all grow with the local length T")
    from ..kinds import kind_of

    for lsm in ir.lsms.values():
        if kind_of(lsm.recurrence).lasp2_map is None:
            print(f"  lsm {lsm.name} ({lsm.recurrence.family.value}): no LASP-2 map, its update is not affine in its "
                  "state; it runs unsplit (sp = 1)")


def show_kernels(program, stats: bool, shape: tuple[int, ...], gpu: str) -> None:
    files = program.files
    for name in program.ir.lsms:
        for fname in sorted(f for f in files if f.startswith(f"{name}_") and f.endswith(".py")):
            print(f"# ===== {fname} =====")
            print(files[fname], end="")
        if stats:
            from ..backends.context import lsm_context
            from ..backends.stats import kernel_stats

            print(f"# ===== kernel stats of {name} at B,T,H,K,V={','.join(map(str, shape))} on {gpu} =====")
            print(kernel_stats(lsm_context(program.ir, program.ir.lsms[name]), *shape, gpu))


def run(args: argparse.Namespace) -> int:
    from .. import compile_spec
    from .flags import spec_file

    shape = _shape(args.shape)
    if args.stats and not args.kernels:
        raise ValueError("--stats goes with --kernels")
    if args.stats:
        from ..backends.stats import GPUS

        if args.gpu not in GPUS:
            raise ValueError(f"unknown --gpu {args.gpu!r}; one of {', '.join(GPUS)}")
    program = compile_spec(spec_file(args.spec))
    ir = program.ir
    if args.ir:
        print(ir.dump())
    elif args.graph:
        show_graph(ir)
    elif args.plan:
        show_plan(ir, shape)
    elif args.kernels:
        show_kernels(program, args.stats, shape, args.gpu)
    else:
        print(f"{ir.source}: spec {ir.name}")
        for name, lsm in ir.lsms.items():
            print(f"  lsm {name}: {lsm.recurrence.family.value} ({lsm.recurrence.key}), chunk {lsm.chunk_size}")
        if ir.model is not None:
            show_graph(ir)
        print("  more: --ir, --graph, --plan, --kernels")
    return 0
