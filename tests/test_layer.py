import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune.method.layer import GaussianFactor, LlmmLinear


def make_layer(K=2, scale=400.0, rank=4, d_in=12, d_out=10, seed=0) -> LlmmLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = LlmmLinear(base, torch.randn(rank, d_in), torch.randn(d_out, rank), K, scale, 2.0, 0.0)
    with torch.no_grad():
        layer.A_moments.normal_()
        layer.B_moments.normal_()
    return layer


@pytest.mark.parametrize("draw", range(5))
def test_factor_gradient_is_sqrt_s_eps_times_mean_gradient(draw):
    torch.manual_seed(draw)
    K, s = 3, 250.0
    mean = torch.randn(4, 6, requires_grad=True)
    moments = torch.randn(K, 4, 6, requires_grad=True)
    eps = torch.randn(K) / math.sqrt(s)
    X = GaussianFactor.apply(mean, moments, eps, math.sqrt(s))
    assert torch.allclose(X, mean + torch.einsum("k,kij->ij", eps, moments))
    (X.sin() * torch.randn(4, 6)).sum().backward()
    for k in range(K):
        assert torch.allclose(moments.grad[k], math.sqrt(s) * eps[k] * mean.grad, atol=1e-6)
    # the plain reparameterisation gradient would be eps_k * g: the scaling really is applied
    assert not torch.allclose(moments.grad[0], eps[0] * mean.grad)


@pytest.mark.parametrize("draw", range(3))
def test_layer_moment_gradients_follow_the_draw(draw):
    layer = make_layer(K=2, scale=400.0).train()
    x = torch.randn(8, 12)
    torch.manual_seed(100 + draw)
    layer(x).pow(2).sum().backward()
    torch.manual_seed(100 + draw)  # the layer draws A's eps, then B's, from the global generator
    eps_A, eps_B = torch.randn(2) / 20.0, torch.randn(2) / 20.0
    for k in range(2):
        assert torch.allclose(layer.A_moments.grad[k], 20.0 * eps_A[k] * layer.A_mean.grad, atol=1e-5)
        assert torch.allclose(layer.B_moments.grad[k], 20.0 * eps_B[k] * layer.B_mean.grad, atol=1e-5)


class Wrapper(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def test_zero_moments_equal_peft_lora_on_the_mean():
    layer = make_layer(K=2)
    with torch.no_grad():
        layer.A_moments.zero_()
        layer.B_moments.zero_()
    layer.train()
    peft_model = get_peft_model(Wrapper(layer.base), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    lora = peft_model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.A_mean)
        lora.lora_B["default"].weight.copy_(layer.B_mean)
    x = torch.randn(6, 12)
    ours, theirs = layer(x), peft_model(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.allclose(layer.A_mean.grad, lora.lora_A["default"].weight.grad, atol=1e-5)
    assert torch.allclose(layer.B_mean.grad, lora.lora_B["default"].weight.grad, atol=1e-5)


def test_eval_is_deterministic_mean_and_training_samples():
    layer = make_layer(K=2, scale=4.0)
    x = torch.randn(3, 12)
    layer.eval()
    expected = layer.base(x) + 2.0 * x @ layer.A_mean.T @ layer.B_mean.T
    assert torch.equal(layer(x), layer(x))
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_monte_carlo_mode_averages_draws():
    layer = make_layer(K=2, scale=4.0).eval()
    x = torch.randn(3, 12)
    mean_output = layer(x)
    layer.sample_in_eval = True
    torch.manual_seed(0)
    draws = torch.stack([layer(x) for _ in range(2000)])
    assert not torch.allclose(draws[0], draws[1])
    # E[B A] = B_mean A_mean (independent zero-mean draws): the average is within 5 standard errors
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert torch.all((draws.mean(0) - mean_output).abs() < 5 * standard_error)
