"""LASP-2 / LASP-2H on CPU (gloo): sp = 2 and 4 equal the single-process op, forward and every gradient.

One spawned run per world size checks every case (spawn is slow); each rank
writes what it found to a JSON file, and the tests below read those results,
one test per case. Inputs are float64; every rank builds the same global
inputs from one seed, runs the op on the whole sequence as the oracle, then its
slice under sequence parallelism.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import sympy
import torch.nn.functional as F

import lmoec

from lmoec.backends.reference import recurrent_reference
from lmoec.ir import expr as ex
from lmoec.ir.nodes import Decay, Delta, DPLRTerms, LSMSpec, ParallelSpec, Param, Recurrence, SpecIR, Update
from lmoec.kinds import kind_of
from lmoec.passes import run_passes
from lmoec.paths import SPECS
from lmoec.program import Program
from conftest import RECURRENCES
from ranks import recording_rank, run_ranks
from lmoec.runtime.contract import check_op_args
from lmoec.trainer.lasp2 import lasp2_op, lasp2h_attention

# one family per kind of transition the all-gather carries (RWKV7's DPLR with its vector decay)
FAMILIES = {name: RECURRENCES[name] for name in ("additive", "constant", "scalar", "vector", "vector_bonus", "delta", "delta_scalar")}
FAMILIES["dplr"] = RECURRENCES["dplr_vector"]
FAMILIES["outer_sum"] = Recurrence(decay="vector", elementwise="outer_sum")  # GFW: A_r [B, H, K, V] element-wise
FAMILIES["outer_product"] = Recurrence(elementwise="outer_product")  # Mamba
# Titans: the joint state (M, S) [B, H, K, 2V] travels stacked, A_r [B, H, 2K, 2K]
FAMILIES["titans"] = Recurrence(update="titans", momentum=True, weight_decay=True)
# (case, family, transition, backend): every family on the float64 oracle and on the emitted torch
# chunkwise op; the generic K x K route forced on a diagonal family too
LSM_CASES = [
    (f"{name}-{backend}", name, "auto", backend) for backend in ("reference", "torch") for name in FAMILIES
] + [("scalar_as_matrix-torch", "scalar", "matrix", "torch"),
      ("titans_minibatch-reference", "titans_minibatch", "auto", "reference")]
# Titans' chunk-start form, each rank's slice of T_LOCAL tokens one whole mini-batch (on the oracle only: an emitted
# op's mini-batch must divide its chunk)
FAMILIES["titans_minibatch"] = Recurrence(update="titans", momentum=True, weight_decay=True, minibatch=5)
B, T_LOCAL, H, K, V = 2, 5, 2, 4, 3
# the families whose segments (cu_seqlens) continue across ranks: every kind of A, on the emitted torch op
SEGMENT_CASES = ["additive", "constant", "scalar", "vector_bonus", "delta_scalar", "dplr", "outer_sum", "outer_product",
                 "titans"]


def reference_op(rec: Recurrence):
    """An op module shaped like an emitted `<lsm>_ops` (RECURRENCE + op), running the float64 oracle."""
    name = f"lasp2_test_ops_{rec.key}"
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.RECURRENCE = rec

        def op(q, k, v, g=None, beta=None, u=None, a=None, b=None, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, gv=None, dt=None, A=None, theta=None, eta=None, alpha=None):
            gates = dict(gv=gv, dt=dt, A=A, theta=theta, eta=eta, alpha=alpha)
            check_op_args(rec, name, q, k, v, g, beta, u, a, b, initial_state, cu_seqlens, **gates)
            return recurrent_reference(rec, q, k, v, g, beta, u, a, b, scale, initial_state, output_final_state, cu_seqlens,
                                       **gates)

        op.__module__ = name
        module.op = op
        sys.modules[name] = module
    return sys.modules[name].op


def _lsm_spec(name: str, rec: Recurrence) -> LSMSpec:
    """A minimal LSM spec whose classified recurrence is `rec` (only the op is used)."""
    x = sympy.Symbol("x")
    parts = {}
    if rec.decay == "constant":
        parts["decay"] = Decay(kind="constant", expr=sympy.log(1 - 2 ** (-5 - sympy.Symbol("h"))))
    elif rec.decay != "none":
        parts["decay"] = Decay(kind=rec.decay, expr=ex.function("logsigmoid")(ex.linear(x, "W_g")))
    if rec.delta:
        parts["delta"] = Delta(beta=ex.function("sigmoid")(ex.linear(x, "W_beta")))
    if rec.dplr:
        parts["dplr"] = DPLRTerms(a=ex.linear(x, "W_a"), b=ex.linear(x, "W_b"))
    if rec.bonus:
        parts["bonus_u"] = True
        parts["params"] = {"u": Param(name="u", shape=["H", "K"], init=sympy.Integer(0))}
    if rec.elementwise == "outer_sum":
        parts["decay"] = parts["decay"].model_copy(update={"value": ex.function("logsigmoid")(ex.linear(x, "W_gv"))})
    elif rec.elementwise == "outer_product":
        parts["decay"] = Decay(step=ex.function("softplus")(ex.linear(x, "W_dt")), rate=-sympy.exp(sympy.Symbol("A_log")))
        parts["params"] = {"A_log": Param(name="A_log", shape=["H", "V", "K"], init=sympy.Integer(0))}
    if rec.update == "titans":
        sigmoid = ex.function("sigmoid")
        parts["update"] = Update(lr=sigmoid(ex.linear(x, "W_lr")), momentum=sigmoid(ex.linear(x, "W_eta")),
                                 weight_decay=sigmoid(ex.linear(x, "W_alpha")))
    return LSMSpec(name=name, **parts)


def emitted_op(family: str):
    """The op of an emitted package (Program.op) for `family`: what users run."""
    rec = FAMILIES[family]
    ir = SpecIR(name=f"lasp2_{family}", source="<test_lasp2>", lsms={family: _lsm_spec(family, rec)})
    op = Program(run_passes(ir)).op()
    assert sys.modules[op.__module__].RECURRENCE == rec
    return op


def op_for(family: str, backend: str):
    """(op, extra op kwargs) for a case."""
    if backend == "reference":
        return reference_op(FAMILIES[family]), {}
    return emitted_op(family), {"backend": backend}


def global_inputs(rec: Recurrence, T: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 inputs for the whole sequence; decays in (0, 1), delta keys normalized."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V)}
    if rec.decay == "constant":
        x["g"] = -0.05 - 0.3 * torch.rand(H, generator=gen, dtype=torch.float64)
    elif rec.decay == "scalar":
        x["g"] = F.logsigmoid(randn(B, T, H) + 2)
    elif rec.decay == "vector":
        x["g"] = F.logsigmoid(randn(B, T, H, K) + 2)
    if rec.delta and not rec.dplr:
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.sigmoid(randn(B, T, H))
    if rec.bonus:
        x["u"] = randn(H, K)
    if rec.dplr:
        x["a"] = 0.3 * randn(B, T, H, K) / K ** 0.5
        x["b"] = 0.3 * randn(B, T, H, K) / K ** 0.5
    if rec.elementwise == "outer_sum":
        x["gv"] = F.logsigmoid(randn(B, T, H, V) + 2)
    elif rec.elementwise == "outer_product":
        x["dt"] = F.softplus(randn(B, T, H, V))
        x["A"] = -0.1 - torch.rand(H, V, K, generator=gen, dtype=torch.float64)
    if rec.update == "titans":
        x["k"] = F.normalize(x["k"], dim=-1)
        x["theta"], x["eta"] = torch.sigmoid(randn(B, T, H)), torch.sigmoid(randn(B, T, H))
        x["alpha"] = torch.sigmoid(randn(B, T, H) - 3)
    x["initial_state"] = randn(B, H, K, kind_of(rec).state_width * V)
    return x



def _close(errors: list[str], what: str, got, want) -> None:
    if got is None or want is None:
        if not (got is None and want is None):
            errors.append(f"{what}: got {'None' if got is None else 'a tensor'}, want {'None' if want is None else 'a tensor'}")
        return
    try:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    except AssertionError as e:
        errors.append(f"{what}: {str(e).splitlines()[0:4]}")


def check_lsm(family: str, transition: str, backend: str, group, seed: int) -> list[str]:
    """This rank's outputs, final state and input gradients against the whole-sequence op."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rec = FAMILIES[family]
    op, op_kwargs = op_for(family, backend)
    full = global_inputs(rec, T_LOCAL * world, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w_o = torch.randn(B, T_LOCAL * world, H, V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, K, kind_of(rec).state_width * V, generator=gen, dtype=torch.float64)

    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    o_full, s_full = op(**leaves, output_final_state=True, **op_kwargs)
    ((o_full * w_o).sum() + (s_full * w_s).sum()).backward()

    # This rank's slice along T; g [H], u [H, K], A [H, V, K] and the initial state are whole on every rank.
    sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    sliced = {n for n, t in full.items() if t.dim() >= 3 and n not in ("initial_state", "A")}
    local = {n: (t[:, sl] if n in sliced else t).clone().requires_grad_() for n, t in full.items()}
    o, s = lasp2_op(op, **local, output_final_state=True, group=group, transition=transition, **op_kwargs)
    loss = (o * w_o[:, sl]).sum()
    if rank == world - 1:  # the final state is replicated: read it once
        loss = loss + (s * w_s).sum()
    loss.backward()

    errors: list[str] = []
    _close(errors, "o", o, o_full[:, sl].detach())
    _close(errors, "final_state", s, s_full.detach())
    for n, leaf in local.items():
        want = leaves[n].grad[:, sl] if n in sliced else leaves[n].grad
        got = leaf.grad
        if n == "initial_state" and rank != 0:
            if got is not None and got.abs().max() != 0:
                errors.append("d initial_state: must be zero/None off rank 0 (it is read on rank 0 only)")
            continue
        if n not in sliced and n != "initial_state":  # replicated: the group's gradients sum to the full one
            got = got.clone() if got is not None else torch.zeros_like(leaf)
            dist.all_reduce(got, group=group)
        _close(errors, f"d {n}", got, want)
    return errors


def check_segments(family: str, backend: str, group, seed: int) -> list[str]:
    """cu_seqlens: N packed segments per rank, segment i continuing on the next rank (a memory layer's
    (memory, batch) segments), some empty on some ranks, against the op on the whole segments."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rec = FAMILIES[family]
    op, op_kwargs = op_for(family, backend)
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 5, (world, 3), generator=gen)  # local rows of each segment on each rank
    lens[0, 1] = lens[-1, 2] = 0
    total = lens.sum(0)
    start = torch.cumsum(total, 0) - total  # each segment's first row in the whole packed sequence
    full = {n: (t[:1] if t.dim() >= 3 and n != "A" else t) for n, t in global_inputs(rec, int(total.sum()), seed).items()}
    full["initial_state"] = torch.randn(3, H, K, kind_of(rec).state_width * V, generator=gen, dtype=torch.float64)
    cu_full = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(total, 0)])
    w_o = torch.randn(1, int(total.sum()), H, V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(3, H, K, kind_of(rec).state_width * V, generator=gen, dtype=torch.float64)
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    o_full, s_full = op(**leaves, output_final_state=True, cu_seqlens=cu_full, **op_kwargs)
    ((o_full * w_o).sum() + (s_full * w_s).sum()).backward()

    before = lens[:rank].sum(0)
    rows = torch.cat([torch.arange(int(start[n] + before[n]), int(start[n] + before[n] + lens[rank, n])) for n in range(3)])
    sliced = {n for n, t in full.items() if t.dim() >= 3 and n not in ("initial_state", "A")}
    local = {n: (t[:, rows] if n in sliced else t).clone().requires_grad_() for n, t in full.items()}
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens[rank], 0)])
    o, s = lasp2_op(op, **local, output_final_state=True, cu_seqlens=cu, group=group, **op_kwargs)
    loss = (o * w_o[:, rows]).sum()
    if rank == world - 1:
        loss = loss + (s * w_s).sum()
    loss.backward()
    errors: list[str] = []
    _close(errors, "o", o, o_full[:, rows].detach())
    _close(errors, "final_state", s, s_full.detach())
    for n, leaf in local.items():
        got = leaf.grad
        if n == "initial_state" and rank != 0:
            continue
        if n not in sliced and n != "initial_state":
            got = got.clone() if got is not None else torch.zeros_like(leaf)
            dist.all_reduce(got, group=group)
        _close(errors, f"d {n}", got, leaves[n].grad[:, rows] if n in sliced else leaves[n].grad)
    return errors


def check_attention(group, seed: int) -> list[str]:
    """LASP-2H (GQA: 4 query heads, 2 key/value heads) against causal attention on the whole sequence."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(seed)
    T = T_LOCAL * world
    full = {"q": torch.randn(B, T, 4, K, generator=gen, dtype=torch.float64),
            "k": torch.randn(B, T, 2, K, generator=gen, dtype=torch.float64),
            "v": torch.randn(B, T, 2, K, generator=gen, dtype=torch.float64)}
    w = torch.randn(B, T, 4, K, generator=gen, dtype=torch.float64)
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    o_full = F.scaled_dot_product_attention(*(leaves[n].transpose(1, 2) for n in "qkv"), is_causal=True, enable_gqa=True)
    o_full = o_full.transpose(1, 2)
    (o_full * w).sum().backward()

    sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    local = {n: t[:, sl].clone().requires_grad_() for n, t in full.items()}
    o = lasp2h_attention(local["q"], local["k"], local["v"], group=group)
    (o * w[:, sl]).sum().backward()
    errors: list[str] = []
    _close(errors, "o", o, o_full[:, sl].detach())
    for n in "qkv":
        _close(errors, f"d {n}", local[n].grad, leaves[n].grad[:, sl])
    return errors


def check_mesh_subgroups() -> list[str]:
    """World 4 as dp=1, sp=2, ep=2: the sp groups are {0,1} and {2,3}, and LASP-2 runs inside each."""
    from lmoec.trainer.mesh import build_mesh, sample_rank

    mesh = build_mesh(ParallelSpec(sp=2, ep=2), seq_len=2 * T_LOCAL, experts=4, batch_size=2, device_type="cpu")
    errors = []
    if mesh.mesh_dim_names != ("dp", "sp", "ep") or tuple(mesh.shape) != (1, 2, 2):
        errors.append(f"mesh dims {mesh.mesh_dim_names} shape {tuple(mesh.shape)}")
    sp_group = mesh["sp"].get_group()
    members = sorted(dist.get_process_group_ranks(sp_group))
    rank = dist.get_rank()
    if members != [rank % 2, rank % 2 + 2]:
        errors.append(f"sp group of rank {rank} is {members}, want {[rank % 2, rank % 2 + 2]}")
    if sample_rank(mesh) != (rank % 2, 2):
        errors.append(f"sample_rank {sample_rank(mesh)}")
    # the two sp groups see different samples (seeds) and must not mix
    errors += [f"lasp2 in sp subgroup: {e}" for e in check_lsm("delta_scalar", "auto", "torch", sp_group, seed=100 + rank % 2)]
    errors += [f"lasp2h in sp subgroup: {e}" for e in check_attention(sp_group, seed=200 + rank % 2)]
    return errors


HYBRID_SPEC = """
import "{lsm}"
model sp_hybrid {{
    vocab = 64
    hidden = 32
    layers = 3
    heads = 2
    pattern = "LNL"
    lsm = {name}
    attention {{ kv_heads = 1 }}
    moe {{ experts = 4 top_k = 2 expert_ffn = 16 }}
    max_seq_len = 64
}}
"""


def model_programs(spec_dir: str) -> dict[str, Program]:
    """Three tiny hybrid models: GLA (vector decay) LLLN from specs/models/tiny.lsm, Gated DeltaNet
    (delta + scalar decay, width-4 short convolutions) LNL with grouped-query attention, and the same
    with Mixture-of-Memories (specs/lsm/mom.lsm: 4 memories, top-2, shared; segments of 0 to 4 tokens
    per rank, so a segment's convolution reaches back over several ranks), Titans LNL (the joint state), and
    minimax-tiny (lightning LLLLLLLN; attention heads wider than hidden / heads with partial RoPE, post-norm blocks)."""
    programs = {"gla_llln": lmoec.compile_spec(SPECS / "models" / "tiny.lsm"),
                "minimax_llllllln": lmoec.compile_spec(SPECS / "models" / "minimax-tiny.lsm")}
    for key, name in (("gdn_lnl", "gated_deltanet"), ("mom_lnl", "mom"), ("titans_lnl", "titans")):
        hybrid = Path(spec_dir, f"sp_hybrid_{name}.lsm")
        if not hybrid.exists():
            hybrid.write_text(HYBRID_SPEC.format(lsm=SPECS / "lsm" / f"{name}.lsm", name=name))
        programs[key] = lmoec.compile_spec(hybrid)
    return programs


def check_model(program: Program, group, seed: int) -> list[str]:
    """Loss, logits and every parameter gradient of a hybrid model under sp equal one process on the whole batch."""
    from lmoec.trainer.parallelize import apply_sequence_parallel, average_gradients, shard_sequence

    world = dist.get_world_size(group)
    torch.manual_seed(seed)
    model = program.model(hidden=32, vocab=64).double()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 4 * world), generator=gen)
    targets = torch.randint(0, 64, (2, 4 * world), generator=gen)

    def loss_of(logits, tgt):
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten())

    logits_full = model(ids)
    loss_full = loss_of(logits_full, targets)
    loss_full.backward()
    grads_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the routers' aux losses (MoE layers; memories): the mean of the ranks' equals the whole batch's
    aux_full = {n: m.last_aux_loss.detach().clone() for n, m in model.named_modules()
                if getattr(m, "last_aux_loss", None) is not None}
    model.zero_grad(set_to_none=True)

    apply_sequence_parallel(model, group)
    logits = model(shard_sequence(ids, group))
    loss = loss_of(logits, shard_sequence(targets, group))
    loss.backward()
    average_gradients(model, group)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    errors: list[str] = []
    _close(errors, "logits", logits.detach(), shard_sequence(logits_full.detach(), group))
    _close(errors, "loss", mean_loss / world, loss_full.detach())
    if not aux_full:
        errors.append("no router aux loss recorded")
    for n, want in aux_full.items():
        aux = dict(model.named_modules())[n].last_aux_loss.detach().clone()
        dist.all_reduce(aux, group=group)
        _close(errors, f"aux loss of {n}", aux / world, want)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if sorted(got) != sorted(grads_full):
        errors.append(f"parameters with gradients differ: {sorted(set(got) ^ set(grads_full))}")
    for n in sorted(set(got) & set(grads_full)):
        _close(errors, f"d {n}", got[n], grads_full[n])
    return errors


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with recording_rank(rank, world, port, out_dir) as record:
        for case, family, transition, backend in LSM_CASES:
            record(case, check_lsm, family, transition, backend, dist.group.WORLD, 7)
        for family in SEGMENT_CASES:
            record(f"segments_{family}", check_segments, family, "torch", dist.group.WORLD, 17)
        record("attention", check_attention, dist.group.WORLD, 11)
        for name, program in model_programs(out_dir).items():
            record(f"model_{name}", check_model, program, dist.group.WORLD, 13)
        if world == 4:
            record("mesh_subgroups", check_mesh_subgroups)


