"""Continual family: GORP over a task sequence (CONTINUAL.md), with plain LoRA or Llmm adapters per task.

For each task of the order: a new adapter pair on `lora_modules` (the earlier pairs frozen and still adding),
the full-rank `full_rank_modules` trained by a projected Adam, and, with `projection`, every update kept off
the memory basis of the earlier tasks, which grows after each task. After each task every task of the order
is scored on its validation split (greedy decoding, exact match): one row of the accuracy matrix, reported
with AA over the whole order (unseen tasks count as the model answers them) so that ASHA, counting tasks,
compares sequences at equal length. A trial's selection value is its last report: a sequence is judged
where it ends. The state after each task is the checkpoint: a trial resumes at the task after it, and the
export re-creates every intermediate model from it to score the test splits once.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import llmm_tune  # the method (apply_llmm, ...) loads peft at first use; reading the family's settings does not
from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path
from llmm_tune.method.config import METHOD_SETTINGS, llmm_config
from llmm_tune.method.model import llmm_layers, matches
from llmm_tune.settings import COMMON, Setting, fraction, positive, positive_int
from llmm_tune.train.data import SHARED_DATA_NAMES, SHARED_DATA_SETTINGS, Example
from llmm_tune.train.dataset import shipped_blocks
from llmm_tune.train.fit import (
    FIT_SETTINGS,
    Batches,
    Hooks,
    Reporter,
    Schedule,
    default_device,
    order_seed,
    train_steps,
)
from llmm_tune.train.lm_scoring import encode, greedy_generate, pad, response_loss
from llmm_tune.train.pretrained import load_causal_lm, tokenizer_for
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.family import Task
from trainables.continual_data import (
    BenchmarkTask,
    check_files,
    check_sequence,
    exact_match,
    is_order,
    order_of,
    sequence,
    test_split,
    train_and_validation,
)
from trainables.gorp import (
    Basis,
    FrozenPairs,
    GradientSummary,
    ProjectedAdam,
    average_accuracy,
    backward_transfer,
    kaiming_rows,
)


def _suffixes(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


SETTINGS: dict[str, Setting] = {
    **COMMON, **METHOD_SETTINGS,
    **{k: FIT_SETTINGS[k] for k in ("lr", "epochs", "batch_size", "grad_accum", "weight_decay", "warmup_ratio",
                                    "max_grad_norm")},
    "init": Setting(lambda v: v in (None, "zero"), "zero or null (each task's pair starts as LoRA's does; LoftQ "
                    "initialises one pair, not a sequence of them)", None),
    "order": Setting(is_order, "a list of distinct tasks from the space's dataset: list, or null (the whole "
                     "list, in its order)", None),
    "galore_lr": Setting(positive, "a number > 0 (the full-rank weights' learning rate)"),
    "galore_rank": Setting(positive_int, "an integer >= 1 (rank of the projected Adam)"),
    "galore_scale": Setting(positive, "a number > 0 (scales the projected update)"),
    "update_proj_gap": Setting(positive_int, "an integer >= 1 (steps between new projections)"),
    "energy_threshold": Setting(lambda v: fraction(v) and v > 0, "a number in (0, 1) (share of a task's gradient "
                                "energy the memory keeps)", 0.9),
    "projection": Setting(lambda v: isinstance(v, bool), "true (GORP) or false (sequential fine-tuning: no memory)",
                          True),
    "lora_modules": Setting(_suffixes, "a list of module-name suffixes (Llama: q_proj, v_proj)", ["q_proj", "v_proj"]),
    "full_rank_modules": Setting(_suffixes, "a list of module-name suffixes (Llama: mlp.gate_proj)", ["mlp.gate_proj"]),
    "max_source_length": Setting(positive_int, "an integer >= 1 (prompt tokens kept, from its end)", 256),
    **SHARED_DATA_SETTINGS,  # each task's own: its validation carved from its train, its rows capped
    "validation_size": SHARED_DATA_SETTINGS["validation_size"]._replace(default=32),
}
DATA_SETTINGS = (*SHARED_DATA_NAMES, "order", "max_source_length")
GPU_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"  # --profile gpu: a Llama needing no gated login
HELD_OUT = "test"
LABEL_TOKENS = 32  # a label longer than this is cut in training (the longest here, "Educational Institution", is 4)
STATE_FILE = "continual_state.safetensors"


def resolve_dataset(block: object, where: str) -> list[dict]:
    """A continual space's `dataset:` list checked: one {name, group} block a task of the benchmark, in sequence
    order (its data is found under the data folder where the trial runs)."""
    return check_sequence(block, where)


def dataset_task(name: str, blocks: list[dict]) -> Task:
    """The sequence a `dataset:` list defines, judged where it ends: AA (selects) and BWT over its tasks."""
    return Task(name, {"aa": "max", "bwt": "max"}, "aa", sequence(blocks), selects="last")


TASKS = {name: dataset_task(name, blocks) for name, blocks in shipped_blocks("continual").items()}


def trial_order(config: dict, context: TrialContext) -> tuple[BenchmarkTask, ...]:
    """The trial's tasks in order: those the `order` setting picks from the space's list, else the whole list."""
    return order_of(config, context.definition.details, context.task)


def clock(config: dict, context: TrialContext) -> tuple[str, float]:
    return "task", float(len(trial_order(config, context)))


def check_data(task: str, data_dir: Path | None) -> str:
    """The data folder; a UsageError naming the fix. The files of the tasks a trial runs (the `order` picks them
    from the space's list) are checked by `prepare`, before any trial starts."""
    if data_dir is None:
        raise UsageError("the continual benchmark is read from a data folder: pass --data-dir DIR (holding "
                         "cl_benchmark/, e.g. ../shared/data) or set LLMM_DATA_DIR")
    return str(data_dir)


@dataclass
class TaskData:
    name: str
    train: Dataset
    lengths: list[int]
    validation: list[Example]


@dataclass
class ContinualData:
    """Each task's tokenised train split and validation examples, shared by every trial of a search."""

    tasks: list[TaskData]
    max_new_tokens: int  # the longest label of the order, in tokens, plus EOS

    @property
    def sizes(self) -> str:
        """What the console says of the data."""
        return (f"{len(self.tasks)} tasks: " + ", ".join(t.name for t in self.tasks) + " | train "
                + "/".join(str(len(t.train)) for t in self.tasks) + " | validation "
                + "/".join(str(len(t.validation)) for t in self.tasks))


def prepare(config: dict, context: TrialContext, source: str) -> ContinualData:
    order = trial_order(config, context)
    root = Path(source)
    check_files(root, order, "the order" if config.get("order") else context.task)
    tokenizer = tokenizer_for(config["model"], context.trust_remote_code)
    tasks = []
    for task in order:
        train, validation = train_and_validation(root, task, config)
        encoded = Dataset.from_list([encode(tokenizer, e.prompt, e.target, config["max_source_length"], LABEL_TOKENS)
                                     for e in train])
        tasks.append(TaskData(task.name, encoded, [len(ids) for ids in encoded["input_ids"]], validation))
    return ContinualData(tasks, answer_tokens(tokenizer, [e for task in tasks for e in task.validation]))


def answer_tokens(tokenizer, examples: list[Example]) -> int:
    """The decoding budget: the longest label among `examples`, in tokens, plus EOS."""
    return max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples) + 1


