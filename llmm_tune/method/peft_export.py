"""An Llmm model as a standard peft LoRA adapter plus its base (`to_peft`), so that peft and vLLM users load what
Llmm trained: the adapter holds the factors' means (what Llmm predicts with in eval mode), the base the dequantised
weights and the trained task head (vLLM refuses an adapter with modules_to_save). With 4-bit normal_float, the
`bnb_4bit` arguments export.json records re-quantise exactly the adapted layers to the same codes (each block's
largest weight is its scale times the code 1); other formats load in full precision, as bitsandbytes has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune.files import write_text
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.model import default_target_modules, dequantize_llmm, llmm_layers, matches

EXPORT_FILE = "export.json"


def lora_targets(names: list[str], model: nn.Module, config: LlmmConfig) -> list[str]:
    """peft's `target_modules` for exactly the adapted layers: the short suffixes (as vLLM expects) when they
    select no other linear layer, else the full names."""
    suffixes = sorted(s for s in config.target_modules or default_target_modules(model)
                      if any(matches(n, (s,)) for n in names))
    selected = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                and matches(name, tuple(suffixes))}
    return suffixes if selected == set(names) else sorted(names)


@torch.no_grad()
def to_peft(model: nn.Module, out: Path, tokenizer=None) -> dict:
    """Write `model` (wrapped with `apply_llmm`, trained) as DIR/base + DIR/adapter; the model is consumed
    (its Llmm layers become plain linear layers, then peft's). Returns what export.json records."""
    config: LlmmConfig = model.llmm_config
    layers = llmm_layers(model)
    means = {name: (layer.A_mean.detach().clone(), layer.B_mean.detach().clone()) for name, layer in layers.items()}
    dequantize_llmm(model).requires_grad_(False)
    model.save_pretrained(out / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")
    names = sorted(means)
    targets = lora_targets(names, model, config)
    others = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                    and name not in means)  # what bitsandbytes must leave in full precision
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    peft_model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets,
                                                  lora_dropout=config.dropout, bias="none",
                                                  task_type="CAUSAL_LM" if causal else None))
    for name, (A, B) in means.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.copy_(A)
        module.lora_B["default"].weight.copy_(B)
    peft_model.save_pretrained(out / "adapter")
    nf4 = (config.bits, config.quant_method) == (4, "normal_float")
    record = {"base": "base", "adapter": "adapter", "bits": config.bits, "quant_method": config.quant_method,
              "bnb_4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
                           "bnb_4bit_use_double_quant": config.double_quant, "llm_int8_skip_modules": others}
              if nf4 else None}
    write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    return record
