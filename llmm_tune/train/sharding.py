"""FSDP for a multi-worker trial (`search --fsdp`): each worker stores 1/W of every weight of the model, the
quantised codes included, and gathers a block's weights only while the block runs (FSDP2's `fully_shard`, on
gloo for CPU as on nccl for GPU). A model whose 4-bit base does not fit one device then trains on several.

Checkpoints stay in the unsharded format (`llmm_tune.train.checkpoint`): the adapter and the optimizer state are
gathered to whole tensors when saved and scattered when loaded (torch.distributed.checkpoint's state-dict
API), so a trial saved sharded resumes unsharded and the other way round, and `score` reads it as any other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from llmm_tune.method.model import trainable_state
from llmm_tune.method.quant import PackedLinear

WHOLE = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)  # trainable tensors, gathered


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model` in place: each repeated block (a transformer layer) as one unit, the rest as another."""
    for module in model.modules():
        if isinstance(module, PackedLinear):  # FSDP shards parameters only: hold the codes as frozen ones
            for name in ("packed", "absmax", "bias"):
                tensor = module._buffers.pop(name)
                module.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
    for block in repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of the model's largest ModuleList by parameter count: its transformer layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def trainable_names(model: nn.Module) -> list[str]:
    """In the order the optimizer holds them (the unsharded state dict's indices)."""
    return list(trainable_state(model))


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def stored_bytes(model: nn.Module) -> int:
    """What this worker stores of the model's parameters and buffers (its shards, when sharded)."""
    tensors = [*model.parameters(), *model.buffers()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)  # not the storage: FSDP keeps a group's shards in one


def whole_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The trainable tensors by name and the optimizer's state dict, whole, in the unsharded form (state keyed
    by the index of the parameter among the trainable ones, as `optimizer.state_dict()` keys it). A
    collective: every worker calls it."""
    adapter, optimizer_state = get_state_dict(model, optimizer, options=WHOLE)
    index = {name: i for i, name in enumerate(trainable_names(model))}
    return adapter, {"state": {index[name]: state for name, state in optimizer_state["state"].items()},
                     "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                      for group in optimizer_state["param_groups"]]}


def load_whole_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, adapter: dict,
                              optimizer_state: dict) -> None:
    """Scatter what `whole_training_state` gathered (or an unsharded run saved) into the sharded model and its
    optimizer. A collective."""
    names = trainable_names(model)
    if set(adapter) != set(names):
        raise ValueError(f"the saved adapter does not fit the model: missing {sorted(set(names) - set(adapter))[:3]}, "
                         f"unexpected {sorted(set(adapter) - set(names))[:3]}")
    by_name = {"state": {names[i]: state for i, state in optimizer_state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=adapter, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True, strict=False))
