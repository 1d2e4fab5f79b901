"""The published settings as the release ran them (METHOD.md section 5): at adapter scale c = 1 the Llmm layer is
the release's `y = Q x + L (R x)` with its draws and scaled gradient; the input embeddings quantised with LoftQ and
a plain low-rank adapter round-trip (merge, save and load, peft), train, and are refused where the output layer
shares their table; the GLUE paper profiles turn both on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from llmm_tune import LlmmConfig, apply_llmm
from llmm_tune.method.layer import LlmmEmbedding, LlmmLinear
from llmm_tune.method.model import load_llmm, merge_llmm, save_adapter
from llmm_tune.method.peft_export import to_peft
from llmm_tune.method.quant import stored_values
from llmm_tune.train.pretrained import load_classifier
from llmm_tune.tune.spaces import SPACES_DIR, load_spec
from tests.helpers.search_fixtures import tiny_bert

IDS = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6, dtype=int)}


def test_at_adapter_scale_1_the_layer_is_the_releases_formula_forward_and_backward():
    torch.manual_seed(0)
    scale, linear = 300.0, nn.Linear(12, 10)
    config = LlmmConfig(rank=4, K=2, scale=scale, bits=None, alpha=16, adapter_scale=1.0)
    layer = LlmmLinear.wrap(linear, config).train()
    assert config.alpha / config.rank == 4 and layer.scaling == 1.0
    with torch.no_grad():
        for param in (layer.A_mean, layer.B_mean, layer.A_moments, layer.B_moments):
            param.normal_()
    x = torch.randn(3, 12)
    torch.manual_seed(7)
    layer(x).square().sum().backward()

    # the release: one draw eps ~ N(0, I_K / s) for R (A) then L (B); y = W x + L (R x); moments get sqrt(s) eps g
    leaves = {name: getattr(layer, name).detach().clone().requires_grad_() for name in
              ("A_mean", "A_moments", "B_mean", "B_moments")}
    torch.manual_seed(7)
    R = leaves["A_mean"] + torch.tensordot(torch.randn(2) / math.sqrt(scale), leaves["A_moments"], dims=1)
    L = leaves["B_mean"] + torch.tensordot(torch.randn(2) / math.sqrt(scale), leaves["B_moments"], dims=1)
    (linear(x) + (x @ R.T) @ L.T).square().sum().backward()
    for name, leaf in leaves.items():
        factor = math.sqrt(scale) if name.endswith("moments") else 1.0
        torch.testing.assert_close(getattr(layer, name).grad, factor * leaf.grad)


def quantised_bert(tmp_path, **settings) -> nn.Module:
    model = load_classifier(str(tiny_bert(tmp_path / "bert", dropout=0.0)), num_labels=2)
    config = LlmmConfig(rank=4, K=1, scale=100.0, loftq_iters=2, quantize_embeddings=True, **settings)
    return apply_llmm(model, config)


@pytest.mark.parametrize("bits, method", [(4, "normal_float"), (2, "uniform")])
def test_quantised_embeddings_reconstruct_the_table_better_than_storage_alone_and_merge(bits, method, tmp_path):
    table = load_classifier(str(tiny_bert(tmp_path / "plain", dropout=0.0)), 2).get_input_embeddings().weight
    model = quantised_bert(tmp_path, bits=bits, quant_method=method).eval()
    layer = model.get_input_embeddings()
    assert isinstance(layer, LlmmEmbedding) and layer.A_moments.shape[0] == 0  # a plain low-rank adapter
    every_row = layer(torch.arange(table.shape[0]))
    stored = stored_values(table, bits, method)  # the same storage without LoftQ's correction
    assert torch.linalg.norm(every_row - table) < 0.9 * torch.linalg.norm(stored - table)
    expected = model(**IDS).logits
    merged = merge_llmm(model).get_input_embeddings()
    assert type(merged) is nn.Embedding and merged.padding_idx == layer.padding_idx
    torch.testing.assert_close(merged(torch.arange(table.shape[0])), every_row)
    torch.testing.assert_close(model(**IDS).logits, expected)


def test_quantised_embeddings_train_save_load_and_export_to_peft(tmp_path):
    model = quantised_bert(tmp_path, bits=4, adapter_scale=1.0).train()
    embedding = model.get_input_embeddings()
    before = embedding.B_mean.detach().clone()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        loss = model(**IDS, labels=torch.tensor([1])).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    used = IDS["input_ids"].unique()
    assert losses[-1] < losses[0] and not torch.equal(embedding.B_mean[used], before[used])
    assert torch.equal(embedding.B_mean[1000], before[1000])  # a row no input used keeps its start

    model.eval()
    expected = model(**IDS).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=2)
    torch.testing.assert_close(load_llmm(fresh, tmp_path / "adapter").eval()(**IDS).logits, expected)

    record = to_peft(model, tmp_path / "out", "tiny-bert")
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == adapter["r"] == 4  # c = 1 as peft says it: alpha = r
    assert any(name.endswith("word_embeddings") for name in adapter["target_modules"])
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / record["base"])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "out" / record["adapter"]).eval()
    torch.testing.assert_close(peft_model(**IDS).logits, expected, atol=1e-5, rtol=1e-4)


def test_embeddings_tied_to_the_output_layer_are_refused():
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="ties its input embeddings to its output layer; set quantize_embeddings"):
        apply_llmm(tied, LlmmConfig(rank=2, quantize_embeddings=True))
    with pytest.raises(ValueError, match="quantize_embeddings must be false when bits is None"):
        LlmmConfig(bits=None, quantize_embeddings=True)


@pytest.mark.parametrize("space", sorted(path.stem for path in SPACES_DIR.glob("glue_*.yaml")))
def test_glue_paper_profiles_run_the_releases_scale_and_quantised_embeddings(space):
    paper, cpu = load_spec(space, "paper", "llmm").fixed, load_spec(space, "cpu", "llmm").fixed
    assert (paper["adapter_scale"], paper["quantize_embeddings"]) == (1.0, True)
    assert (cpu["adapter_scale"], cpu["quantize_embeddings"]) == (None, False)  # an option elsewhere
