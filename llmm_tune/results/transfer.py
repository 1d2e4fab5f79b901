"""Warm starts from earlier searches (`search --warm-start-from PATH ...`): the best configurations of exported
results (a folder the export wrote: trials.csv and best.yaml) or of experiments (a folder under a search's
--storage), of another task, model or method, moved into this search's space and tried before the searcher's own
proposals. Optuna's own warm starting (`enqueue_trial`, Ray's `points_to_evaluate`) takes the points; what it does
not do is read our results, rank them and fit them into another space, which is what this module adds."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from llmm_tune.errors import UsageError
from llmm_tune.results.collect import collect, plain
from llmm_tune.results.record import ExportRecord
from llmm_tune.tune.context import validation_key
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.experiment import read_record
from llmm_tune.tune.spaces import SearchSpec, project

# The best configurations taken from each earlier search. Replayed on recorded curves (MRPC warm-started from
# CoLA's table; results/search_efficiency/mrpc.md, 50 seeds of 16 trials), 1, 3 and 5 reached random search's best
# in 42, 41 and 41 searches of 50 at a median 0.47, 0.56 and 0.69 of its compute: another task's best are spent
# first whether they suit this one or not, so one is the default.
DEFAULT_TOP = 1


def earlier_trials(path: str) -> tuple[pd.DataFrame, str, Direction]:
    """(one row per trial, the validation column, its direction) of exported results or of an experiment."""
    folder = Path(path)
    if (folder / "trials.csv").is_file() and (folder / "best.yaml").is_file():
        record = ExportRecord.read(folder / "best.yaml")
        return pd.read_csv(folder / "trials.csv"), validation_key(record.validation["metric"]), record.direction
    record = read_record(path)
    if record is None:
        raise UsageError(f"--warm-start-from {path}: holds neither exported results (trials.csv and best.yaml) nor "
                         "an experiment (llmm_experiment.json); pass a results folder the export wrote "
                         "(results/<task>) or an experiment folder under a search's --storage")
    found = collect(path)
    return found.trials, found.context.value_key, found.context.direction


def portable_name(path: str) -> str:
    """A folder as a record names it: relative to the working directory when inside it, else as given."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute) if Path(absolute).is_relative_to(Path.cwd()) else path


def best_points(path: str, space: dict, top: int) -> list[tuple[dict, str, list[str]]]:
    """The `top` best trials of the search at `path`, each as (its configuration moved into `space`, where it came
    from, what the move changed)."""
    trials, value, direction = earlier_trials(path)
    if not set(space) & set(trials.columns):
        raise UsageError(f"--warm-start-from {path}: its trials set none of the settings this space searches "
                         f"({', '.join(space)}); warm-start from a search of the same method's settings")
    if value not in trials:
        raise UsageError(f"--warm-start-from {path}: its trials.csv has no {value} column; export the search again")
    return ranked_points(trials, value, direction, space, top, portable_name(path))


def ranked_points(trials: pd.DataFrame, value: str, direction: Direction, space: dict, top: int,
                  source: str) -> list[tuple[dict, str, list[str]]]:
    """The `top` best of `trials` on `value`, each as (its configuration moved into `space`, where it came from (a
    trial of `source`), what the move changed)."""
    shared = sorted(set(space) & set(trials.columns))
    ranked = trials[trials[value].notna()].sort_values(value, ascending=direction.ascending).head(top)
    points = []
    for _, trial in ranked.iterrows():
        given = {name: setting for name in shared if (setting := plain(trial[name])) is not None}
        projected, changes = project(given, space)
        points.append((projected, f"{source} trial {trial['trial']} ({value} {trial[value]:.4g})", changes))
    return points


def warm_start_from(paths: list[str], spec: SearchSpec, top: int = DEFAULT_TOP) -> list[dict]:
    """Put the best configurations of the searches at `paths` first in `spec.warm_start` (the space's own follow),
    noting each move in `spec.adjustments`; returns every warm start with its origin, for the record."""
    earlier = [point for path in paths for point in best_points(path, spec.space, top)]
    origins, points = [], []
    for projected, origin, changes in earlier:
        spec.adjustments += [f"warm start from {origin}: {change}" for change in changes]
        if projected not in points:
            points.append(projected)
            origins.append({"origin": origin, "config": projected})
            spec.adjustments.append(f"warm start {len(points)}: {origin}")
    own = [point for point in spec.warm_start if point not in points]
    spec.warm_start = points + own
    return origins + [{"origin": f"space {spec.path.stem}", "config": point} for point in own]
