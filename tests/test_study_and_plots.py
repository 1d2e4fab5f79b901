"""The search where users already look: Optuna's study, the export's plots, MLflow and W&B, read back as trials.csv
says. A search of a family without a model (tests/doubles/instant_family.py), tracked by both: its study names the
metric and each trial by Ray's id and trials.csv's number; its export draws every plot; MLflow holds the search as a
parent run with its settings and table and each trial nested with its config and every report; W&B (offline) a
run per trial in the search's group. The history names the metric, numbers trials as trials.csv does and marks
those ASHA stopped; the learning curves run against the family's clock with ASHA's rungs where Ray puts them."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.schedulers import ASHAScheduler

from llmm_tune.results.plots import (
    NAMED_CURVES,
    asha_rungs,
    curves_figure,
    history_figure,
    importance_figure,
    parallel_figure,
)
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.searcher import JOURNAL, NUMBER, RAY_TRIAL_ID
from llmm_tune.tune.trackers import TRIAL_TAG
from tests.helpers.search_fixtures import earlier_results, run_module, tiny_space
from tests.helpers.wandb_records import run_of

# its module-scoped runs serve several tests: the whole module runs on one xdist worker
pytestmark = pytest.mark.xdist_group("test_study_and_plots")

PLOTS = ("history.png", "importance.png", "curves.png", "parallel.png")


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """A finished search of 4 trials of 4 epochs each, and its export."""
    root = tmp_path_factory.mktemp("study")
    space = tiny_space(root, root / "no-model", "instant", family="tests.doubles.instant_family", epochs=4)
    earlier = earlier_results(root / "earlier", [dict(trial="e1", lr=2e-2, scale=50.0, rank=8, K=1, bits=4,
                                                      quant_method="normal_float", val_mcc=0.4)])
    trackers = {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "WANDB_MODE": "offline",
                "WANDB_DIR": str(root), "WANDB_PROJECT": "llmm-test"}
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--num-samples", "4", "--storage",
                     str(root / "runs"), "--results", str(root / "results"), "--name", "instant",
                     "--cpus-per-trial", "1", "--tracker", "mlflow", "--tracker", "wandb",
                     "--warm-start-from", str(earlier), env=trackers,
                     cwd=root)  # MLflow puts a sqlite store's artefacts in ./mlruns
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    journal = JournalStorage(JournalFileBackend(str(root / "runs" / "instant" / JOURNAL)))
    return {"study": optuna.load_study(study_name="instant", storage=journal), "out": root / "results" / "cola",
            "trials": pd.read_csv(root / "results" / "cola" / "trials.csv"), "console": run.stdout,
            "mlflow": trackers["MLFLOW_TRACKING_URI"], "wandb": root / "wandb"}


def test_an_earlier_searchs_best_runs_first_moved_into_the_space_and_trials_csv_says_where_it_came_from(searched):
    trials = searched["trials"].set_index("warm_start")
    earlier = trials.loc["earlier trial e1 (val_mcc 0.4)"]  # named from the working directory; lr 0.02 clipped
    assert (earlier["lr"], earlier["scale"], earlier["rank"], earlier["quant_method"]) == (0.01, 50, 8, "normal_float")
    assert trials.loc["space instant", "lr"] == 5e-3  # then the space's own warm start
    assert searched["trials"]["warm_start"].isna().sum() == 2  # the searcher's own proposals
    assert "warm start from" in searched["console"] and "lr=0.02 is outside this space" in searched["console"]


def test_mlflow_holds_the_search_as_a_parent_run_and_every_trial_nested_with_its_config_and_reports(searched):
    from mlflow import MlflowClient

    client, trials = MlflowClient(searched["mlflow"]), searched["trials"]
    runs = client.search_runs([client.get_experiment_by_name("llmm-tune/cola").experiment_id])
    (search,) = [r for r in runs if r.data.tags.get("llmm.kind") == "search"]
    assert search.info.status == "FINISHED" and search.data.params["num_samples"] == "4"
    assert search.data.params["fixed.epochs"] == str(trials["epochs"].iloc[0])  # the settings no trial searched
    assert {a.path for a in client.list_artifacts(search.info.run_id, "results")} >= {"results/table.md",
                                                                                       "results/trials.csv"}
    nested = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id}
    assert sorted(nested) == sorted(trials["trial"]) and len(runs) == 5
    for _, trial in trials.iterrows():
        run = nested[trial["trial"]]
        assert float(run.data.params["lr"]) == pytest.approx(trial["lr"]) and "epochs" not in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_mcc")  # every report, the best as trials.csv's
        assert len(history) == trial["evaluations"] and max(m.value for m in history) == pytest.approx(trial["val_mcc"])


def test_wandb_offline_keeps_a_run_per_trial_in_the_searchs_group_with_config_and_every_report(searched):
    runs = {run["id"]: run for run in map(run_of, searched["wandb"].glob("offline-run-*"))}
    trials = searched["trials"]
    assert len(trials) == 4 and set(runs) == {*trials["trial"], "instant-search"}  # a run per trial, and the search's
    assert {run["group"] for run in runs.values()} == {"instant"} and runs["instant-search"]["job_type"] == "search"
    for _, trial in trials.iterrows():
        run = runs[trial["trial"]]
        assert run["config"]["lr"] == pytest.approx(trial["lr"]) and len(run["history"]) == trial["evaluations"]
        assert max(row["val_mcc"] for row in run["history"]) == pytest.approx(trial["val_mcc"])


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
    axes = history_figure(trials, "val_mcc", Direction("max")).axes[0]
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
    trials = pd.DataFrame({"trial": ["a", "b", "c"], "number": [1, 2, 3], "val_mcc": [0.2, None, None]})  # b
    # reported no value, c nothing
    axes = curves_figure(histories, trials, "val_mcc", "epoch", rungs, Direction("max")).axes[0]
    assert axes.get_xlabel() == "epoch" and axes.get_ylabel() == "val_mcc"
    lines = [(line.get_label(), list(line.get_xdata())) for line in axes.lines]
    assert [line for line in lines if line[0].startswith("trial")] == [("trial 1", [1, 2])]
    assert [x for label, x in lines if not label.startswith("trial")] == [[rung, rung] for rung in rungs]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_learning_curves_of_many_trials_name_the_best_and_draw_the_rest_grey(mode):
    values = [0.05 * i for i in range(NAMED_CURVES + 5)]
    histories = {f"t{i}": pd.DataFrame({"epoch": [1, 2], "val_mcc": [v / 2, v]}) for i, v in enumerate(values)}
    trials = pd.DataFrame({"trial": list(histories), "number": range(1, len(values) + 1), "val_mcc": values})
    axes = curves_figure(histories, trials, "val_mcc", "epoch", [], Direction(mode)).axes[0]
    best = sorted(range(len(values)), key=lambda i: values[i], reverse=mode == "max")[:NAMED_CURVES]
    assert sorted(line.get_label() for line in axes.lines) == sorted(f"trial {i + 1}" for i in best)
    (grey,) = axes.collections
    assert len(grey.get_segments()) == 5 and grey.get_label() == "5 other trials"
    assert [text.get_text() for text in axes.get_legend().get_texts()][0] == "5 other trials"


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_parallel_coordinates_draw_the_worst_trials_visibly_not_white_on_white(direction):
    from matplotlib.collections import LineCollection

    study = optuna.create_study(direction=direction)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, value in enumerate([0.0, 0.1, 0.3, 0.5]):  # CoLA's MCC 0 of a trial that learnt nothing among them
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-4 * 3**i}, distributions={"lr": lr}, value=value))
    figure = parallel_figure(study, "val_mcc", settings=1)
    (lines,) = [c for axes in figure.axes for c in axes.collections
                if isinstance(c, LineCollection) and c.get_array() is not None]
    colours = lines.to_rgba(lines.get_array())
    assert len(colours) == 4 and colours[:, :3].mean(axis=1).max() < 0.8  # Optuna's Blues drew 0.0 at 0.97
