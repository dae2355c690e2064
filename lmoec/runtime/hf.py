"""Hugging Face transformers models: every compiled model as a `PreTrainedModel` with `generate()`.

A compiled package's `hf.py` (templates/package/hf.py.j2) subclasses the two classes here with its own
`CausalLM`, so a saved folder (config.json with the IR and the model's settings, safetensors weights, the
package's files) loads in two ways:

- `trust_remote_code=True`: transformers imports the folder's own package files (through `auto_map`);
- lmoec imported, no remote code: `model_type` "lmoec" is registered with `AutoConfig` and
  `AutoModelForCausalLM`, and the package is emitted again from the IR in config.json by the installed lmoec
  (the folder's code never runs, as for checkpoints).

Decoding carries `LmoecCache`: the per-layer entries the package's model returns (recurrent states and conv
tails for LSM layers, a KVCache for attention layers) and the tokens seen. A left-padded batch is passed to the
model as a mask (see the package's `CausalLM.forward`): padded positions never enter a state.

transformers is imported here, never by `import lmoec`: `lmoec/__init__.py` registers the classes once
transformers itself is imported.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


MODEL_TYPE = "lmoec"
NUL = 0  # the byte models' end-of-text / padding id: the corpus reader skips files holding a NUL byte


class LmoecConfig(PretrainedConfig):
    """config.json of a compiled model: `lmoec_model` (the settings the package's CausalLM is built from) and
    `lmoec_ir` (the spec's IR, from which lmoec emits the package again), plus the usual HF names."""

    model_type = MODEL_TYPE

    def __init__(self, lmoec_model: Optional[dict] = None, lmoec_ir: Optional[dict] = None, **kwargs):
        self.lmoec_model = dict(lmoec_model or {})
        self.lmoec_ir = lmoec_ir
        model = self.lmoec_model
        if model:
            self.vocab_size = model["vocab"]
            self.hidden_size = model["hidden"]
            self.num_hidden_layers = model["layers"]
            self.max_position_embeddings = model["max_seq_len"]
            kwargs["tie_word_embeddings"] = bool(model["tie_embeddings"])
        super().__init__(**kwargs)


class LmoecCache:
    """The decoding cache `generate()` carries: one entry per layer, as the package's CausalLM returns them
    (a dict of recurrent state and conv tails for an LSM layer, a KVCache for attention), and the tokens seen."""

    is_compileable = False  # what transformers asks of a cache before compiling a decode step
    is_croppable = False

    def __init__(self, layers: list, seen: int):
        self.layers, self.seen = layers, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


@dataclass
class LmoecOutput(ModelOutput):
    """logits [B, T, vocab] (the last `logits_to_keep` positions when asked), the loss with labels, the cache.

    The cache is under both names transformers has used for it (`cache` since 5.2x, `past_key_values`
    before), so generate() of either finds it."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[LmoecCache] = None
    past_key_values: Optional[LmoecCache] = None


class LmoecForCausalLMBase(PreTrainedModel, GenerationMixin):
    """A package's CausalLM as a transformers causal LM; the package's hf.py sets `config_class` and `causal_lm`."""

    config_class = LmoecConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # applied when config.tie_word_embeddings
    causal_lm: Any = None  # the package's CausalLM class

    def __init__(self, config: LmoecConfig):
        super().__init__(config)
        self.model = self.causal_lm(config.lmoec_model)
        self.post_init()

    def _init_weights(self, module):
        """Nothing: the package's CausalLM initialises its weights itself (the spec's init expressions)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a DynamicCache: the cache is ours (LmoecCache)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value):
        self.model.head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[LmoecCache] = None, past_key_values: Optional[LmoecCache] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **unused) -> LmoecOutput:
        """input_ids [B, T] after the `cache.seen` tokens of `cache`; attention_mask [B, seen + T] (1: a real
        token) for a left-padded batch; labels [B, T] (-100: ignored) give the next-token loss, plus the MoE
        router losses in training."""
        if unused.get("inputs_embeds") is not None:
            raise ValueError("lmoec models take input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LmoecCache):
            if cache.get_seq_length():
                raise ValueError(f"lmoec models decode with an LmoecCache, got a filled {type(cache).__name__}")
            cache = None  # an empty cache of another kind, made by a generate() that did not ask us
        if use_cache is None:
            use_cache = cache is not None  # generate() asks for it; a scoring call needs none
        seen = cache.seen if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], seen + input_ids.shape[1]):
            raise ValueError(f"attention_mask must be [batch, seen + new tokens] = [{input_ids.shape[0]}, "
                             f"{seen + input_ids.shape[1]}], got {list(attention_mask.shape)}")
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        hidden, layers = self.model.hidden_states(input_ids, None if cache is None else cache.layers, use_cache, mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if self.training and getattr(self.model, "aux_loss", None) is not None:
                loss = loss + self.model.aux_loss
        new_cache = LmoecCache(layers, seen + input_ids.shape[1]) if use_cache else None
        return LmoecOutput(loss=loss, logits=logits, cache=new_cache, past_key_values=new_cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                                      use_cache: bool = True, **kwargs) -> dict:
        """The tokens the cache has not seen yet (all of them at the prefill), the whole mask, the cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, LmoecCache):
            cache = None
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


def emitted_package(config: LmoecConfig):
    """The package of config.json's IR, emitted by the installed lmoec and imported (never the folder's code)."""
    from ..backends.emit import emit_package
    from ..ir.nodes import SpecIR
    from .loader import load_package

    if not isinstance(config.lmoec_ir, dict):
        raise ValueError("config.json holds no lmoec_ir: not an lmoec model, or saved without its IR")
    ir = SpecIR.model_validate(config.lmoec_ir)
    if ir.model is None:
        raise ValueError("config.json's lmoec_ir has no model block")
    return load_package(ir.model.name, emit_package(ir))


def hf_module(package):
    """A model package's hf module (its __init__ leaves it out: it imports transformers)."""
    return importlib.import_module(f"{package.__name__}.hf")


