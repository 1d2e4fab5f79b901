"""A search's Tuner, new or restored (Optuna's searcher behind a concurrency limit, ASHA counting in the family's
clock, our driver callbacks), and its run with the driver's log kept in the experiment."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmm_tune.errors import Interrupted
from llmm_tune.tune import storage, trackers
from llmm_tune.tune.cluster import Layout
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import ExperimentRecord
from llmm_tune.tune.objectives import searcher_targets
from llmm_tune.tune.spaces import SearchSpec

# What a multi-worker trial itself holds while its Ray Train workers run: a little memory, no CPU, so the
# workers can take every CPU (Tune needs a non-empty request).
TRAIN_DRIVER = {"memory": 64 * 2**20}


def build_tuner(spec: SearchSpec, record: ExperimentRecord, context: TrialContext, data, experiment: str,
                resume: bool, optuna_storage: str | None):
    """The Tuner of a new experiment, or of `experiment` resumed."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from llmm_tune.tune.console import Progress
    from llmm_tune.tune.driver import (
        DeleteSupersededCheckpoints,
        ForgetFinishedTrialsMetricWindows,
        ReturnFreedHeap,
        trial_folder,
    )
    from llmm_tune.tune.searcher import make_searcher, study_storage
    from llmm_tune.tune.trainable import trainable

    layout = Layout.from_record(record.resources)
    # a multi-worker trial is a Ray Train run: its workers reserve their own resources, and the trial
    # itself only waits for them (the concurrency limit keeps the trials within what the cluster holds)
    own = {"cpu": layout.cpus, "gpu": layout.gpus} if layout.workers == 1 else TRAIN_DRIVER
    # the fixed settings go to the trials once, not in each trial's config: Tune keeps a trial's config several times
    # in the experiment state it rewrites whole at every snapshot (benchmarks/bench_many_trials.py)
    trainable = tune.with_resources(tune.with_parameters(trainable, context=context, data=data, experiment=experiment,
                                                         layout=record.resources, fixed=spec.fixed), own)
    if resume:
        storage.mend_cut_state(experiment)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = searcher_targets(record.objective_list, context.value_key, spec.mode)
    searcher = make_searcher(spec.distributions(), metric, mode, spec.warm_start, spec.num_samples,
                             spec.fixed["seed"], study_storage(experiment, optuna_storage), record.name,
                             record.sampler)
    clock = spec.recipe.clock(spec.fixed, context)
    stop, planned = budget_stop(record, experiment)
    parent, name = experiment.rstrip("/").rsplit("/", 1) if storage.is_uri(experiment) else \
        (str(Path(experiment).parent), Path(experiment).name)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, layout.concurrent),
                                    scheduler=scheduler(spec, record, clock), num_samples=spec.num_samples,
                                    reuse_actors=True, trial_dirname_creator=trial_folder),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=0, log_to_file=True, stop=stop,
            callbacks=[Progress(spec.metric, spec.mode, spec.num_samples, clock, context.selects,
                                deadline=stop.seconds if stop else None, planned=planned),
                       ForgetFinishedTrialsMetricWindows(), ReturnFreedHeap(), DeleteSupersededCheckpoints(),
                       *trackers.callbacks(record.tracker_names, record), *([stop] if stop else [])],
            # Tune keeps every checkpoint it is told of; DeleteSupersededCheckpoints keeps each trial's latest and best
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, **context.checkpoint_ranking()),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def budget_stop(record: ExperimentRecord, experiment: str):
    """A --budget search's stop at its deadline (the budget less what the command has spent and the export's time),
    also a callback that knows the running trials, and the plan's seconds for the trials from now (the status line's
    first ETA); (None, None) without a budget."""
    if not record.budget:
        return None, None
    from llmm_tune.tune.budget import Sizing, seconds_since_start
    from llmm_tune.tune.driver import BudgetStop

    sizing, spent = Sizing(**record.budget), seconds_since_start()
    return BudgetStop(sizing.trials_seconds(spent), experiment), sizing.trials_left_s(spent)


def scheduler(spec: SearchSpec, record: ExperimentRecord, clock: tuple[str, float]):
    """ASHA on the space's early-stopping settings, counting in the family's clock; FIFO without early stopping."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not record.early_stopping:
        return FIFOScheduler()
    stopping = spec.early_stopping
    return ASHAScheduler(time_attr=clock[0], metric=stopping["metric"], mode=stopping["mode"], max_t=clock[1],
                         grace_period=stopping["grace_period"], reduction_factor=stopping["reduction_factor"])


@contextlib.contextmanager
def search_log(experiment: str) -> Iterator[str]:
    """The driver's library logs go to <experiment>/llmm_search.log (written locally and uploaded at the end
    for an object-store experiment); yields its location."""
    from llmm_tune.tune.console import LOG_FILE, log_to_file

    log = storage.join(experiment, LOG_FILE)
    local_log = Path(experiment) / LOG_FILE if not storage.is_uri(experiment) else \
        Path(tempfile.mkdtemp(prefix="llmm_search_")) / LOG_FILE
    log_to_file(local_log)
    try:
        yield log
    finally:
        if storage.is_uri(experiment):
            storage.write_bytes(log, local_log.read_bytes())
            shutil.rmtree(local_log.parent, ignore_errors=True)


def run_trials(tuner, log: str, resume: str) -> None:
    """Run the trials; a failure of Ray itself stops the search with the command that continues it (the state
    saved at the last checkpoint is what resumes)."""
    try:
        tuner.fit()
    except Exception as error:
        logging.getLogger("ray.tune").exception("the search stopped")
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise Interrupted(f"the search stopped: {type(error).__name__}: {reason} (traceback in {log}); continue "
                          f"with: {resume}", code=1) from None
