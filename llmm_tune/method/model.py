"""Wrap any Hugging Face model with Llmm: inject, save, load, merge, predict, measure."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file
from torch import Tensor, nn

from llmm_tune.files import atomic_path
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.layer import LlmmLinear
from llmm_tune.method.quant import (
    LoftQResult,
    cached_loftq,
    dense_weight,
    dequantize,
    pack,
    quantize,
    quantized_linear,
    unpack,
    weight_bytes,
)
from llmm_tune.tune import storage

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


def _build_layer(linear: nn.Linear, config: LlmmConfig, init: LoftQResult | None) -> LlmmLinear:
    weight, bias = linear.weight, linear.bias
    if init is not None:
        base = quantized_linear(init.to_quantize.to(weight.device), bias, config.bits, config.quant_method,
                                config.double_quant)
        A, B = init.A.to(weight.device), init.B.to(weight.device)
    else:  # plain LoRA init (QLoRA, LoRA): A as peft's kaiming-uniform default, B = 0
        base = linear if config.bits is None else quantized_linear(weight, bias, config.bits,
                                                                   config.quant_method, config.double_quant)
        A = nn.init.kaiming_uniform_(weight.new_empty(config.rank, weight.shape[1]), a=math.sqrt(5))
        B = weight.new_zeros(weight.shape[0], config.rank)
    return LlmmLinear(base.requires_grad_(False), A, B, config.K, config.scale, config.scaling,
                      config.dropout)


class LoftQStore:
    """LoftQ initialisations of a model's layers, kept in `cache` (a folder or URI) when given: the
    initialisation of a large model takes minutes, and every trial of a search with the same weights
    and settings needs the same one. A stored layer is its quantised residual (packed codes and
    scales) and its two factors, so rebuilding the layer is exact and cheap."""

    def __init__(self, model: nn.Module, names: list[str], config: LlmmConfig, init_device: str | None,
                 cache: str | None):
        self.config, self.init_device, self.path = config, init_device, None
        self.stored: dict[str, Tensor] = {}
        self.computed: dict[str, Tensor] = {}
        if cache is not None:
            key = hashlib.blake2b(json.dumps([config.rank, config.bits, config.quant_method, config.loftq_iters,
                                              config.scaling, config.double_quant]).encode(), digest_size=16)
            for name in names:
                weight = model.get_submodule(name).weight
                key.update(f"{name}{tuple(weight.shape)}".encode())
                key.update(weight.detach().float().cpu().numpy().tobytes())
            self.path = storage.join(cache, f"loftq-{key.hexdigest()}.safetensors")
            if storage.exists(self.path):
                self.stored = load_tensors(storage.read_bytes(self.path))

    def init(self, name: str, weight: Tensor) -> LoftQResult:
        c = self.config
        if self.stored:
            s = self.stored
            residual = dequantize(unpack(s[f"{name}.codes"], c.bits), s[f"{name}.absmax"], c.bits, c.quant_method,
                                  weight.shape)
            return LoftQResult(residual, s[f"{name}.A"], s[f"{name}.B"], [])
        result = cached_loftq(weight.to(self.init_device or weight.device), c.rank, c.bits, c.quant_method,
                              c.loftq_iters, c.scaling, c.double_quant)
        if self.path is not None:
            codes, absmax = quantize(result.to_quantize, c.bits, c.quant_method)
            self.computed |= {f"{name}.codes": pack(codes, c.bits).cpu(), f"{name}.absmax": absmax.cpu(),
                              f"{name}.A": result.A.contiguous().cpu(), f"{name}.B": result.B.contiguous().cpu()}
        return result

    def save(self) -> None:
        if self.computed:
            storage.write_bytes(self.path, save_tensors(self.computed))


def apply_llmm(model: nn.Module, config: LlmmConfig, init_device: str | None = None,
               loftq_cache: str | None = None) -> nn.Module:
    """Replace every target linear layer by a quantised base plus a distributional adapter.

    Only adapter parameters and the modules named in `config.head_modules` stay trainable.
    `init_device` (e.g. "cuda") runs LoftQ's SVDs there while the model stays where it is;
    `loftq_cache` (a folder or URI) keeps the LoftQ initialisation for later runs (`LoftQStore`).
    """
    targets = config.target_modules or default_target_modules(model)
    model.requires_grad_(False)
    chosen = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, targets)
        and not _in_head(name, config.head_modules)
    ]
    if not chosen:
        raise ValueError(
            f"LlmmConfig.target_modules {list(targets)} match no linear layer of "
            f"{type(model).__name__}; pass suffixes of names listed by model.named_modules()"
        )
    store = LoftQStore(model, chosen, config, init_device, loftq_cache) if config.resolved_init == "loftq" else None
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        init = store.init(name, linear.weight) if store else None
        setattr(parent, child, _build_layer(linear, config, init))
    if store:
        store.save()
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in config.head_modules:
            module.requires_grad_(True)
    model.llmm_config = config
    return model


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
    """Replace each Llmm layer by a plain nn.Linear with W = dequant(Q) + scaling B_mean A_mean."""
    return _to_linear(model, lambda layer: dense_weight(layer.base) + layer.scaling * layer.B_mean @ layer.A_mean)


def dequantize_llmm(model: nn.Module) -> nn.Module:
    """Replace each Llmm layer by a plain nn.Linear holding its dequantised base weight (the adapter dropped)."""
    return _to_linear(model, lambda layer: dense_weight(layer.base))


@torch.no_grad()
def _to_linear(model: nn.Module, weight_of) -> nn.Module:
    for name, layer in llmm_layers(model).items():
        weight = weight_of(layer)
        bias = layer.base.bias
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                           device=weight.device)
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged.requires_grad_(False))
    del model.llmm_config
    return model


@torch.no_grad()
def predict_mc(model: nn.Module, draws: int, **inputs) -> Tensor:
    """Monte-Carlo prediction: the mean of the logits over `draws` samples of every adapter."""
    layers = llmm_layers(model).values()
    for layer in layers:
        layer.sample_in_eval = True
    try:
        return torch.stack([model(**inputs).logits for _ in range(draws)]).mean(dim=0)
    finally:
        for layer in layers:
            layer.sample_in_eval = False


def bytes_per_base_parameter(model: nn.Module) -> float:
    """Bytes the adapted layers' frozen base weights take per weight element (scales included)."""
    layers = llmm_layers(model).values()
    size = sum(weight_bytes(layer.base) for layer in layers)
    count = sum(layer.A_mean.shape[1] * layer.B_mean.shape[0] for layer in layers)
    return size / count
