"""The export record (best.yaml, configs/<row>.yaml): everything needed to train a trial again and check its
numbers, written and read through one type."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.files import write_text
from llmm_tune.results.collect import plain, trial_config
from llmm_tune.train.data import DATASET_SOURCE, locate_source
from llmm_tune.train.dataset import DataBlock
from llmm_tune.tune.context import TrialContext, validation_key
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.experiment import ExperimentRecord
from llmm_tune.tune.family import load_family


@dataclass
class ExportRecord:
    family: str
    task: str
    method: str
    experiment: str
    trial: str
    config: dict  # the trial's settings
    validation: dict  # metric, mode, value and how the split was carved
    held_out: dict  # split and scores
    data: dict  # source, validation_seed, the user's resolved dataset block and the shift sets, if any
    seed: int
    trust_remote_code: bool
    git_commit: str
    versions: dict
    search_command: str
    reproduce: str  # the command that trains it again
    threads: int | None = None  # torch's threads in the trial (its CPUs), which reproduce takes; None: on a GPU

    @classmethod
    def of_trial(cls, trial: pd.Series, meta: ExperimentRecord, held_out: dict, path: Path) -> ExportRecord:
        """The record of `trial` of `meta`'s search with its held-out scores, as it will be written to `path`."""
        config = trial_config(trial, meta)
        split = load_family(meta.family).HELD_OUT
        dataset = TrialContext.dataset_in(meta.space_yaml)  # the task's data (the user's: files named portably, hashed)
        shift = TrialContext.shift_in(meta.space_yaml)  # extra held-out sets the export scored
        layout = meta.resources or {}
        threads = None if layout.get("gpus_per_trial", 0) else max(1, int(layout.get("cpus_per_trial") or 1))
        return cls(
            family=meta.family, task=meta.task, method=meta.method, experiment=trial["experiment"],
            trial=trial["trial"], config=config,
            validation={"metric": meta.metric, "mode": meta.mode, "value": plain(trial[validation_key(meta.metric)]),
                        "split": f"{config['validation_size']} of train, seed {meta.seed}, nothing of {split}"},
            held_out={"split": split, "scores": held_out},
            data={"source": meta.data, "validation_seed": meta.seed,
                  **({} if dataset is None else {"dataset": dataset.fields}),
                  **({} if shift is None else {"shift": json.loads(shift)})},
            seed=config["seed"], trust_remote_code=meta.trust_remote_code, git_commit=meta.git_commit,
            versions=meta.versions, search_command=meta.command, threads=threads,
            reproduce=f"python -m llmm_tune.reproduce {relative_to_cwd(path)} --seeds {config['seed']}")

    @classmethod
    def read(cls, path: Path) -> ExportRecord:
        if not path.is_file():
            raise UsageError(f"{path} not found; pass a best.yaml or configs/*.yaml written by llmm_tune.export")
        raw = yaml.safe_load(path.read_text())
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"family", "config", "data"} <= set(raw):
            raise UsageError(f"{path} is not an export record (no family/config/data); pass a file written by "
                             "llmm_tune.export")
        missing = {f.name for f in fields(cls) if f.default is MISSING} - set(raw)
        if missing:
            raise UsageError(f"{path} lacks {', '.join(sorted(missing))}; export the search again")
        return cls(**{name: raw[name] for name in names if name in raw})

    def write(self, path: Path) -> None:
        write_text(path, yaml.safe_dump(asdict(self), sort_keys=False))

    @property
    def direction(self) -> Direction:
        return Direction(self.validation["mode"])

    def settings(self) -> dict:
        """The trial's settings (records before the trial context also held task, metric and mode there)."""
        return {k: v for k, v in self.config.items() if k not in ("task", "metric", "mode")}

    def context(self, trust_remote_code: bool | None = None) -> TrialContext:
        """The context the trial ran in (`trust_remote_code`: as given here, else the record's)."""
        trust = self.trust_remote_code if trust_remote_code is None else trust_remote_code
        dataset, shift = self.data.get("dataset"), self.data.get("shift")
        return TrialContext.of(self.family, self.task, self.validation["metric"], trust,
                               dataset=DataBlock.of(dataset),
                               shift=None if shift is None else json.dumps(shift, sort_keys=True))

    def prepare_data(self, context: TrialContext, data_dir: str | None) -> tuple[object, str]:
        """(the trial's train and validation data, its source) found on this machine, as the search split them."""
        found = locate_source(self.data["source"], data_dir)
        source = context.source(None if found in ("hub", DATASET_SOURCE) else found)
        config = {**self.settings(), "seed": self.data["validation_seed"]}
        return context.recipe.prepare(config, context, source), source


TRIAL_RECORD = "configs/trial-{}.yaml"  # beside best.yaml: the record of a trial of a multi-objective search's front


def trial_record(path: Path, trial: str) -> Path:
    """The record the export wrote of `trial` (a trial of pareto.md's front) beside the export record `path`."""
    folder = path.parent.parent if path.parent.name == "configs" else path.parent
    found = folder / TRIAL_RECORD.format(trial)
    if not found.is_file():
        raise UsageError(f"--trial {trial}: no {found}; the export writes a record of each trial on a multi-objective "
                         f"search's Pareto front: pass a trial that {folder / 'pareto.md'} marks as on the front")
    return found


def relative_to_cwd(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it, as a user would type it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
