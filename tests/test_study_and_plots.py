"""The search's Optuna study and the export's plots read as trials.csv does. A search of a family without a model
(tests/instant_family.py): its study names the metric and each trial by Ray's id and trials.csv's number; its export
draws every plot. The history names the metric, numbers trials as trials.csv does and marks those ASHA stopped; the
learning curves run against the family's clock with ASHA's rungs where Ray puts them."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.schedulers import ASHAScheduler

from llmm_tune.export import asha_rungs, curves_figure, history_figure, importance_figure
from llmm_tune.tune.searcher import JOURNAL, NUMBER, RAY_TRIAL_ID
from tests.search_fixtures import run_module, tiny_space

PLOTS = ("history.png", "importance.png", "curves.png", "parallel.png")


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """A finished search of 4 trials of 4 epochs each, and its export."""
    root = tmp_path_factory.mktemp("study")
    space = tiny_space(root, root / "no-model", "instant", family="tests.instant_family", epochs=4)
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--num-samples", "4", "--storage",
                     str(root / "runs"), "--results", str(root / "results"), "--name", "instant",
                     "--cpus-per-trial", "1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    journal = JournalStorage(JournalFileBackend(str(root / "runs" / "instant" / JOURNAL)))
    return {"study": optuna.load_study(study_name="instant", storage=journal), "out": root / "results" / "cola",
            "trials": pd.read_csv(root / "results" / "cola" / "trials.csv"), "console": run.stdout}


def test_the_study_names_its_metric_and_each_trial_as_trials_csv_does(searched):
    study, trials = searched["study"], searched["trials"]
    assert study.metric_names == ["val_mcc"] and len(trials) == 4
    named = {(t.user_attrs[RAY_TRIAL_ID], t.user_attrs[NUMBER]): t.value for t in study.trials}
    assert named == pytest.approx(dict(zip(zip(trials["trial"], trials["number"]), trials["val_mcc"])))


def test_the_export_draws_every_plot_and_says_when_importances_rest_on_few_trials(searched):
    for name in PLOTS:
        assert (searched["out"] / name).stat().st_size > 0, name
    assert "importance.png (on 4 trials: too few to trust)" in searched["console"]


def test_the_history_names_the_metric_numbers_trials_as_trials_csv_and_marks_the_early_stopped():
    trials = pd.DataFrame({"number": [3, 1, 2, 4], "val_mcc": [0.3, 0.1, None, 0.2],
                           "stopped_early": [True, False, True, False]})
    axes = history_figure(trials, "val_mcc", "max").axes[0]
    assert axes.get_ylabel() == "val_mcc"
    points = {c.get_label(): c.get_offsets().tolist() for c in axes.collections}
    assert points == {"trial": [[1, 0.1], [4, 0.2]], "stopped early by ASHA": [[3, 0.3]]}
    assert axes.lines[0].get_ydata().tolist() == [0.1, 0.3, 0.3]  # the best so far, trial by trial


def test_importances_from_few_trials_say_so_in_their_title():
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "rank": optuna.distributions.CategoricalDistribution([4, 8])}
    study = optuna.create_study(direction="maximize")
    for lr, rank, value in ((1e-3, 4, 0.1), (3e-3, 8, 0.3), (5e-3, 4, 0.2)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "rank": rank}, distributions=distributions,
                                                  value=value))
    axes = importance_figure(study, "val_mcc", " (on 3 trials: too few to trust)").axes[0]
    assert axes.get_title(loc="left") == "Hyperparameter Importances (on 3 trials: too few to trust)"


@pytest.mark.parametrize("grace, factor, budget", [(1, 2, 4), (1, 3, 10), (2, 2, 16)])
def test_learning_curves_run_against_the_clock_with_ashas_rungs_where_ray_puts_them(grace, factor, budget):
    asha = ASHAScheduler(time_attr="epoch", metric="val_mcc", mode="max", max_t=budget, grace_period=grace,
                         reduction_factor=factor)
    rungs = asha_rungs({"grace_period": grace, "reduction_factor": factor}, budget)
    assert rungs == sorted(milestone for milestone, _ in asha._brackets[0]._rungs if milestone < budget)
    histories = {"a": pd.DataFrame({"epoch": [1, 2], "val_mcc": [0.1, 0.2]}), "b": pd.DataFrame({"epoch": [1]})}
    trials = pd.DataFrame({"trial": ["a", "b", "c"], "number": [1, 2, 3]})  # b reported no value, c nothing
    axes = curves_figure(histories, trials, "val_mcc", "epoch", rungs).axes[0]
    assert axes.get_xlabel() == "epoch" and axes.get_ylabel() == "val_mcc"
    lines = [(line.get_label(), list(line.get_xdata())) for line in axes.lines]
    assert [line for line in lines if line[0].startswith("trial")] == [("trial 1", [1, 2])]
    assert [x for label, x in lines if not label.startswith("trial")] == [[rung, rung] for rung in rungs]
