"""What a search's driver process does for itself, in Tune's hooks, besides printing (console): name the trials'
folders, delete the checkpoints no trial needs any more, drop what Tune keeps of a finished trial only to update it
and hand freed heap back to the system. All four matter in searches of thousands of trials."""

from __future__ import annotations

import json
import logging
import time
from collections import deque

from ray.tune import Callback, Stopper

from llmm_tune.tune import storage
from llmm_tune.tune.experiment import BUDGET_FILE
from llmm_tune.tune.runner import trim_heap


def trial_folder(trial) -> str:
    """A trial's folder, named by its id. A function, not a lambda: Tune pickles it into every trial's entry of the
    experiment state, which it rewrites whole at every snapshot (a lambda took 1.2 KB a trial there)."""
    return f"trial_{trial.trial_id}"


class ReturnFreedHeap(Callback):
    """After each trial, the driver's freed heap back to the system. Tune serialises its whole experiment state
    (tens of MB by a thousand trials) at every snapshot, and glibc keeps freed pages for reuse: our driver grew
    210 MiB per 1,000 trials without this (`bench_many_trials.py --trials 150`) and 66 to 92 MiB with it
    (`--trials 400`)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        trim_heap()


class ForgetFinishedTrialsMetricWindows(Callback):
    """A finished trial's windows of each metric's last 5 and 10 values, which Tune keeps only to update the averages
    over them (`metric_n_steps`: two deques of 760 bytes a numeric metric, 11 metrics in the benchmark's trials), leave
    the driver; the averages stay in the trial's metric analysis. Tune holds its record of every trial of the search
    in the driver, and the windows made a third of it: 69.5 KiB a trial with them, 44.9 without (bench_many_trials.py,
    1,000 trials). Tune offers no setting for them, so this replaces the one field in its record."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        metadata = trial.run_metadata
        metadata.metric_n_steps = MetricWindows(metadata._n_steps)  # also drops Tune's cached JSON of the trial


class MetricWindows(dict):
    """Tune's windows of a finished trial: none, and new empty ones for a metric reported again (a trial retried
    after its stop failed), where Tune's update would otherwise find no window."""

    def __init__(self, lengths: tuple[int, ...]) -> None:
        super().__init__()
        self.lengths = lengths

    def __missing__(self, metric: str) -> dict[str, deque]:
        windows = self[metric] = {str(n): deque(maxlen=n) for n in self.lengths}
        return windows


class DeleteSupersededCheckpoints(Callback):
    """Each trial keeps its latest checkpoint and its best (by the selection metric), as
    `CheckpointConfig(num_to_keep=1)` would: a superseded checkpoint leaves Tune's record of the trial at once and its
    files go two experiment snapshots later, when the state on storage no longer names it. By hand because Tune's
    num_to_keep deletes a superseded checkpoint at once and then forces a snapshot of the whole experiment after every
    checkpoint so that its state names the successor: that snapshot grows with the trials, so a search of thousands
    would spend hours rewriting it (ray issue 31613; bench_many_trials.py), and a driver killed between the deletion and
    the snapshot left a state naming a deleted checkpoint (ray issue 27790). With Tune keeping every checkpoint
    (num_to_keep=None) it snapshots on its own period instead. Two snapshots, not one: Tune uploads a snapshot in the
    background and skips the next upload while one runs. Left behind by a kill: what was not yet deleted."""

    def __init__(self) -> None:
        self.superseded: list = []  # (trial, checkpoint) since the last snapshot: a state on record may name them
        self.due: list[list] = [[], []]  # superseded before each of the last two snapshots
        self.snapshot_last = False  # whether Tune's last act was a snapshot (its final one, before the end)
        self.started = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self.snapshot_last = False
        if not self.started:  # a resumed search's trials may still list checkpoints superseded before the kill
            self.started = True
            self.superseded += [(trial, checkpoint) for trial in trials for checkpoint in forget_superseded(trial)]

    def on_trial_save(self, iteration: int, trials: list, trial, **info) -> None:
        """After Tune registered the trial's new checkpoint."""
        self.superseded += [(trial, checkpoint) for checkpoint in forget_superseded(trial)]

    def get_state(self) -> None:
        """Called by Tune right after it wrote a snapshot, which lists none of the superseded checkpoints."""
        delete_checkpoints(self.due.pop(0))
        self.due.append(self.superseded)
        self.superseded, self.snapshot_last = [], True
        return None  # nothing for Tune to save and restore: a resumed search starts with nothing due

    def on_experiment_end(self, trials: list, **info) -> None:
        """After Tune's final snapshot, which it uploads and waits for, nothing due is named on storage; when the
        search ended with an error instead, Tune took none, and what is due stays."""
        if self.snapshot_last:
            delete_checkpoints([due for snapshot in self.due for due in snapshot])
            self.due = [[], []]


def forget_superseded(trial) -> list:
    """Drop the trial's checkpoints other than its latest and its best from Tune's record of it (what num_to_keep
    does to it), so that the next snapshot no longer lists them; returns them."""
    manager = trial.run_metadata.checkpoint_manager
    kept = {result.checkpoint.path for result in (manager.latest_checkpoint_result, manager.best_checkpoint_result)
            if result is not None}
    # Tune offers no public way to forget a checkpoint: this list is what num_to_keep itself prunes
    results = manager._checkpoint_results
    if len(results) <= len(kept):
        return []
    manager._checkpoint_results = [result for result in results if result.checkpoint.path in kept]
    trial.run_metadata.invalidate_cache()
    return [result.checkpoint for result in results if result.checkpoint.path not in kept]


def delete_checkpoints(due: list) -> None:
    for trial, checkpoint in due:
        try:
            checkpoint.filesystem.delete_dir(checkpoint.path)
        except FileNotFoundError:
            pass  # deleted by hand or by an earlier run of this search
        except OSError as error:  # an object store's hiccup: the checkpoint stays, the search goes on
            logging.getLogger("ray.tune").warning("trial %s: could not delete %s: %s", trial.trial_id,
                                                  checkpoint.path, error)


class BudgetStop(Callback, Stopper):
    """Ends the search `seconds` after its first step (`--budget`): Tune's own stop of the whole experiment (no new
    trials; each running one ends, keeping its latest evaluation and checkpoint). The trials it cut are written to
    the experiment for the export to mark. A Callback too, to know which trials run; a resumed search counts its
    `seconds` anew."""

    def __init__(self, seconds: float, experiment: str):
        self.seconds, self.experiment = seconds, experiment
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {"seconds": self.seconds, "experiment": self.experiment}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.running: set[str] = set()
        self.reported = 0  # evaluations the trials reported: none at the deadline leaves nothing to export
        self.started: float | None = None
        self.stopped = False

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)

    on_trial_error = on_trial_complete

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.reported += 1

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False  # a trial is stopped with all the others, by stop_all

    def stop_all(self) -> bool:
        now = time.monotonic()
        self.started = self.started or now
        if not self.stopped and now - self.started >= self.seconds:
            self.stopped = True
            storage.write_text(storage.join(self.experiment, BUDGET_FILE),
                               json.dumps({"after_s": round(now - self.started, 1), "cut": sorted(self.running),
                                          "reported": self.reported}))
        return self.stopped
