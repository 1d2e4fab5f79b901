"""Task families: the one way the search driver, export and reproduce reach a recipe. `Family` says what a
family defines; `load_family` finds one by name and checks it defines that."""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from llmm_tune.errors import UsageError
from llmm_tune.tune.direction import MODES, Direction

if TYPE_CHECKING:
    from llmm_tune.settings import Setting
    from llmm_tune.train.dataset import DataBlock
    from llmm_tune.train.fit import Reporter

BUILT_IN = ("glue", "causal_lm", "continual")
# A trial's llmm_tune.tune.context.TrialContext, named loosely: that module imports this one.
Context = Any


@dataclass(frozen=True)
class Task:
    """A task as the driver sees it: its metrics, each with "max" or "min" as the better direction."""

    name: str
    metrics: dict[str, str]
    metric: str  # the default selection metric
    details: object = field(default=None, compare=False)  # what only the family reads
    selects: str = "best"  # a trial's value: its best report ("best": epochs of one fit) or its last ("last":
    # a task sequence, judged where it ends)
    reported: dict[str, str] = field(default_factory=dict)  # metrics its trials report beside `metrics`, each with
    # its better direction, that never select (a classifier's calibration); `search --objectives` may name them

    def __post_init__(self) -> None:
        assert self.metric in self.metrics and set(self.metrics.values()) <= set(MODES), self
        assert set(self.reported.values()) <= set(MODES), self
        assert self.selects in ("best", "last"), self


class Family(Protocol):
    """A family: a module (`trainables.<name>` or any importable dotted path) that defines these names.

    `config` holds a trial's settings alone; `context` (its `TrialContext`) the rest: task, selection metric and
    direction, which report stands, trust_remote_code, where LoftQ initialisations are kept. `train` reports
    `val_<metric>` for the metrics of its task it computes (the selection metric always); which one selects, and
    in which direction, is data (`Task.metrics`), never assumed by the driver; so is which report stands for the
    trial (`Task.selects`).

    Optional, read where a family defines them:
    `build_model(config, context, device) -> nn.Module`: the model a checkpoint's adapter loads into
    (`llmm_tune.export_adapter` needs it).
    `resolve_dataset(block, where) -> dict` and `dataset_task(name, block) -> Task`, in a family whose tasks are
    `dataset:` blocks of its spaces (`llmm_tune.train.dataset`; a task sequence's: a list of blocks): the block
    checked (the user's data: against its data, and completed) once, where the search starts; the task it defines,
    a pure function of the resolved block.
    Its `TASKS` are then the tasks its shipped spaces' blocks define (`shipped_blocks`), for records that name a
    task alone.
    `held_out_details(scores) -> str`: Markdown for what `score` returns beside numbers (the export adds it; ""
    adds nothing).
    `resolve_shift(entry, task, where) -> dict`: a space's `shift:` entry (`{name, task}` or `{name, files}`, an
    extra held-out set scored at export) checked against the trained `Task` and resolved; `score` finds the
    resolved entries as JSON in `context.shift`. A family without it takes no `shift:`.
    `GPU_MODEL`: the model of `--profile gpu` where a space gives no gpu profile (the paper profile's settings with
    this model, one that needs no gated login).
    """

    SETTINGS: dict[str, Setting]  # its trial settings (the method's and the fit loop's included)
    TASKS: dict[str, Task]  # its tasks, each with its metrics and their directions
    DATA_SETTINGS: tuple[str, ...]  # the settings `prepare` reads: fixed per search, never searched
    HELD_OUT: str  # the name of the split `score` reads ("dev", "test")

    def check_data(self, task: str, data_dir: Path | None) -> str:
        """Where the task's data will come from: "hub" or the data folder (`llmm_tune.train.data.local_or_hub`
        checks both); a UsageError naming the fix."""

    def prepare(self, config: dict, context: Context, source: str) -> object:
        """The train and validation data, prepared once and shared by every trial of a search."""

    def train(self, config: dict, context: Context, data: object, report: Reporter, resume: str | None = None) -> None:
        """Fit, calling `report(metrics, checkpoint_dir)` after each evaluation; from `resume`, a checkpoint
        it reported, when given."""

    def score(self, config: dict, context: Context, checkpoint: str, source: str) -> dict:
        """Every metric of the task on the held-out split, scored once, for the export's table."""

    def clock(self, config: dict, context: Context) -> tuple[str, float]:
        """The reported key ASHA counts in and its final value (`llmm_tune.train.fit.epoch_clock`: the fit loop's)."""


# Read off `Family`, so the contract is written once.
REQUIRED = (*Family.__annotations__,
            *(name for name, member in vars(Family).items() if callable(member) and not name.startswith("_")))


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
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise UsageError(f"family module {module_name} lacks {missing}; a family defines {', '.join(REQUIRED)} "
                         "(see Family in llmm_tune/tune/family.py)")
    return module


@functools.cache
def _dataset_task(family: str, name: str, dataset: DataBlock) -> Task:
    return load_family(family).dataset_task(name, dataset.fields)


def task_definition(family: str, name: str, dataset: DataBlock | None) -> Task:
    """The task `name` of `family`: the one its resolved `dataset:` block defines, else (a record that names its
    task alone) the one of that name the family ships."""
    return load_family(family).TASKS[name] if dataset is None else _dataset_task(family, name, dataset)


def replaces(task: Task, direction: Direction, new: float, kept: float | None) -> bool:
    """Whether a trial's new report becomes the one that stands for it (`kept`: the current one's value, None:
    none yet): the last for a task that selects the last, else the best, and the later of equal ones, as Ray's
    checkpoint manager keeps them (so a retrained trial is scored from the checkpoint the search kept)."""
    if task.selects == "last" or kept is None or math.isnan(kept):
        return True
    return direction.at_least_as_good(new, kept)
