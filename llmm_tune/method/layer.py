"""The distributional LoRA layer (METHOD.md section 2).

Each factor X in {A, B} is a Gaussian measure: a mean plus K moment directions. In training, one
draw eps ~ N(0, I_K / s) per factor per forward (shared across the batch) gives
X = X_mean + sum_k eps_k X_moments[k]; the backward pass returns g to the mean and
sqrt(s) * eps_k * g to moment k (the scaled gradient). Evaluation uses the mean.

Like peft's lora.Linear, the layer owns its life: its initialisation (LoftQ or plain LoRA), its delta
weight, and its merge into a plain linear layer; the model only finds targets and swaps layers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.loftq import LoftQResult
from llmm_tune.method.quant import dense_weight, quantized_linear


class GaussianFactor(torch.autograd.Function):
    """X = mean + sum_k eps_k moments[k], with the scaled gradient sqrt(s) * eps_k * g for moment k."""

    @staticmethod
    def forward(ctx, mean: Tensor, moments: Tensor, eps: Tensor, sqrt_scale: float) -> Tensor:
        ctx.save_for_backward(eps)
        ctx.sqrt_scale = sqrt_scale
        return mean + torch.tensordot(eps, moments, dims=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (eps,) = ctx.saved_tensors
        moment_weights = (ctx.sqrt_scale * eps).view(-1, *([1] * grad.dim()))
        return grad, moment_weights * grad, None, None


class LlmmLinear(nn.Module):
    """y = base(x) + scaling * B (A dropout(x)), with A and B drawn from their Gaussian measures."""

    def __init__(self, base: nn.Module, A: Tensor, B: Tensor, K: int, scale: float, scaling: float,
                 dropout: float):
        super().__init__()
        self.base = base
        # contiguous whatever the initialiser's strides (an SVD slice is not): the float summation order of
        # every matmul then depends only on the values, so a run resumed from saved tensors stays bit-identical
        self.A_mean = nn.Parameter(A.float().clone(memory_format=torch.contiguous_format))
        self.B_mean = nn.Parameter(B.float().clone(memory_format=torch.contiguous_format))
        self.A_moments = nn.Parameter(A.new_zeros(K, *A.shape, dtype=torch.float32))
        self.B_moments = nn.Parameter(B.new_zeros(K, *B.shape, dtype=torch.float32))
        self.scale, self.scaling = scale, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sample_in_eval = False  # Monte-Carlo prediction: draw even in eval mode

    @classmethod
    def wrap(cls, linear: nn.Module, config: LlmmConfig, loftq: LoftQResult | None = None) -> LlmmLinear:
        """`linear` adapted under `config`: with `loftq`, its base quantises LoftQ's residual and the factors
        start at LoftQ's; without, the base is `linear` quantised (or kept, bits None) and the factors start as
        plain LoRA's (A as peft's kaiming-uniform default, B = 0), as QLoRA and LoRA do."""
        weight, bias = linear.weight, getattr(linear, "bias", None)
        if loftq is not None:
            base = quantized_linear(loftq.to_quantize.to(weight.device), bias, config.bits, config.quant_method,
                                    config.double_quant)
            A, B = loftq.A.to(weight.device), loftq.B.to(weight.device)
        else:
            base = linear if config.bits is None else quantized_linear(weight, bias, config.bits,
                                                                       config.quant_method, config.double_quant)
            A = nn.init.kaiming_uniform_(weight.new_empty(config.rank, weight.shape[1]), a=math.sqrt(5))
            B = weight.new_zeros(weight.shape[0], config.rank)
        return cls(base.requires_grad_(False), A, B, config.K, config.scale, config.scaling, config.dropout)

    def draw(self, mean: Tensor, moments: Tensor) -> Tensor:
        if moments.shape[0] == 0 or not (self.training or self.sample_in_eval):
            return mean
        eps = torch.randn(moments.shape[0], device=mean.device) / math.sqrt(self.scale)
        return GaussianFactor.apply(mean, moments, eps, math.sqrt(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        A = self.draw(self.A_mean, self.A_moments)
        B = self.draw(self.B_mean, self.B_moments)
        update = F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """What the adapter adds to the base weight in eval mode (the means): scaling * B_mean A_mean."""
        return self.scaling * self.B_mean @ self.A_mean

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain frozen layer with W = dequant(Q) + scaling B_mean A_mean (METHOD.md section 2)."""
        return self._plain(dense_weight(self.base) + self.delta_weight())

    @torch.no_grad()
    def dequantized(self) -> nn.Module:
        """A plain frozen layer holding the dequantised base weight alone (the adapter dropped)."""
        return self._plain(dense_weight(self.base))

    @torch.no_grad()
    def _plain(self, weight: Tensor) -> nn.Linear:
        bias = self.base.bias
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        r, K = self.A_mean.shape[0], self.A_moments.shape[0]
        return f"rank={r}, K={K}, scale={self.scale}, scaling={self.scaling}"


class LlmmEmbedding(LlmmLinear):
    """The input embeddings as the release quantises them (`--quant_embedding`, METHOD.md section 5): the table W
    (vocabulary x dim) LoftQ-quantised like a linear layer's weight, plus a plain low-rank adapter (the means, no
    moments): E(ids) = Q[ids] + scaling * B[ids] A, B vocabulary x r, A r x dim. peft's lora.Embedding holds the
    same adapter transposed: lora_embedding_A = B^T, lora_embedding_B = A^T."""

    @classmethod
    def wrap(cls, embedding: nn.Embedding, config: LlmmConfig, loftq: LoftQResult | None = None) -> LlmmEmbedding:
        layer = super().wrap(embedding, dataclasses.replace(config, K=0), loftq)
        layer.padding_idx, layer.out_dtype = embedding.padding_idx, embedding.weight.dtype
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, dense_weight(self.base), self.padding_idx)
        update = F.embedding(ids, self.B_mean, self.padding_idx) @ self.A_mean
        return (rows + self.scaling * update).to(self.out_dtype)

    @torch.no_grad()
    def _plain(self, weight: Tensor) -> nn.Embedding:
        embedding = nn.Embedding(*weight.shape, padding_idx=self.padding_idx, device=weight.device,
                                 dtype=self.out_dtype)
        embedding.weight.copy_(weight)
        return embedding.requires_grad_(False)
