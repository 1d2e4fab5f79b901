"""What a search's driver process does for itself, in Tune's hooks, besides printing (console): name the trials'
folders and hand freed heap back to the system. Both matter in searches of thousands of trials."""

from __future__ import annotations

from ray.tune import Callback

from llmm_tune.tune.runner import trim_heap


def trial_folder(trial) -> str:
    """A trial's folder, named by its id. A function, not a lambda: Tune pickles it into every trial's entry of the
    experiment state, which it rewrites whole at every checkpoint (a lambda took 1.2 KB a trial there)."""
    return f"trial_{trial.trial_id}"


class ReturnFreedHeap(Callback):
    """After each trial, the driver's freed heap back to the system. Tune serialises its whole experiment state
    (tens of MB by a thousand trials) at every checkpoint, and glibc keeps freed pages for reuse: our driver grew
    210 MiB per 1,000 trials without this (`bench_many_trials.py --trials 150`) and 66 to 92 MiB with it
    (`--trials 400`)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        trim_heap()
