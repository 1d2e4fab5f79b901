"""What a search prints: what was chosen, a live status line, one line per trial that ends, the final
table. Everything else (Ray's and the libraries' logs, tracebacks) goes to the experiment's log file
and each trial's own log files."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial

from llmm_tune.errors import FAILURE_KEY, STARTED_AGAIN_KEY
from llmm_tune.tune.family import better

LOG_FILE = "llmm_search.log"
# the loggers whose records go to the search log (llmm_tune.progress: also printed, by the progress lines)
LOGGED = ("ray", "ray.tune", "ray.train", "ray.data", "optuna", "filelock", "llmm_tune.progress")


def quiet_logs() -> None:
    """Keep a process's output to what the user asked for: no per-load reports, bars or notices."""
    import datasets
    import optuna
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_ray() -> None:
    """Before Ray is imported: the legacy output engine, silent at verbose=0 (the new one prints its
    configuration box, paths and hints whatever the verbosity)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A trial that ends itself (divergence, out of memory) reports its reason without metrics.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune snapshots the experiment at every checkpoint (num_to_keep=1): that is what lets a killed
    # search resume from its latest checkpoints, so its warning about the snapshot rate is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def log_to_file(path: Path) -> None:
    """Send the driver's library logs (Ray Tune's trial errors and tracebacks among them) to `path`
    instead of the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGED:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)


class Progress(Callback):
    """The status line and one line per trial that ends: its score, or why it failed and where its log
    is. On a terminal the status line is rewritten in place every 2 s; into a file or pipe it is printed
    every minute and whenever a trial ends."""

    CLEAR = "\r\x1b[2K"  # back to the line's start, erase it
    selects = "best"  # a trial's value: its best report, or its last (`Task.selects`)

    def __init__(self, metric: str, mode: str, num_samples: int, clock: tuple[str, float], selects: str = "best"):
        self.metric, self.mode, self.num_samples, self.selects = metric, mode, num_samples, selects
        self.time_attr, self.budget = clock
        self.started = time.time()
        self.printed = 0.0
        self.ended: set[str] = set()

    @property
    def key(self) -> str:
        return f"best_val_{self.metric}"

    def best(self, trials: list[Trial]) -> Trial | None:
        chosen = None
        for trial in trials:
            value = (trial.last_result or {}).get(self.key)
            if value is not None and (chosen is None or better(self.mode, value, chosen.last_result[self.key])):
                chosen = trial
        return chosen

    def status(self, trials: list[Trial]) -> str:
        elapsed = time.time() - self.started
        running = done = failed = 0
        work = 0.0  # finished trials count whole; running ones by the share of their budget done (an upper bound
        # on the remaining work, since early stopping ends many of them sooner)
        for trial in trials:  # one pass: Tune calls this after every trial of a search of thousands
            result = trial.last_result or {}
            # Tune calls back before it sets a trial's final status: what ended is what was announced
            if trial.trial_id in self.ended or trial.status in (Trial.TERMINATED, Trial.ERROR):
                if trial.status == Trial.ERROR or FAILURE_KEY in result:
                    failed += 1
                else:
                    done += 1
            elif trial.status == Trial.RUNNING:
                running += 1
                work += min(1.0, result.get(self.time_attr, 0) / self.budget)
        work += done + failed
        best = self.best(trials)
        best_text = (f"best val {self.metric} {best.last_result[self.key]:.4f} (trial {best.trial_id})" if best
                     else "no result yet")
        eta = f"ETA <= {minutes(elapsed / work * (self.num_samples - work))}" if work else "ETA unknown"
        return (f"[{minutes(elapsed)}] trials: {running} running, {done} done, {failed} failed "
                f"of {self.num_samples} | {best_text} | {eta}")

    @staticmethod
    def live() -> bool:  # asked each time: a resumed search unpickles this object in another console
        return sys.stdout.isatty()

    def report(self, trials: list[Trial], force: bool = False) -> None:
        if force or time.time() - self.printed >= (2.0 if self.live() else 60.0):
            if self.live():
                print(self.CLEAR + self.status(trials), end="", flush=True)
            else:
                print(self.status(trials), flush=True)
            self.printed = time.time()

    def ended_line(self, trial: Trial) -> str:
        result = trial.last_result or {}
        name = f"trial {trial.trial_id}"
        if trial.status == Trial.ERROR or trial.error_file:
            lines = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
            return (f"{name} failed: {lines[-1] if lines else 'error'} (after {trial.num_failures} tries); "
                    f"log: {trial.path}/error.txt")
        if FAILURE_KEY in result:
            return f"{name} failed: {result[FAILURE_KEY]}"
        clock = result.get(self.time_attr, 0)
        stopped = f", stopped early at {self.time_attr} {clock:g}" if clock < self.budget else ""
        return (f"{name} done: val {self.metric} {result.get(self.key, float('nan')):.4f} ({self.selects} of "
                f"{result.get('training_iteration', 0)} evaluations{stopped})")

    def trial_ended(self, trials: list[Trial], trial: Trial) -> None:
        if trial.trial_id not in self.ended:
            self.ended.add(trial.trial_id)
            print((self.CLEAR if self.live() else "") + self.ended_line(trial), flush=True)
        self.report(trials, force=True)

    def on_experiment_end(self, trials, **info):
        if self.live():
            print(flush=True)  # end the status line

    def on_step_end(self, iteration, trials, **info):  # between results too: a first evaluation can take minutes
        self.report(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STARTED_AGAIN_KEY in result:
            print((self.CLEAR if self.live() else "") + f"trial {trial.trial_id}: {result[STARTED_AGAIN_KEY]}",
                  flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trial_ended(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_ended(trials, trial)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
