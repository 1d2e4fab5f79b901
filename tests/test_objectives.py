"""Several objectives (`search --objectives mcc:max,loss:min`): the option's form and its refusals before Ray starts,
the Pareto front and the pick rule of the export, and a multi-objective search of a model-free family end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llmm_tune.cli import main
from llmm_tune.results.pareto import PICK_WITHIN, non_dominated, pareto_figure, pick, pick_rule
from llmm_tune.tune.objectives import Objective, parse_objectives, searcher_targets
from tests.helpers.search_fixtures import run_module, tiny_space

TIMED = "tests.doubles.timed_family"


def dominates(a: pd.Series, b: pd.Series, objectives: list[Objective]) -> bool:
    """`a` at least as good as `b` on every objective and better on one, written out apart from the library's."""
    at_least = all(a[o.key] >= b[o.key] if o.mode == "max" else a[o.key] <= b[o.key] for o in objectives)
    better = any(a[o.key] > b[o.key] if o.mode == "max" else a[o.key] < b[o.key] for o in objectives)
    return at_least and better


def test_the_option_reads_as_metrics_and_modes_and_tells_the_searcher_lists():
    objectives = parse_objectives("mcc:max, ece:min,brier:min")
    assert objectives == [Objective("mcc", "max"), Objective("ece", "min"), Objective("brier", "min")]
    assert searcher_targets(objectives, "val_mcc", "max") == (["best_val_mcc", "best_val_ece", "best_val_brier"],
                                                              ["max", "min", "min"])
    assert parse_objectives(None) == []
    assert searcher_targets([], "val_mcc", "max") == ("best_val_mcc", "max")  # a search without: as before


