"""What makes a result reproducible: the command, the settings, package versions and git commit, in the typed
record written once into each experiment folder (`llmm_experiment.json`) and copied into every export."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmm_tune.project import CHECKOUT
from llmm_tune.tune import storage
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.objectives import Objective
from llmm_tune.tune.spaces import SearchSpec, load_spec

METADATA_FILE = "llmm_experiment.json"
LOFTQ_CACHE = "loftq"  # <experiment>/loftq/: LoftQ initialisations every trial of the search shares
BUDGET_FILE = "llmm_budget.json"  # when --budget stopped the search, and the trials it cut (tune/driver.BudgetStop)
PACKAGES = ("llmm-tune", "torch", "transformers", "peft", "bitsandbytes", "ray", "optuna", "datasets")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# What makes the numbers: a change elsewhere (the README, tests) does not make a record dirty.
CODE_PATHS = ("llmm_tune", "trainables", "pyproject.toml", "requirements.lock")


def git_commit() -> str:
    """The checkout's commit, marked `-dirty` when the code that makes results has uncommitted changes ("unknown" for
    an installed wheel: its version is in the record's versions)."""
    if CHECKOUT is None:
        return "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=CHECKOUT, capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(module: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", module, *args])


def fresh_name(storage_dir: Path, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... whichever is free: running the same search again starts a new one."""
    taken = set(storage.list_names(str(storage_dir)))
    number = 1
    while (name := base if number == 1 else f"{base}-{number}") in taken:
        number += 1
    return name


@dataclass
class ExperimentRecord:
    """An experiment as `llmm_tune.search` started it, written once into its folder and read by every command
    that continues, exports or compares it. Records written by older versions load through `from_dict`."""

    name: str
    family: str
    task: str
    space: str  # the space's name, or its file as given
    space_yaml: str  # the space itself: a search resumes and exports without the file
    profile: str
    method: str
    metric: str
    mode: str
    seed: int  # the searcher's and the validation split's
    model: str
    num_samples: int
    overrides: dict  # the fixed settings the command line set (seed, model, on_bad_row, fsdp)
    options: dict  # the search's command-line options, parsed (compare reuses a search only with the same ones)
    command: str
    git_commit: str
    versions: dict
    started: str
    resources: dict = field(default_factory=dict)  # cluster.Layout's record
    data: str = "hub"  # as records name the data: portable (data.portable_source)
    data_dir: str | None = None  # this machine's data folder, to resume here
    trust_remote_code: bool = False
    sampler: str = "tpe"
    early_stopping: bool = True
    trackers: dict = field(default_factory=dict)  # per tracker, the search's own run (llmm_tune.tune.trackers)
    warm_starts: list = field(default_factory=list)  # each enqueued point and its origin (llmm_tune.tune.transfer)
    budget: dict = field(default_factory=dict)  # --budget's sizing (llmm_tune.tune.budget.Sizing), else empty
    objectives: list = field(default_factory=list)  # --objectives' [{metric, mode}, ...], the first `metric`; else
    # empty (one objective, `metric`)

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentRecord:
        """A record as written, older ones too: before `overrides` they kept seed, model, on_bad_row and fsdp
        apart, before `options` compare re-read the command."""
        known = {f.name for f in fields(cls)}
        legacy = {k: values[k] for k in ("seed", "model", "on_bad_row") if k in values}
        values = {"overrides": {**legacy, **({"fsdp": True} if values.get("fsdp") else {})}, "options": {},
                  **values}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def tracker_names(self) -> list[str]:
        """The trackers the search logs to (`--tracker`), the same when it resumes."""
        return self.options.get("tracker") or []

    def spec(self) -> SearchSpec:
        """The search space as the experiment resolved it, with the command line's fixed settings: its trials'
        settings are these fixed ones and their own searched ones."""
        return load_spec(self.space, self.profile, self.method, self.num_samples, text=self.space_yaml,
                         overrides=self.overrides, metric=self.metric if self.objectives else None)

    @property
    def objective_list(self) -> list[Objective]:
        """The search's objectives ([]: it selects on `metric` alone)."""
        return [Objective(**objective) for objective in self.objectives]

    def warm_start_origin(self, config: dict) -> str | None:
        """Where the warm start a trial ran came from (None: the searcher proposed it)."""
        return next((start["origin"] for start in self.warm_starts
                     if all(config.get(name) == value for name, value in start["config"].items())), None)

    def context(self, experiment: str | None = None) -> TrialContext:
        """The context of this experiment's trials, its LoftQ initialisations kept in `experiment` (None: in memory
        only, as a retraining elsewhere keeps them)."""
        cache = None if experiment is None else storage.join(str(experiment), LOFTQ_CACHE)
        space = self.space_yaml
        return TrialContext.of(self.family, self.task, self.metric, self.trust_remote_code, cache,
                               TrialContext.dataset_in(space), TrialContext.shift_in(space),
                               tuple(objective["metric"] for objective in self.objectives[1:]))

    @property
    def direction(self) -> Direction:
        return Direction(self.mode)

    def write(self, experiment: str) -> None:
        storage.write_text(storage.join(str(experiment), METADATA_FILE),
                           json.dumps(asdict(self), indent=2, default=str))


def read_budget_stop(experiment: str) -> dict | None:
    """What --budget stopped, if it stopped the search: {"after_s", "cut": [trial ids]}."""
    path = storage.join(str(experiment), BUDGET_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def read_record(experiment: str) -> ExperimentRecord | None:
    """The experiment's record, or None when `experiment` is not an llmm-tune experiment."""
    path = storage.join(str(experiment), METADATA_FILE)
    return ExperimentRecord.from_dict(json.loads(storage.read_text(path))) if storage.exists(path) else None
