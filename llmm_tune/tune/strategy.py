"""Which searcher and early stopping a search runs when the command line does not say: chosen by its trial count,
from replays of recorded learning curves (benchmarks/bench_search_efficiency.py --counts)."""

from __future__ import annotations

SAMPLERS = ("auto", "tpe", "random", "qmc")  # --sampler; auto: `default_strategy` at the search's trial count
# Replayed on the recorded CoLA and MRPC curves at 3 to 48 trials (results/search_efficiency/*_by_trials.md, 50
# seeds): below 24 trials neither TPE nor QMC, with or without ASHA, reached random search's best with less compute
# on CoLA's table; from 24 trials QMC (Sobol) with ASHA did on both tables (CoLA 0.29 and 0.14 of random search's
# compute at 24 and 48 trials, MRPC 0.17 and 0.09), and TPE with ASHA did not on CoLA's.
QMC_FROM_TRIALS = 24


def default_strategy(num_samples: int) -> tuple[str, bool]:
    """(sampler, early stopping) a search of `num_samples` trials runs by default: random search with every trial
    run to its end below QMC_FROM_TRIALS trials, QMC (Sobol) with ASHA from there."""
    return ("qmc", True) if num_samples >= QMC_FROM_TRIALS else ("random", False)


def strategy_text(sampler: str, early_stopping: bool) -> str:
    names = {"tpe": "Optuna's multivariate TPE", "random": "random search", "qmc": "QMC (Sobol) points"}
    return f"{names[sampler]}, {'ASHA stopping weak trials early' if early_stopping else 'every trial to its end'}"
