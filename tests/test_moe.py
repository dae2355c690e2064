"""The MoE layer against a dense float64 reference: a Python loop over tokens to route and over experts to compute."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmoec.ir.nodes import DenseFFNSpec, ModelSpec, MoESpec, ParallelSpec, SpecIR
from lmoec.passes.comm import plan
from lmoec.program import compile_ir
from lmoec.runtime.moe import MoE, grouped_matmul, grouped_mm_available, grouped_weight_grad

HIDDEN, FFN = 16, 12


def reference_moe(moe: MoE, params: dict, x: torch.Tensor):
    """Dense float64 MoE: (y, aux, z, tokens_per_expert); routing decided token by token in Python.

    Ties go to the lower expert index; capacity keeps each expert's first tokens by position.
    Every expert runs on every token; a [N, E] combine matrix (zero where not routed) picks.
    """
    p = {name: t.double() for name, t in params.items()}
    tokens = x.double().reshape(-1, moe.hidden)
    n, e, k = tokens.shape[0], moe.experts, moe.top_k
    logits = tokens @ p["router.weight"].T
    probs = torch.softmax(logits, -1)
    if moe.score == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        scores = probs
    select = logits if (moe.score == "softmax" and moe.order == "topk_softmax") else scores
    select = select.detach() + (p["router.bias"] if "router.bias" in p else 0)
    capacity = math.ceil(moe.capacity_factor * n * k / e) if moe.capacity_factor else None
    load = [0] * e
    kept = [0] * e
    rows = []
    for t in range(n):
        chosen = sorted(range(e), key=lambda i: (-float(select[t, i]), i))[:k]
        if moe.score == "softmax" and moe.order == "topk_softmax":
            w = torch.softmax(logits[t, chosen], -1)
        else:
            w = scores[t, chosen]
            if moe.normalize_topk:
                w = w / w.sum()
        for j, i in enumerate(chosen):
            load[i] += 1
            if capacity is None or kept[i] < capacity:
                kept[i] += 1
                rows.append((t, i, w[j]))
    t_idx, e_idx, w_kept = zip(*rows)
    combine = torch.zeros(n, e, dtype=torch.float64).index_put((torch.tensor(t_idx), torch.tensor(e_idx)), torch.stack(w_kept))
    y = torch.zeros_like(tokens)
    for i in range(e):
        h = F.silu(tokens @ p["w_gate"][i]) * (tokens @ p["w_up"][i])
        y = y + combine[:, i : i + 1] * (h @ p["w_down"][i])
    if "shared.w_gate" in p:
        y = y + (F.silu(tokens @ p["shared.w_gate"]) * (tokens @ p["shared.w_up"])) @ p["shared.w_down"]
    f = torch.tensor(load, dtype=torch.float64) / (n * k)
    aux = e * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return y.reshape(x.shape), aux, z, torch.tensor(load)


def check_against_reference(moe: MoE, x: torch.Tensor, rtol: float, atol: float):
    """Forward, losses, stats, and gradients of input / router / experts / shared experts."""
    x = x.clone().requires_grad_()
    y = moe(x)
    loss_w = torch.randn_like(y)
    total = (y * loss_w).sum() + 0.3 * moe.last_aux_loss + 0.2 * moe.last_z_loss
    grads = torch.autograd.grad(total, [x] + [p for p in moe.parameters() if p.requires_grad], allow_unused=False)

    params = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in moe.named_parameters()}
    x_ref = x.detach().double().requires_grad_()
    y_ref, aux_ref, z_ref, load_ref = reference_moe(moe, params, x_ref)
    total_ref = (y_ref * loss_w.double()).sum() + 0.3 * aux_ref + 0.2 * z_ref
    trainable = [p for p in params.values() if p.requires_grad]
    grads_ref = torch.autograd.grad(total_ref, [x_ref] + trainable)

    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(moe.last_aux_loss.double(), aux_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(moe.last_z_loss.double(), z_ref, rtol=rtol, atol=atol)
    assert torch.equal(moe.last_tokens_per_expert.cpu(), load_ref)
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), g_ref, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")
    return y


def make_moe(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw.setdefault("experts", 6)
    kw.setdefault("top_k", 2)
    return MoE(HIDDEN, expert_ffn=FFN, init_std=0.3, dtype=dtype, **kw)


CONFIGS = {
    "softmax_topk": dict(),
    "softmax_topk_unnormalized_shared": dict(normalize_topk=False, shared_experts=2),
    "topk_softmax": dict(order="topk_softmax", top_k=3),
    "sigmoid_bias": dict(score="sigmoid", bias_balancing=True),
    "capacity": dict(capacity_factor=0.75, top_k=2),
    "top1_capacity_shared": dict(top_k=1, capacity_factor=1.0, shared_experts=1),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_dense_reference_float64(config):
    moe = make_moe(**CONFIGS[config])
    if moe.router.bias is not None:
        moe.router.bias.copy_(torch.randn(moe.experts) * 0.3)  # a bias that changes selection
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    check_against_reference(moe, x, rtol=1e-10, atol=1e-10)


def test_capacity_drops_tokens_by_position():
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(1, 24, HIDDEN, dtype=torch.float64)
    check_against_reference(moe, x, rtol=1e-10, atol=1e-10)
    assert int(moe.last_dropped_tokens) > 0
    # the stats count every slot beyond its expert's capacity
    capacity = math.ceil(0.5 * 24 * 2 / 6)
    assert int(moe.last_dropped_tokens) == int((moe.last_tokens_per_expert - capacity).clamp(min=0).sum())


def test_ties_go_to_the_lower_expert_index():
    moe = make_moe(experts=5, top_k=2)
    with torch.no_grad():
        moe.router.weight[3] = moe.router.weight[1]  # experts 1 and 3 always tie
        moe.router.weight[4] = moe.router.weight[1]
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    check_against_reference(moe, x, rtol=1e-10, atol=1e-10)
    # all-zero tokens: every logit is 0, every expert ties: experts 0 .. k-1 take them
    zeros = torch.zeros(1, 4, HIDDEN, dtype=torch.float64)
    moe(zeros)
    assert moe.last_tokens_per_expert.tolist() == [4, 4, 0, 0, 0]
    check_against_reference(moe, zeros, rtol=1e-10, atol=1e-10)


def test_expert_without_tokens_gets_zero_gradient():
    moe = make_moe(experts=6, top_k=2)
    x = torch.randn(1, 10, HIDDEN, dtype=torch.float64)
    x[..., 0] = 1.0 + x[..., 0].abs()
    with torch.no_grad():
        moe.router.weight[4, 0] = -100.0  # expert 4's logit is always far below the others
    check_against_reference(moe, x, rtol=1e-10, atol=1e-10)
    assert moe.last_tokens_per_expert[4] == 0
    x.requires_grad_()
    moe(x).sum().backward()
    for name in ("w_gate", "w_up", "w_down"):
        grad = getattr(moe, name).grad
        assert torch.count_nonzero(grad[4]) == 0 and torch.count_nonzero(grad[0:4]) > 0


def test_float32_close_to_float64_reference():
    moe = make_moe(dtype=torch.float32, shared_experts=1)
    x = torch.randn(2, 11, HIDDEN)
    check_against_reference(moe, x, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not grouped_mm_available(), reason="this torch has neither grouped_mm nor _grouped_mm")
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_grouped_gemm_path_float32(capacity_factor):
    """The path CUDA runs (one grouped GEMM per projection), here on CPU in float32."""
    moe = make_moe(dtype=torch.float32, grouped_backend="grouped", capacity_factor=capacity_factor, experts=8)
    x = torch.randn(2, 13, HIDDEN)
    check_against_reference(moe, x, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not grouped_mm_available(), reason="this torch has neither grouped_mm nor _grouped_mm")
@pytest.mark.parametrize("width", [2, 3, 8])
def test_grouped_gemm_takes_narrow_outputs(width):
    """grouped_mm wants 16-byte aligned strides: a narrow output (a memory layer's per-memory decay projection to H
    heads crashed on an H100 with "strides should be multiple of 16 bytes") is padded, forward and weight gradient,
    and equals the loop; an empty group and a float32 CPU run included."""
    gen = torch.Generator().manual_seed(width)
    rows, weight = torch.randn(13, 16, generator=gen), torch.randn(3, 16, width, generator=gen)
    grad, counts = torch.randn(13, width, generator=gen), torch.tensor([5, 0, 8])
    torch.testing.assert_close(grouped_matmul(rows, weight, counts, "grouped"), grouped_matmul(rows, weight, counts, "loop"))
    torch.testing.assert_close(grouped_weight_grad(rows, grad, counts, "grouped"),
                               grouped_weight_grad(rows, grad, counts, "loop"))


def test_bias_update_moves_load_towards_balance():
    moe = make_moe(score="sigmoid", bias_balancing=True, bias_update_rate=0.1)
    assert not moe.router.bias.requires_grad
    moe(torch.randn(1, 20, HIDDEN, dtype=torch.float64))
    load = moe.last_tokens_per_expert.float()
    before = moe.router.bias.clone()
    moe.update_bias()
    step = moe.router.bias - before
    assert torch.equal(step, 0.1 * torch.sign(load.mean() - load))


def test_parameter_api():
    moe = make_moe(experts=4, top_k=2, shared_experts=1, bias_balancing=True, score="sigmoid")
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes["router.weight"] == (4, HIDDEN) and shapes["router.bias"] == (4,)
    assert shapes["w_gate"] == shapes["w_up"] == (4, HIDDEN, FFN) and shapes["w_down"] == (4, FFN, HIDDEN)
    assert make_moe(experts=4).router.bias is None and make_moe(experts=4).shared is None
    with pytest.raises(ValueError, match="top_k"):
        MoE(HIDDEN, experts=4, top_k=5, expert_ffn=FFN)


def _model_ir(moe: MoESpec | None, ep: int = 1) -> SpecIR:
    """A model of attention layers only: the MoE layer does not depend on the LSM backends."""
    model = ModelSpec(name="tiny", vocab=32, hidden=HIDDEN, layers=2, heads=2, pattern="NN", moe=moe,
                      ffn=None if moe else DenseFFNSpec(ffn=32))
    return SpecIR(name="tiny", source="<test>", model=model, parallel=ParallelSpec(ep=ep))


def test_program_moe_builds_the_emitted_layer():
    spec = MoESpec(experts=6, top_k=2, expert_ffn=FFN, shared_experts=1, score="sigmoid", bias_balancing=True,
                   capacity_factor=1.25, aux_loss=0.02, z_loss=0.003, normalize_topk=False)
    program = compile_ir(_model_ir(spec))
    text = program.files["moe.py"]
    assert "def build(" in text and "lmoec.runtime.moe" in text
    moe = program.moe()
    assert moe is not program.moe("tiny")  # a fresh layer per call
    assert (moe.experts, moe.top_k, moe.expert_ffn, moe.capacity_factor) == (6, 2, FFN, 1.25)
    assert (moe.score, moe.normalize_topk, moe.aux_loss_coef, moe.z_loss_coef) == ("sigmoid", False, 0.02, 0.003)
    assert moe.router.bias is not None and moe.shared is not None
    moe = moe.double()
    check_against_reference(moe, torch.randn(1, 7, HIDDEN, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no model named"):
        program.moe("other")
    with pytest.raises(ValueError, match="no moe"):
        compile_ir(_model_ir(None)).moe()


def test_plan_has_expert_parallel_steps():
    ir = plan(_model_ir(MoESpec(experts=6, top_k=2, expert_ffn=FFN), ep=2))
    moe_steps = [s for s in ir.comm.steps if s.kind == "moe" and s.layer == 0]
    kinds = [(s.direction, s.collective) for s in moe_steps]
    assert ("forward", "all_gather") in kinds  # the token-count exchange
    assert kinds.count(("forward", "all_to_all")) == 2 and kinds.count(("backward", "all_to_all")) == 2


def test_compiled_forward_counts_experts_once_with_an_int32_atomic_add():
    """torch.compile has no atomic add for int64: it runs an int64 index_add as a sort-based index_put (1.1 ms per
    call for 131K slots on an H100, run 14, twice per MoE layer). The forward counts the experts once, in int32,
    which inductor lowers to one atomic-add kernel."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.utils import needs_fallback_due_to_atomic_add_limitations

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    moe = make_moe(experts=8)
    compiled = torch.compile(moe, backend=lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=capture))
    x = torch.randn(2, 16, HIDDEN, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(compiled(x), moe(x))
    adds = [n for g in graphs for n in g.graph.nodes if n.target == torch.ops.aten.index_add.default]
    assert len(adds) == 1
    dtype = adds[0].args[0].meta["val"].dtype
    assert dtype == torch.int32 and not needs_fallback_due_to_atomic_add_limitations(dtype)
