"""Experiment trackers (`search --tracker mlflow|wandb`, repeatable): the search is a parent run holding its settings
and, at its end, the exported table as artefacts; each trial is a run under it with its config and every report.
Where the tracker lives and who may write to it comes from its usual environment variables (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_MODE, WANDB_API_KEY, ...). A resumed search continues the same runs.

Ray Tune's own logger callbacks log the trials. Written here, because they do not: the parent run and its
artefacts; and, for MLflow, finding a trial's run again after a resume (Ray keeps its trial -> run map in memory
only, so a restored search would open a second run per trial). W&B has no nested runs: the search run and its
trials share the experiment's name as their group, as Ray groups them, and a trial's run id is its Ray trial id.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from llmm_tune.errors import UsageError

TRACKERS = {"mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}
TRIAL_TAG = "ray_trial_id"  # the MLflow tag that names a trial's run


def check_installed(trackers: list[str]) -> None:
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--tracker {name} needs the {name} package; pip install {TRACKERS[name].split()[0]}, "
                             "or drop --tracker")


def flat_settings(record) -> dict:
    """What a search run records as its parameters: how it searched, its space (as its profile and method resolved it)
    and its fixed settings (a trial's run holds the settings searched)."""
    spec = record.spec()
    return {"task": record.task, "method": record.method, "profile": record.profile, "metric": record.metric,
            "num_samples": record.num_samples, "sampler": record.sampler, "seed": record.seed, "model": record.model,
            "git_commit": record.git_commit, "early_stopping": record.early_stopping,
            **{f"space.{k}": v for k, v in spec.space.items()}, **{f"fixed.{k}": v for k, v in spec.fixed.items()}}


def start(trackers: list[str], record) -> None:
    """Open (or, on resume, reopen) the search's own run in each tracker; its id goes into the record."""
    for name in trackers:
        record.trackers[name] = {"mlflow": _start_mlflow, "wandb": _start_wandb}[name](record)


def callbacks(trackers: list[str], record) -> list:
    """Ray Tune callbacks that log each trial as a run of the search's."""
    found = []
    if "mlflow" in trackers:
        found.append(_trial_runs_under(record.trackers["mlflow"]))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        found.append(WandbLoggerCallback(group=record.name, resume="allow", job_type="trial",
                                         project=_wandb_project(record)))
    return found


def finish(trackers: list[str], record, table_folder: Path | None) -> None:
    """Log the exported table (when there is one) to the search's run and end it."""
    if "mlflow" in trackers:
        _finish_mlflow(record.trackers["mlflow"], table_folder)
    if "wandb" in trackers:
        _finish_wandb(record, table_folder)


def _start_mlflow(record) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient()
    state = record.trackers.get("mlflow")
    if state:  # resumed: the same parent run
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", f"llmm-tune/{record.task}")
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=record.name, tags={"llmm.command": record.command,
                                                                         "llmm.kind": "search"})
    for key, value in flat_settings(record).items():
        client.log_param(run.info.run_id, key, value)
    return {"experiment_name": name, "experiment_id": experiment_id, "parent_run_id": run.info.run_id}


def _trial_runs_under(state: dict):
    """Ray's MLflow callback with every trial's run nested under the search's, found again after a resume."""
    from mlflow import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class NestedTrialRuns(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            if trial not in self._trial_runs:
                existing = MlflowClient().search_runs(
                    [state["experiment_id"]], filter_string=f"tags.{TRIAL_TAG} = '{trial.trial_id}' and "
                                                            f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
                if existing:
                    self._trial_runs[trial] = existing[0].info.run_id
                else:
                    self.tags = {**self.tags, TRIAL_TAG: trial.trial_id}
            super().log_trial_start(trial)

    return NestedTrialRuns(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"), experiment_name=state["experiment_name"],
                           tags={"mlflow.parentRunId": state["parent_run_id"]})


def _finish_mlflow(state: dict, table_folder: Path | None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    if table_folder is not None:
        client.log_artifacts(state["parent_run_id"], str(table_folder), artifact_path="results")
    client.set_terminated(state["parent_run_id"], status="FINISHED")


def _wandb_project(record) -> str:
    return os.environ.get("WANDB_PROJECT") or f"llmm-tune-{record.task}"


def _start_wandb(record) -> dict:
    import wandb

    state = record.trackers.get("wandb") or {"search_run_id": re.sub(r"[^\w-]", "-", record.name)[:40] + "-search"}
    run = wandb.init(project=_wandb_project(record), group=record.name, job_type="search", id=state["search_run_id"],
                     name=record.name, config=flat_settings(record), resume="allow", reinit="create_new",
                     settings=wandb.Settings(silent=True))
    run.finish()  # reopened at the end, when the table is there; trials log in their own runs meanwhile
    return state


def _finish_wandb(record, table_folder: Path | None) -> None:
    import wandb

    run = wandb.init(project=_wandb_project(record), group=record.name, job_type="search",
                     id=record.trackers["wandb"]["search_run_id"], resume="allow", reinit="create_new",
                     settings=wandb.Settings(silent=True))
    if table_folder is not None:
        artifact = wandb.Artifact(f"{record.name}-results", type="results")
        artifact.add_dir(str(table_folder))
        run.log_artifact(artifact)
        run.summary["results"] = str(table_folder.name)
    run.finish()
