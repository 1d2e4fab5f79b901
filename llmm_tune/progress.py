"""A one-line live status of a search: trials running and done, the best so far, an ETA."""

from __future__ import annotations

import time

from ray.tune import Callback
from ray.tune.experiment import Trial

from llmm_tune.errors import FAILURE_KEY


class Progress(Callback):
    """Prints at most every `every` seconds, and whenever a trial ends."""

    def __init__(self, metric: str, num_samples: int, max_iterations: int, every: float = 20.0):
        self.metric, self.num_samples, self.max_iterations, self.every = metric, num_samples, max_iterations, every
        self.started = time.time()
        self.printed = 0.0

    def status(self, trials: list[Trial]) -> str:
        elapsed = time.time() - self.started
        ended_itself = [t for t in trials if t.status == Trial.TERMINATED and FAILURE_KEY in (t.last_result or {})]
        done = [t for t in trials if t.status == Trial.TERMINATED and t not in ended_itself]
        failed = [t for t in trials if t.status == Trial.ERROR] + ended_itself
        running = [t for t in trials if t.status == Trial.RUNNING]
        scored = [t for t in trials if t.last_result and self.metric in t.last_result]
        best = max(scored, key=lambda t: t.last_result[self.metric], default=None)
        best_text = f"best {self.metric} {best.last_result[self.metric]:.4f} ({best.trial_id})" if best else \
            "no result yet"
        # finished trials count whole; running ones by the share of their evaluations done (an upper
        # bound on remaining work, since early stopping ends many of them sooner)
        work = len(done) + len(failed) + sum(
            min(1.0, t.last_result.get("training_iteration", 0) / self.max_iterations) for t in running)
        eta = f"ETA <= {_minutes(elapsed / work * (self.num_samples - work))}" if work else "ETA unknown"
        return (f"[{_minutes(elapsed)}] trials: {len(running)} running, {len(done)} done, {len(failed)} failed "
                f"of {self.num_samples} | {best_text} | {eta}")

    def report(self, trials: list[Trial], force: bool = False) -> None:
        if force or time.time() - self.printed >= self.every:
            print(self.status(trials), flush=True)
            self.printed = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.report(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.report(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.report(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self.report(trials, force=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def quiet_logs() -> None:
    """Keep a search's output to its status lines: no per-load reports, bars or checkpoint notices."""
    import logging

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
