"""What a trial knows besides its settings: its family and task, the metric that selects and its direction,
which report stands for it, whether the model's own code may run, and where LoftQ initialisations are kept.
Built once where a search, a reproduction or a compare starts, and handed to every consumer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from llmm_tune.train.data import DATASET_SOURCE
from llmm_tune.train.dataset import DataBlock
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.family import Task, load_family, task_definition


def validation_key(metric: str) -> str:
    """The key a trial reports `metric` on its validation split under (the fit loop's `val_` prefix)."""
    return f"val_{metric}"


@dataclass(frozen=True)
class TrialContext:
    family: str
    task: str
    metric: str  # the selection metric, reported as val_<metric>
    mode: str  # "max" or "min": the metric's better direction
    selects: str  # the report that stands for a trial: its "best", or its "last" (a task sequence)
    trust_remote_code: bool = False
    loftq_cache: str | None = None  # a folder or URI every trial of the search shares; None: memory only
    dataset: DataBlock | None = None  # the space's resolved `dataset:` block (a continual space's: its list of task
    # blocks); None: the task is named alone (a record from before shipped tasks had blocks)
    shift: str | None = None  # the space's resolved `shift:` entries as JSON (extra held-out sets), else None
    objectives: tuple[str, ...] = ()  # the search's other objectives (--objectives), whose values at the report
    # that stands go out beside the selection metric's (`best_val_<metric>`)

    @classmethod
    def of(cls, family: str, task: str, metric: str | None = None, trust_remote_code: bool = False,
           loftq_cache: str | None = None, dataset: DataBlock | None = None, shift: str | None = None,
           objectives: tuple[str, ...] = ()) -> TrialContext:
        """The context of `task` of `family` selecting on `metric` (default: the task's); the direction and which
        report stands are the task's."""
        definition = task_definition(family, task, dataset)
        metric = metric or definition.metric
        return cls(family, task, metric, definition.metrics[metric], definition.selects, trust_remote_code,
                   loftq_cache, dataset, shift, objectives)

    @property
    def recipe(self) -> ModuleType:
        return load_family(self.family)

    @property
    def definition(self) -> Task:
        return task_definition(self.family, self.task, self.dataset)

    def source(self, data_dir: Path | None) -> str:
        """Where the task's data comes from: the user's data block, else (a shipped task) the family's check of the
        data folder or the hub (a UsageError naming the fix)."""
        if self.dataset and self.dataset.users:
            return DATASET_SOURCE
        return self.recipe.check_data(self.task, data_dir)

    @property
    def direction(self) -> Direction:
        return Direction(self.mode)

    @property
    def value_key(self) -> str:
        """The reported key a trial is selected on."""
        return validation_key(self.metric)

    @staticmethod
    def dataset_in(space_yaml: str) -> DataBlock | None:
        """The resolved `dataset:` block of a search space's YAML, as the context carries it."""
        return DataBlock.of((yaml.safe_load(space_yaml) or {}).get("dataset"))

    @staticmethod
    def shift_in(space_yaml: str) -> str | None:
        """The resolved `shift:` entries of a search space's YAML, as JSON (as the context carries them)."""
        entries = (yaml.safe_load(space_yaml) or {}).get("shift")
        return None if entries is None else json.dumps(entries, sort_keys=True)

    def checkpoint_ranking(self) -> dict:
        """How Ray ranks a trial's checkpoints to keep the one that stands (keyword arguments of its
        CheckpointConfig): by the selection metric, or, for a task judged by its last report, the latest."""
        if self.selects == "last":
            return {"checkpoint_score_attribute": None}
        return {"checkpoint_score_attribute": self.value_key, "checkpoint_score_order": self.mode}

    def loftq_store(self):
        """Where `apply_llmm` keeps LoftQ initialisations for the other trials (a folder or an object store)."""
        if self.loftq_cache is None:
            return None
        from llmm_tune.tune.storage import Store

        return Store(self.loftq_cache)
