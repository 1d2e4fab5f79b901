import bitsandbytes.functional as bnbf
import pytest
import torch

from llmm_tune.models import load_classifier
from llmm_tune.quant import (
    BITS,
    METHODS,
    NF4Linear,
    PackedLinear,
    fake_quantize,
    levels,
    loftq,
    pack,
    unpack,
)

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


@pytest.mark.parametrize("bits,method", [(2, "uniform"), (2, "normal_float"), (4, "normal_float")])
def test_loftq_error_never_increases_and_beats_plain_quantisation(minilm_weight, bits, method):
    W, scaling = minilm_weight, 4.0  # alpha / rank = 4: the factors must absorb sqrt(scaling)
    result = loftq(W, rank=16, bits=bits, method=method, iters=5, scaling=scaling)
    errors = result.errors
    assert len(errors) == 5 and all(b <= a for a, b in zip(errors, errors[1:]))
    Q = fake_quantize(result.to_quantize, bits, method)
    true_error = torch.linalg.norm(W - (Q + scaling * result.B @ result.A)).item()
    assert true_error == pytest.approx(errors[-1], rel=1e-5)  # the kept iterate is what is returned
    plain = torch.linalg.norm(W - fake_quantize(W, bits, method)).item()
    assert errors[-1] < 0.97 * plain
