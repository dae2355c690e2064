"""MQAR generator: distinct keys, answerable queries, disjoint key/value vocabularies, the metric."""
import pytest
import torch

from lmoec.tasks.mqar import IGNORE, MQARConfig, mqar_batch, recall_accuracy


def test_mqar_sequences_are_well_formed():
    cfg = MQARConfig(seq_len=64, num_pairs=6, vocab=64)
    inputs, targets = mqar_batch(cfg, 32, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (32, 64)
    half = cfg.vocab // 2
    for row in range(32):
        keys, values = inputs[row, 0:12:2], inputs[row, 1:12:2]
        assert len(set(keys.tolist())) == 6, "keys within a sequence are distinct"
        assert ((keys >= 1) & (keys < half)).all() and (values >= half).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        asked = (targets[row] != IGNORE).nonzero().flatten()
        assert len(asked) == 6
        for p in asked.tolist():
            assert p >= 12, "queries come after the context"
            assert pairs[inputs[row, p].item()] == targets[row, p].item(), "every query is answerable"


def test_mqar_is_deterministic_per_seed_and_varies_across_seeds():
    cfg = MQARConfig(seq_len=48, num_pairs=4, vocab=32)
    a = mqar_batch(cfg, 4, torch.Generator().manual_seed(1))
    b = mqar_batch(cfg, 4, torch.Generator().manual_seed(1))
    c = mqar_batch(cfg, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_rejects_impossible_configs():
    with pytest.raises(ValueError, match="distinct keys"):
        MQARConfig(vocab=8, num_pairs=8)
    with pytest.raises(ValueError, match="seq_len"):
        MQARConfig(seq_len=16, num_pairs=8)


def test_recall_accuracy_counts_only_answers():
    targets = torch.full((1, 5), IGNORE)
    targets[0, 2], targets[0, 4] = 7, 9
    logits = torch.zeros(1, 5, 10)
    logits[0, 2, 7] = 1.0  # right
    logits[0, 4, 3] = 1.0  # wrong
    logits[0, 0, 1] = 5.0  # unlabeled, ignored
    assert recall_accuracy(logits, targets) == 0.5
