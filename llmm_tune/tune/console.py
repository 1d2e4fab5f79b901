"""What a search prints: what was chosen, a live status line, one line per trial that ends, the final
table. Everything else (Ray's and the libraries' logs, tracebacks) goes to the experiment's log file
and each trial's own log files."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune import Callback
from ray.tune.experiment import Trial

from llmm_tune.errors import FAILURE_KEY, STARTED_AGAIN_KEY
from llmm_tune.train.data import DATASET_SOURCE
from llmm_tune.tune.direction import Direction

if TYPE_CHECKING:
    from llmm_tune.tune.experiment import ExperimentRecord
    from llmm_tune.tune.spaces import SearchSpec

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


@dataclass
class Tally:
    """The status line's counts, kept as trials report and end: passing over every trial after each one ends made a
    search of 10,000 trials spend a quarter of its driver's time here (bench_many_trials.py)."""

    mode: str
    key: str  # a trial's best value so far, as it reports it
    time_attr: str
    budget: float
    done: int = 0
    failed: int = 0
    running: dict[str, float] = field(default_factory=dict)  # trial id -> the share of its budget done
    best: tuple[float, str] | None = None  # (value, trial id)
    ended_shares: list[float] = field(default_factory=list)  # of their budgets, what the ended trials ran
    first_report: tuple[float, float] | None = None  # (time.time(), the work done) at the first report seen here
    reports_after_first: int = 0

    def share(self, result: dict) -> float:
        return min(1.0, result.get(self.time_attr, 0) / self.budget)

    def work(self) -> float:
        """Of the trials' budgets, the shares done: ended and running."""
        return sum(self.ended_shares) + sum(self.running.values())

    def since_first(self, started: float) -> tuple[float, float] | None:
        """For the ETA's rate: (seconds from `started` to the first report, the work done then), once work was
        reported. Until as many reports followed it as trials run, the work done now: the other trials' first
        reports (their start-up in them) would count as progress made in seconds."""
        if self.first_report is None:
            return None
        at, work = self.first_report
        return at - started, work if self.reports_after_first >= len(self.running) else self.work()

    def restart_rate(self) -> None:
        """The ETA's rate from now on: after a resumed search's counts are rebuilt, its work before counts for no
        time."""
        self.first_report = (time.time(), self.work()) if self.work() else None
        self.reports_after_first = 0

    def reported(self, trial_id: str, result: dict) -> None:
        share = self.share(result)
        progressed = share > self.running.get(trial_id, 0.0)
        self.running[trial_id] = share
        if progressed and self.first_report is None:
            self.first_report = (time.time(), self.work())
        elif progressed:
            self.reports_after_first += 1
        self.note(trial_id, result)

    def ended(self, trial: Trial) -> None:
        result = trial.last_result or {}
        self.running.pop(trial.trial_id, None)
        self.ended_shares.append(self.share(result))
        if trial.status == Trial.ERROR or FAILURE_KEY in result:
            self.failed += 1
        else:
            self.done += 1
        self.note(trial.trial_id, result)

    def note(self, trial_id: str, result: dict) -> None:
        value = result.get(self.key)
        if value is not None and Direction(self.mode).better(value, None if self.best is None else self.best[0]):
            self.best = (value, trial_id)


