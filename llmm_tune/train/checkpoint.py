"""A trial's full training state in safetensors (tensors) plus JSON metadata (scalars): the adapter,
the optimizer and scheduler, the random-number state and progress (whole tensors, also for a sharded
model: `llmm_tune.train.sharding`). Nothing is unpickled, so a results directory from elsewhere cannot run code
when a run resumes or is exported."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmm_tune.files import atomic_path
from llmm_tune.method.model import load_adapter, read_adapter_tensors, save_adapter
from llmm_tune.train.sharding import is_sharded, load_whole_training_state, whole_training_state

STATE_FILE = "training_state.safetensors"


def save_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, progress: dict,
                        rng_states: list[torch.Tensor] | None = None) -> None:
    """`rng_states`: the random state of each worker of a data-parallel trial (default: this process's)."""
    if is_sharded(model):
        adapter, optimizer_state = whole_training_state(model, optimizer)
    else:
        adapter, optimizer_state = None, optimizer.state_dict()
    save_adapter(model, directory, adapter)
    states = rng_states or [torch.get_rng_state()]
    tensors = {rng_key(rank): state for rank, state in enumerate(states)}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    metadata = {
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
        "progress": json.dumps(progress),
    }
    with atomic_path(Path(directory) / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def rng_key(rank: int) -> str:
    return "rng.torch" if rank == 0 else f"rng.torch.{rank}"


def load_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0) -> dict:
    """Restore everything `save_training_state` wrote (worker `rank`'s random state); returns the progress
    record."""
    state: dict[int, dict] = {}
    with safe_open(str(Path(directory) / STATE_FILE), framework="pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = f.get_tensor(name)
        torch.set_rng_state(f.get_tensor(rng_key(rank) if rng_key(rank) in f.keys() else rng_key(0)))
    optimizer_state = {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    if is_sharded(model):
        load_whole_training_state(model, optimizer, read_adapter_tensors(model, directory), optimizer_state)
    else:
        load_adapter(model, directory)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    return json.loads(metadata["progress"])
