"""A long search stays bounded (issue 26.4, the small version of benchmarks/bench_many_trials.py): the real driver
(Optuna TPE, ASHA, a checkpoint per report, the console, the journal) over a model-free family, with the driver's
memory growth and the experiment folder's size per trial held under limits a leak would break."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest

from benchmarks import bench_many_trials as bench
from llmm_tune.tune.driver import DeleteSupersededCheckpoints, ForgetFinishedTrialsMetricWindows
from llmm_tune.tune.searcher import JOURNAL
from tests.helpers.search_fixtures import ENV, ROOT

TRIALS = 300
# Ray Tune's driver keeps its record of every trial (docs/benchmarks.md: 41.2 MiB per 1,000 trials in ours over
# 10,000, 63.3 bare; 43 to 73 over the first few hundred or thousand, with allocator noise). The bound is above that,
# and a trial that kept a model or a dataset alive in the driver would add megabytes a trial, thousands of MiB per
# 1,000.
GROWTH_MIB_PER_1000 = 400
FOLDER_KIB_PER_TRIAL = 64  # one kept checkpoint of a few bytes, progress and result files, Tune's params
JOURNAL_KIB_PER_TRIAL = 4  # the Optuna journal: a trial's params, its reports, its end


def test_a_long_search_keeps_the_drivers_memory_and_its_folder_bounded(tmp_path):
    sampled, experiment = bench.ours(TRIALS, tmp_path, every=TRIALS // 4)
    ends = bench.trial_ends(experiment)
    assert len(ends) == TRIALS
    growth = bench.growth_per_1000(sampled, ends, TRIALS // 4)
    print(f"{TRIALS} trials: driver memory growth {growth:.1f} MiB per 1,000 trials", file=sys.stderr)
    assert growth < GROWTH_MIB_PER_1000
    assert bench.size_mib(experiment) * 1024 / TRIALS < FOLDER_KIB_PER_TRIAL
    assert bench.size_mib(experiment / JOURNAL) * 1024 / TRIALS < JOURNAL_KIB_PER_TRIAL
    # the instant family's value rises with each report: a trial's latest checkpoint is its best and the only one left
    kept = {folder.name: sorted(c.name for c in folder.glob("checkpoint_*")) for folder in experiment.glob("trial_*")}
    assert len(kept) == TRIALS and all(len(names) == 1 for names in kept.values())
    assert any(names == [f"checkpoint_{bench.REPORTS - 1:06d}"] for names in kept.values())
    # no finished trial's metric windows in what Tune keeps (and snapshots) of the trials
    saved = json.loads(bench.state_file(experiment).read_text())["trial_data"]
    assert len(saved) == TRIALS and all(json.loads(run)["metric_n_steps"] == {} for _, run in saved)


def test_a_finished_trial_leaves_its_metric_windows_keeps_its_averages_and_may_report_again():
    from ray.tune.experiment import Trial

    trial = Trial("trainable", stub=True)
    for step, value in enumerate([0.2, 0.4, 0.9], start=1):
        trial.update_last_result({"val": value, "epoch": step, "training_iteration": step})
    analysis, saved = copy.deepcopy(trial.run_metadata.metric_analysis), trial.get_json_state()[1]
    ForgetFinishedTrialsMetricWindows().on_trial_complete(iteration=3, trials=[trial], trial=trial)
    assert trial.run_metadata.metric_analysis == analysis and analysis["val"]["last-5-avg"] == 0.5
    assert not trial.run_metadata.metric_n_steps and len(trial.get_json_state()[1]) < len(saved)
    trial.update_last_result({"val": 0.3, "epoch": 4, "training_iteration": 4})  # retried after a failed stop
    assert trial.run_metadata.metric_analysis["val"] | {"avg": None} == {
        "max": 0.9, "min": 0.2, "avg": None, "last": 0.3, "last-5-avg": 0.3, "last-10-avg": 0.3}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_superseded_checkpoint_goes_two_snapshots_later_and_a_trial_keeps_its_latest_and_best(tmp_path, mode):
    """As CheckpointConfig(num_to_keep=1) keeps them, but deleted only when no state Tune may still be uploading
    names them; the last ones after Tune's final snapshot, and none when the search ended without one."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    trial = Trial("trainable", stub=True, checkpoint_config=CheckpointConfig(
        checkpoint_score_attribute="val", checkpoint_score_order=mode))
    values = [0.5, 0.9, 0.7, 0.6] if mode == "max" else [0.5, 0.1, 0.3, 0.4]  # the best is the second report's
    callback, folders = DeleteSupersededCheckpoints(), [tmp_path / f"checkpoint_{i}" for i in range(len(values))]
    callback.on_step_begin(iteration=0, trials=[trial])

    def report(i: int) -> None:
        folders[i].mkdir()
        (folders[i] / "adapter").write_text("weights")
        checkpoint = Checkpoint(str(folders[i]))
        trial.run_metadata.checkpoint_manager.register_checkpoint(_TrainingResult(checkpoint, {"val": values[i]}))
        callback.on_trial_save(iteration=i, trials=[trial], trial=trial)

    def kept() -> list[bool]:
        return [folder.exists() for folder in folders]

    for i in range(3):
        report(i)
    manager = trial.run_metadata.checkpoint_manager
    assert len(manager.best_checkpoint_results) == 2  # the first is out of Tune's record, so of the next snapshot
    callback.get_state()  # that snapshot: the state saved before it may name the first
    callback.get_state()  # the next one: the first's upload may have been skipped while the previous one ran
    assert kept()[:3] == [True, True, True]
    callback.get_state()
    assert kept()[:3] == [False, True, True]
    report(3)  # the third is superseded: neither latest nor best
    callback.get_state()
    callback.on_step_begin(iteration=5, trials=[trial])
    callback.on_experiment_end(trials=[trial])  # ended by an error, without a final snapshot: the third stays
    assert kept() == [False, True, True, True]
    callback.get_state()  # Tune's final snapshot
    callback.on_experiment_end(trials=[trial])
    assert kept() == [False, True, False, True]
    assert sorted(result.metrics["val"] for result in manager.best_checkpoint_results) == sorted([values[1], values[3]])


# In its own process: the freeze would otherwise keep this test process's objects out of every later collection.
FREEZE = textwrap.dedent("""
    import gc, weakref
    from llmm_tune.tune.runner import release_memory

    class Node:
        pass

    release_memory()  # the end of a worker's first trial
    frozen = gc.get_freeze_count()
    cycle = Node()
    cycle.self = cycle
    alive = weakref.ref(cycle)
    del cycle
    release_memory()  # the end of its second
    print(frozen, alive() is None, gc.get_freeze_count() == frozen)
""")


def test_a_workers_clean_up_sets_the_libraries_aside_once_and_still_frees_each_trials_cycles():
    """release_memory freezes what survives a worker's first trial (the imports: a collection of them took 0.2 s
    a trial), once; what a later trial leaves in reference cycles is still collected."""
    out = subprocess.run([sys.executable, "-c", FREEZE], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 100_000  # torch and the libraries the runner imports
    assert out[1:] == ["True", "True"]
