"""An Llmm model exported as a standard peft adapter plus its base gives the Llmm model's eval-mode logits when
reloaded with `PeftModel.from_pretrained`: GLUE classifier and causal LM, 4-bit normal_float (the base
quantised again by bitsandbytes) and a packed 2-bit base."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from llmm_tune import LlmmConfig, apply_llmm
from llmm_tune.method.peft_export import EXPORT_FILE, to_peft
from llmm_tune.train.pretrained import load_classifier
from tests.search_fixtures import tiny_bert, tiny_causal_lm

FORMATS = [(4, "normal_float"), (2, "uniform")]


def trained(model: torch.nn.Module, bits: int, method: str) -> torch.nn.Module:
    """Llmm layers whose means are as a fine-tune leaves them (B no longer zero)."""
    torch.manual_seed(1)
    model = apply_llmm(model, LlmmConfig(rank=4, K=2, scale=100, bits=bits, quant_method=method, init="zero"))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def reload(out, loader):
    record = json.loads((out / EXPORT_FILE).read_text())
    quantised = {"quantization_config": BitsAndBytesConfig(**record["bnb_4bit"])} if record["bnb_4bit"] else {}
    base = loader.from_pretrained(out / record["base"], **quantised)
    four_bit = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in four_bit:  # bitsandbytes' own layer takes its canonical kernel on every CPU: on one with
        # AVX512-BF16 it would repack the weight in eval mode for a bf16 kernel (other logits; it also needs
        # in_features a multiple of 64, which these tiny models' 32 is not)
        layer.support_avx512bf16_for_cpu = False
    assert len(four_bit) == (sum(isinstance(m, torch.nn.Linear) for m in base.modules()) - len(
        record["bnb_4bit"]["llm_int8_skip_modules"]) if record["bnb_4bit"] else 0)  # the adapted layers, only
    return PeftModel.from_pretrained(base, out / record["adapter"]).eval(), record


@pytest.mark.parametrize("bits, method", FORMATS)
def test_an_exported_classifier_reloads_in_peft_with_the_same_logits(bits, method, tmp_path):
    model = trained(load_classifier(str(tiny_bert(tmp_path / "bert", dropout=0.0)), num_labels=3), bits, method)
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]),
              "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    expected = model(**inputs).logits
    to_peft(model, tmp_path / "out")
    peft_model, record = reload(tmp_path / "out", AutoModelForSequenceClassification)
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16 and not adapter.get("modules_to_save")
    assert (record["bnb_4bit"] is not None) == (bits == 4)
    assert torch.allclose(peft_model(**inputs).logits, expected, atol=1e-4)


@pytest.mark.parametrize("bits, method", FORMATS)
def test_an_exported_causal_lm_reloads_in_peft_with_the_same_logits(bits, method, tmp_path):
    model = trained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm(tmp_path / "llama")), bits, method)
    ids = torch.tensor([[1, 7, 42, 99, 5, 17]])
    expected = model(input_ids=ids).logits
    to_peft(model, tmp_path / "out")
    peft_model, _ = reload(tmp_path / "out", AutoModelForCausalLM)
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-4)
