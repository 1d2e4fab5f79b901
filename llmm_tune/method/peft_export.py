"""An Llmm model as a standard peft LoRA adapter plus its base (`to_peft`), so that peft and vLLM users load what
Llmm trained: the adapter holds the factors' means (what Llmm predicts with in eval mode) and, for a classifier,
the trained task head (peft's `modules_to_save`); the base holds the dequantised weights (and the trained head too).
With 4-bit normal_float, the `bnb_4bit` arguments export.json records re-quantise exactly the adapted layers to the
same codes (each block's largest weight is its scale times the code 1); other formats load in full precision, as
bitsandbytes has none.

The adapter names its base (`base_model_name_or_path`) by a name that means the same on every machine, the hub id
the caller gives. A path cannot: peft and transformers resolve it against the working directory of whoever loads
(an absolute one is this machine's), so a path to DIR/base would be right only by accident. The exact base (the
quantised weights as trained, the label names, the tokenizer) is DIR/base, which `PeftModel.from_pretrained` takes
explicitly; `AutoPeftModel*` loads the hub's full-precision weights instead: the same model only when the base was
neither quantised nor other than the hub's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune.files import write_text
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.layer import LlmmEmbedding
from llmm_tune.method.model import default_target_modules, dequantize_llmm, llmm_layers, matches

EXPORT_FILE = "export.json"
# peft's task type by the model class's suffix: it picks the AutoPeftModel class and, for a classifier, makes
# peft save and restore the head
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


def lora_targets(names: list[str], model: nn.Module, config: LlmmConfig) -> list[str]:
    """peft's `target_modules` for exactly the adapted layers: the short suffixes (as vLLM expects) when they
    select no other linear layer, else the full names."""
    suffixes = sorted(s for s in config.target_modules or default_target_modules(model)
                      if any(matches(n, (s,)) for n in names))
    selected = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                and matches(name, tuple(suffixes))}
    return suffixes if selected == set(names) else sorted(names)


def task_type(model: nn.Module) -> str | None:
    """peft's task type of a Hugging Face model, None for another head."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def trained_heads(model: nn.Module, config: LlmmConfig) -> list[str]:
    """The head modules `apply_llmm` trained in full that the model has (peft's `modules_to_save`)."""
    return sorted({name.rpartition(".")[2] for name, _ in model.named_modules()} & set(config.head_modules))


@torch.no_grad()
def to_peft(model: nn.Module, out: Path, base_name: str, tokenizer=None, training: dict | None = None) -> dict:
    """Write `model` (wrapped with `apply_llmm`, trained) as DIR/base + DIR/adapter; the model is consumed (its
    Llmm layers become plain linear layers, then peft's). `base_name` is the adapter's `base_model_name_or_path`
    (see above); `training`, settings the model was trained with (its lengths), goes into export.json. Returns what
    export.json records."""
    config: LlmmConfig = model.llmm_config
    means = {name: (layer.A_mean.detach().clone(), layer.B_mean.detach().clone())
             for name, layer in llmm_layers(model).items()}
    embeddings = [name for name, layer in llmm_layers(model).items() if isinstance(layer, LlmmEmbedding)]
    dequantize_llmm(model).requires_grad_(False)
    model.name_or_path = model.config.name_or_path = base_name  # what peft's config and model card name
    model.save_pretrained(out / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")
    targets = lora_targets(sorted(set(means) - set(embeddings)), model, config) + embeddings
    others = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                    and name not in means)  # what bitsandbytes must leave in full precision
    task = task_type(model)
    peft_model = get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=config.scaling * config.rank, target_modules=targets, lora_dropout=config.dropout,
        bias="none", task_type=task, modules_to_save=trained_heads(model, config) or None))
    for name, (A, B) in means.items():
        module = peft_model.base_model.model.get_submodule(name)
        if name in embeddings:  # peft's embedding adapter is ours transposed (LlmmEmbedding)
            module.lora_embedding_A["default"].copy_(B.T)
            module.lora_embedding_B["default"].copy_(A.T)
        else:
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    peft_model.save_pretrained(out / "adapter", save_embedding_layers=False)  # the base holds the embedding table
    nf4 = (config.bits, config.quant_method) == (4, "normal_float")
    record = {"base": "base", "adapter": "adapter", "base_model_name_or_path": base_name, "task_type": task,
              "num_labels": model.config.num_labels if task == "SEQ_CLS" else None, "bits": config.bits,
              "quant_method": config.quant_method, "training": training or {},
              "bnb_4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
                           "bnb_4bit_use_double_quant": config.double_quant, "llm_int8_skip_modules": others}
              if nf4 else None}
    write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    return record
