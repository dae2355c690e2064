"""Multi-query associative recall (MQAR), the recall probe of the linear-attention literature.

A sequence first lists `num_pairs` key-value pairs, then asks for keys again at
random later positions; the model must emit each key's value right after the
key. Keys and values come from disjoint halves of the vocabulary, keys within a
sequence are distinct, and every query asks a key that was listed, so every
target is answerable from the context alone. Only the answer positions carry a
label (others are IGNORE), and recall accuracy is the fraction of answers the
model gets right (Arora et al., 2023, "Zoology").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class MQARConfig:
    seq_len: int = 128
    num_pairs: int = 8
    num_queries: int = 0  # 0: as many as there are pairs
    vocab: int = 256
    power_a: float = 0.01  # query gaps follow a power law, as in Zoology

    def __post_init__(self) -> None:
        queries = self.num_queries or self.num_pairs
        if self.vocab < 4 or self.num_pairs > self.vocab // 2 - 1:
            raise ValueError(f"MQAR: vocab {self.vocab} holds at most {self.vocab // 2 - 1} distinct keys, asked {self.num_pairs}")
        if 2 * self.num_pairs + 2 * queries > self.seq_len:
            raise ValueError(f"MQAR: {self.num_pairs} pairs and {queries} queries need seq_len >= {2 * self.num_pairs + 2 * queries}, got {self.seq_len}")


def mqar_batch(cfg: MQARConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [batch, seq_len], targets [batch, seq_len]) with IGNORE where nothing is asked.

    Token 0 is filler; keys are 1 .. vocab/2 - 1, values vocab/2 .. vocab - 1.
    """
    n, L = cfg.num_pairs, cfg.seq_len
    queries = cfg.num_queries or n
    half = cfg.vocab // 2
    inputs = torch.zeros(batch, L, dtype=torch.long)
    targets = torch.full((batch, L), IGNORE, dtype=torch.long)
    context = 2 * n
    # query slots: pairs (query key, answer) at even offsets after the context, gaps power-law distributed
    slots = (L - context) // 2
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (cfg.power_a - 1)
    for row in range(batch):
        keys = torch.randperm(half - 1, generator=generator)[:n] + 1
        values = torch.randint(half, cfg.vocab, (n,), generator=generator)
        inputs[row, 0:context:2] = keys
        inputs[row, 1:context:2] = values
        asked = torch.randint(0, n, (queries,), generator=generator)
        where = torch.multinomial(weights, queries, replacement=False, generator=generator)
        pos = context + 2 * where
        inputs[row, pos] = keys[asked]
        targets[row, pos] = values[asked]  # predict the value at the position of its key
    return inputs, targets


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of answer positions where the argmax is the right value."""
    asked = targets != IGNORE
    if not asked.any():
        raise ValueError("recall_accuracy: no answer positions in targets")
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()
