"""An Llmm model exported as a standard peft adapter plus its base gives the Llmm model's eval-mode logits when
reloaded with `PeftModel.from_pretrained`: GLUE classifier and causal LM, 4-bit normal_float (the base
quantised again by bitsandbytes) and a packed 2-bit base. The export names its base by a hub id, so that
`AutoPeftModel*` loads it (with the trained head) wherever that model is, and no file names a path of this machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import huggingface_hub
import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from llmm_tune import LlmmConfig, apply_llmm, export_adapter
from llmm_tune.method.peft_export import EXPORT_FILE, to_peft
from llmm_tune.train.pretrained import CACHE_DIR, HUB_IDS, load_classifier
from tests.helpers.search_fixtures import ROOT, export_record, tiny_bert, tiny_causal_lm

FORMATS = [(4, "normal_float"), (2, "uniform")]


def trained(model: torch.nn.Module, bits: int | None, method: str) -> torch.nn.Module:
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
    to_peft(model, tmp_path / "out", "tiny-bert")
    peft_model, record = reload(tmp_path / "out", AutoModelForSequenceClassification)
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16 and adapter["task_type"] == "SEQ_CLS"
    assert {"classifier", "pooler"} <= set(adapter["modules_to_save"])  # the head Llmm trained in full
    assert (record["bnb_4bit"] is not None) == (bits == 4)
    assert torch.allclose(peft_model(**inputs).logits, expected, atol=1e-4)


@pytest.mark.parametrize("bits, method", FORMATS)
def test_an_exported_causal_lm_reloads_in_peft_with_the_same_logits(bits, method, tmp_path):
    model = trained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm(tmp_path / "llama")), bits, method)
    ids = torch.tensor([[1, 7, 42, 99, 5, 17]])
    expected = model(input_ids=ids).logits
    to_peft(model, tmp_path / "out", "tiny-llama")
    peft_model, _ = reload(tmp_path / "out", AutoModelForCausalLM)
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]  # vLLM serves no such adapter
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-4)


COMMIT = "0" * 40
# record (as best.yaml holds it) -> the tiny model standing for the packaged one, and the AutoPeftModel class
CASES = {
    "classifier": ({"family": "glue", "task": "cola", "metric": "mcc", "mode": "max",
                    "config": {"model": "minilm", "max_length": 32}},
                   lambda folder: load_classifier(str(tiny_bert(folder, dropout=0.0)), num_labels=2),
                   AutoPeftModelForSequenceClassification),
    "causal_lm": ({"family": "causal_lm", "task": "gsm8k", "metric": "nll", "mode": "min",
                   "config": {"model": "smollm2", "max_source_length": 24, "max_target_length": 8}},
                  lambda folder: AutoModelForCausalLM.from_pretrained(tiny_causal_lm(folder)),
                  AutoPeftModelForCausalLM),
}


def hub_cache(root: Path, hub_id: str, model: Path) -> Path:
    """A Hugging Face hub cache holding the folder `model` as the hub's `hub_id`, as a machine that downloaded
    it has it."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.mark.parametrize("kind", CASES)
def test_auto_peft_model_loads_an_exported_adapter_on_its_hub_base_and_no_file_names_this_machine(kind, tmp_path,
                                                                                                  monkeypatch):
    """The command's export of a full-precision base (the lora baseline: the hub's weights are the trained base).
    The model's eval logits again up to float32 rounding (peft adds B(A x) to the base's output where Llmm's layer
    computes the same sum in another order: ~1e-7 on logits of order 1), with the trained head that the hub's base
    lacks (its classifier is initialised at random)."""
    entry, build, auto = CASES[kind]
    model = trained(build(tmp_path / "model"), None, "normal_float")
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]),
              "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    expected = model(**inputs).logits
    validation = {"metric": entry["metric"], "mode": entry["mode"], "value": 0.0}
    export_record(family=entry["family"], task=entry["task"], method="lora", config=entry["config"],
                  validation=validation).write(tmp_path / "best.yaml")
    monkeypatch.setattr(export_adapter, "trained_model", lambda *args: model)  # what the search's checkpoint gives
    out = tmp_path / "out"
    written = export_adapter.run([str(tmp_path / "best.yaml"), "--out", str(out)])
    assert written["base_model_name_or_path"] == HUB_IDS[entry["config"]["model"]]
    cache = hub_cache(tmp_path / "hub", written["base_model_name_or_path"], tmp_path / "model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, before conftest set it
    loaded = auto.from_pretrained(out / "adapter", cache_dir=cache).eval()
    assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)
    for path in [p for p in out.rglob("*") if p.is_file()]:
        for machine_path in (tmp_path, ROOT, CACHE_DIR):  # ROOT holds the virtualenv with the packaged models
            assert str(machine_path).encode() not in path.read_bytes(), (path, machine_path)
    assert "model = PeftModel.from_pretrained(base, 'DIR/adapter')" in (out / "README.md").read_text()
    lengths = {k: v for k, v in entry["config"].items() if k != "model"}
    assert json.loads((out / EXPORT_FILE).read_text())["training"] == lengths
    if kind == "classifier":
        assert json.loads((out / "base" / "config.json").read_text())["id2label"] == {"0": "unacceptable",
                                                                                      "1": "acceptable"}
        assert AutoTokenizer.from_pretrained(out / "base").model_max_length == lengths["max_length"]


def test_the_export_says_what_the_mean_adapter_loses_against_the_records_draws():
    from llmm_tune.export_adapter import what_the_mean_loses

    assert "predicts exactly as it was scored" in what_the_mean_loses({"K": 0, "draws": 8})
    assert "what the record was scored with (draws 0)" in what_the_mean_loses({"K": 2})
    sampled = what_the_mean_loses({"K": 1, "draws": 8})
    assert "mean of 8 adapter samples" in sampled and "predicts as draws 0 does" in sampled