class Progress(Callback):
    """The status line and one line per trial that ends: its score, or why it failed and where its log
    is. On a terminal the status line is rewritten in place every 2 s; into a file or pipe it is printed
    every minute and whenever a trial ends."""

    CLEAR = "\r\x1b[2K"  # back to the line's start, erase it
    selects = "best"  # a trial's value: its best report, or its last (`Task.selects`)
    counted: Tally | None = None  # a class default too: a search started before Tally resumes with its old callback
    deadline: float | None = None  # --budget's: seconds from the start at which the trials are stopped
    planned: float | None = None  # --budget's plan: seconds from the start at which the trials are predicted to end

    def __init__(self, metric: str, mode: str, num_samples: int, clock: tuple[str, float], selects: str = "best",
                 deadline: float | None = None, planned: float | None = None):
        self.metric, self.mode, self.num_samples, self.selects = metric, mode, num_samples, selects
        self.deadline, self.planned = deadline, planned
        self.time_attr, self.budget = clock
        self.started = time.time()
        self.printed = 0.0
        self.ended: set[str] = set()

    @property
    def key(self) -> str:
        return f"best_val_{self.metric}"

    def tally(self, trials: list[Trial]) -> Tally:
        """Built from every trial when the first line is due (a resumed search's trials ended before it), then
        kept by Tune's callbacks."""
        if self.counted is None:
            self.counted = Tally(self.mode, self.key, self.time_attr, self.budget)
            for trial in trials:
                # Tune calls back before it sets a trial's final status: what ended is what was announced
                if trial.trial_id in self.ended or trial.status in (Trial.TERMINATED, Trial.ERROR):
                    self.counted.ended(trial)
                elif trial.status == Trial.RUNNING:
                    self.counted.reported(trial.trial_id, trial.last_result or {})
                else:
                    self.counted.note(trial.trial_id, trial.last_result or {})
            self.counted.restart_rate()
        return self.counted

    def status(self, trials: list[Trial]) -> str:
        elapsed, tally = time.time() - self.started, self.tally(trials)
        best_text = (f"best val {self.metric} {tally.best[0]:.4f} (trial {tally.best[1]})" if tally.best
                     else "no result yet")
        waiting = self.num_samples - len(tally.ended_shares) - len(tally.running)
        left = eta_seconds(elapsed, waiting, tally.ended_shares, list(tally.running.values()), self.planned,
                           tally.since_first(self.started))
        if self.deadline is not None:  # a budgeted search ends at its deadline at the latest
            left = max(0.0, min(math.inf if left is None else left, self.deadline - elapsed))
        eta = "ETA unknown" if left is None else eta_text(left)
        return (f"[{minutes(elapsed)}] trials: {len(tally.running)} running, {tally.done} done, {tally.failed} "
                f"failed of {self.num_samples} | {best_text} | {eta}")

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
            if self.counted is not None:
                self.counted.ended(trial)
            print((self.CLEAR if self.live() else "") + self.ended_line(trial), flush=True)
        self.report(trials, force=True)

    def on_experiment_end(self, trials, **info):
        if self.live():
            print(flush=True)  # end the status line

    def on_step_end(self, iteration, trials, **info):  # between results too: a first evaluation can take minutes
        self.report(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.counted is not None:
            self.counted.reported(trial.trial_id, trial.last_result or {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.counted is not None and trial.trial_id not in self.ended:
            self.counted.reported(trial.trial_id, result)
        if STARTED_AGAIN_KEY in result:
            print((self.CLEAR if self.live() else "") + f"trial {trial.trial_id}: {result[STARTED_AGAIN_KEY]}",
                  flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trial_ended(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trial_ended(trials, trial)


def eta_seconds(elapsed: float, waiting: int, ended: list[float], running: list[float], planned: float | None = None,
                first: tuple[float, float] | None = None) -> float | None:
    """Seconds until the trials end, predicted: the work left (in shares of a trial's budget) at the rate work was
    done since `first` (the seconds to the first report and the work done then: a rate from the start would count
    Ray's start, the trials' and the first LoftQ; with no work since, the rate from the start). A trial yet to start
    runs what the ended ones ran on average (ASHA stops many early; before any ended, its whole budget); a running
    one at share d runs on as far as the ended trials that got past d did on average (to its budget's end when none
    did). With `planned` (a --budget plan's seconds for the trials, from the line's start), the plan refines it: its
    end stands until a rate is measured, then its time after the first report, in proportion to the work left, is
    weighted by the share of the work left (a plan already past is left out). Else None before any work is done."""
    work = sum(ended) + sum(running)
    expected = sum(ended) / len(ended) if ended else 1.0

    def rest(done: float) -> float:
        further = [share - done for share in ended if share > done]
        return sum(further) / len(further) if further else 1.0 - done

    work_left = waiting * expected + sum(rest(done) for done in running)
    if not work:
        return None if planned is None or planned <= elapsed else planned - elapsed
    if not work_left:
        return 0.0
    first_s, first_work = first or (0.0, 0.0)
    if work <= first_work:  # no work since the first report: no rate yet
        return planned - elapsed if planned is not None and planned > elapsed else work_left * elapsed / work
    measured = work_left * (elapsed - first_s) / (work - first_work)
    if planned is None or planned <= first_s:
        return measured
    planned_left = (planned - first_s) * work_left / (work + work_left - first_work)
    share_left = work_left / (work + work_left)
    return (1 - share_left) * measured + share_left * planned_left


def eta_text(left: float) -> str:
    """The trials' predicted end: the time left and the clock time."""
    return f"ETA {minutes(left)} (ends {time.strftime('%H:%M', time.localtime(time.time() + left))})"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def caps(spec: SearchSpec, record: ExperimentRecord, data) -> list[str]:
    """The caps on rows the search applies, in words, with the option that lifts them: none is silent."""
    profile = f"the {record.profile} profile"
    lines = []
    train_cap, test_cap = spec.fixed.get("max_train_examples"), spec.fixed.get("test_examples")
    every = record.budget.get("available_rows", 0) if record.budget else len(getattr(data, "train", ())) + 1
    if train_cap is not None and every > train_cap:  # fewer rows than the data holds
        lines.append(f"trials train on {train_cap:,} rows: max_train_examples {train_cap} "
                     f"({'--budget' if record.budget else profile}); lift it with "
                     f"{'a longer --budget' if record.budget else '--budget DURATION (every row that fits)'} or "
                     "max_train_examples: null in the space (write it with --write-space FILE)")
    if test_cap is not None:
        lines.append(f"the held-out score reads at most {test_cap:,} rows: test_examples {test_cap} ({profile}); lift "
                     "it with test_examples: null in the space (write it with --write-space FILE)")
    return lines


def data_sizes(data) -> str:
    """What the console says of the prepared data: the family's own summary, else its splits' sizes."""
    return getattr(data, "sizes", None) or " | ".join(f"{k} {len(v)}" for k, v in vars(data).items()
                                                      if hasattr(v, "__len__") and k in ("train", "validation"))


def data_named(spec: SearchSpec, source: str) -> str:
    """The data as the console names it: the user's data block's path, else the folder or "hub"."""
    return spec.dataset.fields["path"] if source == DATASET_SOURCE else source
