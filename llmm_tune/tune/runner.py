"""The one runner of a recipe: train a trial's configuration with its family and keep the report that stands
for it (its best, or its last for a task sequence; the later of equal ones, as Ray's checkpoint manager keeps
them). The Tune trainable, its Ray Train workers, reproduce, compare and export_adapter all run recipes here."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llmm_tune.tune.context import TrialContext, validation_key
from llmm_tune.tune.family import replaces

BEST_FILE = "llmm_best.json"  # in every checkpoint: the selection value that stands up to it ("value") and, with
# --objectives, the other objectives' values at that report ("others"; older files lack it)
Sender = Callable[[dict, str, bool], None]  # (metrics, checkpoint directory, whether this report stands)


def run_recipe(context: TrialContext, config: dict, data, send: Sender, resume: str | None = None) -> None:
    """Train `config` with the context's recipe, from the checkpoint directory `resume` when given. Each report
    goes out through `send` with `best_val_<metric>`, the trial's value so far (the value of the report that
    stands), the same of each other objective (`best_val_<objective>`: its value at that report), and a flag
    saying whether this report now stands for the trial."""
    key, others = context.value_key, [validation_key(metric) for metric in context.objectives]
    standing: dict = {"value": None, "others": {}}
    if resume is not None:
        standing.update(json.loads((Path(resume) / BEST_FILE).read_text()))

    def report(metrics: dict, directory: str) -> None:
        stands = replaces(context.definition, context.direction, metrics[key], standing["value"])
        if stands:
            standing["value"] = metrics[key]
            standing["others"] = {other: metrics.get(other) for other in others}
        (Path(directory) / BEST_FILE).write_text(json.dumps(standing))
        send({**metrics, f"best_{key}": standing["value"],
              **{f"best_{other}": standing["others"].get(other) for other in others}}, directory, stands)

    context.recipe.train(config, context, data, report, resume=resume)


def train_standing(context: TrialContext, config: dict, data, work: Path) -> tuple[dict, Path]:
    """Train `config` outside Tune; (the validation metrics of the report that stands, a copy of its checkpoint
    under `work`)."""
    kept = {"metrics": {}}
    checkpoint = work / f"seed{config['seed']}"

    def keep(metrics: dict, directory: str, stands: bool) -> None:
        if stands:
            kept["metrics"] = metrics
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.copytree(directory, checkpoint)

    run_recipe(context, config, data, keep)
    return {k: v for k, v in kept["metrics"].items() if k.startswith("val_")}, checkpoint


def train_and_score(context: TrialContext, config: dict, data, source: str, work: Path) -> dict[str, float]:
    """Train `config` outside Tune; the validation metrics of the report that stands and its checkpoint's scores on
    the held-out split (as `<split>_<metric>`): one run of reproduce, compare and export_adapter."""
    validation, checkpoint = train_standing(context, config, data, work)
    held_out = context.recipe.score(config, context, str(checkpoint), source)
    return {**validation, **{f"{context.recipe.HELD_OUT}_{k}": v for k, v in held_out.items()}}


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


def release_memory() -> None:
    """Free what a finished trial held. glibc keeps freed heap pages for reuse, and a worker that ran
    several trials of a causal LM grew from 6.5 to 9.5 GB resident: hand them back to the system."""
    gc.collect()
    # What survives the first trial (the libraries' ~600,000 import-time objects) is moved out of the collector's
    # sight: a full collection then takes microseconds, not the 0.2 s per trial it took with them (timed in a process
    # with the same imports). Frozen objects are still freed by reference counting.
    if gc.get_freeze_count() == 0:
        gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them for reuse)."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