class LmoecAutoModel:
    """What `AutoModelForCausalLM` finds for model_type "lmoec" without remote code: emits the package again
    from the folder's IR and loads the weights into that package's own class."""

    config_class = LmoecConfig

    @classmethod
    def _package_config(cls, config: LmoecConfig):
        hf = hf_module(emitted_package(config))
        return hf.ForCausalLM, hf.Config.from_dict(config.to_dict())

    @classmethod
    def from_pretrained(cls, path, *args, config: Optional[LmoecConfig] = None, **kwargs):
        if config is None:
            config = LmoecConfig.from_pretrained(path)
        model_class, config = cls._package_config(config)
        return model_class.from_pretrained(path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config: LmoecConfig, **kwargs):
        model_class, config = cls._package_config(config)
        return model_class(config, **kwargs)

    _from_config = from_config


def register() -> None:
    """model_type "lmoec" with AutoConfig and AutoModelForCausalLM (idempotent; done when this module is imported)."""
    AutoConfig.register(MODEL_TYPE, LmoecConfig, exist_ok=True)
    AutoModelForCausalLM.register(LmoecConfig, LmoecAutoModel, exist_ok=True)


register()


def byte_tokenizer():
    """lmoec's byte-level tokenization (token id = byte value, vocab 256) as a transformers fast tokenizer.

    A BPE with no merges over the 256 byte symbols of the byte-level pre-tokenizer: every byte is one token,
    its id the byte's value; decoding maps them back to bytes. NUL (id 0) serves as end-of-text and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()
    byte_of = _bytes_to_unicode()
    vocab = {byte_of[b]: b for b in range(256)}
    assert set(vocab) == set(symbols)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    nul = byte_of[NUL]
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=nul, bos_token=nul, pad_token=nul,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level pre-tokenizer's printable symbol for each byte (GPT-2's table): printable Latin-1 bytes
    stand for themselves, the others for code points from 256 on, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def save_hf(package, model_config: dict, state_dict: dict, out_dir: str | os.PathLike,
            token_ids: Optional[dict] = None) -> Path:
    """Write an HF folder from an imported package, the settings its CausalLM was built with and its weights:
    config.json, model.safetensors, the package's files (auto_map). Without `token_ids` (bos/eos/pad ids) the model
    is a byte model: NUL ends text and pads, and the byte tokenizer is written too."""
    out = Path(out_dir)
    ir = json.loads(Path(package.__file__).with_name("ir.json").read_text(encoding="utf-8"))
    hf = hf_module(package)
    byte_model = token_ids is None
    if byte_model:
        token_ids = {"bos_token_id": NUL, "eos_token_id": NUL, "pad_token_id": NUL}
    config = hf.Config(lmoec_model=model_config, lmoec_ir=ir, **token_ids)
    model = hf.ForCausalLM(config)
    model.model.load_state_dict(state_dict)
    model.save_pretrained(out)
    if byte_model and config.vocab_size == 256:
        byte_tokenizer().save_pretrained(out)
    return out
