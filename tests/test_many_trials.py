"""A long search stays bounded (issue 26.4, the small version of benchmarks/bench_many_trials.py): the real driver
(Optuna TPE, ASHA, a checkpoint per report, the console, the journal) over a model-free family, with the driver's
memory growth and the experiment folder's size per trial held under limits a leak would break."""

from __future__ import annotations

import sys

from benchmarks import bench_many_trials as bench
from llmm_tune.tune.searcher import JOURNAL

TRIALS = 100
# The goal is under 50 MB per 1,000 trials; a few hundred trials measure it with Ray's own noise, so the test
# allows twice that. A trial that kept a model or a dataset alive would grow the driver by megabytes.
GROWTH_MIB_PER_1000 = 100
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
