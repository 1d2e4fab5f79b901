"""LoftQ initialisation (METHOD.md section 1) and the one cache that keeps it.

Initialising a large model takes minutes and every trial of a search with the same weights and settings
needs the same initialisation, so `LoftQCache` keeps a model's initialisation in memory (least recently
used entries dropped beyond a byte budget; the process-wide `CACHE` serves the next trial a reused worker
runs) and, when given a `LoftQStore`, in a persistent store that other processes read. Every path gives
the same layer: an entry holds what a store holds (each layer's residual as packed codes and block scales,
and its two factors), and a fresh computation is rebuilt from that form too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from llmm_tune.files import atomic_path
from llmm_tune.method.config import LlmmConfig
from llmm_tune.method.quant import dequantize, pack, quantize, stored_values, unpack


@dataclass
class LoftQResult:
    """The residual to quantise for storage, LoRA factors (already divided by sqrt(scaling)), and
    the error ||W - (Q + scaling B A)||_F of the kept iterate after each iteration."""

    to_quantize: Tensor
    A: Tensor
    B: Tensor
    errors: list[float]


def loftq(weight: Tensor, rank: int, bits: int, method: str, iters: int, scaling: float,
          double_quant: bool = False) -> LoftQResult:
    """LoftQ: alternate block quantisation of W - scaling B A (exactly as the base layer will store it) and
    a rank-r SVD of W - Q.

    Absmax requantisation is not an exact projection, so the raw error can rise after a few
    iterations (seen at 2 bits); the best iterate is kept, so the returned error never increases.
    """
    W = weight.detach().float()
    A = W.new_zeros(rank, W.shape[1])
    B = W.new_zeros(W.shape[0], rank)
    best = LoftQResult(W, A, B, [])
    for _ in range(iters):
        residual = W - scaling * B @ A
        Q = stored_values(residual, bits, method, double_quant)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:rank].sqrt() / math.sqrt(scaling)  # W - Q ~ scaling * B A
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
        error = torch.linalg.norm(W - Q - scaling * B @ A).item()
        if not best.errors or error < best.errors[-1]:
            best = LoftQResult(residual, A, B, best.errors + [error])
        else:
            best.errors.append(best.errors[-1])
    return best


@runtime_checkable
class LoftQStore(Protocol):
    """Where initialisations outlive the process: named byte strings (`tune.storage.Store` for any URI)."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...


@dataclass(frozen=True)
class FolderStore:
    """A LoftQStore in a local folder; a write is atomic, so a concurrent reader never sees half a file."""

    path: Path

    def read(self, name: str) -> bytes | None:
        file = Path(self.path, name)
        return file.read_bytes() if file.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        with atomic_path(Path(self.path, name)) as tmp:
            tmp.write_bytes(data)


def as_store(cache: str | os.PathLike | LoftQStore | None) -> LoftQStore | None:
    """The store `apply_llmm`'s `loftq_cache` names: None, a local folder, or a LoftQStore."""
    if cache is None or isinstance(cache, LoftQStore):
        return cache
    location = os.fspath(cache)
    if "://" in location:
        raise ValueError(f"loftq_cache {location!r} is a URI; this package reads local folders only: pass a store "
                         f"for it instead, llmm_tune.tune.storage.Store({location!r})")
    return FolderStore(Path(location))


@dataclass(frozen=True)
class LoftQInit:
    """A model's LoftQ initialisation in its stored form: per layer `<name>.codes` (packed), `.absmax`, `.A`, `.B`;
    and, where this process computed it without a store to read it back from, each layer's float residual.

    The float residual and the one dequantised from its codes quantise to the same base but for a handful of
    weights at a rounding threshold of bitsandbytes' NF4 (2 of 21M in MiniLM): a run builds from the float
    residual when it computed it, as it always did, so that searches and reproductions keep their numbers."""

    tensors: dict[str, Tensor]
    bits: int
    method: str
    residuals: dict[str, Tensor] | None = None

    def layer(self, name: str, shape: torch.Size) -> LoftQResult:
        """Layer `name`'s residual (as computed, or dequantised from its codes) and factors."""
        t = self.tensors
        residual = self.residuals[name] if self.residuals is not None else dequantize(
            unpack(t[f"{name}.codes"], self.bits), t[f"{name}.absmax"], self.bits, self.method, shape)
        return LoftQResult(residual, t[f"{name}.A"], t[f"{name}.B"], [])

    def stored(self) -> LoftQInit:
        """The initialisation as a store holds it (residuals from the codes)."""
        return dataclasses.replace(self, residuals=None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.tensors.values(), *(self.residuals or {}).values()))


def entry_name(weights: dict[str, Tensor], config: LlmmConfig) -> str:
    """The key of an initialisation: the settings LoftQ depends on and every adapted weight (name, shape and
    values); where it was computed does not count."""
    key = hashlib.blake2b(json.dumps([config.rank, config.bits, config.quant_method, config.loftq_iters,
                                      config.scaling, config.double_quant]).encode(), digest_size=16)
    for name, weight in weights.items():
        key.update(f"{name}{tuple(weight.shape)}".encode())
        key.update(weight.detach().float().cpu().numpy().tobytes())
    return f"loftq-{key.hexdigest()}.safetensors"


def compute(weights: dict[str, Tensor], config: LlmmConfig, init_device: str | None = None) -> LoftQInit:
    """Run LoftQ on every weight (on `init_device` when given): its stored form and its float residuals."""
    c, tensors, residuals = config, {}, {}
    for name, weight in weights.items():
        result = loftq(weight.to(init_device or weight.device), c.rank, c.bits, c.quant_method, c.loftq_iters,
                       c.scaling, c.double_quant)
        codes, absmax = quantize(result.to_quantize, c.bits, c.quant_method)
        tensors |= {f"{name}.codes": pack(codes, c.bits).cpu(), f"{name}.absmax": absmax.cpu(),
                    f"{name}.A": result.A.contiguous().cpu(), f"{name}.B": result.B.contiguous().cpu()}
        residuals[name] = result.to_quantize
    return LoftQInit(tensors, c.bits, c.quant_method, residuals)


class LoftQCache:
    """Initialisations kept in memory up to `budget` bytes (least recently used dropped first) and, per call,
    in a store: memory is asked first, then the store; what is computed goes to both (an entry found in memory
    is not copied to a store that lacks it: the process that computes an entry fills the store). With a store,
    every build but the computing one reads the stored form, as the other processes of a search do."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[str, LoftQInit] = OrderedDict()

    def get(self, weights: dict[str, Tensor], config: LlmmConfig, init_device: str | None = None,
            store: LoftQStore | None = None) -> LoftQInit:
        """The initialisation of the layers `weights` (name -> weight) under `config`."""
        name = entry_name(weights, config)
        entry = self.entries.get(name)
        if entry is not None and store is not None:
            entry = entry.stored()
        if entry is None and store is not None and (data := store.read(name)) is not None:
            entry = LoftQInit(load_tensors(data), config.bits, config.quant_method)
        if entry is None:
            entry = compute(weights, config, init_device)
            if store is not None:
                store.write(name, save_tensors(entry.tensors))
                self.remember(name, entry.stored())
                return entry
        self.remember(name, entry)
        return entry

    def remember(self, name: str, entry: LoftQInit) -> None:
        self.entries[name] = entry
        self.entries.move_to_end(name)
        while self.entries and sum(e.nbytes for e in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


# process-wide: the trials a worker runs one after another find their initialisation here
CACHE = LoftQCache(int(os.environ.get("LLMM_LOFTQ_CACHE_MB", "1024")) * 2**20)
