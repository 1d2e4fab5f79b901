"""`--budget`: a duration read as seconds; a search sized to it from a probe's figures (trials first, then epochs,
then rows, else refused naming the budget that fits); and a budgeted search of a model-free family whose trials run
slower than its probe, stopped at the budget with an export that marks the trials it cut."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from llmm_tune.errors import UsageError
from llmm_tune.tune.budget import fits, parse_duration, size
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import run_module, tiny_space

# a trial of the probe: 0.1 s a step at batch 16, 2 s an evaluation, 20 s to score the held-out split
FIGURES = {"prepare_s": 5.0, "train_examples": 4000, "build_cold_s": 12.0, "build_warm_s": 6.0, "first_steps_s": 0.2,
           "step_s": 0.1, "eval_s": 2.0, "score_s": 20.0}


@pytest.fixture
def spec(tmp_path):
    """Two trials of 4 epochs at once, ASHA from epoch 1 (a model-free family's space, read as a search reads it)."""
    path = tiny_space(tmp_path, tmp_path / "no-model", "timed", family="tests.doubles.timed_family", epochs=4)
    return load_spec(str(path), "cpu", "llmm")


@pytest.mark.parametrize(("text", "seconds"), [("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("90s", 90),
                                               ("1h2m3s", 3723)])
def test_a_budget_reads_as_hours_minutes_and_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10", "m", "0m", "1.5h", "-5m"])
def test_a_budget_that_is_no_duration_is_refused(text):
    with pytest.raises(UsageError, match="--budget"):
        parse_duration(text)


def test_a_search_is_sized_to_its_budget_trials_first_then_epochs_then_rows(spec):
    long = size(FIGURES, spec, concurrent=2, workers=1, budget_s=3 * 3600, spent_s=30)
    assert (long.num_samples, long.epochs, long.train_rows) == (4 * spec.num_samples, 4, 4000)  # the most trials
    assert long.spent_s + long.predicted_s <= 3 * 3600
    sizings = [size(FIGURES, spec, 2, 1, minutes * 60, 30) for minutes in (8, 6, 5, 3, 2)]
    for sizing in sizings:
        assert sizing.spent_s + sizing.predicted_s <= sizing.budget_s, sizing
        # no more than what fits: one trial more would not (unless the most trials ran already)
        more = fits(FIGURES, spec, sizing.epochs, sizing.train_rows, sizing.num_samples + 1, 2, 1).wall_s
        assert sizing.num_samples == 4 * spec.num_samples or more > sizing.budget_s - 30, sizing
    work = [s.num_samples * s.epochs * s.train_rows for s in sizings]
    assert work == sorted(work, reverse=True) and len(set(work)) == len(work)  # less time, less training
    assert [s.num_samples >= 2 for s in sizings[:3]] == [True] * 3  # a search of two or more while it can
    assert sizings[3].epochs < 4 and sizings[3].train_rows == 4000  # epochs are given up before rows
    shrunk = sizings[-1]
    assert shrunk.epochs < 4 or shrunk.train_rows < 4000  # the shortest gives up epochs or rows, not the search
    assert all(s.available_rows == 4000 for s in sizings)


def test_a_budget_too_short_for_one_trial_names_the_smallest_that_fits(spec):
    with pytest.raises(UsageError, match=r"--budget 0.5 min is too short for one trial here .* give --budget (\d+)m"):
        size(FIGURES, spec, 2, 1, budget_s=30, spent_s=20)
    smallest = size(FIGURES, spec, 2, 1, budget_s=10 * 60, spent_s=20)
    assert smallest.num_samples >= 1


def test_a_sizing_keeps_what_resumes_and_exports_need_in_the_record(spec):
    sizing = size(FIGURES, spec, 2, 1, budget_s=8 * 60, spent_s=30)
    assert sizing.overrides() == {"epochs": sizing.epochs, "max_train_examples": sizing.train_rows}
    assert type(sizing)(**dataclasses.asdict(sizing)) == sizing  # the record's dict is the sizing again
    assert sizing.trials_seconds(30) < sizing.budget_s - 30  # the export's time is kept from the trials


def test_a_budgeted_search_stops_at_its_budget_exports_and_marks_the_trials_it_cut(tmp_path):
    space = tiny_space(tmp_path, tmp_path / "no-model", "timed", family="tests.doubles.timed_family", epochs=4,
                       evals_per_epoch=4)
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--budget", "60s", "--cpus-per-trial",
                     "1", "--storage", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                     env={"TIMED_FAMILY_SLOWER": "3", "LLMM_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (sized,) = [line for line in run.stdout.splitlines() if line.startswith("budget 1.0 min: ")]
    assert "trials x up to" in sized and "2 at once" in sized
    (stopped,) = [line for line in run.stdout.splitlines() if line.startswith("budget reached ")]
    trials = pd.read_csv(tmp_path / "results" / "cola" / "trials.csv")
    cut = trials[trials["cut_by_budget"]]
    assert len(cut) >= 1 and f"{len(cut)} cut at their latest evaluation" in stopped, stopped
    assert not cut["stopped_early"].any()  # ended by the budget, not by ASHA
    assert ((cut["evaluations"] > 0) == cut["val_mcc"].notna()).all()  # each scored as it stood when cut
    assert (tmp_path / "results" / "cola" / "best.yaml").is_file()
    table = (tmp_path / "results" / "cola" / "table.md").read_text()  # the plan beside what it measured
    assert "timed-llmm-cpu: sized to --budget 1 min, " in table and " min (the first start to the last report)" in table


def test_every_cap_on_rows_is_said_with_what_lifts_it():
    from types import SimpleNamespace

    from llmm_tune.tune.console import caps

    capped = SimpleNamespace(fixed={"max_train_examples": 96, "test_examples": 64})
    profile = SimpleNamespace(profile="cpu", budget={})
    assert caps(capped, profile, SimpleNamespace(train=list(range(96)))) == [
        "trials train on 96 rows: max_train_examples 96 (the cpu profile); lift it with --budget DURATION (every row "
        "that fits) or max_train_examples: null in the space (write it with --write-space FILE)",
        "the held-out score reads at most 64 rows: test_examples 64 (the cpu profile); lift it with test_examples: "
        "null in the space (write it with --write-space FILE)"]
    assert len(caps(capped, profile, SimpleNamespace(train=list(range(50))))) == 1  # fewer rows than the cap
    sized = SimpleNamespace(fixed={"max_train_examples": 262}, profile="cpu")
    budget = SimpleNamespace(profile="cpu", budget={"available_rows": 524})
    (line,) = caps(sized, budget, SimpleNamespace(train=list(range(262))))
    assert line.startswith("trials train on 262 rows: max_train_examples 262 (--budget); lift it with a longer")
    assert caps(sized, SimpleNamespace(profile="cpu", budget={"available_rows": 262}), None) == []  # every row
