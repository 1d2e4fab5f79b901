"""Task families: the one way the search driver, export and reproduce reach a recipe.

A family is a module (`trainables.<name>` or any importable dotted path) with these names:

    SETTINGS: dict[str, Setting]     its trial settings (the method's and the fit loop's included)
    TASKS: dict[str, Task]           its tasks, each with its metrics and their directions
    DATA_SETTINGS: tuple[str, ...]   settings `prepare` reads: fixed per search, never searched
    HELD_OUT: str                    the name of the split `score` reads ("dev", "test")
    check_data(task, data_dir) -> str                          "hub" or the data folder; UsageError naming the fix
    prepare(config, context, source) -> data                   train and validation data, shared by all trials
    train(config, context, data, report, resume=None) -> None  report(metrics, checkpoint_dir) per evaluation
    score(config, context, checkpoint, source) -> dict         every metric of the task on the held-out split,
                                                               scored once, for the table
    clock(config, context) -> (str, float)                     the reported key ASHA counts in, and its final value

`config` holds the trial's settings alone; `context` (`llmm_tune.tune.context.TrialContext`) the rest: task,
selection metric and direction, which report stands, trust_remote_code, where LoftQ initialisations are kept.
Optional: `build_model(config, context, device) -> nn.Module`, the model a checkpoint's adapter loads into
(`llmm_tune.export_adapter` needs it). A family that takes the user's data from a space's `dataset:` block
(`llmm_tune.train.dataset`) also defines `resolve_dataset(block, where) -> dict` (the block checked against its
data and completed, once, where the search starts) and `dataset_task(name, block) -> Task` (the task it
defines, a pure function of the resolved block).

`train` reports `val_<metric>` for the metrics of its task it computes (the selection metric always);
which one selects, and in which direction, is data (`Task.metrics`), never assumed by the driver; so is
which report stands for the trial (`Task.selects`). A family may also define
`held_out_details(scores) -> str`: Markdown for what `score` returns beside numbers (the export adds it).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import dataclass, field
from types import ModuleType

from llmm_tune.errors import UsageError

BUILT_IN = ("glue", "causal_lm", "continual")
INTERFACE = ("SETTINGS", "TASKS", "DATA_SETTINGS", "HELD_OUT", "check_data", "prepare", "train", "score", "clock")
MODES = ("max", "min")


@dataclass(frozen=True)
class Task:
    """A task as the driver sees it: its metrics, each with "max" or "min" as the better direction."""

    name: str
    metrics: dict[str, str]
    metric: str  # the default selection metric
    details: object = field(default=None, compare=False)  # what only the family reads
    selects: str = "best"  # a trial's value: its best report ("best": epochs of one fit) or its last ("last":
    # a task sequence, judged where it ends)

    def __post_init__(self) -> None:
        assert self.metric in self.metrics and set(self.metrics.values()) <= set(MODES), self
        assert self.selects in ("best", "last"), self


def load_family(name: str) -> ModuleType:
    """`trainables.<name>` for a built-in family, else the module at the dotted path `name`."""
    module_name = f"trainables.{name}" if name in BUILT_IN else name
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if error.name and module_name.startswith(error.name):
            raise UsageError(f"unknown family {name!r}; use one of {', '.join(BUILT_IN)} or the dotted path of an "
                             "importable module (on PYTHONPATH on every Ray node)") from None
        raise
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    if missing:
        raise UsageError(f"family module {module_name} lacks {missing}; a family defines {', '.join(INTERFACE)} "
                         "(see llmm_tune/family.py)")
    return module


@functools.cache
def _dataset_task(family: str, name: str, dataset: str) -> Task:
    return load_family(family).dataset_task(name, json.loads(dataset))


def task_definition(family: str, name: str, dataset: str | None) -> Task:
    """The task `name` of `family`: one it ships, or the one a resolved `dataset:` block (as JSON) defines."""
    return load_family(family).TASKS[name] if dataset is None else _dataset_task(family, name, dataset)


def better(mode: str, a: float, b: float | None) -> bool:
    """Whether `a` beats `b` (None: nothing yet) in direction `mode`."""
    return b is None or (a > b if mode == "max" else a < b)


def replaces(task: Task, mode: str, new: float, kept: float | None) -> bool:
    """Whether a trial's new report becomes the one that stands for it (`kept`: the current one's value, None:
    none yet): the last for a task that selects the last, else the best, and the later of equal ones, as Ray's
    checkpoint manager keeps them (so a retrained trial is scored from the checkpoint the search kept)."""
    if task.selects == "last" or kept is None or math.isnan(kept):
        return True
    return new >= kept if mode == "max" else new <= kept


def worst(mode: str) -> float:
    return float("-inf") if mode == "max" else float("inf")