_RESULTS: dict[int, dict[str, list[str]]] = {}


def results_for(world: int, tmp_path_factory) -> dict[str, list[str]]:
    """Run every case once in `world` spawned processes; {case: failures of all ranks}."""
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"lasp2_world{world}")
        # emit once here, so the workers only import the cached packages
        for family in {c[1] for c in LSM_CASES if c[3] == "torch"} | set(SEGMENT_CASES):
            emitted_op(family)
        for program in model_programs(str(out)).values():
            program.package
        _RESULTS[world] = run_ranks(_worker, world, out)
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [c[0] for c in LSM_CASES])
def test_lasp2_matches_single_process(world, case, tmp_path_factory):
    res = results_for(world, tmp_path_factory)
    assert case in res, f"case {case} did not run"
    assert res[case] == [], "\n".join(res[case])


@pytest.mark.parametrize("world", [2, 4])
def test_lasp2h_attention_matches_causal_attention(world, tmp_path_factory):
    res = results_for(world, tmp_path_factory)
    assert res["attention"] == [], "\n".join(res["attention"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("family", SEGMENT_CASES)
def test_lasp2_segments_continue_across_ranks(world, family, tmp_path_factory):
    res = results_for(world, tmp_path_factory)
    assert res[f"segments_{family}"] == [], "\n".join(res[f"segments_{family}"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", ["gla_llln", "gdn_lnl", "mom_lnl", "titans_lnl", "minimax_llllllln"])
def test_sequence_parallel_hybrid_model_matches_single_process(world, model, tmp_path_factory):
    res = results_for(world, tmp_path_factory)
    assert res[f"model_{model}"] == [], "\n".join(res[f"model_{model}"])


def test_lasp2_inside_mesh_sp_subgroups(tmp_path_factory):
    res = results_for(4, tmp_path_factory)
    assert res["mesh_subgroups"] == [], "\n".join(res["mesh_subgroups"])
