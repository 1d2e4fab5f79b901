"""THE Tune trainable: runs one trial of any family, resumes it from Tune's checkpoint, tracks the best
validation value in the task's direction, and ends the trial (not the search) when it fails for a
reason: divergence, out of memory, or the same crash again after a restore."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from llmm_tune.errors import FAILURE_KEY, failure_reason
from llmm_tune.tune import storage
from llmm_tune.tune.family import load_family, replaces

BEST_FILE = "llmm_best.json"  # in every checkpoint: the best selection value up to it
CRASHES = "crashes"  # <experiment>/crashes/<trial id>.json and .log: the last crash of each trial
LOFTQ_CACHE = "loftq"  # <experiment>/loftq/: LoftQ initialisations every trial of the search shares


def trainable(config: dict, family: str, data, experiment: str, layout: dict) -> None:
    """Ray Tune function trainable; `experiment` is the experiment's folder or URI, `layout` its
    `cluster.Layout` record (more than one worker per trial: a Ray Train run, see `distributed`)."""
    from ray import tune

    prepare_process()
    trial_id = tune.get_context().get_trial_id()
    config = {**config, "loftq_cache": storage.join(experiment, LOFTQ_CACHE)}
    try:
        if layout["workers_per_trial"] > 1:
            from llmm_tune.tune.workers import run_workers

            run_workers(config, family, data, experiment, layout, trial_id)
        else:
            torch.set_num_threads(max(1, int(layout["cpus_per_trial"])))

            def send(metrics: dict, directory: str) -> None:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

            run_trial(load_family(family), config, data, send, tune.get_checkpoint())
        return
    except Exception as error:  # divergence, out of memory, a repeated crash: end the trial, not the search
        reason = failure_reason(error) or repeated_crash(error, experiment, trial_id)
        if reason is None:
            raise  # Tune records it and retries from the last checkpoint (FailureConfig)
    finally:
        release_memory()  # the trial's model, before this worker (reused by Tune) takes the next trial
    tune.report({FAILURE_KEY: reason})


def prepare_process() -> None:
    """Quiet library logs; give a stopped trial's thread time to end; and Ray's Tee (the trial's log files)
    lacks isatty, which transformers calls when it reports weights a checkpoint lacks (a new task head)."""
    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    # When Tune reuses this actor for the next trial, it waits this long for the stopped trial's thread to end
    # (read in this process, so set here it holds on any cluster). Tune's default, 2 s, is shorter than a
    # stopped trial's clean-up on a loaded machine, and the next trial then failed with "Trainable runner reuse
    # requires reset_config()" (seen on 2 cores under a second workload).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    for stream in (sys.stdout, sys.stderr):
        if not hasattr(stream, "isatty"):
            stream.isatty = lambda: False


def run_trial(recipe, config: dict, data, send, checkpoint) -> None:
    """Train with `recipe`, from `checkpoint` (a Ray checkpoint) when given; each evaluation's metrics,
    with `best_val_<metric>` (the trial's value so far: its best report, or its last for a task that selects
    the last) go out with their checkpoint directory
    through `send(metrics, directory)`."""
    metric, mode, task = config["metric"], config["mode"], recipe.TASKS[config["task"]]
    best = {"value": None}

    def report(metrics: dict, directory: str) -> None:
        if replaces(task, mode, metrics[f"val_{metric}"], best["value"]):
            best["value"] = metrics[f"val_{metric}"]
        (Path(directory) / BEST_FILE).write_text(json.dumps(best))
        send({**metrics, f"best_val_{metric}": best["value"]}, directory)

    if checkpoint is None:
        recipe.train(config, data, report)
        return
    with checkpoint.as_directory() as directory:
        best.update(json.loads((Path(directory) / BEST_FILE).read_text()))
        recipe.train(config, data, report, resume=directory)


def release_memory() -> None:
    """Free what a finished trial held. glibc keeps freed heap pages for reuse, and a worker that ran
    several trials of a causal LM grew from 6.5 to 9.5 GB resident: hand them back to the system."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
