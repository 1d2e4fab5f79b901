"""The fit loop every supervised recipe shares: length-grouped batches, gradient accumulation, linear
warmup and decay, clipping, `evals_per_epoch` evaluations, and after each one a report with a
checkpoint that resumes the run exactly (adapter, optimizer, schedule, random state, data position)."""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable
from itertools import islice

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from llmm_tune.errors import TrialFailure
from llmm_tune.settings import Setting, fraction, non_negative, optional, positive, positive_int
from llmm_tune.train.checkpoint import load_training_state, save_training_state
from llmm_tune.train.sharding import is_sharded, shard_model, stored_bytes

Reporter = Callable[[dict, str], None]  # (metrics, checkpoint directory)

FIT_SETTINGS: dict[str, Setting] = {
    "lr": Setting(positive, "a number > 0"),
    "epochs": Setting(positive_int, "an integer >= 1"),
    "batch_size": Setting(positive_int, "an integer >= 1"),
    "grad_accum": Setting(positive_int, "an integer >= 1", 1),
    "evals_per_epoch": Setting(positive_int, "an integer >= 1", 1),
    "max_steps": Setting(optional(positive_int), "an integer >= 1 or null (whole epochs)", None),
    "weight_decay": Setting(non_negative, "a number >= 0", 0.0),
    "warmup_ratio": Setting(fraction, "a number in [0, 1)", 0.06),
    "max_grad_norm": Setting(positive, "a number > 0", 1.0),
    "fsdp": Setting(lambda v: isinstance(v, bool), "true or false (shard the model over a multi-worker trial's "
                    "workers instead of copying it to each: search --fsdp)", False),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(**batch).loss


def fit(config: dict, model: nn.Module, train: Dataset, lengths: list[int], collate: Callable,
        evaluate: Callable[[], dict[str, float]], report: Reporter, resume: str | None = None,
        device: str = "cpu", loss: Callable[[nn.Module, object], torch.Tensor] = model_loss) -> None:
    """Train `model` on `train` (batches grouped by `lengths`) on `loss(model, batch)`; `evaluate()` scores
    the validation split with the model in eval mode and returns metrics ("loss" among them), reported as
    `val_<name>`. With `max_steps`, training stops there (the epoch clock still advances by steps).

    In a torch.distributed group (a multi-worker trial) the model is data parallel: worker r of W takes
    batches r, r + W, ... of the same length-grouped order (the epoch's last `len % W` batches are left
    out, so every worker steps alike), and every worker evaluates and reports the same metrics. The model is
    copied to every worker, or with `fsdp` sharded over them."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() \
        else (1, 0)
    trained = distribute(model, config.get("fsdp", False), world)  # records from before fsdp lack it
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    batch_size, accum = config["batch_size"], config["grad_accum"]
    batches_per_epoch = math.ceil(len(train) / batch_size) // world  # per worker
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * config["epochs"]
    if config["max_steps"]:
        total_steps = min(total_steps, config["max_steps"])
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config["warmup_ratio"] * total_steps), total_steps)
    evals = config["evals_per_epoch"]
    eval_at = {e * steps_per_epoch + round(k * steps_per_epoch / evals)
               for e in range(config["epochs"]) for k in range(1, evals + 1)}
    eval_at = {min(step, total_steps) for step in eval_at}
    progress = {"step": 0, "loss_sum": 0.0, "loss_count": 0}
    if resume is not None:
        progress = load_training_state(resume, model, optimizer, scheduler, rank)
    model.train()
    started = time.time()
    while progress["step"] < total_steps:
        epoch = progress["step"] // steps_per_epoch
        order = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)  # same per epoch on resume
        indices = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=order))
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)][rank::world]
        batches = batches[:batches_per_epoch]
        # the loader's own generator: without one, each new iterator draws from the global RNG that the
        # adapters' noise uses, and a run resumed mid-epoch would draw once more than an uninterrupted one
        loader = DataLoader(train, batch_sampler=batches, collate_fn=collate, generator=torch.Generator())
        done = (progress["step"] - epoch * steps_per_epoch) * accum
        for index, batch in enumerate(islice(loader, done, None), start=done):
            batch_loss = loss(trained, batch.to(device))
            if not everywhere(math.isfinite(value := batch_loss.item()), world):
                raise TrialFailure(f"diverged: training loss {value} at step {progress['step']}; "
                                   "lower lr or raise scale")
            (batch_loss / accum).backward()
            progress["loss_sum"] += value
            progress["loss_count"] += 1
            if (index + 1) % accum and index + 1 < batches_per_epoch:
                continue
            torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            if progress["step"] in eval_at:
                model.eval()
                evaluated = time.time()
                scores = evaluate()
                if is_sharded(model):  # FSDP leaves the root's weights gathered after a forward with no backward
                    model.reshard()
                evaluated = time.time() - evaluated
                model.train()
                if not math.isfinite(scores.get("loss", 0.0)):
                    raise TrialFailure(f"diverged: validation loss {scores['loss']} at step {progress['step']}; "
                                       "lower lr or raise scale")
                result = {
                    "epoch": progress["step"] / steps_per_epoch, "step": progress["step"],
                    "train_loss": mean_everywhere(progress["loss_sum"], progress["loss_count"], world),
                    **{f"val_{k}": v for k, v in scores.items()},
                    "lr": scheduler.get_last_lr()[0], "seconds": time.time() - started, "eval_seconds": evaluated,
                }
                if world > 1:  # which examples this worker trained on this epoch, and what it stores of the model
                    result |= {"shard": f"{rank}/{world}", "shard_examples": sum(map(len, batches)),
                               "shard_digest": hashlib.sha1(repr(batches).encode()).hexdigest()[:12],
                               "stored_bytes": stored_bytes(model)}
                progress["loss_sum"], progress["loss_count"] = 0.0, 0
                with tempfile.TemporaryDirectory() as directory:
                    save_training_state(directory, model, optimizer, scheduler, progress, rng_states(world))
                    report(result, directory)
            if progress["step"] >= total_steps:
                break


def distribute(model: nn.Module, fsdp: bool, world: int) -> nn.Module:
    """What the loop calls to train: the model on one worker; on W workers a DistributedDataParallel copy of it,
    or with `fsdp` the model itself, sharded over the workers in place (`llmm_tune.train.sharding`)."""
    if world == 1:
        return model
    return shard_model(model) if fsdp else DistributedDataParallel(model, find_unused_parameters=True)


def everywhere(flag: bool, world: int) -> bool:
    """`flag` on every worker: one worker raising alone would leave the others waiting in a collective."""
    if world == 1:
        return flag
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def mean_everywhere(total: float, count: int, world: int) -> float:
    if world > 1:
        both = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(both)
        total, count = both.tolist()
    return total / max(count, 1)


def rng_states(world: int) -> list[torch.Tensor]:
    """Every worker's CPU random state (each draws its own adapter noise), in rank order."""
    if world == 1:
        return [torch.get_rng_state()]
    states: list = [None] * world
    dist.all_gather_object(states, torch.get_rng_state())
    return states