class Sequence:
    """A model learning an order of tasks: its adapter layers (each on `FrozenPairs` of the earlier tasks),
    the full-rank weights, the memory bases, the full-rank weights after each task and the accuracy matrix."""

    def __init__(self, config: dict, context: TrialContext, device: str):
        torch.manual_seed(config["seed"])
        model = load_causal_lm(config["model"], trust_remote_code=context.trust_remote_code)
        model.config.use_cache = False
        lora = tuple(config["lora_modules"])
        self.model = llmm_tune.apply_llmm(model, llmm_config(config, init="zero", target_modules=lora)).to(device)
        self.layers = llmm_layers(self.model)
        for layer in self.layers.values():
            layer.base = FrozenPairs(layer.base, layer.A_mean.shape[1], layer.B_mean.shape[0], layer.scaling)
        self.full = {name: module.weight for name, module in self.model.named_modules()
                     if isinstance(module, nn.Linear) and matches(name, tuple(config["full_rank_modules"]))}
        if not self.full:
            raise UsageError(f"full_rank_modules {config['full_rank_modules']} match no linear layer of the model; "
                             "name suffixes of its linear layers (Llama: mlp.gate_proj)")
        for weight in self.full.values():
            weight.requires_grad_(True)
        self.pristine = {name: w.detach().cpu().clone() for name, w in self.full.items()}
        self.out_bases = {name: Basis(w.shape[0], device) for name, w in self.full.items()}
        self.in_bases = {name: Basis(layer.A_mean.shape[1], device) for name, layer in self.layers.items()}
        self.after_task: list[dict[str, torch.Tensor]] = []  # the full-rank weights after each task
        self.matrix: list[list[float]] = []  # matrix[t][i]: task i's validation accuracy after task t
        self.rank = config["rank"]

    def start_task(self, projection: bool) -> None:
        """A new pair on every adapter layer: A Kaiming-uniform off the input basis (B and the moments are zero
        since the last `end_task`, or construction)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                A = kaiming_rows(*layer.A_mean.shape, layer.A_mean.device)
                layer.A_mean.copy_(self.in_bases[name].remove(A.T).T if projection else A)

    def project_adapters(self, gradients: bool, summaries: dict[str, GradientSummary] | None = None) -> None:
        """Remove the input basis from every A (mean and moments): from their gradients (which feed the task's
        summaries first) before the step, or from the factors themselves after it (AdamW's per-entry scaling
        brings a little of the basis back)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                basis = self.in_bases[name]
                for param in (layer.A_mean, layer.A_moments):
                    tensor = param.grad if gradients else param
                    if tensor is None or tensor.numel() == 0:
                        continue
                    if summaries is not None and param is layer.A_mean:
                        summaries[name].add(tensor.T)
                    flat = tensor.reshape(-1, tensor.shape[-1])
                    tensor.copy_(basis.remove(flat.T).T.reshape(tensor.shape))

    def end_task(self) -> None:
        """The pair joins the frozen ones (and stops adding itself: B and the moments back to zero); the
        full-rank weights after the task are kept."""
        with torch.no_grad():
            for layer in self.layers.values():
                layer.base.append(layer.A_mean, layer.B_mean)
                for tensor in (layer.B_mean, layer.A_moments, layer.B_moments):
                    tensor.zero_()
        self.after_task.append({name: w.detach().cpu().clone() for name, w in self.full.items()})

    def show(self, tasks: int, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The model as it was after the first `tasks` tasks (0: before the sequence), from every task's `pairs`."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                A, B = pairs[name]
                layer.base.A, layer.base.B = A[:tasks * self.rank], B[:, :tasks * self.rank]
            weights = self.after_task[tasks - 1] if tasks else self.pristine
            for name, weight in self.full.items():
                weight.copy_(weights[name])

    def save(self, directory: str, order: tuple[str, ...]) -> None:
        tensors = {}
        for name, layer in self.layers.items():
            tensors |= {f"pairs.{name}.A": layer.base.A, f"pairs.{name}.B": layer.base.B,
                        f"basis_in.{name}": self.in_bases[name].U}
        for name in self.full:
            tensors[f"basis_out.{name}"] = self.out_bases[name].U
            for t, weights in enumerate(self.after_task):
                tensors[f"after.{t}.{name}"] = weights[name]
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(Path(directory) / STATE_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"matrix": json.dumps(self.matrix), "order": json.dumps(order)})

    def load(self, directory: str) -> int:
        """Restore a saved state; returns the number of tasks it had learnt."""
        device = next(iter(self.full.values())).device
        with safe_open(str(Path(directory) / STATE_FILE), framework="pt") as f:
            self.matrix = json.loads(f.metadata()["matrix"])
            done = len(self.matrix)
            for name, layer in self.layers.items():
                layer.base.A = f.get_tensor(f"pairs.{name}.A").to(device)
                layer.base.B = f.get_tensor(f"pairs.{name}.B").to(device)
                self.in_bases[name].U = f.get_tensor(f"basis_in.{name}").to(device)
            for name in self.full:
                self.out_bases[name].U = f.get_tensor(f"basis_out.{name}").to(device)
            self.after_task = [{name: f.get_tensor(f"after.{t}.{name}") for name in self.full} for t in range(done)]
        if done:
            with torch.no_grad():
                for name, weight in self.full.items():
                    weight.copy_(self.after_task[-1][name])
        return done


