"""No host sync in the decode step (what a CUDA graph needs), and the op contract reads cu_seqlens back once
per tensor: counted on CPU with lmoec.runtime.syncs.HostSyncs."""
import pytest
import torch

import lmoec
from lmoec.paths import SPECS
from lmoec.runtime.moe import MoE
from lmoec.runtime.syncs import HostSyncs

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
