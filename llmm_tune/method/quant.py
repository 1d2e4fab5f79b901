"""Block-wise low-bit quantisers and low-bit storage of frozen base weights (LoftQ, which corrects them, is in
`loftq`).

METHOD.md section 1. Weights are quantised in blocks of 64 with one absmax scale per block;
`normal_float` uses QLoRA's NF levels (0 exactly representable), `uniform` evenly spaced levels.
4-bit normal_float is stored and multiplied by bitsandbytes (`Linear4bit`); every other
(bits, method) pair is stored as packed integer codes and dequantised on the fly, because
bitsandbytes has no 2-bit or 8-bit NF / uniform block format.
"""

from __future__ import annotations

import copy
import functools
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64
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
        data, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCK, quant_type="nf4",
                                         compress_statistics=double_quant)
        return bnbf.dequantize_4bit(data, state).float()
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

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, method={self.method}"


class NF4Linear(bnb.nn.Linear4bit):
    """bitsandbytes' NF4 layer that can be trained after any number of evaluations, on every CPU.

    On a CPU with AVX512-BF16, `Linear4bit` repacks its weight in eval mode into an inference-only
    layout (bf16 compute, no backward), and its inverse leaves the per-block scales in bf16 and in the
    wrong order: training after an evaluation crashes, and reading the weight gives wrong values.
    Here the canonical layout is the default everywhere, so scores do not depend on the CPU that made
    them; `fast_cpu_inference` opts in to the packed layout for inference, and whenever the canonical
    layout is needed again (training, gradients, reading, saving, moving) the codes are unpacked and
    the original scales put back exactly.
    """

    fast_cpu_inference = False
    PACK_ROWS, PACK_COLS = 32, BLOCK  # shapes bitsandbytes' CPU repacking and kernel accept

    def __init__(self, weight: Tensor, bias: Tensor | None, double_quant: bool = False):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                         compress_statistics=double_quant, quant_type="nf4", device=weight.device)
        # block 64; its float32 absmax, or with `double_quant` absmax in 8 bits per 256 blocks (bitsandbytes'
        # compressed statistics: 4.127 bits per weight instead of 4.5)
        data, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCK, quant_type="nf4",
                                         compress_statistics=double_quant)
        self.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                        quant_type="nf4", compress_statistics=double_quant, bnb_quantized=True,
                                        module=self)
        self.quant_state = state  # where bitsandbytes finds it again for a weight FSDP gathered as a plain tensor
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.canonical_state = None  # the weight's quant state while the packed layout is in place

    @property
    def packed(self) -> bool:
        # an FSDP-gathered weight is a plain tensor until bitsandbytes gives it the module's quant state back
        return bool(getattr(getattr(self.weight, "quant_state", None), "packing_format_for_cpu", False))

    def canonical(self) -> None:
        """Put the canonical layout back if bitsandbytes repacked the weight for CPU inference."""
        if self.packed:
            data, _ = bnbf._convert_weight_packed_for_cpu_inverse(self.weight.data, self.weight.quant_state)
            self.weight.data = data
            self.weight.quant_state = self.quant_state = self.canonical_state
            self.canonical_state = None

    def forward(self, x: Tensor) -> Tensor:
        fast = (self.fast_cpu_inference and not self.training and not x.requires_grad
                and self.out_features % self.PACK_ROWS == 0 and self.in_features % self.PACK_COLS == 0)
        if not fast:
            self.canonical()
        elif not self.packed:
            self.canonical_state = copy.deepcopy(self.weight.quant_state)  # bitsandbytes edits it in place
        cpu_bf16 = self.support_avx512bf16_for_cpu  # bitsandbytes packs in eval mode when this is set
        self.support_avx512bf16_for_cpu = cpu_bf16 and fast
        try:
            return super().forward(x)
        finally:
            self.support_avx512bf16_for_cpu = cpu_bf16

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.canonical()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        self.canonical()
        return super()._apply(fn, recurse)


def quantized_linear(weight: Tensor, bias: Tensor | None, bits: int, method: str,
                     double_quant: bool = False) -> nn.Module:
    """A frozen base layer holding `weight` at `bits` bits (`double_quant`: 4-bit normal_float only)."""
    if bits == 4 and method == "normal_float":
        return NF4Linear(weight, bias, double_quant)
    return PackedLinear(weight, bias, bits, method)


def dense_weight(layer: nn.Module) -> Tensor:
    """The dequantised float32 weight of a base layer made by `quantized_linear`."""
    if isinstance(layer, NF4Linear):
        layer.canonical()
        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if isinstance(layer, PackedLinear):
        return layer.dense_weight()
    return layer.weight.detach().float()


def weight_bytes(layer: nn.Module) -> int:
    """Bytes the base layer spends on its weight (codes plus scales; bias excluded)."""
    if isinstance(layer, NF4Linear):
        layer.canonical()
        state = layer.weight.quant_state
        nested = state.state2.absmax.nbytes + state.state2.code.nbytes if state.nested else 0
        return layer.weight.data.nbytes + state.absmax.nbytes + nested
    if isinstance(layer, PackedLinear):
        return layer.packed.nbytes + layer.absmax.nbytes
    return layer.weight.nbytes
