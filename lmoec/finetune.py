"""`lmoec finetune`: LoRA fine-tuning (peft) of a Hugging Face folder of an lmoec model, e.g. what `linearize` wrote.

The base stays frozen; LoRA adapters of rank r go on the linear maps named by `targets` (by default the mixers'
q, k, v and o projections, as Liger does; those the model has: an HGRN2-style layer has no k projection). Text is the default corpus (the Python standard library's sources)
or `--data`, tokenized with the folder's tokenizer (bytes for a byte model), in random windows; the last 5% is
held out. The result is a PEFT adapter folder (loaded with `PeftModel.from_pretrained(base, DIR)`), or with
`merge` the adapters folded into the weights: a complete HF folder like the input, the adapters in its adapter/.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .linearize import SPEC_FILE

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class FinetuneError(ValueError):
    """A folder or flag that finetune can't take (one line, naming what)."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    targets: Optional[tuple] = None  # None: those of DEFAULT_TARGETS the model has


@dataclass
class FinetuneConfig:
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: Optional[str] = None
    steps: int = 100
    seq_len: int = 128
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    eval_batches: int = 4
    merge: bool = False


def parse_lora(items: list[str]) -> LoraSettings:
    """`--lora r=8 alpha=16 targets=q_proj,v_proj` -> LoraSettings."""
    settings = LoraSettings()
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            if key == "r":
                settings.r = int(value)
            elif key == "alpha":
                settings.alpha = float(value)
            elif key == "targets":
                settings.targets = tuple(t for t in value.split(",") if t)
            else:
                raise ValueError
        except ValueError:
            raise FinetuneError(f"--lora takes r=N, alpha=X and targets=NAME,NAME,..., got {item!r}") from None
    if settings.r < 1 or not settings.alpha > 0 or settings.targets == ():
        raise FinetuneError("--lora: r must be >= 1, alpha > 0, and targets must name at least one module")
    return settings


def load_base(folder: Path):
    """The folder's model in float32: built from its editable spec (model.lsm) when it has one, with the folder's
    weights loaded by name (parameters the edited spec adds keep their init, and are reported), else from
    config.json's IR; and its tokenizer, or None for a byte model without one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise FinetuneError(f"{folder}: no config.json (a folder written by `lmoec linearize` or `lmoec export` is expected)")
    notes = []
    if (folder / SPEC_FILE).is_file():
        from safetensors.torch import load_file

        from .program import compile_spec

        weights = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(file))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        program = compile_spec(folder / SPEC_FILE)
        model = program.hf_model(program.model())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, key, config.get(key))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "model.head.weight")]
        if missing:
            notes.append(f"{len(missing)} weights not in the folder keep their init (first: {missing[0]})")
        if unexpected:
            notes.append(f"{len(unexpected)} weights of the folder are not in the spec (first: {unexpected[0]})")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model.float(), tokenizer, notes


def token_data(tokenizer, config: FinetuneConfig, vocab: int):
    """(train, held-out) token tensors: the corpus as bytes, or through the tokenizer (only as much text as the
    run reads, so a large corpus is not tokenized whole)."""
    from .trainer.data import load_tokens

    data = load_tokens(config.data, config.seq_len)
    if tokenizer is None:
        if vocab < 256:
            raise FinetuneError(f"the model has vocab {vocab} and the folder no tokenizer: byte text needs vocab >= 256")
        return data.train, data.eval
    need = 8 * (config.steps + 2) * config.batch * (config.seq_len + 1)  # generous: a token is rarely 8 bytes

    def tokens(part: torch.Tensor) -> torch.Tensor:
        text = bytes(part[:need].tolist()).decode("utf-8", errors="replace")
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    train, held_out = tokens(data.train), tokens(data.eval)
    for name, part in (("train", train), ("held-out", held_out)):
        if len(part) < config.seq_len + 2:
            raise FinetuneError(f"{data.source}: its {name} part gives {len(part)} tokens, fewer than seq_len {config.seq_len} + 2")
    return train, held_out


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, config: FinetuneConfig) -> float:
    """Mean next-token loss over `eval_batches` fixed windows of the held-out tokens."""
    from .trainer.data import sample_batch

    was_training = model.training
    model.eval()
    losses = [float(model(window, labels=window).loss)  # the model shifts the labels itself
              for window, _ in (sample_batch(tokens, config.batch, config.seq_len + 1, 1234, i) for i in range(config.eval_batches))]
    model.train(was_training)
    return sum(losses) / len(losses)


def finetune(folder: str | Path, out: str | Path, config: FinetuneConfig,
             say: Callable[[str], None] = print) -> dict:
    """Fine-tune the folder's model with LoRA and write OUT (all or nothing); the run's losses."""
    from peft import LoraConfig, get_peft_model

    from .cli.export import new_folder, publish
    from .trainer.data import sample_batch

    folder, out = Path(folder), Path(out)
    model, tokenizer, notes = load_base(folder)
    for note in notes:
        say(f"note: {note}")
    train, held_out = token_data(tokenizer, config, model.config.vocab_size)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if config.lora.targets is None:
        config.lora.targets = tuple(t for t in DEFAULT_TARGETS if t in names)
    absent = [t for t in config.lora.targets if t not in names]
    if absent or not config.lora.targets:
        missing = repr(absent[0]) if absent else f"any of {', '.join(DEFAULT_TARGETS)}"
        raise FinetuneError(f"--lora targets: the model has no linear map named {missing} (it has {', '.join(sorted(names))})")
    tmp = new_folder(out, "lmoec finetune")
    try:
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, target_modules=list(config.lora.targets),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        say(f"LoRA r={config.lora.r} on {', '.join(config.lora.targets)}: {trainable:,} trainable of {total:,} parameters")
        before = held_out_loss(peft_model, held_out, config)
        say(f"held-out loss before: {before:.4f}")
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
        peft_model.train()
        log = []
        for step in range(config.steps):
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))  # cosine to zero
            for group in optimizer.param_groups:
                group["lr"] = lr
            window, _ = sample_batch(train, config.batch, config.seq_len + 1, config.seed, step)
            loss = peft_model(window, labels=window).loss  # next-token loss over seq_len positions
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append(float(loss.detach()))
            if (step + 1) % max(config.steps // 10, 1) == 0 or step + 1 == config.steps:
                say(f"step {step + 1}/{config.steps}  loss {log[-1]:.4f}")
        after = held_out_loss(peft_model, held_out, config)
        say(f"held-out loss after: {after:.4f}")
        peft_model.eval()
        if config.merge:
            peft_model.save_pretrained(tmp / "adapter")  # the adapters alone too: small, and they can be merged again
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(tmp)
            if (folder / SPEC_FILE).is_file():
                shutil.copyfile(folder / SPEC_FILE, tmp / SPEC_FILE)
        else:
            peft_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        result = {"base": str(folder), "merged": config.merge, "held_out_before": before, "held_out_after": after,
                  "train_loss": log, "trainable": trainable, "steps": config.steps, "seq_len": config.seq_len,
                  "batch": config.batch, "lr": config.lr, "r": config.lora.r, "targets": list(config.lora.targets)}
        (tmp / "finetune.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return result
