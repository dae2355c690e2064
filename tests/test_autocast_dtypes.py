"""bf16 autocast training of every LSM in specs/lsm: the layer hands its op q, k, v in one dtype.

CUDA training runs under bf16 autocast (lmoec.trainer.train.autocast_for): linears and convs run in bf16,
while rsqrt, sum, exp, log, softplus run in fp32, so an L2-normalized q/k (Gated DeltaNet, DeltaNet, RWKV7)
left the feature map in fp32 while v came from a bf16 linear, and the op contract refused them. CPU autocast
casts linears and convs alike but keeps rsqrt & co. in the input dtype; the `cuda_like` variant makes those
functions return fp32 under CPU autocast too, as CUDA autocast does. The op contract itself still refuses
mismatched dtypes when called directly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmoec.ir.nodes import AttentionSpec, DenseFFNSpec, ModelSpec, SpecIR
from lmoec.paths import SPECS
from lmoec.program import compile_ir, compile_spec
from lmoec.trainer.train import lm_loss

LSM_SPECS = sorted(p.stem for p in (SPECS / "lsm").glob("*.lsm"))


def tiny_model(lsm_name: str, pattern: str = "LN"):
    source = compile_spec(SPECS / "lsm" / f"{lsm_name}.lsm").ir
    lsms = {name: spec.model_copy(update={"recurrence": None, "heads": None}) for name, spec in source.lsms.items()}
    lsm = source.lsm().name
    model = ModelSpec(name=f"autocast_{lsm_name}", vocab=256, hidden=32, layers=len(pattern), heads=2, pattern=pattern,
                      lsm=lsm, attention=AttentionSpec(), ffn=DenseFFNSpec(ffn=64))
    program = compile_ir(SpecIR(source=f"<autocast {lsm_name}>", name=model.name, lsms=lsms, model=model))
    torch.manual_seed(0)
    return program.model()


@pytest.fixture(params=["cpu_autocast", "cuda_like"])
def autocast_kind(request, monkeypatch):
    """CPU bf16 autocast as is, or with rsqrt / exp / log / softplus in fp32 (CUDA autocast's float32 list)."""
    if request.param == "cuda_like":
        for owner, name in ((torch, "rsqrt"), (torch, "exp"), (torch, "log"), (F, "softplus")):
            fn = getattr(owner, name)

            def fp32(x, *args, _fn=fn, **kwargs):
                if torch.is_autocast_enabled("cpu") and isinstance(x, torch.Tensor) and x.is_floating_point():
                    x = x.float()
                return _fn(x, *args, **kwargs)

            monkeypatch.setattr(owner, name, fp32)
    return request.param


def test_every_lsm_spec_is_covered():
    assert {"gated_deltanet", "deltanet", "gla", "bla", "rwkv7", "hgrn2"} <= set(LSM_SPECS)


@pytest.mark.parametrize("lsm", LSM_SPECS)
def test_bf16_autocast_forward_backward(lsm, autocast_kind):
    model = tiny_model(lsm)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = lm_loss(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss), lsm
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for name, g in grads.items() if g is None and ".mixer." in name and "blocks.0." in name]
    assert not missing, f"{lsm}: no gradient for {missing}"
    bad = [name for name, g in grads.items() if g is not None and not torch.isfinite(g).all()]
    assert not bad, f"{lsm}: non-finite gradients in {bad}"
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())


@pytest.mark.parametrize("lsm", ["gated_deltanet", "hgrn2"])
def test_bf16_autocast_decode_step(lsm, autocast_kind):
    """Prefill and one-token steps under autocast too: the recurrent step gets one dtype as well."""
    model = tiny_model(lsm).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = model(ids[:, :5], use_cache=True)
        for t in range(5, 8):
            logits, cache = model(ids[:, t : t + 1], cache=cache, use_cache=True)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_contract_refuses_mixed_dtypes(autocast):
    """A direct call with mixed dtypes still fails; under autocast the message says why it may happen."""
    program = compile_spec(SPECS / "lsm" / "gated_deltanet.lsm")
    ops = program.package.gated_deltanet_ops
    B, T, H, K = 1, 4, 2, 8
    q = k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, 2 * K, dtype=torch.bfloat16)
    message = "autocast is on" if autocast else "q, k, v must share one floating dtype"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.raises(ValueError, match=message):
        ops.op(q, k, v, g=-torch.rand(B, T, H), beta=torch.rand(B, T, H), backend="torch")
