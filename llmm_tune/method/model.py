"""Wrap any Hugging Face model with Llmm: find the target layers and swap them (`LlmmLinear` builds, merges
itself), save and load adapters, merge, predict, measure."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llmm_tune.files import atomic_path
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.layer import LlmmEmbedding, LlmmLinear
from llmm_tune.method.loftq import CACHE, LoftQStore, as_store
from llmm_tune.method.quant import weight_bytes

# LoftQ and MeMoTune adapt every linear layer of the transformer blocks; peft's defaults (query
# and value only) are the fallback for other architectures.
_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {
    "bert": ("query", "key", "value", "intermediate.dense", "output.dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "t5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
}
ADAPTER_FILE = "adapter.safetensors"


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    # peft's table of LoRA targets per architecture; importing peft takes seconds, which a search's driver (it loads
    # this module with a family's settings) does not spend
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = DEFAULT_TARGETS.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        model_type
    )
    if not targets:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; "
            "set LlmmConfig.target_modules to the names of the linear layers to adapt"
        )
    return tuple(targets)


def matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _in_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(part in heads for part in name.split("."))


def apply_llmm(model: nn.Module, config: LlmmConfig, init_device: str | None = None,
               loftq_cache: str | os.PathLike | LoftQStore | None = None) -> nn.Module:
    """Replace every target linear layer by a quantised base plus a distributional adapter (and, with
    `config.quantize_embeddings`, the input embeddings by a quantised table plus a low-rank adapter).

    Only adapter parameters and the modules named in `config.head_modules` stay trainable.
    `init_device` (e.g. "cuda") runs LoftQ's SVDs there while the model stays where it is. LoftQ
    initialisations are kept in this process's memory (`loftq.CACHE`) and, with `loftq_cache` (a local
    folder, or a `LoftQStore` such as `llmm_tune.tune.storage.Store(uri)` for any location), for later runs.
    """
    targets = config.target_modules or default_target_modules(model)
    model.requires_grad_(False)
    chosen = {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, targets)
        and not _in_head(name, config.head_modules)
    }
    if not chosen:
        raise ValueError(
            f"LlmmConfig.target_modules {list(targets)} match no linear layer of "
            f"{type(model).__name__}; pass suffixes of names listed by model.named_modules()"
        )
    if config.quantize_embeddings:
        chosen |= input_embeddings(model)
    store = as_store(loftq_cache)
    init = (CACHE.get({name: module.weight for name, module in chosen.items()}, config, init_device, store)
            if config.resolved_init == "loftq" else None)
    for name, module in chosen.items():
        loftq = init.layer(name, module.weight.shape) if init else None
        layer = LlmmEmbedding if isinstance(module, nn.Embedding) else LlmmLinear
        _replace(model, name, layer.wrap(module, config, loftq))
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in config.head_modules:
            module.requires_grad_(True)
    model.llmm_config = config
    return model


def input_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """The model's input embeddings by name, for `quantize_embeddings`; not when tied to the output layer, which
    would then keep the full-precision table while the input reads the quantised one."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is embedding.weight:
        raise ValueError(f"LlmmConfig.quantize_embeddings: {type(model).__name__} ties its input embeddings to its "
                         "output layer; set quantize_embeddings false for it")
    return {name: module for name, module in model.named_modules() if module is embedding}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def llmm_layers(model: nn.Module) -> dict[str, LlmmLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LlmmLinear)}


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter and head tensors: what training changes and an adapter file holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, directory: str | Path, tensors: dict[str, Tensor] | None = None) -> Path:
    """Write the trainable tensors (`tensors`, when gathered from shards) and the LlmmConfig to
    `directory/adapter.safetensors`."""
    config: LlmmConfig = model.llmm_config
    tensors = {name: t.contiguous().cpu() for name, t in (tensors or trainable_state(model)).items()}
    path = Path(directory) / ADAPTER_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"llmm_config": json.dumps(config.to_dict())})
    return path


