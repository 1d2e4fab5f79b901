"""An experiment read once: its record, every trial as a row, the checkpoint that stands for each trial and
their reports; the best trial and its held-out scores. What the export, compare, export_adapter and warm starts
read, the way Ray's `ExperimentAnalysis` is what Tune's users read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow.fs as pafs

from llmm_tune.errors import UsageError
from llmm_tune.train.data import locate_source
from llmm_tune.tune import storage
from llmm_tune.tune.context import TrialContext, validation_key
from llmm_tune.tune.experiment import ExperimentRecord, read_budget_stop, read_record
from llmm_tune.tune.family import load_family
from llmm_tune.tune.spaces import SearchSpec

VERSION_KEYS = ("torch", "transformers", "peft", "bitsandbytes", "ray", "optuna")


class Collected(NamedTuple):
    """What an experiment holds, read once: Ray's reading of every trial's reports grows with the trials."""

    meta: ExperimentRecord
    spec: SearchSpec  # the space as the experiment resolved it
    context: TrialContext  # what its trials were told
    trials: pd.DataFrame  # one row per trial
    checkpoints: dict  # trial id -> the checkpoint that stands for it
    histories: dict[str, pd.DataFrame]  # trial id -> its reports

    def scored(self) -> pd.DataFrame:
        """The trials with a validation score and a checkpoint that stands for them."""
        value = self.context.value_key
        return self.trials[self.trials[value].notna() & self.trials["trial"].isin(self.checkpoints)]


def collect(experiment: str) -> Collected:
    """An experiment's record, trials, standing checkpoints and reports."""
    from ray.tune import ExperimentAnalysis

    meta = read_record(experiment)
    if meta is None:
        raise UsageError(f"{experiment} is not an llmm-tune experiment (no llmm_experiment.json); pass a folder "
                         "under the search's --storage")
    spec = meta.spec()
    context = meta.context(experiment)
    storage.mend_cut_state(experiment)
    analysis = ExperimentAnalysis(experiment)
    rows, checkpoints = [], {}
    cut = set((read_budget_stop(experiment) or {}).get("cut", []))
    for trial in analysis.trials:
        rows.append(trial_row(trial, meta, spec, context, trial.trial_id in cut))
        checkpoint = standing_checkpoint(analysis, trial, context, experiment)
        if checkpoint is not None:
            checkpoints[trial.trial_id] = checkpoint
    return Collected(meta, spec, context, pd.DataFrame(rows).sort_values("number", kind="stable"), checkpoints,
                     analysis.trial_dataframes)


def trial_row(trial, meta: ExperimentRecord, spec: SearchSpec, context: TrialContext, cut: bool = False) -> dict:
    """One trial as trials.csv has it: its settings, status, standing value and provenance; `cut`: ended by the
    search's --budget before its end, at its latest evaluation."""
    last = trial.last_result or {}
    config = {**spec.fixed, **trial.config}  # a trial's config holds what was searched (older ones: everything)
    clock, budget = context.recipe.clock(config, context)
    kept = "last" if context.selects == "last" else context.mode
    return {"experiment": meta.name, "trial": trial.trial_id, "number": trial_number(trial),
            "status": trial.status, **config, "method": meta.method, "task": meta.task,
            "evaluations": last.get("training_iteration", 0),
            # the best of every report (a trial that failed after it reported keeps its score), or the
            # last for a task sequence
            context.value_key: trial.metric_analysis.get(context.value_key, {}).get(kept),
            # each other objective (--objectives) at the report that stands, as the searcher was last told it
            **{key: trial.metric_analysis.get(f"best_{key}", {}).get("last")
               for key in map(validation_key, context.objectives)},
            "failure": last.get("failure"), "seconds": last.get("time_total_s"),
            # ended by ASHA before the end of its budget (as the console says it)
            "stopped_early": trial.status == "TERMINATED" and last.get("failure") is None
            and last.get(clock, budget) < budget and not cut,
            "cut_by_budget": cut,
            "warm_start": meta.warm_start_origin(config),
            "git_commit": meta.git_commit,
            "versions": " ".join(f"{k}={meta.versions.get(k)}" for k in VERSION_KEYS),
            "search_command": meta.command}


def standing_checkpoint(analysis, trial, context: TrialContext, experiment: str):
    """The checkpoint that stands for `trial` (Tune's, or its Ray Train run's), None without one or when an
    unfinished trial's is gone (tune/trainable.py's StartsAgainWhenItsCheckpointIsGone says how)."""
    if not trial.last_result:
        return None
    checkpoint = analysis.get_best_checkpoint(trial, metric=context.value_key, mode=context.mode)
    if checkpoint is None:
        checkpoint = train_checkpoint(analysis.trial_dataframes.get(trial.trial_id), context, experiment)
    if checkpoint is not None and trial.status != "TERMINATED" and not storage.checkpoint_exists(checkpoint):
        print(f"trial {trial.trial_id} ({trial.status.lower()}): its checkpoint {checkpoint.path} is gone, so it "
              "has no held-out score", file=sys.stderr)
        return None
    return checkpoint


def train_checkpoint(results: pd.DataFrame | None, context: TrialContext, experiment: str):
    """The checkpoint that stands for a multi-worker trial, if still kept: its Ray Train run keeps them and
    reports each one's path (`checkpoint_path`, inside the experiment's filesystem) with the metrics. The best
    on the selection metric, or the latest for a task judged by its last report."""
    from ray.train import Checkpoint

    if results is None or "checkpoint_path" not in results:
        return None
    scored = results[results["checkpoint_path"].notna() & results[context.value_key].notna()]
    if context.selects == "last":
        ranked = scored.sort_values("training_iteration", ascending=False, kind="stable")
    else:
        ranked = scored.sort_values(context.value_key, ascending=context.direction.ascending, kind="stable")
    fs = storage.filesystem(experiment)[0]
    for path in ranked["checkpoint_path"]:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return Checkpoint(path, filesystem=fs)
    return None


def trial_number(trial) -> int:
    """The order in which the searcher proposed the trial (Tune's tag starts with it: `3_K=1,...`)."""
    head = trial.experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def ended_trials(experiment: str) -> int:
    """Trials the saved experiment state records as ended (Tune marks the ones it stopped on Ctrl+C as
    terminated in memory, but saves them as pending, which is what a resume reads)."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(experiment).trials)


def best_trial(found: Collected) -> pd.Series:
    """The trial best on validation among those with a standing checkpoint."""
    scored = found.scored()
    if scored.empty:
        raise UsageError(f"no trial of {found.meta.name} has a validation score and a checkpoint yet; check its log "
                         "(llmm_search.log), or export again once trials have reported")
    return scored.loc[found.context.direction.best_label(scored[found.context.value_key])]


def trial_config(trial: pd.Series, meta: ExperimentRecord) -> dict:
    """The trial's settings, as its family names them."""
    return {k: plain(trial[k]) for k in load_family(meta.family).SETTINGS if k in trial}


def data_source(meta: ExperimentRecord) -> str:
    """The search's data on this machine: its folder if still there, else as the record names it."""
    if meta.data_dir and Path(meta.data_dir).is_dir():
        return meta.data_dir
    return str(locate_source(meta.data))


def score_held_out(config: dict, checkpoint, meta: ExperimentRecord, experiment: str) -> dict[str, float]:
    """The held-out metrics of a checkpoint: only the export and `reproduce` ever read that split."""
    context = meta.context(experiment)
    with checkpoint.as_directory() as directory:
        return context.recipe.score(config, context, directory, data_source(meta))


def plain(value):
    """numpy scalars and NaN as plain YAML values."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and value != value else value
