"""The fit loop every supervised recipe shares: length-grouped batches, gradient accumulation, linear
warmup and decay, clipping, `evals_per_epoch` evaluations, and after each one a report with a
checkpoint that resumes the run exactly (adapter, optimizer, schedule, random state, data position).

Its parts serve other loops too: `Schedule` is the one place the steps of a fit are counted (plan counts
with it), and `train_steps`, the step loop, has a hook between backward and the optimizer step, where the
continual family (`trainables/continual.py`) projects gradients and steps its full-rank weights."""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from llmm_tune.errors import TrialFailure
from llmm_tune.settings import Setting, fraction, non_negative, optional, positive, positive_int
from llmm_tune.train.checkpoint import load_training_state, save_training_state
from llmm_tune.train.sharding import is_sharded, shard_model, stored_bytes

Reporter = Callable[[dict, str], None]  # (metrics, checkpoint directory)
Loss = Callable[[nn.Module, object], torch.Tensor]  # (model, batch) -> the batch's mean loss

FIT_SETTINGS: dict[str, Setting] = {
    "lr": Setting(positive, "a number > 0"),
    "epochs": Setting(positive, "a number > 0 (a fraction ends inside the last epoch: 2.5)"),
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


def epoch_clock(config: dict, context: object) -> tuple[str, float]:
    """The family clock (`llmm_tune.tune.family.Family.clock`) of a recipe that trains with `fit`: ASHA counts
    the epochs it reports, up to the `epochs` setting."""
    return "epoch", config["epochs"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(**batch).loss


@dataclass(frozen=True)
class Schedule:
    """The steps of a fit, counted here only, so that the loop, its learning-rate schedule, its evaluations and
    plan's prediction of a trial's length cannot disagree. A step is one optimizer step: `accum` batches, or
    fewer at the end of an epoch."""

    batch_size: int
    accum: int
    batches_per_epoch: int  # per worker: the epoch's last `batches % world` are left out so every worker steps alike
    steps_per_epoch: int
    total_steps: int  # the epochs' steps, or `max_steps` when fewer
    warmup_steps: int
    eval_at: frozenset[int]  # the steps after which `fit` evaluates (`evals_per_epoch` per epoch, and at the end)
    epochs: float | None = None  # the `epochs` setting where the fit runs all of it (not cut short by `max_steps`)

    @classmethod
    def of(cls, config: dict, examples: int, world: int = 1) -> Schedule:
        """From the fit settings (a family without `max_steps` or `evals_per_epoch` gets their defaults), the
        number of training examples and the number of workers."""
        batch_size, accum, epochs = config["batch_size"], config["grad_accum"], config["epochs"]
        batches_per_epoch = math.ceil(examples / batch_size) // world
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        whole = math.floor(epochs)  # a fraction of an epoch rounds to steps as an evaluation within one does
        epoch_steps = max(1, whole * steps_per_epoch + round((epochs - whole) * steps_per_epoch))
        total_steps = min(epoch_steps, config.get("max_steps") or epoch_steps)
        evals = config.get("evals_per_epoch", 1)
        eval_at = {min(e * steps_per_epoch + round(k * steps_per_epoch / evals), total_steps)
                   for e in range(math.ceil(epochs)) for k in range(1, evals + 1)}
        return cls(batch_size, accum, batches_per_epoch, steps_per_epoch, total_steps,
                   round(config["warmup_ratio"] * total_steps), frozenset(eval_at - {0}),
                   epochs if total_steps == epoch_steps else None)

    def epoch(self, step: int) -> int:
        """The epoch in which the step after `step` steps falls."""
        return step // self.steps_per_epoch

    def epochs_done(self, step: int) -> float:
        """Training progress after `step` steps in epochs, as `fit` reports it (ASHA's clock): at the end of a fit
        that runs its `epochs`, that setting (a fraction of an epoch ends on a whole step)."""
        if step == self.total_steps and self.epochs is not None:
            return float(self.epochs)
        return step / self.steps_per_epoch

    def lr_schedule(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """Linear warmup over `warmup_steps`, then linear decay to zero at `total_steps`."""
        from transformers import get_linear_schedule_with_warmup  # imports peft (3 s): only where a fit runs

        return get_linear_schedule_with_warmup(optimizer, self.warmup_steps, self.total_steps)


def order_seed(config: dict) -> int:
    """The seed of a fit's batch order (epoch e draws with this + e)."""
    return config["seed"] * 1_000_003


@dataclass(frozen=True)
class Batches:
    """A training split as the loop draws it: each epoch's length-grouped order comes from `seed + epoch` alone
    (so a resumed run draws what an uninterrupted one did); worker `rank` of `world` takes every world-th batch."""

    train: Dataset
    lengths: list[int]
    collate: Callable
    device: str
    seed: int
    rank: int = 0
    world: int = 1

    def of_epoch(self, epoch: int, schedule: Schedule) -> list[list[int]]:
        """This worker's batches of `epoch`, as lists of example indices."""
        order = torch.Generator().manual_seed(self.seed + epoch)
        size = schedule.batch_size
        from transformers.trainer_pt_utils import LengthGroupedSampler  # imports peft: only where a fit runs

        indices = list(LengthGroupedSampler(size, lengths=self.lengths, generator=order))
        batches = [indices[i:i + size] for i in range(0, len(indices), size)][self.rank::self.world]
        return batches[:schedule.batches_per_epoch]


def _no_hook() -> None:
    """The loop's default between backward and the step: nothing."""


def _diverged_at_step(value: float, step: int) -> str:
    return f"diverged: training loss {value} at step {step}; lower lr or raise scale"


@dataclass(frozen=True)
class Hooks:
    """What a loop built on `train_steps` adds inside a step (what it adds after one, it does where
    `train_steps` yields)."""

    before_step: Callable[[], None] = _no_hook  # the step's gradients accumulated, before clipping and the step
    diverged: Callable[[float, int], str] = _diverged_at_step  # message for a non-finite loss (value, steps done)


@dataclass(frozen=True)
class Step:
    """An optimizer step done: the steps done so far, the losses of its batches, and the epoch's batches."""

    number: int
    losses: list[float]
    batches: list[list[int]]


def train_steps(schedule: Schedule, data: Batches, model: nn.Module, loss: Loss, optimizer: torch.optim.Optimizer,
                scheduler: LambdaLR, max_grad_norm: float, hooks: Hooks = Hooks(), start: int = 0) -> Iterator[Step]:
    """The step loop, from `start` steps done (mid-epoch too: the epoch's first batches are skipped) to
    `schedule.total_steps`: backward on each batch's loss / accum, then `hooks.before_step()`, clipping of the
    optimizer's parameters, the optimizer's and scheduler's steps; yields after each step. The loader has a
    generator of its own: without one, each new iterator draws from the global RNG that the adapters' noise
    uses, and a run resumed mid-epoch would draw once more than an uninterrupted one."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = start
    while step < schedule.total_steps:
        epoch = schedule.epoch(step)
        batches = data.of_epoch(epoch, schedule)
        loader = DataLoader(data.train, batch_sampler=batches, collate_fn=data.collate, generator=torch.Generator())
        done = (step - epoch * schedule.steps_per_epoch) * schedule.accum
        losses = []
        for index, batch in enumerate(islice(loader, done, None), start=done):
            batch_loss = loss(model, batch.to(data.device))
            if not everywhere(math.isfinite(value := batch_loss.item()), data.world):
                raise TrialFailure(hooks.diverged(value, step))
            (batch_loss / schedule.accum).backward()
            losses.append(value)
            if (index + 1) % schedule.accum and index + 1 < schedule.batches_per_epoch:
                continue
            hooks.before_step()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            yield Step(step, losses, batches)
            losses = []
            if step >= schedule.total_steps:
                break


def fit(config: dict, model: nn.Module, train: Dataset, lengths: list[int], collate: Callable,
        evaluate: Callable[[], dict[str, float]], report: Reporter, resume: str | None = None,
        device: str = "cpu", loss: Loss = model_loss) -> None:
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
    schedule = Schedule.of(config, len(train), world)
    scheduler = schedule.lr_schedule(optimizer)
    progress = {"step": 0, "loss_sum": 0.0, "loss_count": 0}
    if resume is not None:
        progress = load_training_state(resume, model, optimizer, scheduler, rank)
    data = Batches(train, lengths, collate, device, order_seed(config), rank, world)
    model.train()
    started = time.time()
    for step in train_steps(schedule, data, trained, loss, optimizer, scheduler, config["max_grad_norm"],
                            start=progress["step"]):
        progress["step"] = step.number
        for value in step.losses:
            progress["loss_sum"] += value
            progress["loss_count"] += 1
        if step.number not in schedule.eval_at:
            continue
        scores, seconds = validate(model, evaluate, step.number)
        result = {
            "epoch": schedule.epochs_done(step.number), "step": step.number,
            "train_loss": mean_everywhere(progress["loss_sum"], progress["loss_count"], world),
            **{f"val_{k}": v for k, v in scores.items()},
            "lr": scheduler.get_last_lr()[0], "seconds": time.time() - started, "eval_seconds": seconds,
        }
        if world > 1:  # which examples this worker trained on this epoch, and what it stores of the model
            result |= {"shard": f"{rank}/{world}", "shard_examples": sum(map(len, step.batches)),
                       "shard_digest": hashlib.sha1(repr(step.batches).encode()).hexdigest()[:12],
                       "stored_bytes": stored_bytes(model)}
        progress["loss_sum"], progress["loss_count"] = 0.0, 0
        with tempfile.TemporaryDirectory() as directory:
            save_training_state(directory, model, optimizer, scheduler, progress, rng_states(world))
            report(result, directory)


def validate(model: nn.Module, evaluate: Callable[[], dict[str, float]], step: int) -> tuple[dict[str, float], float]:
    """`evaluate()` in eval mode and the seconds it took; a non-finite validation loss ends the trial."""
    model.eval()
    started = time.time()
    scores = evaluate()
    if is_sharded(model):  # FSDP leaves the root's weights gathered after a forward with no backward
        model.reshard()
    seconds = time.time() - started
    model.train()
    if not math.isfinite(scores.get("loss", 0.0)):
        raise TrialFailure(f"diverged: validation loss {scores['loss']} at step {step}; lower lr or raise scale")
    return scores, seconds


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
