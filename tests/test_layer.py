import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmm_tune.method.config import LlmmConfig, llmm_config
from llmm_tune.method.layer import GaussianFactors, LlmmLinear
from llmm_tune.method.quant import quantized_linear

# torch.manual_seed(100), then torch.randn(2) twice: the eps of A and of B (times sqrt(s)) that the layer drew for
# that seed when it drew them in two calls; one call of 2K values must give the same
SAVED_DRAWS_SEED_100 = ([0.36065590381622314, -0.2859211564064026], [-0.39381808042526245, 0.24293792247772217])


def make_layer(K=2, scale=400.0, rank=4, d_in=12, d_out=10, seed=0, base="fp32", **options) -> LlmmLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out).requires_grad_(False)
    if base == "nf4":
        linear = quantized_linear(linear.weight * 0.1, linear.bias, 4, "normal_float")
    layer = LlmmLinear(linear, torch.randn(rank, d_in), torch.randn(d_out, rank), K, scale, 2.0,
                       options.pop("dropout", 0.0), **options)
    with torch.no_grad():
        layer.A_moments.normal_()
        layer.B_moments.normal_()
    return layer


def grads(layer: LlmmLinear, x: torch.Tensor) -> list[torch.Tensor | None]:
    return [x.grad, layer.A_mean.grad, layer.A_moments.grad, layer.B_mean.grad, layer.B_moments.grad]


@pytest.mark.parametrize("K", [1, 2, 3])
def test_drawn_factors_and_their_scaled_gradients(K):
    torch.manual_seed(K)
    s = 250.0
    means = [torch.randn(4, 6, requires_grad=True), torch.randn(5, 4, requires_grad=True)]
    moments = [torch.randn(K, 4, 6, requires_grad=True), torch.randn(K, 5, 4, requires_grad=True)]
    eps = torch.randn(2 * K) / math.sqrt(s)
    A, B = GaussianFactors.apply(means[0], moments[0], means[1], moments[1], eps, math.sqrt(s))
    for X, mean, moment, e in zip((A, B), means, moments, (eps[:K], eps[K:])):
        assert torch.allclose(X, mean + torch.einsum("k,kij->ij", e, moment), atol=1e-6)
    ((A.sin() * torch.randn(4, 6)).sum() + (B.cos() * torch.randn(5, 4)).sum()).backward()
    for mean, moment, e in zip(means, moments, (eps[:K], eps[K:])):
        for k in range(K):  # the scaled gradient, sqrt(s) * eps_k * g, exactly as METHOD.md defines it
            assert torch.allclose(moment.grad[k], math.sqrt(s) * e[k] * mean.grad, atol=1e-6)
        # the plain reparameterisation gradient would be eps_k * g: the scaling really is applied
        assert not torch.allclose(moment.grad[0], e[0] * mean.grad)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
@pytest.mark.parametrize("K", [0, 1, 2])
def test_forward_and_gradients_equal_the_reference_formula(K, base):
    """y = base(x) + c x A^T B^T with X = X_mean + eps_X . X_moments, eps drawn as the layer always drew them (A's,
    then B's, from the global generator); gradients: x's and the means' by autograd of that formula, moment k's
    sqrt(s) eps_k times its mean's. Tolerance: 1e-5 relative to the largest entry (float32 re-association)."""
    layer, s = make_layer(K=K, base=base).train(), 400.0
    x = torch.randn(3, 5, 12, requires_grad=True)
    weights = torch.randn(3, 5, 10)
    torch.manual_seed(100)
    y = layer(x)
    (y * weights).sum().backward()
    torch.manual_seed(100)
    eps_A, eps_B = torch.randn(K) / math.sqrt(s), torch.randn(K) / math.sqrt(s)
    A = (layer.A_mean + torch.einsum("k,kij->ij", eps_A, layer.A_moments)).detach().requires_grad_()
    B = (layer.B_mean + torch.einsum("k,kij->ij", eps_B, layer.B_moments)).detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected_y = layer.base(x_ref) + layer.scaling * (x_ref @ A.T) @ B.T
    (expected_y * weights).sum().backward()
    expected = [x_ref.grad, A.grad, math.sqrt(s) * eps_A.view(-1, 1, 1) * A.grad, B.grad,
                math.sqrt(s) * eps_B.view(-1, 1, 1) * B.grad]
    for got, want in zip([y, *grads(layer, x)], [expected_y, *expected]):
        if K == 0 and want.numel() == 0:
            assert got is None  # no moments, no gradient for them
            continue
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


