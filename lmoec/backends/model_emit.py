"""Emit the causal LM of a model spec: `model.py` (the nn.Module) and `config.json` (its hyperparameters).

The template reads one `ModelContext`; every derived number (head counts, FFN
kind) is decided here once, so model.py and config.json cannot disagree.
"""
from __future__ import annotations

import json
import pprint
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from ..ir.nodes import SpecIR
from .literal import Name


class ModelContext(BaseModel):
    """What templates/model/model.py.j2 reads (names and finite numbers: they are pasted as code)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    name: Name
    source: str
    vocab: int
    hidden: int
    layers: int
    pattern: str
    lsm: Optional[Name]  # the L layers' LSM name (its module is <lsm>_layer.py); None: no L layers
    lsm_heads: int
    attn_heads: int
    attn_kv_heads: int
    rope_theta: float
    window: Optional[int]
    attn_head_dim: Optional[int]  # None: hidden / attn_heads
    rotary_dim: Optional[int]  # None: RoPE over the whole head
    postnorm: bool  # the residual is the normed input (ResidualSpec)
    residual_alpha: float  # x = alpha * residual + beta * f(...)
    residual_beta: float
    moe: bool  # True: moe.py builds the FFN; False: dense SwiGLU of width ffn_width
    ffn_width: Optional[int]
    norm: Literal["rmsnorm", "layernorm"]
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    max_seq_len: int
    lsm_memories: bool = False  # the L layers route tokens to memories: their router losses join aux_loss
    lsm_mask: bool = False  # the L layers take the padding mask themselves (window attention, or q/k/v biases)

    @property
    def config(self) -> dict:
        """The runtime config dict model.py is built from (and config.json holds)."""
        return {
            "model_type": "lmoec",
            "name": self.name,
            "vocab": self.vocab,
            "hidden": self.hidden,
            "layers": self.layers,
            "pattern": self.pattern,
            "lsm": self.lsm,
            "lsm_heads": self.lsm_heads,
            "attn_heads": self.attn_heads,
            "attn_kv_heads": self.attn_kv_heads,
            "rope_theta": self.rope_theta,
            "window": self.window,
            **({"attn_head_dim": self.attn_head_dim} if self.attn_head_dim is not None else {}),
            **({"rotary_dim": self.rotary_dim} if self.rotary_dim is not None else {}),
            **({"postnorm": self.postnorm, "residual_alpha": self.residual_alpha, "residual_beta": self.residual_beta}
               if self.scaled_residual else {}),
            "moe": self.moe,
            "ffn": self.ffn_width,
            "norm": self.norm,
            "norm_eps": self.norm_eps,
            "tie_embeddings": self.tie_embeddings,
            "init_std": self.init_std,
            "max_seq_len": self.max_seq_len,
        }

    @property
    def scaled_residual(self) -> bool:
        """The blocks add their sublayers other than x + f(norm(x)): a post-norm, or a residual scale."""
        return self.postnorm or self.residual_alpha != 1 or self.residual_beta != 1

    @property
    def config_literal(self) -> str:
        return pprint.pformat(self.config, sort_dicts=False, width=110)


def model_context(ir: SpecIR) -> ModelContext:
    model = ir.model
    assert model is not None
    if model.moe is None and model.ffn is None:
        raise ValueError(f"{ir.source}: model {model.name!r} declares neither moe nor ffn")
    lsm_heads = model.heads
    if "L" in model.pattern:
        lsm_heads = ir.lsm(model.lsm).heads or model.heads
    return ModelContext(
        name=model.name,
        source=ir.source,
        vocab=model.vocab,
        hidden=model.hidden,
        layers=model.layers,
        pattern=model.pattern,
        lsm=model.lsm if "L" in model.pattern else None,
        lsm_heads=lsm_heads,
        attn_heads=model.attention.heads or model.heads,
        attn_kv_heads=model.attention.kv_heads or model.attention.heads or model.heads,
        rope_theta=model.attention.rope_theta,
        window=model.attention.window,
        attn_head_dim=model.attention.head_dim,
        rotary_dim=model.attention.rotary_dim,
        postnorm=model.residual.postnorm,
        residual_alpha=model.residual.alpha,
        residual_beta=model.residual.beta,
        moe=model.moe is not None,
        ffn_width=None if model.ffn is None else model.ffn.ffn,
        norm=model.norm,
        norm_eps=model.norm_eps,
        tie_embeddings=model.tie_embeddings,
        init_std=model.init_std,
        max_seq_len=model.max_seq_len,
        lsm_memories="L" in model.pattern and ir.lsm(model.lsm).memories is not None,
        lsm_mask="L" in model.pattern and (ir.lsm(model.lsm).window_attention is not None or ir.lsm(model.lsm).qkv_bias),
    )


def emit_model(ir: SpecIR) -> dict[str, str]:
    """model.py and config.json for a spec with a model; nothing for an LSM-only spec."""
    if ir.model is None:
        return {}
    from .render import header, render  # jinja2 only when rendering: `lmoec check` imports this module

    ctx = model_context(ir)
    return {
        "model.py": render("model/model.py.j2", ctx=ctx, header=header(ir, f"model {ctx.name}")),
        "config.json": json.dumps(ctx.config, indent=2) + "\n",
    }