@pytest.mark.parametrize(("given", "says"), [
    ("mcc:up,loss:min", "mcc:up has no mode max or min"),
    ("mcc:max,loss", "each objective is METRIC:MODE"),
    ("mcc:max", "two or more objectives"),
    ("mcc:max,mcc:max", "names a metric twice"),
    ("mcc:max,accuracy:max", "cola's trials report no accuracy; choose among mcc, loss, ece, brier, nll"),
    ("ece:min,mcc:max", "the first objective selects trials, so it is a metric of cola (mcc, loss), not ece"),
    ("mcc:min,ece:min", "write mcc:max"),
])
def test_a_bad_objective_stops_with_one_line_and_exit_2_before_ray(given, says, tmp_path, monkeypatch, capsys):
    space = tiny_space(tmp_path, tmp_path / "no-model", "timed", family=TIMED)
    storage = tmp_path / "runs"
    from llmm_tune.search import run

    monkeypatch.setattr("sys.argv", ["llmm_tune.search", str(space), "--profile", "cpu", "--objectives", given,
                                     "--storage", str(storage), "--no-export"])
    with pytest.raises(SystemExit) as stopped:
        main(run)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --objectives") and err.count("\n") == 1 and says in err, err
    assert not list(storage.rglob("llmm_experiment.json"))  # no experiment started
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_resumed_search_keeps_its_objectives(tmp_path, monkeypatch, capsys):
    from llmm_tune.search import run

    monkeypatch.setattr("sys.argv", ["llmm_tune.search", "glue_cola", "--name", "x", "--resume", "--objectives",
                                     "mcc:max,ece:min", "--storage", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        main(run)
    assert stopped.value.code == 2 and "keeps the objectives it was started with" in capsys.readouterr().err


OBJECTIVES = [Objective("a", "max"), Objective("b", "min"), Objective("c", "max")]
#                     p     q     r     s     t     u     v             w
TABLE = pd.DataFrame({"val_a": [0.9, 0.8, 0.8, 0.7, 0.7, 0.9, float("nan"), 0.6],
                      "val_b": [0.3, 0.2, 0.25, 0.35, 0.35, 0.3, 0.1, 0.1],
                      "val_c": [0.5, 0.5, 0.5, 0.9, 0.8, 0.5, 0.9, 0.4]}, index=list("pqrstuvw"))


def test_the_front_is_exactly_the_non_dominated_rows_in_each_objectives_direction():
    """r loses to q on b alone, t to s on c alone; p and u tie (neither dominates); v lacks a value."""
    front = non_dominated(TABLE, OBJECTIVES)
    assert list(TABLE.index[front]) == ["p", "q", "s", "u", "w"]
    complete = TABLE.dropna()
    for name, row in complete.iterrows():  # the same, written out
        assert front[name] == (not any(dominates(other, row, OBJECTIVES) for _, other in complete.iterrows()))
    flipped = [OBJECTIVES[0], Objective("b", "max"), OBJECTIVES[2]]  # b better higher: p and u beat q, r and w
    assert list(TABLE.index[non_dominated(TABLE, flipped)]) == ["p", "s", "u"]


def test_the_pick_is_the_best_second_objective_within_the_window_of_the_best_first():
    objectives = [Objective("mcc", "max"), Objective("loss", "min")]
    table = pd.DataFrame({"val_mcc": [0.500, 0.495, 0.491, 0.480], "val_loss": [0.40, 0.30, 0.20, 0.10]},
                         index=["A", "B", "C", "D"])
    assert PICK_WITHIN == 0.01 and "within 0.01 (absolute) of the best val_mcc" in pick_rule(objectives)
    assert pick(table, objectives) == "C"  # D's loss is lower, but its mcc 0.02 below the best
    tied = pd.concat([table, pd.DataFrame({"val_mcc": [0.493], "val_loss": [0.20]}, index=["E"])])
    assert pick(tied, objectives) == "E"  # C's loss, better mcc
    assert pick(table.assign(val_mcc=float("nan")), objectives) is None


def test_trials_drawn_at_one_place_share_one_label_on_the_plot():
    """Two untrained classifiers tie at mcc 0 with the same ECE: the plot names both in one label, where two labels
    would overprint; a trial apart keeps its own."""
    trials = pd.DataFrame({"trial": ["a1", "b2", "c3"], "val_mcc": [0.0, 0.0, 0.33],
                           "val_ece": [0.0234, 0.0238, 0.098]})
    objectives = [Objective("mcc", "max"), Objective("ece", "min")]
    front = non_dominated(trials, objectives)
    figure = pareto_figure(trials, objectives, front, trials.iloc[2])
    assert sorted(text.get_text() for text in figure.axes[0].texts) == ["a1, b2", "c3"]


def test_a_multi_objective_search_exports_a_front_of_non_dominated_trials(tmp_path):
    """A model-free family's search on mcc:max,loss:min: Optuna's study has both objectives, trials.csv each
    trial's values, pareto.md marks exactly the non-dominated trials, best.yaml is the pick, and a trial of the
    front trains again by its id."""
    space = tiny_space(tmp_path, tmp_path / "no-model", "timed", family=TIMED, max_train_examples=320)
    results = tmp_path / "results"
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--num-samples", "3", "--max-concurrent", "1",
                     "--cpus-per-trial", "1", "--objectives", "mcc:max,loss:min", "--storage", str(tmp_path / "runs"),
                     "--results", str(results))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "objectives: val_mcc (higher is better), val_loss (lower is better)" in run.stdout
    objectives = [Objective("mcc", "max"), Objective("loss", "min")]
    folder = results / "cola"
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial": str}).set_index("trial")
    assert len(trials) == 3 and trials[["val_mcc", "val_loss"]].notna().all().all()
    shown = pareto_rows(folder / "pareto.md")
    assert set(shown.index) == set(trials.index) and (folder / "pareto.png").stat().st_size > 0
    on_front = shown.index[shown["front"] == "yes"]
    assert len(on_front) >= 1
    for trial, row in trials.iterrows():  # every point of the front is non-dominated, every other one dominated
        beaten = any(dominates(other, row, objectives) for _, other in trials.iterrows())
        assert (trial in on_front) == (not beaten), (trial, trials[["val_mcc", "val_loss"]])
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["trial"] == pick(trials, objectives)
    (exported,) = [line for line in run.stdout.splitlines() if line.startswith("exported ")]
    assert f"pareto.md, pareto.png; best.yaml: {pick_rule(objectives)}: trial {best['trial']}" in exported
    check_study(tmp_path / "runs", trials)
    check_reproduced(folder, on_front[-1], trials.loc[on_front[-1], "val_mcc"])


def pareto_rows(path: Path) -> pd.DataFrame:
    """pareto.md's table, by trial."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return pd.DataFrame(rows, columns=header).set_index("trial")


def check_study(runs: Path, trials: pd.DataFrame) -> None:
    """Optuna's study of the search is multi-objective, names both objectives and holds each trial's values."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (journal,) = runs.glob("*/optuna.journal")
    study = optuna.load_study(study_name=journal.parent.name, storage=JournalStorage(JournalFileBackend(str(journal))))
    assert study.metric_names == ["val_mcc", "val_loss"] and len(study.directions) == 2
    for ot_trial in study.trials:
        trial = trials.loc[ot_trial.user_attrs["ray_trial_id"]]
        assert ot_trial.values == pytest.approx([trial["val_mcc"], trial["val_loss"]])


def check_reproduced(folder: Path, trial: str, value: float) -> None:
    """`reproduce best.yaml --trial ID` trains that trial of the front again, to its validation value."""
    import torch

    from llmm_tune.reproduce import run as reproduce

    threads = torch.get_num_threads()
    try:
        report = reproduce([str(folder / "best.yaml"), "--trial", trial, "--seeds", "0"])
    finally:
        torch.set_num_threads(threads)  # reproduce takes the trial's
    assert report["config"].endswith(f"configs/trial-{trial}.yaml")
    assert report["summary"]["val_mcc"]["mean"] == pytest.approx(value)
