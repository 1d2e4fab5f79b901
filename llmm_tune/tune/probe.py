"""What a search will cost, measured and predicted: a probe of one trial on this machine (build, step, evaluation,
held-out scoring, peak memory) and, from its figures, the wall time of a whole search with ASHA. `plan` prints it;
`search --budget` sizes a search with it."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmm_tune.train.fit import Batches, Schedule, order_seed
from llmm_tune.train.progress import Progress
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.spaces import SearchSpec

PROBE_STEPS = 16
# how the probe measures, in the key of its cache (--budget's): figures measured otherwise are measured again
# (2: steps timed on rows of an epoch's mean padded width, not its widest batches; 3: the slowdown of trials at
# once, the least disturbed of three rounds)
PROBE_METHOD = 3
TUNE_OVERHEAD_S = 3.0  # per trial: worker start, object store, reports (benchmarks/bench_search.py)
RAY_START_S = 5.0  # ray.init of a private instance (benchmarks/bench_search.py: 4.2 s)
# the first trials' processes: Python, Ray's worker and the family's imports (glue on the 2-core Xeon: 6 to 10 s)
ACTOR_START_S = 8.0
# from the trials' end to the command's: Tune's clean-up of the trial actors, the export's reading of the experiment,
# its tables and plots, and Ray's shutdown (a search of a model-free family on the 2-core Xeon: 16 s)
EXPORT_OVERHEAD_S = 15.0


def trial_config(spec: SearchSpec) -> dict:
    """The configuration of the search's first trial (its first warm start, else the middle of the space)."""
    point = spec.warm_start[0] if spec.warm_start else {
        name: d.choices[0] if hasattr(d, "choices") else type(d.low)(math.sqrt(d.low * d.high) if d.log else
                                                                     (d.low + d.high) / 2)
        for name, d in spec.distributions().items()}
    return {**spec.fixed, **point}


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30 + 0.5  # + the CUDA context
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def probe(spec: SearchSpec, source: str, steps: int, score: bool) -> dict:
    """Figures of one trial measured here: build (model load + LoftQ, cold and from the disk cache),
    seconds per optimizer step (the first two apart), per evaluation, to score the held-out split, and
    peak memory; a progress line every 30 seconds while it runs."""
    with Progress("probing one trial here (prepare, two short runs, scoring)", 3 + score) as progress:
        config, context = trial_config(spec), spec.context()
        started = time.perf_counter()
        data = spec.recipe.prepare(config, context, source)
        progress.advance()
        figures = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
                   "prepare_s": time.perf_counter() - started, "train_examples": len(data.train)}
        with tempfile.TemporaryDirectory() as work:
            return figures | timed_runs(spec, config, context, typical_rows(data, config, steps), source, steps,
                                        score, Path(work), progress)


def typical_rows(data, config: dict, steps: int):
    """`data` with its training split cut to the rows whose token count is nearest the mean padded width of an
    epoch's batches, enough for the probe's runs (they evaluate once, at their end): the timed steps then cost what
    an epoch's steps do on average, a step's cost growing with its padded width (about linearly; text's token counts
    spread wide enough that such rows exist). On all rows they were among an epoch's widest, as length grouping
    puts each run of up to 50 batches widest first (CoLA's MiniLM: 0.38 s a probed step, 0.26 s on average). Data
    without token lengths (a family that trains without `fit`) is kept whole."""
    lengths = getattr(data, "train_lengths", None)
    if not lengths:
        return data
    schedule = Schedule.of(config, len(lengths))
    batches = Batches(data.train, lengths, None, "cpu", order_seed(config)).of_epoch(0, schedule)
    width = statistics.fmean(max(lengths[i] for i in batch) for batch in batches)
    rows = (3 + steps) * schedule.batch_size * schedule.accum
    nearest = np.argsort(np.abs(np.asarray(lengths) - width), kind="stable")[:rows].tolist()
    return dataclasses.replace(data, train=data.train.select(nearest), train_lengths=[lengths[i] for i in nearest])


