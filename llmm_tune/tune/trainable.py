"""THE Tune trainable: runs one trial of any family through the runner, resumes it from Tune's checkpoint, and
ends the trial (not the search) when it fails for a reason: divergence, out of memory, or the same crash again
after a restore."""

from __future__ import annotations

import json
import traceback

import torch

from llmm_tune.errors import FAILURE_KEY, STARTED_AGAIN_KEY, failure_reason
from llmm_tune.tune import storage
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.runner import prepare_process, release_memory, run_recipe

CRASHES = "crashes"  # <experiment>/crashes/<trial id>.json and .log: the last crash of each trial


def trainable(config: dict, context: TrialContext, data, experiment: str, layout: dict, fixed: dict) -> None:
    """Ray Tune function trainable of the searched settings `config`, trained with the space's `fixed` ones;
    `experiment` is the experiment's folder or URI, `layout` its `cluster.Layout` record (more than one worker per
    trial: a Ray Train run, see `workers`)."""
    from ray import tune

    prepare_process()
    config = {**fixed, **config}
    trial_id = tune.get_context().get_trial_id()
    try:
        if layout["workers_per_trial"] > 1:
            from llmm_tune.tune.workers import run_workers

            run_workers(config, context, data, experiment, layout, trial_id)
        else:
            torch.set_num_threads(max(1, int(layout["cpus_per_trial"])))
            run_single(config, context, data)
        return
    except Exception as error:  # divergence, out of memory, a repeated crash: end the trial, not the search
        reason = failure_reason(error) or repeated_crash(error, experiment, trial_id)
        if reason is None:
            raise  # Tune records it and retries from the last checkpoint (FailureConfig)
    finally:
        release_memory()  # the trial's model, before this worker (reused by Tune) takes the next trial
    tune.report({FAILURE_KEY: reason})


class StartsAgainWhenItsCheckpointIsGone:
    """Mixed into the trainable's Tune class (`__mixins__`, which `tune.with_parameters` and `wrap_function` keep):
    a trial whose checkpoint has vanished starts again from the beginning, where Tune would fail it three times.
    Deleted by hand, or in a search started before driver.DeleteSupersededCheckpoints: there Tune deleted a trial's
    previous checkpoint (num_to_keep) as soon as the next one registered and saved the experiment's state, which
    names the checkpoint to resume from, only afterwards, so a driver killed in between left a state naming a deleted
    checkpoint (ray issues 27790 and 31613). Ray once fell back to the latest checkpoint still there (ray PR 29099);
    2.60 raises instead."""

    def restore(self, checkpoint_path):
        checkpoint = getattr(checkpoint_path, "checkpoint", None)
        if checkpoint is not None and not storage.checkpoint_exists(checkpoint):
            STARTED_AGAIN[self.trial_id] = (f"its checkpoint {checkpoint.path} was gone at the resume; trained again "
                                            "from the start")
            return None
        return super().restore(checkpoint_path)


STARTED_AGAIN: dict[str, str] = {}  # trial id -> why it starts from the beginning, until its first report says so
trainable.__mixins__ = (StartsAgainWhenItsCheckpointIsGone,)


def run_single(config: dict, context: TrialContext, data) -> None:
    """A one-process trial: every report to Tune with its checkpoint, from Tune's latest one when resumed."""
    from ray import tune

    started_again = STARTED_AGAIN.pop(tune.get_context().get_trial_id(), None)

    def send(metrics: dict, directory: str, stands: bool) -> None:
        nonlocal started_again
        said = {STARTED_AGAIN_KEY: started_again} if started_again else {}
        tune.report({**metrics, **said}, checkpoint=tune.Checkpoint.from_directory(directory))
        started_again = None

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_recipe(context, config, data, send)
        return
    with checkpoint.as_directory() as directory:
        run_recipe(context, config, data, send, resume=directory)


def repeated_crash(error: BaseException, experiment: str, trial_id: str) -> str | None:
    """The reason to stop retrying when this crash repeats the trial's previous one (same error at the
    same line), else None after recording it: a retry from a checkpoint cannot fix a deterministic bug."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    lines = str(error).strip().splitlines()
    crash = {"error": f"{type(error).__name__}: {lines[0] if lines else ''}"[:300],
             "where": f"{frame.filename}:{frame.lineno}"}
    record, log = (storage.join(experiment, CRASHES, f"{trial_id}.{suffix}") for suffix in ("json", "log"))
    storage.write_text(log, "".join(traceback.format_exception(error)))
    if storage.exists(record) and json.loads(storage.read_text(record)) == crash:
        return (f"crashed again after a restore with the same error, not retried: {crash['error']} at "
                f"{crash['where']}; log: {log}")
    storage.write_text(record, json.dumps(crash))
    return None
