"""The distributional LoRA layer (METHOD.md section 2).

Each factor X in {A, B} is a Gaussian measure: a mean plus K moment directions. In training, one
draw eps ~ N(0, I_K / s) per factor per forward (shared across the batch) gives
X = X_mean + sum_k eps_k X_moments[k]; the backward pass returns g to the mean and
sqrt(s) * eps_k * g to moment k (the scaled gradient). Evaluation uses the mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def extra_repr(self) -> str:
        r, K = self.A_mean.shape[0], self.A_moments.shape[0]
        return f"rank={r}, K={K}, scale={self.scale}, scaling={self.scaling}"