def accuracy(sequence: Sequence, examples: list[Example], tokenizer, max_new_tokens: int, batch_size: int,
             device: str) -> float:
    generations = greedy_generate(sequence.model, tokenizer, [e.prompt for e in examples], max_new_tokens,
                                  batch_size, device)
    return exact_match(generations, examples)


def train_task(sequence: Sequence, task: TaskData, index: int, config: dict, collate, device: str) -> float:
    """One task of the order, trained by the shared step loop; returns its mean training loss. GORP's steps in
    it: between backward and the adapters' step, their gradients lose the memory's directions (feeding the
    task's summaries first) and the full-rank weights take their projected step; after it, the factors lose
    them too; after the task, the memory grows. The task's randomness (new pair, batch order, adapter noise)
    comes from (seed, task index) alone, so a sequence resumed at a task boundary repeats an uninterrupted one."""
    torch.manual_seed(config["seed"] * 1_000_003 + index)
    projection = config["projection"]
    sequence.start_task(projection)
    lora = [p for layer in sequence.layers.values() for p in (layer.A_mean, layer.B_mean, layer.A_moments,
                                                              layer.B_moments) if p.numel()]
    optimizer = torch.optim.AdamW(lora, lr=config["lr"], weight_decay=config["weight_decay"])
    full_rank = ProjectedAdam(sequence.full, sequence.out_bases if projection else None, config["galore_lr"],
                              config["galore_rank"], config["galore_scale"], config["update_proj_gap"])
    summaries = {name: GradientSummary(layer.A_mean.shape[1], device) for name, layer in sequence.layers.items()}
    schedule = Schedule.of(config, len(task.train))

    def before_step() -> None:
        if projection:
            sequence.project_adapters(gradients=True, summaries=summaries)
        full_rank.step(optimizer.param_groups[0]["lr"] / config["lr"])  # the full-rank weights follow the schedule
        full_rank.zero_grad()

    def diverged(value: float, _: int) -> str:
        return f"diverged: training loss {value} in task {task.name}; lower lr or galore_lr"

    data = Batches(task.train, task.lengths, collate, device, order_seed(config) + index * 1_009)
    losses = []
    sequence.model.train()
    for step in train_steps(schedule, data, sequence.model, response_loss, optimizer, schedule.lr_schedule(optimizer),
                            config["max_grad_norm"], Hooks(before_step, diverged)):
        losses += step.losses
        if projection:
            sequence.project_adapters(gradients=False)
    if projection:
        threshold = config["energy_threshold"]
        for name, basis in sequence.out_bases.items():
            basis.grow(full_rank.summaries[name], threshold)
        for name, basis in sequence.in_bases.items():
            basis.grow(summaries[name], threshold)
    sequence.end_task()
    return sum(losses) / max(1, len(losses))


