"""4-bit normal_float base layers, stored and multiplied by bitsandbytes (the other formats are `quant.PackedLinear`).

Its own module because importing bitsandbytes takes about 2 s (it compiles its CPU ops through torch's dynamo): a
search's driver, the export and a 2- or 8-bit trial start without it.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import Tensor, nn

from llmm_tune.method.config import BLOCK


def nf4_quantize(weight: Tensor, double_quant: bool = False):
    """bitsandbytes' NF4 codes and quant state of `weight`: block 64, its float32 absmax, or with `double_quant`
    absmax in 8 bits per 256 blocks (bitsandbytes' compressed statistics: 4.127 bits per weight instead of 4.5)."""
    return bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCK, quant_type="nf4",
                              compress_statistics=double_quant)


def nf4_round_trip(weight: Tensor, double_quant: bool = False) -> Tensor:
    """`weight` through bitsandbytes' NF4 quantisation and back (float32): its table and, with `double_quant`, its
    8-bit block scales."""
    return bnbf.dequantize_4bit(*nf4_quantize(weight, double_quant)).float()


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
        data, state = nf4_quantize(weight, double_quant)
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

    def dense_weight(self) -> Tensor:
        self.canonical()
        return bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).float()

    def weight_bytes(self) -> int:
        self.canonical()
        state = self.weight.quant_state
        nested = state.state2.absmax.nbytes + state.state2.code.nbytes if state.nested else 0
        return self.weight.data.nbytes + state.absmax.nbytes + nested

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.canonical()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        self.canonical()
        return super()._apply(fn, recurse)
