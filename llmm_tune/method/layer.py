"""The distributional LoRA layer (METHOD.md section 2).

Each factor X in {A, B} is a Gaussian measure: a mean plus K moment directions. In training, one
draw eps ~ N(0, I_K / s) per factor per forward (shared across the batch) gives
X = X_mean + sum_k eps_k X_moments[k]; the backward pass returns g to the mean and
sqrt(s) * eps_k * g to moment k (the scaled gradient). Evaluation uses the mean.

A forward draws both factors' eps in one call, forms each drawn factor in one matrix-vector product and adds
the adapter's output into the base's in the second factor's matmul (`addmm`, its scaling as the matmul's alpha):
per layer, the same large kernels as peft's LoRA and none of its passes over the output for the scaling and the
sum. `compile` runs that adapter computation (not the base) through torch.compile.

Like peft's lora.Linear, the layer owns its life: its initialisation (LoftQ or plain LoRA), its delta
weight, and its merge into a plain linear layer; the model only finds targets and swaps layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.loftq import LoftQResult
from llmm_tune.method.quant import dense_weight, quantized_linear


class GaussianFactors(torch.autograd.Function):
    """(A, B), each X = X_mean + sum_k eps_k X_moments[k] (A's eps first in `eps`), with the scaled gradient:
    g to the mean, sqrt(s) * eps_k * g to moment k."""

    @staticmethod
    def forward(ctx, A_mean: Tensor, A_moments: Tensor, B_mean: Tensor, B_moments: Tensor, eps: Tensor,
                sqrt_scale: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(eps)
        ctx.sqrt_scale = sqrt_scale
        K = A_moments.shape[0]
        return drawn(A_mean, A_moments, eps[:K]), drawn(B_mean, B_moments, eps[K:])

    @staticmethod
    def backward(ctx, grad_A: Tensor, grad_B: Tensor) -> tuple[Tensor | None, ...]:
        (eps,) = ctx.saved_tensors
        weights = ctx.sqrt_scale * eps
        K = eps.shape[0] // 2
        return grad_A, moment_grads(weights[:K], grad_A), grad_B, moment_grads(weights[K:], grad_B), None, None


def drawn(mean: Tensor, moments: Tensor, eps: Tensor) -> Tensor:
    """mean + sum_k eps_k moments[k], one matrix-vector product."""
    return torch.addmv(mean.reshape(-1), moments.reshape(eps.shape[0], -1).t(), eps).view(mean.shape)


def moment_grads(weights: Tensor, grad: Tensor) -> Tensor:
    """weights[k] * grad for every k (K x grad's shape), one multiplication."""
    return (weights.view(-1, 1) * grad.reshape(1, -1)).view(weights.shape[0], *grad.shape)


def adapter_inputs(x: Tensor, A_mean: Tensor, A_moments: Tensor, B_mean: Tensor, B_moments: Tensor,
                   eps: Tensor | None, sqrt_scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x A^T, B^T) in `dtype` for 2-d `x` (N x d_in), A and B drawn with `eps` (None: the means): what the layer
    adds to the base's output, scaling * (x A^T) B^T, is one matmul of these. The small factors are cast, not x."""
    if eps is None:
        A, B = A_mean, B_mean
    else:
        A, B = GaussianFactors.apply(A_mean, A_moments, B_mean, B_moments, eps, sqrt_scale)
    return F.linear(x.to(dtype), A.to(dtype)).to(dtype), B.to(dtype).t()  # the last cast: autocast's output


@functools.cache
def compiled_adapter_inputs() -> Callable[..., tuple[Tensor, Tensor]]:
    """`adapter_inputs` through torch.compile with every size symbolic, made on first use (importing the compiler
    takes seconds). It takes the parameters as plain views: torch.compile holds a parameter's sizes fixed, so each
    shape of layer would be a graph of its own, and a model of many shapes would reach its recompile limit."""
    compiled = torch.compile(adapter_inputs, dynamic=True)

    def call(x: Tensor, *parameters_and_draw) -> tuple[Tensor, Tensor]:
        *parameters, eps, sqrt_scale, dtype = parameters_and_draw
        return compiled(x, *(p.view_as(p) for p in parameters), eps, sqrt_scale, dtype)

    return call


class LlmmLinear(nn.Module):
    """y = base(x) + scaling * B (A dropout(x)), with A and B drawn from their Gaussian measures."""

    def __init__(self, base: nn.Module, A: Tensor, B: Tensor, K: int, scale: float, scaling: float,
                 dropout: float, compile: bool = False):
        super().__init__()
        self.base = base
        # contiguous whatever the initialiser's strides (an SVD slice is not): the float summation order of
        # every matmul then depends only on the values, so a run resumed from saved tensors stays bit-identical
        self.A_mean = nn.Parameter(A.float().clone(memory_format=torch.contiguous_format))
        self.B_mean = nn.Parameter(B.float().clone(memory_format=torch.contiguous_format))
        self.A_moments = nn.Parameter(A.new_zeros(K, *A.shape, dtype=torch.float32))
        self.B_moments = nn.Parameter(B.new_zeros(K, *B.shape, dtype=torch.float32))
        self.scale, self.scaling = scale, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # None: no call at all at p = 0
        self.compile_adapter = compile  # the adapter computation through torch.compile (not nn.Module.compile)
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
        return cls(base.requires_grad_(False), A, B, config.K, config.scale, config.scaling, config.dropout,
                   config.compile)

    def noise(self) -> Tensor | None:
        """This forward's eps for A then B (2K values, one call to the global generator), or None: the means."""
        K = self.A_moments.shape[0]
        if K == 0 or not (self.training or self.sample_in_eval):
            return None
        return torch.randn(2 * K, device=self.A_mean.device) / math.sqrt(self.scale)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = self.base(rows)
        adapted = self.dropout(rows) if self.dropout is not None else rows
        eps = self.noise()
        # compiled only where the factors are drawn: the means alone are two matmuls, with nothing to fuse
        inputs = compiled_adapter_inputs() if self.compile_adapter and eps is not None else adapter_inputs
        hidden, B_t = inputs(adapted, self.A_mean, self.A_moments, self.B_mean, self.B_moments, eps,
                             math.sqrt(self.scale), out.dtype)
        # the sum inside the second matmul, written into the base's fresh output: a linear layer's backward does not
        # keep its output (autograd would refuse the write if one did); out of place where the base returned a view
        add = torch.addmm if out._base is not None else Tensor.addmm_
        out = add(out, hidden, B_t, alpha=self.scaling)
        return out.reshape(*x.shape[:-1], out.shape[-1])

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
        return f"rank={r}, K={K}, scale={self.scale}, scaling={self.scaling}, compile={self.compile_adapter}"


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
