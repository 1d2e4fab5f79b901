import bitsandbytes.functional as bnbf
import pytest
import torch

from llmm_tune.method.config import BITS, METHODS
from llmm_tune.method.loftq import loftq
from llmm_tune.method.nf4 import NF4Linear
from llmm_tune.method.quant import (
    PackedLinear,
    dense_weight,
    fake_quantize,
    levels,
    pack,
    quantized_linear,
    stored_values,
    unpack,
    weight_bytes,
)
from llmm_tune.train.pretrained import load_classifier

CASES = [(b, m) for b in BITS for m in METHODS]


def heavy_tailed(shape):
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample(shape) * 0.02


@pytest.mark.parametrize("bits,method", CASES)
def test_levels_shape(bits, method):
    lv = levels(bits, method)
    assert lv.numel() == 2**bits and torch.all(lv[1:] > lv[:-1])
    assert lv[0] == -1 and lv[-1] == 1
    if method == "normal_float":
        assert (lv == 0).sum() == 1  # zero exactly representable


@pytest.mark.parametrize("bits,method", CASES)
def test_each_block_holds_at_most_2_pow_b_levels(bits, method):
    w = heavy_tailed((96, 200))  # 19200 elements: 300 blocks of 64
    stored = PackedLinear(w, None, bits, method).dense_weight()
    assert torch.equal(stored, fake_quantize(w, bits, method))
    blocks = stored.reshape(-1, 64)
    distinct = max(len(torch.unique(block)) for block in blocks)
    assert distinct <= 2**bits


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_as_bits_rise(method):
    w = heavy_tailed((64, 256))
    errors = [torch.linalg.norm(w - fake_quantize(w, b, method)).item() for b in BITS]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02 * torch.linalg.norm(w).item()


@pytest.mark.parametrize("bits", BITS)
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (64 * 5,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_nf4_bitsandbytes_agrees_with_our_normal_float():
    torch.manual_seed(0)
    w = torch.randn(128, 320)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnbf.dequantize_4bit(data, state)
    ours = fake_quantize(w, 4, "normal_float")
    assert torch.allclose(levels(4, "normal_float"), bnbf.get_4bit_type("nf4", device="cpu"), atol=2e-7)
    assert (theirs - ours).abs().max() <= 1e-6 * w.abs().max()
    layer = NF4Linear(w, None)
    x = torch.randn(5, 320)
    assert torch.allclose(layer(x), x @ ours.T, atol=1e-4)


@pytest.fixture(scope="module")
def minilm_weight():
    model = load_classifier("minilm", num_labels=2)
    return model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()


@pytest.mark.parametrize("bits,method,double_quant", [(2, "uniform", False), (2, "normal_float", False),
                                                      (4, "normal_float", False), (4, "normal_float", True)])
def test_loftq_error_never_increases_and_beats_plain_quantisation(minilm_weight, bits, method, double_quant):
    W, scaling = minilm_weight, 4.0  # alpha / rank = 4: the factors must absorb sqrt(scaling)
    result = loftq(W, rank=16, bits=bits, method=method, iters=5, scaling=scaling, double_quant=double_quant)
    errors = result.errors
    assert len(errors) == 5 and all(b <= a for a, b in zip(errors, errors[1:]))
    Q = dense_weight(quantized_linear(result.to_quantize, None, bits, method, double_quant))  # what is stored
    true_error = torch.linalg.norm(W - (Q + scaling * result.B @ result.A)).item()
    assert true_error == pytest.approx(errors[-1], rel=1e-5)  # LoftQ corrected exactly the stored values
    plain = torch.linalg.norm(W - stored_values(W, bits, method, double_quant)).item()
    assert errors[-1] < 0.97 * plain


def test_double_quantised_nf4_stores_8_bit_scales_and_the_same_layer_output():
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    plain, compressed = NF4Linear(w, None), NF4Linear(w, None, double_quant=True)
    assert compressed.weight.quant_state.nested and compressed.weight.quant_state.absmax.dtype == torch.uint8
    bits = [8 * weight_bytes(layer) / w.numel() for layer in (plain, compressed)]
    assert bits[0] == pytest.approx(4.5) and bits[1] < 4.16  # 4 + 8/64 + the scales of the scales (+ their map)
    x = torch.randn(3, 1024)
    assert torch.allclose(compressed(x), x @ dense_weight(compressed).T, atol=1e-5)
    assert (dense_weight(compressed) - dense_weight(plain)).abs().max() < 0.01 * w.abs().max()
