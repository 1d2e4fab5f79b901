"""Warm starts from earlier searches (`search --warm-start-from`): an exported results folder's best trials, in the
order of their validation score, moved into this space (clipped to its ranges, the nearest choice, a missing
setting in the middle) and enqueued before the space's own points, each with the folder and trial it came from."""

from __future__ import annotations

import math

import pytest

from llmm_tune.errors import UsageError
from llmm_tune.results.transfer import warm_start_from
from llmm_tune.tune.experiment import ExperimentRecord
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import earlier_results

NF, UNIFORM = "normal_float", "uniform"
RECORD_FIELDS = ("name", "family", "task", "space", "space_yaml", "profile", "method", "metric", "mode", "seed",
                 "model", "num_samples", "overrides", "options", "command", "git_commit", "versions", "started")
TRIALS = [  # another task's search, in another space (glue_cola's paper profile: rank 32, lr 5e-3)
    dict(trial="t3", lr=6e-4, scale=300.0, rank=8, K=2, bits=4, quant_method=UNIFORM, val_mcc=0.12),
    dict(trial="t1", lr=5e-3, scale=800.0, rank=32, K=1, bits=4, quant_method=NF, val_mcc=0.31),
    dict(trial="t2", lr=4e-4, scale=math.nan, rank=16, K=0, bits=8, quant_method=UNIFORM, val_mcc=0.28),
    dict(trial="t4", lr=7e-4, scale=200.0, rank=8, K=1, bits=8, quant_method=NF, val_mcc=math.nan),  # failed
]


def test_the_best_trials_of_exported_results_run_first_moved_into_this_space_with_their_origin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier_results(tmp_path / "results" / "cola", TRIALS)
    spec = load_spec("glue_mrpc", "cpu", "llmm")  # lr in [3e-4, 1.5e-3], scale in [50, 5000], rank 8 or 16, K 1 or 2
    own = list(spec.warm_start)
    starts = warm_start_from([str(tmp_path / "results" / "cola")], spec, top=2)

    assert spec.warm_start[:2] == [
        dict(lr=1.5e-3, scale=800.0, rank=16, K=1, bits=4, quant_method=NF),  # lr clipped, rank the nearest choice
        dict(lr=4e-4, scale=pytest.approx(500.0), rank=16, K=1, bits=8, quant_method=UNIFORM)]  # scale: the middle
    assert spec.warm_start[2:] == own  # the space's own points follow
    assert [start["origin"] for start in starts] == ["results/cola trial t1 (val_mcc 0.31)",
                                                     "results/cola trial t2 (val_mcc 0.28)",
                                                     *["space glue_mrpc"] * len(own)]
    notes = "\n".join(spec.adjustments)
    assert "warm start from results/cola trial t1 (val_mcc 0.31): lr=0.005 is outside this space; enqueued with " \
           "lr=0.0015" in notes
    assert "trial t2 (val_mcc 0.28): no scale given" in notes and "K=0 is outside this space" in notes
    record = ExperimentRecord.from_dict({**{k: None for k in RECORD_FIELDS}, "warm_starts": starts})
    assert record.warm_start_origin({**spec.warm_start[0], "epochs": 2}) == "results/cola trial t1 (val_mcc 0.31)"
    assert record.warm_start_origin({**spec.warm_start[0], "lr": 1e-3}) is None  # a point the searcher proposed


def test_a_lower_is_better_metric_takes_the_lowest_and_repeated_points_run_once(tmp_path):
    trials = [dict(trial=f"t{i}", lr=lr, rank=16, val_nll=nll) for i, (lr, nll) in
              enumerate([(1e-2, 0.9), (2e-2, 0.8), (3e-3, 1.2)])]
    folder = earlier_results(tmp_path / "gsm8k", trials, metric="nll", mode="min")
    spec = load_spec("gsm8k", "cpu", "llmm")  # lr in [2e-4, 3e-3]: both best clip to 3e-3, the same point
    starts = warm_start_from([str(folder)], spec, top=2)
    assert starts[0]["origin"].endswith("trial t1 (val_nll 0.8)") and starts[0]["config"]["lr"] == 3e-3
    assert [start["config"] for start in starts].count(starts[0]["config"]) == 1


def test_a_search_without_the_spaces_settings_is_refused(tmp_path):
    folder = earlier_results(tmp_path / "gorp", [dict(trial="a", learning_rate=1e-3, val_mcc=0.3)])
    with pytest.raises(UsageError, match="its trials set none of the settings this space searches"):
        warm_start_from([str(folder)], load_spec("glue_cola", "cpu", "llmm"))
