"""The search-efficiency benchmark's parts (benchmarks/record_curves.py, benchmarks/bench_search_efficiency.py): the
recorded design covers the space with the warm starts first, and the replay asks Optuna, replays the nearest
recorded curve, lets the pruner stop it, and counts the compute as the recorded trial-seconds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks import bench_search_efficiency as bench
from benchmarks import record_curves
from llmm_tune.tune.spaces import SPACES_DIR, load_spec

EVALUATIONS, BEST_LR = 8, 6e-4


@pytest.fixture(scope="module")
def spec():
    return load_spec("glue_cola", "cpu", "llmm")


def cola_design(size: int = 48) -> list[dict]:
    space = yaml.safe_load((SPACES_DIR / "glue_cola.yaml").read_text())
    return record_curves.design(record_curves.profile_space(space), space["profiles"]["cpu"]["warm_start"], size)


def distance_to_best(config: dict) -> float:
    return abs(math.log(config["lr"] / BEST_LR))


def rising(config: dict, evaluation: int) -> float:
    """A validation metric that rises with the evaluation, highest near lr 6e-4."""
    return 0.5 * evaluation / EVALUATIONS - distance_to_best(config)


def write_table(path, configs: list[dict], metric=rising) -> bench.Table:
    """Each configuration's curve (`metric`, and a loss lowest near lr 6e-4); each evaluation 10 s after 5 s of
    set-up."""
    rows = [{"config": i, **config, "evaluation": e, "epoch": e / 2, "val_mcc": metric(config, e),
             "val_loss": distance_to_best(config) + 1 / e, "trial_seconds": 5 + 10 * e}
            for i, config in enumerate(configs) for e in range(1, EVALUATIONS + 1)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return bench.Table(path)


def test_the_design_starts_with_the_warm_starts_and_stays_in_the_space(spec):
    configs = cola_design()
    assert len(configs) == 48 and configs[:len(spec.warm_start)] == spec.warm_start
    for name, entry in spec.space.items():
        (kind, args), = entry.items()
        values = [config[name] for config in configs]
        if kind == "choice":
            assert set(values) == set(args)  # every choice is tried
        else:
            assert args[0] <= min(values) and max(values) <= args[1]
            assert max(values) / min(values) > 0.5 * args[1] / args[0]  # spread over the range, not clustered


def test_a_proposal_replays_the_nearest_recorded_configuration(tmp_path, spec):
    configs = cola_design(12)
    table = write_table(tmp_path / "cola.csv", configs)
    assert [table.nearest(config, spec.space) for config in configs] == list(range(12))
    moved = {**configs[5], "lr": configs[5]["lr"] * 1.01}
    assert table.nearest(moved, spec.space) == 5


def test_without_pruning_every_curve_runs_to_its_end_and_costs_its_seconds(tmp_path, spec):
    table = write_table(tmp_path / "cola.csv", cola_design(12))
    log = bench.replay(table, spec, bench.STRATEGIES["random (reference)"], seed=0, trials=6, warm=[])
    assert len(log) == 6 * EVALUATIONS
    assert log[-1, 0] == pytest.approx(6 * (5 + 10 * EVALUATIONS))
    assert np.all(np.diff(log[:, 0]) > 0)


def test_asha_stops_weak_trials_and_saves_their_compute(tmp_path, spec):
    table = write_table(tmp_path / "cola.csv", cola_design(24))
    full = bench.replay(table, spec, bench.STRATEGIES["random (reference)"], seed=1, trials=12, warm=[])
    stopped = bench.replay(table, spec, bench.STRATEGIES["random + ASHA"], seed=1, trials=12, warm=[])
    assert len(stopped) < len(full) and stopped[-1, 0] < full[-1, 0]
    assert stopped[:, 1].max() <= full[:, 1].max()  # the same proposals, some cut short


def test_asha_can_rank_its_rungs_on_the_validation_loss(tmp_path, spec):
    def flat_until_the_end(config: dict, evaluation: int) -> float:  # like CoLA's MCC: 0 until the model learns
        return rising(config, evaluation) if evaluation == EVALUATIONS else 0.0

    table = write_table(tmp_path / "cola.csv", cola_design(24), flat_until_the_end)
    on_metric = bench.replay(table, spec, bench.Strategy(bench.random_sampler, bench.asha()), seed=2, trials=12,
                             warm=[])
    on_loss = bench.replay(table, spec, bench.Strategy(bench.random_sampler, bench.asha(), rungs_on="loss"), seed=2,
                           trials=12, warm=[])
    assert len(on_metric) == 12 * EVALUATIONS  # ties at 0: no rung can rank them
    assert len(on_loss) < len(on_metric)


def test_warm_starts_are_replayed_first(tmp_path, spec):
    configs = cola_design(12)
    table = write_table(tmp_path / "cola.csv", configs)
    log = bench.replay(table, spec, bench.STRATEGIES["TPE + ASHA"], seed=0, trials=3, warm=[configs[7]])
    first = table.curves[7][0]
    assert np.allclose(log[:EVALUATIONS, 1], first)


def test_transfer_takes_the_other_tables_best_through_warm_start_from(tmp_path, spec):
    configs = cola_design(12)
    table = write_table(tmp_path / "cola.csv", configs)
    finals = {c: values.max() for c, (values, _) in table.curves.items()}
    ranked = sorted(finals, key=finals.get, reverse=True)
    points = bench.transferred(tmp_path, "cola", spec, top=2)
    assert points[:2] == [configs[ranked[0]], configs[ranked[1]]]
    assert points[2:] == [point for point in spec.warm_start if point not in points[:2]]  # the space's follow


def test_the_summary_measures_compute_against_the_references_best():
    reference = np.array([[10.0, 0.1], [20.0, 0.3], [40.0, 0.5]])  # reaches 0.5 after all its 40 s
    faster = np.array([[5.0, 0.2], [10.0, 0.5]])  # reaches it after 10 s: a quarter
    never = np.array([[5.0, 0.2], [30.0, 0.4]])
    summary, ratios, median = bench.summarise({"random (reference)": [reference], "fast": [faster],
                                               "never": [never]}, "random (reference)")
    assert ratios["fast"] == [0.25] and ratios["random (reference)"] == [1.0] and ratios["never"] == [math.inf]
    assert median == 40.0
    assert summary.set_index("strategy").loc["never", "reached"] == "0/1"
    assert bench.best_within(faster, 0.25 * median) == 0.5 and math.isnan(bench.best_within(faster, 4.0))
