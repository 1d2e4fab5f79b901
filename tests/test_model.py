import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from llmm_tune import (
    LlmmConfig,
    apply_llmm,
    bytes_per_base_parameter,
    load_llmm,
    merge_llmm,
    predict_mc,
    save_adapter,
)
from llmm_tune.method import loftq as loftq_module
from llmm_tune.method.loftq import CACHE, LoftQCache, LoftQInit, loftq
from llmm_tune.method.model import llmm_layers, trainable_state
from llmm_tune.method.quant import PackedLinear, dense_weight, dequantize, quantize, quantized_linear
from llmm_tune.tune.storage import Store


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def train_step(model, batch, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss


def cls_batch(n=4, length=16):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(1000, 2000, (n, length)), "labels": torch.tensor([0, 1] * (n // 2))}


def lm_batch(n=2, length=12):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (n, length))
    return {"input_ids": ids, "labels": ids}


def assert_only_adapter_changed(model, before):
    after = snapshot(model)
    trainable = set(trainable_state(model))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(k.endswith("A_moments") for k in changed) == (model.llmm_config.K > 0)  # K = 0: no moments


def test_minilm_end_to_end_nf4(minilm):
    model = apply_llmm(minilm, LlmmConfig(rank=8, K=2, scale=100.0))
    layers = llmm_layers(model)
    assert len(layers) == 6 * 6  # q, k, v, attention output, intermediate, output in 6 blocks
    assert all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in layers.values())
    assert {n.split(".")[0] for n in trainable_state(model) if "A_mean" not in n and "moments" not in n
            and "B_mean" not in n} == {"bert", "classifier"}  # pooler and classifier heads
    before = snapshot(model)
    loss = train_step(model, cls_batch())
    assert torch.isfinite(loss)
    assert_only_adapter_changed(model, before)


def test_small_llama_end_to_end_2bit_uniform(tiny_llama):
    model = apply_llmm(tiny_llama, LlmmConfig(rank=4, K=2, bits=2, quant_method="uniform"))
    assert len(llmm_layers(model)) == 2 * 7
    assert all(isinstance(layer.base, PackedLinear) for layer in llmm_layers(model).values())
    before = snapshot(model)
    train_step(model, lm_batch())
    assert_only_adapter_changed(model, before)
    assert bytes_per_base_parameter(model) == pytest.approx(2 / 8 + 4 / 64)


def test_eval_output_is_deterministic_and_equals_merged_model(minilm):
    model = apply_llmm(minilm, LlmmConfig(rank=8, K=2, scale=50.0))
    train_step(model, cls_batch())
    train_step(model, cls_batch())
    model.eval()
    batch = {"input_ids": cls_batch()["input_ids"]}
    with torch.no_grad():
        first, second = model(**batch).logits, model(**batch).logits
        merged = merge_llmm(copy.deepcopy(model)).eval()
        assert not llmm_layers(merged)
        merged_logits = merged(**batch).logits
    assert torch.equal(first, second)
    assert torch.allclose(first, merged_logits, atol=1e-4)  # float32 re-association only


def test_monte_carlo_prediction_differs_from_mean_and_averages(minilm):
    model = apply_llmm(minilm, LlmmConfig(rank=4, K=1, scale=1.0))
    with torch.no_grad():
        for layer in llmm_layers(model).values():
            layer.A_moments.normal_(std=0.05)
    model.eval()
    batch = {"input_ids": cls_batch()["input_ids"]}
    torch.manual_seed(0)
    mc = predict_mc(model, 4, **batch)
    with torch.no_grad():
        mean = model(**batch).logits
    assert mc.shape == mean.shape and not torch.allclose(mc, mean)
    assert not any(layer.sample_in_eval for layer in llmm_layers(model).values())


def test_save_load_roundtrip_is_bit_exact(minilm, tmp_path):
    from llmm_tune.train.pretrained import load_classifier

    config = LlmmConfig(rank=8, K=2, bits=2, quant_method="normal_float")
    model = apply_llmm(minilm, config)
    train_step(model, cls_batch())
    save_adapter(model, tmp_path)
    torch.manual_seed(123)  # a different head init: loading must overwrite it
    fresh = load_llmm(load_classifier("minilm", num_labels=2), tmp_path)
    assert fresh.llmm_config == config
    saved, loaded = trainable_state(model), trainable_state(fresh)
    assert saved and saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    model.eval(), fresh.eval()
    batch = {"input_ids": cls_batch()["input_ids"]}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_baselines_come_from_the_same_config(tiny_llama):
    reference = copy.deepcopy(tiny_llama).eval()
    ids = lm_batch()["input_ids"]
    lora = apply_llmm(copy.deepcopy(tiny_llama), LlmmConfig(rank=4, K=0, bits=None)).eval()
    with torch.no_grad():  # full-precision LoRA starts as the pretrained model (B = 0)
        assert torch.equal(lora(ids).logits, reference(ids).logits)
    qlora = apply_llmm(copy.deepcopy(tiny_llama), LlmmConfig(rank=4, K=0, init="zero"))
    qlora_layers = llmm_layers(qlora).values()
    assert qlora_layers and all(isinstance(x.base, bnb.nn.Linear4bit) and not x.B_mean.any() for x in qlora_layers)
    loftq_model = apply_llmm(copy.deepcopy(tiny_llama), LlmmConfig(rank=4, K=0))
    layer = next(iter(llmm_layers(loftq_model).values()))
    assert layer.A_moments.shape[0] == 0 and layer.B_mean.any()


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("K", -1), ("scale", 0.0), ("scale", -5), ("bits", 3), ("quant_method", "int"),
    ("loftq_iters", 0), ("dropout", 1.0), ("init", "gaussian"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LlmmConfig\.{field} must be"):
        LlmmConfig(**{field: value})


def test_loftq_init_without_quantisation_is_rejected():
    with pytest.raises(ValueError, match="LlmmConfig.init"):
        LlmmConfig(bits=None, init="loftq")


def test_targets_matching_nothing_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"target_modules \['query'\] match no linear layer"):
        apply_llmm(tiny_llama, LlmmConfig(target_modules=["query"]))


def packed_product(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """What bitsandbytes' AVX512-BF16 kernel computes from a weight in its CPU inference layout (in bf16), here
    from the weight unpacked again: the packed path's arithmetic on any CPU."""
    codes, unpacked = bnbf._convert_weight_packed_for_cpu_inverse(B.detach().clone(), copy.deepcopy(state))
    unpacked.absmax, unpacked.nested = state.absmax.T.reshape(-1).float(), False  # the layout's scales: transposed
    weight = bnbf.dequantize_4bit(codes, unpacked)
    return A.to(torch.bfloat16) @ weight.to(torch.bfloat16).T


@pytest.mark.parametrize("kernel", ["canonical layout", "packed layout", "packed layout, native kernel"])
def test_nf4_base_trains_after_evaluations_on_a_cpu_with_avx512_bf16(minilm, monkeypatch, kernel):
    """bitsandbytes repacks a 4-bit weight for inference in eval mode when `support_avx512bf16_for_cpu` is
    set; forcing it makes this test take that path on every CPU. Its kernel for that layout exists only on a CPU
    with AVX512-BF16, so the packed case multiplies by `packed_product` instead and both cases compare the
    evaluation's logits on every CPU; a third case runs the native kernel where it exists."""
    fast_cpu_inference = kernel != "canonical layout"
    if kernel == "packed layout":
        monkeypatch.setattr(bnbf, "gemv_4bit", packed_product)
    elif kernel == "packed layout, native kernel" and not bnbf.has_avx512bf16():
        pytest.skip("bitsandbytes has its packed-layout CPU kernel only on a CPU with AVX512-BF16")
    model = apply_llmm(minilm, LlmmConfig(rank=4, K=1, scale=100.0))
    layers = llmm_layers(model).values()
    assert layers
    weights = [dense_weight(layer.base).clone() for layer in layers]
    saved = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    batch = cls_batch()
    ids = {"input_ids": batch["input_ids"]}
    model.eval()
    with torch.no_grad():
        canonical_eval = model(**ids).logits
    for layer in layers:
        layer.base.support_avx512bf16_for_cpu = True
        layer.base.fast_cpu_inference = fast_cpu_inference

    def train_forward():
        model.train()
        torch.manual_seed(5)  # the adapters' noise draw
        return model(**batch)

    before = train_forward().logits.detach()
    for _ in range(3):  # train -> eval -> train cycles
        model.eval()
        with torch.no_grad():
            logits = model(**ids).logits
        assert [layer.base.packed for layer in layers] == [fast_cpu_inference] * len(layers)
        if fast_cpu_inference:  # the packed layout computes in bf16
            assert torch.allclose(logits, canonical_eval, atol=2e-2)
        else:
            assert torch.equal(logits, canonical_eval)
        model.zero_grad()
        output = train_forward()
        output.loss.backward()
        assert torch.equal(output.logits, before)
        for layer in layers:
            for factor in (layer.A_mean, layer.B_mean, layer.A_moments, layer.B_moments):
                assert factor.grad is not None and factor.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(**ids)  # leave the last cycle in eval: reading, saving and merging must still see the true weight
        assert all(torch.equal(dense_weight(layer.base), w) for layer, w in zip(layers, weights))
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        model(**ids)
        merged = merge_llmm(copy.deepcopy(model)).eval()(**ids).logits
        assert torch.allclose(merged, canonical_eval, atol=1e-4)


@pytest.mark.parametrize("bits,method,double_quant", [(4, "normal_float", False), (4, "normal_float", True),
                                                      (2, "uniform", False), (8, "normal_float", False)])
def test_loftq_computed_remembered_or_stored_builds_the_layers_a_search_always_built(tiny_llama, tmp_path, monkeypatch,
                                                                                     bits, method, double_quant):
    """The build that computes LoftQ uses its float residual; every other build of a search (memory or store)
    the residual read back from its stored codes, as the trials after the first always did."""
    config = LlmmConfig(rank=4, K=1, bits=bits, quant_method=method, double_quant=double_quant, loftq_iters=2)
    CACHE.clear()
    computed = apply_llmm(copy.deepcopy(tiny_llama), config, loftq_cache=tmp_path)
    (stored,) = list(tmp_path.iterdir())
    with monkeypatch.context() as patch:
        patch.setattr(loftq_module, "compute", None)  # from here on, computing again would fail
        remembered = apply_llmm(copy.deepcopy(tiny_llama), config, loftq_cache=tmp_path)
        CACHE.clear()
        read = apply_llmm(copy.deepcopy(tiny_llama), config, loftq_cache=Store(str(tmp_path)))
    assert list(tmp_path.iterdir()) == [stored]
    CACHE.clear()
    alone = apply_llmm(copy.deepcopy(tiny_llama), config)  # no store: computed here, its float residual
    assert llmm_layers(computed)
    for name, layer in llmm_layers(computed).items():
        weight = tiny_llama.get_submodule(name).weight
        result = loftq(weight, 4, bits, method, 2, config.scaling, double_quant)
        codes, absmax = quantize(result.to_quantize, bits, method)
        from_codes = quantized_linear(dequantize(codes, absmax, bits, method, weight.shape), None, bits, method,
                                      double_quant)
        from_float = quantized_linear(result.to_quantize, None, bits, method, double_quant)
        for built, base in ((layer, from_float), (llmm_layers(alone)[name], from_float),
                            (llmm_layers(remembered)[name], from_codes), (llmm_layers(read)[name], from_codes)):
            assert torch.equal(dense_weight(built.base), dense_weight(base))
            assert torch.equal(built.A_mean, result.A) and torch.equal(built.B_mean, result.B)
    other = apply_llmm(copy.deepcopy(tiny_llama), LlmmConfig(rank=8, K=1, bits=bits, quant_method=method,
                                                             loftq_iters=2), loftq_cache=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2 and llmm_layers(other)  # another setting, another entry


def test_loftq_cache_keeps_the_most_recent_entries_within_its_budget():
    entry = LoftQInit({"layer.A": torch.zeros(256)}, 4, "normal_float")  # 1 KiB
    cache = LoftQCache(budget=2 * entry.nbytes)
    for name in ("a", "b", "a", "c"):
        cache.remember(name, entry)
    assert list(cache.entries) == ["a", "c"]


def test_a_uri_needs_a_store(tiny_llama):
    with pytest.raises(ValueError, match=r"pass a store for it instead, llmm_tune.tune.storage.Store\('s3://b/x'\)"):
        apply_llmm(tiny_llama, LlmmConfig(rank=4, loftq_iters=1), loftq_cache="s3://b/x")


def test_double_quant_is_only_for_4_bit_normal_float():
    with pytest.raises(ValueError, match="LlmmConfig.double_quant must be false unless bits is 4"):
        LlmmConfig(bits=2, double_quant=True)
