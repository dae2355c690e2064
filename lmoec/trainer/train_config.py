"""The hyperparameters of a training run, apart from the trainer so that `lmoec --help` shows their defaults
without importing torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    """Hyperparameters; the defaults train the tiny spec on a 2-core CPU in a few minutes."""

    steps: int = 300
    seq_len: int = 128
    batch: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    data: Optional[str] = None  # None: the Python standard library's sources
    compile: bool = False  # torch.compile the loss (model, LM head, losses) around the emitted ops
    recompute: bool = False  # activation checkpointing: each block's forward runs again in the backward

    def lr_at(self, step: int) -> float:
        """Linear warmup over `warmup` steps, then cosine to lr * min_lr_ratio at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
