"""No host sync in the decode step (what a CUDA graph needs), none in the Triton kernels' forward and backward for a
batch of equal-length sequences, and the op contract reads cu_seqlens back once per tensor: counted on CPU with
lmoec.trainer.syncs.HostSyncs."""
import json
import sys

import pytest
import torch

import lmoec
from lmoec.paths import SPECS
from lmoec.runtime.moe import MoE
from lmoec.trainer.syncs import HostSyncs

LSM_SPECS = sorted((SPECS / "lsm").glob("*.lsm"))


def test_the_counter_sees_what_would_sync():
    x = torch.randn(6)
    with HostSyncs() as syncs:
        x.sum().item()
        x.tolist()
        x[x > 0]
        bool(x.max() > 0)
    assert len(syncs.calls) == 4, syncs.calls
    assert all("test_host_sync.py" in c for c in syncs.calls)  # each says where it happened


def _tiny_model(grouped: bool):
    torch.manual_seed(0)
    model = lmoec.compile_spec(SPECS / "models" / "tiny.lsm").model().eval()
    for m in model.modules():
        if isinstance(m, MoE):
            m.grouped_backend = "grouped" if grouped else "loop"
    return model


def test_hybrid_decode_step_has_no_host_sync():
    """The tiny LLLN hybrid (GLA, attention with a KV cache, MoE top-2) with the grouped-GEMM experts CUDA uses."""
    model = _tiny_model(grouped=True)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        _, cache = model(ids, use_cache=True)
        with HostSyncs() as syncs:
            logits, cache = model(ids[:, -1:], cache=cache, use_cache=True)
    assert syncs.calls == []
    assert torch.isfinite(logits).all()
    # the control: the per-expert loop (CPU's default) reads the counts back, and the counter says where
    with torch.no_grad(), HostSyncs() as syncs:
        _tiny_model(grouped=False)(ids[:, -1:], cache=None, use_cache=True)
    assert any("Tensor.tolist at" in c and "moe.py" in c for c in syncs.calls), syncs.calls


@pytest.mark.parametrize("path", LSM_SPECS, ids=lambda p: p.stem)
def test_lsm_decode_step_has_no_host_sync(path):
    torch.manual_seed(0)
    layer = lmoec.compile_spec(path).layer(hidden=32, heads=2)
    with torch.no_grad():
        _, cache = layer(torch.randn(2, 3, 32), use_cache=True)
        with HostSyncs() as syncs:
            layer(torch.randn(2, 1, 32), past=cache, use_cache=True)
    assert syncs.calls == []


def test_cu_seqlens_is_read_back_once_per_tensor():
    """The contract and the backend share one read-back (bla: its torch path reads nothing else back)."""
    op = lmoec.compile_spec(SPECS / "lsm" / "bla.lsm").op()
    q, k, v = torch.randn(3, 1, 20, 2, 8)
    cu_seqlens = torch.tensor([0, 7, 20])
    with HostSyncs() as syncs:
        first = [op(q, k, v, cu_seqlens=cu_seqlens)[0] for _ in range(3)]  # three layers of one packed batch
    assert len(syncs.calls) == 1 and "contract.py" in syncs.calls[0], syncs.calls
    cu_seqlens[1] = 9  # changed in place: read again
    with HostSyncs() as syncs:
        moved = op(q, k, v, cu_seqlens=cu_seqlens)[0]
    assert len(syncs.calls) == 1, syncs.calls
    torch.testing.assert_close(moved[:, 9:], op(q[:, 9:], k[:, 9:], v[:, 9:])[0])  # the new offsets were used
    assert not torch.allclose(moved[:, 7:9], first[0][:, 7:9])


def test_bad_cu_seqlens_still_fail_clearly():
    op = lmoec.compile_spec(SPECS / "lsm" / "gla.lsm").op()
    q, k, v = torch.randn(3, 1, 20, 2, 8)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 20, 2, 8))
    for bad in ([0, 12, 7, 20], [0, 7, 19], [1, 20]):
        with pytest.raises(ValueError, match=r"gla: cu_seqlens must rise from 0 to T=20, got \[" + str(bad[0])):
            op(q, k, v, g=g, cu_seqlens=torch.tensor(bad))


# one spec per Triton template: the element-wise, Titans and TTT kernels read their number of chunks back until run 12's
# session; the others never did
TRAINING_SPECS = ["mamba", "titans", "ttt_linear", "gated_deltanet", "rwkv7", "gla"]


def _training_syncs(names: list[str]) -> dict:
    """{spec: the host syncs of one forward and backward of its op on the Triton kernels}, B = 2 sequences of 20 tokens."""
    from lmoec.bench import op_inputs

    out = {}
    for name in names:
        program = lmoec.compile_spec(SPECS / "lsm" / f"{name}.lsm")
        rec = program.ir.lsm().recurrence
        (q, k, v), args = op_inputs(rec, 2, 20, 2, 16, torch.float32, "cpu")
        leaves = [t.requires_grad_() for t in (q, k, v, *args.values()) if t.is_floating_point()]
        with HostSyncs() as syncs:
            o, ht = program.op()(q, k, v, **args, output_final_state=True, backend="triton")
            torch.autograd.backward([o.sum() + ht.sum()], inputs=leaves)
        out[name] = syncs.calls
    return out


def test_triton_training_step_has_no_host_sync():
    """A training step of equal-length sequences launches the kernels without reading anything back (packed batches
    read cu_seqlens once per tensor, above)."""
    from interpreted import interpreted

    syncs = interpreted([__file__, *TRAINING_SPECS])
    assert set(syncs) == set(TRAINING_SPECS)
    assert not any(syncs.values()), syncs


if __name__ == "__main__":
    print(json.dumps(_training_syncs(sys.argv[1:])))
