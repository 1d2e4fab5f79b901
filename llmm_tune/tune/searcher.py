"""Optuna's multivariate TPE behind Ray Tune, told about trials that failed for a reason.

A trial that diverges or runs out of memory ends itself and reports `failure` (see
`llmm_tune.tune.trainable.trainable`). Ray's `OptunaSearch` would tell Optuna such a trial was
pruned (no metric) or, given a NaN, drop the report with a warning and leave the Optuna trial
running forever. Here it is marked infeasible through an Optuna constraint instead: TPE then
ranks it below every feasible trial and steers away from that region, and `study.best_trial`
never picks it.

The study reads as trials.csv does: it names its metric (`val_<metric>`, the trial's standing value, which
the searcher is told as `best_val_<metric>`), and each Optuna trial carries Ray's trial id and Tune's number
for it (user attrs `ray_trial_id` and `number`), so optuna-dashboard and trials.csv name the same trials.
With several objectives (`search --objectives`, lists of metrics and modes) the study is multi-objective, names
each, and a failed trial is infeasible with the worst value of every objective.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import QMCSampler, RandomSampler, TPESampler
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from llmm_tune.errors import FAILURE_KEY
from llmm_tune.tune import storage
from llmm_tune.tune.direction import Direction

RAY_TRIAL_ID, NUMBER = "ray_trial_id", "number"  # the user attrs naming a trial as Ray and trials.csv do


class FailureAwareOptunaSearch(OptunaSearch):
    @property
    def study(self):
        return self._ot_study

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of each objective: one, or several (lists of metrics and modes)."""
        if isinstance(self._metric, list):
            return list(zip(self._metric, self._mode))
        return [(self._metric, self._mode)]

    def _setup_study(self, mode: str | list[str]) -> None:
        super()._setup_study(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # set_metric_names: the API since Optuna 3.2
            # run_recipe's prefix off
            self._ot_study.set_metric_names([metric.removeprefix("best_") for metric, _ in self.objectives])

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's proposal, its trial named by Ray's id and Tune's number: Tune numbers the trials 1, 2, ... in
        the order the searcher proposes them (the experiment tag's head, trials.csv's `number`)."""
        new = trial_id not in self._ot_trials
        config = super().suggest(trial_id)
        if new:
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(RAY_TRIAL_ID, trial_id)
            ot_trial.set_user_attr(NUMBER, len(self._ot_trials))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if FAILURE_KEY not in result:  # a failure report has no metric to record
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        failure = (result or {}).get(FAILURE_KEY)
        if failure is None or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(FAILURE_KEY, failure)
        ot_trial.set_constraint(FAILURE_KEY, 1.0)
        # infeasible trials are ranked by their violation, never by value: report the worst value of each objective
        worst = [Direction(mode).worst() for _, mode in self.objectives]
        self._ot_study.tell(ot_trial, worst if isinstance(self._metric, list) else worst[0],
                            state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)


JOURNAL = "optuna.journal"  # <experiment>/optuna.journal: `optuna-dashboard <that file>` watches the search


def study_storage(experiment: str, url: str | None) -> BaseStorage | None:
    """Where the Optuna study lives: the database at `url`, else a journal file in a local experiment
    folder; None (in memory, saved with Ray's searcher state) for an object-store experiment, since a
    journal needs a file with locks."""
    if url:
        return optuna.storages.RDBStorage(url)
    if storage.is_uri(experiment):
        return None
    return JournalStorage(JournalFileBackend(str(Path(experiment) / JOURNAL)))


def startup_trials(num_samples: int) -> int:
    """TPE's random start-up trials for a search of `num_samples` (after the warm starts): a third of the budget,
    2 to 10. Replayed on CoLA's recorded curves (results/search_efficiency/cola.md, 16 trials, 50 seeds), 5 or 8
    start-up trials reached random search's best in 27 searches of 50, the former quarter (4) in 22, and 2 in 20."""
    return min(10, max(2, num_samples // 3))


def make_searcher(distributions: dict, metric: str | list[str], mode: str | list[str], warm_start: list[dict],
                  num_samples: int, seed: int, study: BaseStorage | None = None, name: str | None = None,
                  sampler_name: str = "tpe") -> FailureAwareOptunaSearch:
    """The warm-start points first, then `sampler_name`'s: multivariate TPE (random start-up for a third of the
    budget), uniformly random points, or a Sobol sequence (QMC: an even cover of the space). Lists of metrics and
    modes make the study multi-objective (each sampler samples for all of them)."""
    if sampler_name == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # QMCSampler: experimental since Optuna 3.0
            sampler = QMCSampler(seed=seed)
    elif sampler_name == "random":
        sampler = RandomSampler(seed=seed)
    else:
        sampler = TPESampler(multivariate=True, seed=seed, n_startup_trials=startup_trials(num_samples))
    return FailureAwareOptunaSearch(distributions, metric=metric, mode=mode, sampler=sampler,
                                    points_to_evaluate=warm_start or None, storage=study,
                                    study_name=name if study else None)