def timed_runs(spec: SearchSpec, config: dict, context: TrialContext, data, source: str, steps: int, score: bool,
               work: Path, progress: Progress) -> dict:
    """Two runs on the same LoftQ cache: the first (2 steps) computes LoftQ, the second (2 + steps) reads it.
    Their difference is the time of `steps` ordinary steps: the first two carry the warm-up of the kernels. Then the
    held-out scoring."""
    recipe = spec.recipe
    reports: list[tuple[float, dict, str]] = []

    def keep(metrics: dict, directory: str) -> None:
        reports.append((time.perf_counter(), metrics, shutil.copytree(directory, work / str(len(reports)))))

    cached = dataclasses.replace(context, loftq_cache=str(work / "loftq"))
    once_an_epoch = {"evals_per_epoch": 1} if "evals_per_epoch" in config else {}  # no evaluation before a run's end
    runs = []
    for max_steps in (2, 2 + steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        recipe.train({**config, "max_steps": max_steps, **once_an_epoch}, cached, data, keep)
        ended, metrics, _ = reports[-1]
        runs.append({"build_s": ended - began - metrics["seconds"], "eval_s": metrics["eval_seconds"],
                     "train_s": metrics["seconds"] - metrics["eval_seconds"]})
        progress.advance()
    figures = {"build_cold_s": runs[0]["build_s"], "build_warm_s": runs[1]["build_s"],
               "eval_s": runs[1]["eval_s"], "step_s": (runs[1]["train_s"] - runs[0]["train_s"]) / steps,
               "first_steps_s": runs[0]["train_s"] / 2, "peak_memory_gib": peak_memory_gib()}
    if score:
        began = time.perf_counter()
        recipe.score(config, cached, reports[0][2], source)
        figures["score_s"] = time.perf_counter() - began
        progress.advance()
    return figures


def busy_seconds(threads: int, steps: int = 12) -> float:
    """Seconds of `steps` forward and backward passes of a transformer's feed-forward block (MiniLM's width, a batch
    of 512 tokens) on `threads` threads, after two to warm up: the kind of work a CPU trial's steps are."""
    torch.set_num_threads(threads)
    block = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    tokens = torch.randn(512, 384)
    for step in range(steps + 2):
        if step == 2:
            began = time.perf_counter()
        block(tokens).square().mean().backward()
    return time.perf_counter() - began


def wait_at(barrier) -> None:
    barrier.wait()


def concurrency_slowdown(concurrent: int, threads: int, work: Callable[..., float] = busy_seconds) -> float:
    """How much longer CPU work takes with `concurrent` trials' processes busy at once than with one alone (cores
    that share a physical core, memory bandwidth, clocks that drop under load): the probe times one trial alone.
    Measured with `work(threads, steps=...)`'s seconds in separate processes, as Ray runs trials; at least 1."""
    spawn = multiprocessing.get_context("spawn")
    # no work before every process is up: one started early would take the tasks meant to run at once
    with spawn.Pool(concurrent, initializer=wait_at, initargs=(spawn.Barrier(concurrent),)) as pool:
        pool.starmap(work, [(threads, 1)] * concurrent)  # the work's imports and first kernels
        alone = min(pool.apply(work, (threads,)) for _ in range(2))
        # the least disturbed of three rounds, as `alone` is: another program busy for a moment would otherwise be
        # cached with the probe's figures and shrink every later search sized here (a few seconds of it: 1.61, not 1.04)
        together = min(statistics.median(pool.starmap(work, [(threads,)] * concurrent)) for _ in range(3))
    return max(1.0, together / alone)


def with_slowdown(figures: dict, concurrent: int) -> dict:
    """`figures` with the slowdown of `concurrent` CPU trials at once, measured here unless they hold one for as
    many or more (a GPU's trials are packed by memory and not measured)."""
    measured = figures.get("slowdown")
    if figures["device"] != "cpu" or concurrent < 2 or (measured and measured["trials"] >= concurrent):
        return figures
    factor = concurrency_slowdown(concurrent, figures["threads"])
    return {**figures, "slowdown": {"trials": concurrent, "factor": factor}}


def slowdown(figures: dict, concurrent: int) -> float:
    """The factor a trial's time grows by with `concurrent` trials at once: the measured one (`with_slowdown`),
    in proportion for fewer trials than it was measured with; 1 where none was measured."""
    measured = figures.get("slowdown")
    if not measured or concurrent < 2:
        return 1.0
    return 1.0 + (measured["factor"] - 1.0) * min(1.0, (concurrent - 1) / (measured["trials"] - 1))


def rungs(spec, budget: float) -> list[float]:
    stopping = spec.early_stopping
    milestones, value = [], stopping["grace_period"]
    while value < budget:
        milestones.append(value)
        value *= stopping["reduction_factor"]
    return milestones


def simulate(spec, trial_s: float, budget: float, concurrent: int, evals: list[float], draws: int = 400,
             early_stopping: bool = True) -> dict:
    """ASHA as Tune runs it (asynchronous successive halving: at each rung a trial is stopped when its
    score is below the top 1/rf of those recorded there before it; the first at a rung goes on), with
    trials of random quality, `concurrent` at a time, each deciding in the order trials start (close to
    the order they reach a rung when trials run alike): mean trial length and makespan, over `draws`."""
    milestones, rf = rungs(spec, budget) if early_stopping else [], spec.early_stopping["reduction_factor"]
    decisions = [next(e for e in evals if e >= m) for m in milestones if any(e >= m for e in evals)]
    rng = np.random.default_rng(0)
    lengths, makespans = [], []
    for _ in range(draws):
        quality = rng.random(spec.num_samples)
        recorded: list[list[float]] = [[] for _ in decisions]
        free = [0.0] * concurrent  # when each slot is next free
        for trial in range(spec.num_samples):
            slot = int(np.argmin(free))
            start = free[slot]
            end, length = start, 0.0
            for k, at in enumerate(decisions + [budget]):
                end = start + at / budget * trial_s
                length = at / budget
                if k == len(decisions):
                    break
                values = recorded[k]
                cutoff = np.percentile(values, (1 - 1 / rf) * 100) if values else None
                values.append(quality[trial])
                if cutoff is not None and quality[trial] < cutoff:
                    break
            free[slot] = end + TUNE_OVERHEAD_S
            lengths.append(length)
        makespans.append(max(free))
    return {"mean_fraction": float(np.mean(lengths)), "makespan_s": float(np.mean(makespans))}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A search's predicted wall time and its parts (seconds)."""

    trial_s: float  # one whole trial: start, every step and evaluation
    steps: int  # optimizer steps of a whole trial
    evaluations: list[float]  # the epochs at which a trial reports
    mean_fraction: float  # of a whole trial, what a trial runs on average under ASHA
    makespan_s: float  # the trials, `concurrent` at a time
    cold_s: float  # LoftQ computed by the first trials of each base format
    export_s: float | None  # the trials' end to the command's, the held-out scoring included; None: not probed
    table_rows: float  # rows the export's table is expected to hold
    wall_s: float  # data, Ray, trials, LoftQ and export


def predict(figures: dict, spec: SearchSpec, config: dict, rows: int, concurrent: int, workers: int = 1,
            early_stopping: bool = True) -> Prediction:
    """The wall time of `spec`'s search (its trial count, early stopping, when on, and space) with trials of `config`
    training on `rows` examples, `concurrent` at a time, from a probe's `figures`."""
    schedule = Schedule.of(config, rows, workers)
    steps = schedule.total_steps
    evals = [schedule.epochs_done(step) for step in sorted(schedule.eval_at)]  # the epochs fit reports at
    trial_s = (figures["build_warm_s"] + 2 * figures["first_steps_s"] + (steps - 2) * figures["step_s"]
               + len(evals) * figures["eval_s"]) * slowdown(figures, concurrent)
    _, epochs = spec.recipe.clock(config, spec.context())
    asha = simulate(spec, trial_s, epochs, concurrent, evals, early_stopping=early_stopping)
    combos = math.prod(len(d.choices) for n, d in spec.distributions().items()
                       if n in ("quant_method", "bits", "rank") and hasattr(d, "choices")) or 1
    table_rows = combos * (1 - (1 - 1 / combos) ** spec.num_samples) if combos > 1 else 1
    cold = min(combos, spec.num_samples) * (figures["build_cold_s"] - figures["build_warm_s"]) / concurrent
    export_s = EXPORT_OVERHEAD_S + table_rows * figures["score_s"] if "score_s" in figures else None
    wall = figures["prepare_s"] + RAY_START_S + ACTOR_START_S + asha["makespan_s"] + cold + (export_s or 0.0)
    return Prediction(trial_s, steps, evals, asha["mean_fraction"], asha["makespan_s"], cold, export_s, table_rows,
                      wall)
