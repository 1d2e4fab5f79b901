"""Block-wise low-bit quantisers and low-bit storage of frozen base weights (LoftQ, which corrects them, is in
`loftq`).

METHOD.md section 1. Weights are quantised in blocks of 64 with one absmax scale per block;
`normal_float` uses QLoRA's NF levels (0 exactly representable), `uniform` evenly spaced levels.
4-bit normal_float is stored and multiplied by bitsandbytes (`nf4.NF4Linear`); every other
(bits, method) pair is stored as packed integer codes and dequantised on the fly, because
bitsandbytes has no 2-bit or 8-bit NF / uniform block format.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmm_tune.method.config import BLOCK

NF_OFFSET = 0.9677083  # QLoRA / bitsandbytes offset (METHOD.md rounds it to 0.9677)


@functools.cache
def levels(bits: int, method: str) -> Tensor:
    """The 2**bits sorted quantisation levels in [-1, 1] (float32, CPU)."""
    n = 2**bits
    if method == "uniform":
        return torch.linspace(-1.0, 1.0, n)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = normal.icdf(torch.linspace(NF_OFFSET, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(NF_OFFSET, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


def _blocks(weight: Tensor) -> Tensor:
    flat = weight.detach().reshape(-1).float()
    return F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)


def quantize(weight: Tensor, bits: int, method: str) -> tuple[Tensor, Tensor]:
    """Codes (uint8, one per element, padded to whole blocks) and per-block absmax (float32)."""
    blocks = _blocks(weight)
    absmax = blocks.abs().amax(dim=1)
    lv = levels(bits, method).to(blocks.device)
    normalised = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(normalised, (lv[1:] + lv[:-1]) / 2)  # nearest level
    return codes.to(torch.uint8), absmax


def dequantize(codes: Tensor, absmax: Tensor, bits: int, method: str, shape: torch.Size) -> Tensor:
    lv = levels(bits, method).to(absmax.device)
    values = lv[codes.view(-1, BLOCK).long()] * absmax[:, None]
    return values.view(-1)[: math.prod(shape)].view(shape)


def fake_quantize(weight: Tensor, bits: int, method: str) -> Tensor:
    """dequant(quant(weight)) in float32."""
    return dequantize(*quantize(weight, bits, method), bits, method, weight.shape)


def stored_values(weight: Tensor, bits: int, method: str, double_quant: bool = False) -> Tensor:
    """What a base layer made by `quantized_linear` holds for `weight`, dequantised (float32): the values
    LoftQ must correct. 4-bit normal_float takes bitsandbytes' own round trip (its NF4 table and, with
    `double_quant`, its 8-bit block scales); every other format is `fake_quantize`."""
    if bits == 4 and method == "normal_float":
        from llmm_tune.method.nf4 import nf4_round_trip

        return nf4_round_trip(weight, double_quant)
    return fake_quantize(weight, bits, method)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes of `bits` bits into bytes, 8 // bits per byte."""
    per_byte = 8 // bits
    grouped = codes.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)).view(-1).to(torch.uint8)


class PackedLinear(nn.Module):
    """Frozen linear layer whose weight is stored as packed `bits`-bit codes plus per-block absmax."""

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, method: str):
        super().__init__()
        self.bits, self.method = bits, method
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        codes, absmax = quantize(weight, bits, method)
        self.register_buffer("packed", pack(codes, bits))
        self.register_buffer("absmax", absmax)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dense_weight(self) -> Tensor:
        codes = unpack(self.packed, self.bits)
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize(codes, self.absmax, self.bits, self.method, shape)

    def weight_bytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, method={self.method}"


def quantized_linear(weight: Tensor, bias: Tensor | None, bits: int, method: str,
                     double_quant: bool = False) -> nn.Module:
    """A frozen base layer holding `weight` at `bits` bits (`double_quant`: 4-bit normal_float only)."""
    if bits == 4 and method == "normal_float":
        from llmm_tune.method.nf4 import NF4Linear  # bitsandbytes takes 2 s to import: loaded when a layer needs it

        return NF4Linear(weight, bias, double_quant)
    return PackedLinear(weight, bias, bits, method)


def dense_weight(layer: nn.Module) -> Tensor:
    """The dequantised float32 weight of a base layer made by `quantized_linear`, or of a plain linear layer."""
    own = getattr(layer, "dense_weight", None)
    return own() if own is not None else layer.weight.detach().float()


def weight_bytes(layer: nn.Module) -> int:
    """Bytes the base layer spends on its weight (codes plus scales; bias excluded)."""
    own = getattr(layer, "weight_bytes", None)
    return own() if own is not None else layer.weight.nbytes