def test_the_draws_for_a_seed_are_the_saved_sequence():
    layer, x = make_layer(K=2, scale=400.0).train(), torch.randn(8, 12)
    torch.manual_seed(100)
    layer(x).pow(2).sum().backward()
    for moments, mean, saved in [(layer.A_moments, layer.A_mean, SAVED_DRAWS_SEED_100[0]),
                                 (layer.B_moments, layer.B_mean, SAVED_DRAWS_SEED_100[1])]:
        for k in range(2):  # sqrt(s) * eps_k = the standard normal drawn
            assert torch.allclose(moments.grad[k], saved[k] * mean.grad, rtol=1e-5, atol=1e-5)


def test_the_base_output_is_left_alone_when_it_is_a_view():
    """The adapter's sum goes into the base's output in place only where that output is its own tensor."""

    class Keeping(nn.Linear):
        def forward(self, x):
            self.kept = super().forward(x)
            return self.kept[:, :]  # a view of what the base keeps

    layer = LlmmLinear(Keeping(12, 10).requires_grad_(False), torch.randn(4, 12), torch.randn(10, 4), 1, 100.0,
                       2.0, 0.0).eval()
    x = torch.randn(6, 12)
    y = layer(x)
    assert torch.equal(layer.base.kept, layer.base.forward(x))  # unchanged
    assert torch.allclose(y, layer.base.kept + 2.0 * x @ layer.A_mean.T @ layer.B_mean.T, atol=1e-5)


def test_dropout_is_no_module_call_at_zero_and_drops_above():
    plain = make_layer(K=0)
    assert list(plain.children()) == [plain.base]  # p = 0: nothing but the base
    layer = make_layer(K=0, dropout=0.5).train()
    x = torch.randn(4, 12)
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.allclose(first, layer(x))  # the masks differ
    torch.manual_seed(0)
    mask = nn.functional.dropout(torch.ones(4, 12), 0.5)
    expected = layer.base(x) + 2.0 * (x * mask) @ layer.A_mean.T @ layer.B_mean.T
    assert torch.allclose(first, expected, atol=1e-5)


def compiler_or_skip() -> None:
    """Skip only where torch.compile has no C++ compiler to build its CPU kernels with."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        pytest.skip(f"torch.compile cannot build CPU kernels here: {error}")


@pytest.mark.parametrize("K", [1, 2])
def test_the_compiled_adapter_equals_the_eager_one(K):
    """Outputs and every gradient, in training (drawn factors) and in evaluation (the means), within 1e-5 of the
    largest entry (the compiled graph may fuse and re-associate float32 operations), on layers of three shapes that
    share one compiled graph or two (its sizes are symbolic): not a graph per shape."""
    compiler_or_skip()
    import torch._dynamo

    torch._dynamo.reset()
    for d_in, d_out in [(12, 10), (20, 7), (9, 30)]:
        eager, compiled = (make_layer(K=K, d_in=d_in, d_out=d_out, compile=c) for c in (False, True))
        for train in (True, False):
            results = []
            for layer in (eager, compiled):
                layer.train(train)
                for p in layer.parameters():
                    p.grad = None
                x = torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
                torch.manual_seed(5)
                layer(x).pow(2).sum().backward()
                torch.manual_seed(5)
                results.append([layer(x), *grads(layer, x)])
            for got, want in zip(results[1], results[0]):
                assert (got is None) == (want is None)
                if want is not None:
                    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    counters = torch._dynamo.utils.counters
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]


def test_compile_is_a_validated_setting_that_reaches_every_layer():
    with pytest.raises(ValueError, match="LlmmConfig.compile must be true or false"):
        LlmmConfig(compile="yes")
    trial = {"rank": 4, "K": 1, "bits": None, "alpha": 8, "scale": 10.0, "quant_method": None, "loftq_iters": 1,
             "dropout": 0.0, "init": None}
    assert not llmm_config(trial).compile and llmm_config({**trial, "compile": True}).compile
    layer = LlmmLinear.wrap(nn.Linear(12, 10), LlmmConfig(rank=4, bits=None, compile=True))
    assert layer.compile_adapter and "compile=True" in repr(layer)


@pytest.mark.parametrize("draw", range(3))
def test_layer_moment_gradients_follow_the_draw(draw):
    layer = make_layer(K=2, scale=400.0).train()
    x = torch.randn(8, 12)
    torch.manual_seed(100 + draw)
    layer(x).pow(2).sum().backward()
    torch.manual_seed(100 + draw)  # the layer draws A's eps, then B's, in one call to the global generator
    eps_A, eps_B = torch.randn(4).split(2)
    for k in range(2):
        assert torch.allclose(layer.A_moments.grad[k], eps_A[k] * layer.A_mean.grad, atol=1e-5)
        assert torch.allclose(layer.B_moments.grad[k], eps_B[k] * layer.B_mean.grad, atol=1e-5)


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
