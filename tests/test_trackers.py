"""A resumed search continues its tracker runs: the same MLflow parent run, and each trial's run found again by its
Ray trial id rather than opened a second time (Ray's callback keeps its trial -> run map in memory only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmm_tune.errors import UsageError
from llmm_tune.tune import trackers
from llmm_tune.tune.experiment import ExperimentRecord
from llmm_tune.tune.spaces import space_path


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artefacts in ./mlruns
    return uri


def record() -> ExperimentRecord:
    return ExperimentRecord(name="cola-llmm-cpu", family="glue", task="cola", space="glue_cola",
                            space_yaml=space_path("glue_cola").read_text(), profile="cpu", method="llmm",
                            metric="mcc", mode="max", seed=0, model="minilm", num_samples=2, overrides={},
                            options={"tracker": ["mlflow"]}, command="python -m llmm_tune.search glue_cola",
                            git_commit="abc", versions={}, started="now")


class Trial(SimpleNamespace):
    """What Ray's MLflow callback reads of a trial; hashed by identity, as Tune's trials are."""

    __hash__ = object.__hash__

    def __str__(self) -> str:
        return f"trainable_{self.trial_id}"


def trial_run(state: dict, trial: Trial) -> str:
    """The run a freshly set-up callback (as after a restore) logs `trial` to."""
    callback = trackers.callbacks(["mlflow"], SimpleNamespace(trackers={"mlflow": state}))[0]
    callback.setup()
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"val_mcc": 0.1, "training_iteration": 1})
    return callback._trial_runs[trial]


def test_a_resumed_search_reopens_its_parent_run_and_each_trials_run(tracking):
    from mlflow import MlflowClient

    searched = record()
    trackers.start(["mlflow"], searched)
    state = dict(searched.trackers["mlflow"])
    trial = Trial(trial_id="a1b2c3d4", config={"lr": 1e-4}, local_path="/nowhere")
    first = trial_run(state, trial)
    again = trial_run(state, Trial(trial_id="a1b2c3d4", config={"lr": 1e-4}, local_path="/nowhere"))
    other = trial_run(state, Trial(trial_id="e5f6a7b8", config={"lr": 1e-3}, local_path="/nowhere"))
    assert first == again != other
    resumed = ExperimentRecord.from_dict({**searched.__dict__})
    trackers.start(["mlflow"], resumed)
    assert resumed.trackers["mlflow"] == state
    client = MlflowClient()
    assert client.get_run(state["parent_run_id"]).info.status == "RUNNING"
    assert client.get_run(first).data.tags["mlflow.parentRunId"] == state["parent_run_id"]
    assert len(client.get_metric_history(first, "val_mcc")) == 2  # one report before the restore, one after


def test_a_tracker_that_is_not_installed_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="--tracker mlflow needs the mlflow package; pip install mlflow-skinny"):
        trackers.check_installed(["mlflow"])