def read_adapter_config(directory: str | Path) -> LlmmConfig:
    with safe_open(str(Path(directory) / ADAPTER_FILE), framework="pt") as f:
        return LlmmConfig.from_dict(json.loads(f.metadata()["llmm_config"]))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Copy a saved adapter into a model already wrapped with the same LlmmConfig."""
    saved = read_adapter_config(directory)
    if getattr(model, "llmm_config", None) != saved:
        raise ValueError(f"adapter in {directory} was saved with {saved}, the model has "
                         f"{getattr(model, 'llmm_config', None)}; wrap it with load_llmm instead")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in read_adapter_tensors(model, directory).items():
            params[key].copy_(tensor)
    return model


def read_adapter_tensors(model: nn.Module, directory: str | Path) -> dict[str, Tensor]:
    """The adapter tensors saved in `directory`, checked to be exactly the model's trainable ones, in the
    model's order (the same on every worker: a sharded load scatters them one by one)."""
    names = list(trainable_state(model))
    with safe_open(str(Path(directory) / ADAPTER_FILE), framework="pt") as f:
        keys, expected = set(f.keys()), set(names)
        if keys != expected:
            raise ValueError(f"adapter in {directory} does not fit the model: missing "
                             f"{sorted(expected - keys)[:3]}, unexpected {sorted(keys - expected)[:3]}")
        return {name: f.get_tensor(name) for name in names}


def load_llmm(model: nn.Module, directory: str | Path, init_device: str | None = None) -> nn.Module:
    """Wrap a freshly loaded pretrained model with the saved config, then load the adapter."""
    apply_llmm(model, read_adapter_config(directory), init_device)
    return load_adapter(model, directory)


def merge_llmm(model: nn.Module) -> nn.Module:
    """Replace each Llmm layer by a plain nn.Linear (nn.Embedding) with W = dequant(Q) + scaling B_mean A_mean."""
    return _unwrap(model, LlmmLinear.merged)


def dequantize_llmm(model: nn.Module) -> nn.Module:
    """Replace each Llmm layer by a plain nn.Linear holding its dequantised base weight (the adapter dropped)."""
    return _unwrap(model, LlmmLinear.dequantized)


def _unwrap(model: nn.Module, linear_of: Callable[[LlmmLinear], nn.Module]) -> nn.Module:
    for name, layer in llmm_layers(model).items():
        _replace(model, name, linear_of(layer))
    del model.llmm_config
    return model


@contextmanager
def adapter_noise(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Inside it every Llmm layer draws its factors in eval mode too, as in training (`LlmmLinear.sample_in_eval`).
    With `seed`, the draws come from the global generators (CPU and the model's GPU) seeded with it, and their
    state is restored after: the same samples at every entry, and a training run's random stream undisturbed."""
    layers = llmm_layers(model).values()
    parameter = next(model.parameters(), None)
    gpu = [parameter.device.index or 0] if parameter is not None and parameter.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu, enabled=seed is not None):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for index in gpu:
                torch.cuda.default_generators[index].manual_seed(seed)
        for layer in layers:
            layer.sample_in_eval = True
        try:
            yield
        finally:
            for layer in layers:
                layer.sample_in_eval = False


def mean_over_draws(model: nn.Module, draws: int, forward: Callable[[], Tensor], seed: int | None = None,
                    log_space: bool = False) -> Tensor:
    """The mean of `forward()` over `draws` samples of every adapter (`adapter_noise(model, seed)`). With
    `log_space`, `forward()` returns log-probabilities and the result is the log of the mean of their
    probabilities (summed by log-sum-exp: no probability underflows): the Monte-Carlo predictive distribution."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    with adapter_noise(model, seed):
        total = forward()
        for _ in range(draws - 1):
            total = torch.logaddexp(total, forward()) if log_space else total + forward()
    return total - math.log(draws) if log_space else total / draws


def draws_needed(model: nn.Module, draws: int) -> int:
    """`draws`, or 0 where no adapter has moment directions (K = 0: every sample is the mean adapter)."""
    return draws if any(layer.A_moments.shape[0] for layer in llmm_layers(model).values()) else 0


@torch.no_grad()
def predict_mc(model: nn.Module, draws: int, **inputs) -> Tensor:
    """Monte-Carlo prediction: the mean of the logits over `draws` samples of every adapter (from the global random
    stream; `mean_over_draws` with `log_space` averages probabilities instead)."""
    return mean_over_draws(model, draws, lambda: model(**inputs).logits)


def bytes_per_base_parameter(model: nn.Module) -> float:
    """Bytes the adapted layers' frozen base weights take per weight element (scales included)."""
    layers = llmm_layers(model).values()
    size = sum(weight_bytes(layer.base) for layer in layers)
    count = sum(layer.A_mean.shape[1] * layer.B_mean.shape[0] for layer in layers)
    return size / count