def train(config: dict, context: TrialContext, data: ContinualData, report: Reporter, resume: str | None = None,
          device: str | None = None) -> None:
    device = device or default_device()
    sequence = Sequence(config, context, device)
    tokenizer = tokenizer_for(config["model"], context.trust_remote_code)
    order = tuple(t.name for t in data.tasks)
    done = sequence.load(resume) if resume else 0
    collate = functools.partial(pad, pad_id=tokenizer.pad_token_id)
    started = time.time()
    for index in range(done, len(data.tasks)):
        loss = train_task(sequence, data.tasks[index], index, config, collate, device)
        row = [accuracy(sequence, t.validation, tokenizer, data.max_new_tokens, config["batch_size"] * 4, device)
               for t in data.tasks]
        sequence.matrix.append(row)
        metrics = {"task": index + 1, "train_loss": loss, "val_aa": average_accuracy(sequence.matrix),
                   "val_bwt": backward_transfer(sequence.matrix),
                   **{f"val_acc_{name}": value for name, value in zip(order, row)},
                   "memory_directions": sum(b.U.shape[1] for b in sequence.out_bases.values()),
                   "seconds": time.time() - started}
        with tempfile.TemporaryDirectory() as directory:
            sequence.save(directory, order)
            report(metrics, directory)


def score(config: dict, context: TrialContext, checkpoint: str, source: str) -> dict:
    """Every intermediate model of the sequence re-created from the checkpoint and scored once on the test
    splits: the accuracy matrix (row t: after task t, tasks 1..t; the last row: every task, and the untuned
    model's row 0), AA and BWT from it."""
    device = default_device()
    sequence = Sequence(config, context, device)
    tokenizer = tokenizer_for(config["model"], context.trust_remote_code)
    done = sequence.load(checkpoint)
    pairs = {name: (layer.base.A, layer.base.B) for name, layer in sequence.layers.items()}
    tasks = trial_order(config, context)
    order = tuple(task.name for task in tasks)
    tests = [test_split(Path(source), task, config) for task in tasks]
    new_tokens = answer_tokens(tokenizer, [e for t in tests for e in t])

    def row(tasks: int, width: int) -> list[float]:
        sequence.show(tasks, pairs)
        return [accuracy(sequence, tests[i], tokenizer, new_tokens, config["batch_size"] * 4, device)
                for i in range(width)]

    untuned = row(0, len(order))
    matrix = [row(t, t if t < done else len(order)) for t in range(1, done + 1)]
    return {"aa": average_accuracy(matrix), "bwt": backward_transfer(matrix),
            "untuned_aa": sum(untuned) / len(untuned), "tasks_trained": float(done),
            "accuracy_matrix": {"tasks": list(order), "untuned": untuned, "after_each_task": matrix}}


def held_out_details(scores: dict) -> str:
    """The accuracy matrix as Markdown (the export writes it under the table for the best configuration)."""
    found = scores["accuracy_matrix"]
    tasks = found["tasks"]
    lines = ["| after | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
             "| (untuned) | " + " | ".join(f"{v:.3f}" for v in found["untuned"]) + " |"]
    for t, values in enumerate(found["after_each_task"]):
        cells = [f"{v:.3f}" for v in values] + [""] * (len(tasks) - len(values))
        lines.append(f"| {t + 1}. {tasks[t]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
