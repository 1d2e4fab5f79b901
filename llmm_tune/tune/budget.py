"""A search sized to the user's time (`--budget 45m`): from a probe of one trial on this machine (cached by model,
data, settings and hardware), the trials, epochs and training rows that finish, export included, inside the budget.

Ray Tune's `time_budget_s` (and Syne Tune's or W&B's caps) stop a search when time is up; none sizes it to the time
up front, which is what this module adds. The stop itself is Tune's: `driver.BudgetStop` ends the search at its
deadline, each running trial keeping its latest evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
import time
from fractions import Fraction
from pathlib import Path

import torch

from llmm_tune.errors import Interrupted, UsageError
from llmm_tune.train.data import DATASET_SOURCE
from llmm_tune.train.pretrained import CACHE_DIR
from llmm_tune.tune.cluster import MAX_TRIALS_PER_GPU, Layout, LayoutRequest, machine, plan_layout, trials_per_gpu
from llmm_tune.tune.console import quiet_logs
from llmm_tune.tune.probe import (
    ACTOR_START_S,
    PROBE_METHOD,
    RAY_START_S,
    Prediction,
    predict,
    probe,
    trial_config,
    with_slowdown,
)
from llmm_tune.tune.spaces import SearchSpec

DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
MIN_ROWS = 256  # fewer training rows than this would measure noise, not a configuration
MAX_TRIALS_PER_PROFILE_TRIAL = 4  # a long budget runs up to this many times the profile's trials
EXPORT_MARGIN = 1.2  # the export's predicted time, with room: the trials stop this much earlier
# fewer than plan's 16: the probe's time comes out of the budget (SmolLM2 on one thread: 8 s a step)
BUDGET_PROBE_STEPS = 4
GPU_PROFILE_BUDGET = "1h"  # --profile gpu without --budget
SEARCH_START_S = 20.0  # a search process's imports, checks and data before its sizing (glue on the 2-core Xeon)


def parse_duration(text: str) -> float:
    """Seconds in `45m`, `2h`, `1h30m` or `90s`."""
    match = DURATION.fullmatch(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise UsageError(f"--budget {text}: expected a duration such as 45m, 2h, 1h30m or 90s")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UsageError(f"--budget {text} is no time; give a positive duration such as 10m")
    return float(total)


def duration_text(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes >= 10 else f"{minutes:.1f} min"


@dataclasses.dataclass(frozen=True)
class Sizing:
    """A search sized to a budget, and what it is predicted to take."""

    budget_s: float
    num_samples: int
    epochs: float  # whole, or ending at an evaluation inside the last epoch
    train_rows: int  # the rows each trial trains on
    available_rows: int  # the training rows the data holds (after the validation split)
    concurrent: int
    spent_s: float  # before the sizing: the command's start-up and the probe (cached: none)
    predicted_s: float  # the search from the sizing on, export included
    export_s: float  # the export's share of `predicted_s`
    gpus_per_trial: float | None = None  # the GPU fraction the probe's peak memory packs; None: the command line's

    def trials_seconds(self, spent_s: float) -> float:
        """How long the trials may run once `spent_s` of the budget are gone: the export then fits in it."""
        return self.budget_s - spent_s - EXPORT_MARGIN * self.export_s

    def trials_left_s(self, spent_s: float) -> float:
        """The plan's seconds left for the trials once `spent_s` of the budget are gone (the export follows them)."""
        return self.spent_s + self.predicted_s - self.export_s - spent_s

    def overrides(self) -> dict:
        """The fixed settings that make the sized search: what its record keeps, so a resume trains the same."""
        return {"epochs": self.epochs, "max_train_examples": self.train_rows}

    def applied(self, spec: SearchSpec) -> SearchSpec:
        """`spec` with the sized trial count and settings."""
        return dataclasses.replace(spec, num_samples=self.num_samples, fixed={**spec.fixed, **self.overrides()})

    def packing(self) -> str:
        return f" ({round(1 / self.gpus_per_trial)} per GPU by memory)" if self.gpus_per_trial else ""

    def line(self) -> str:
        rows = (f"all {self.train_rows:,} rows" if self.train_rows == self.available_rows
                else f"{self.train_rows:,} of {self.available_rows:,} rows")
        return (f"budget {duration_text(self.budget_s)}: {self.num_samples} trials x up to {self.epochs:g} epoch(s) on "
                f"{rows}, {self.concurrent} at once{self.packing()}: about "
                f"{duration_text(self.spent_s + self.predicted_s)} predicted ({self.spent_s:.0f} s of start-up and "
                "probe included); at the budget, running trials end at their latest evaluation and the export runs")


def fits(figures: dict, spec: SearchSpec, epochs: float, rows: int, trials: int, concurrent: int,
         workers: int) -> Prediction:
    """The prediction for `trials` trials of `epochs` epochs on `rows` rows (with the early stopping of a search of
    that many trials)."""
    sized = dataclasses.replace(spec, num_samples=trials, fixed={**spec.fixed, "epochs": epochs})
    return predict(figures, sized, trial_config(sized), rows, min(concurrent, trials), workers,
                   early_stopping=sized.stops_early())


def most_trials(figures: dict, spec: SearchSpec, epochs: float, rows: int, concurrent: int, workers: int,
                seconds: float, most: int) -> int:
    """The most trials (up to `most`, at least 0) of `epochs` epochs on `rows` rows predicted within `seconds`."""
    low, high = 0, most
    while low < high:  # the wall time grows with the trials: bisect
        middle = (low + high + 1) // 2
        if fits(figures, spec, epochs, rows, middle, concurrent, workers).wall_s <= seconds:
            low = middle
        else:
            high = middle - 1
    return low


def size(figures: dict, spec: SearchSpec, concurrent: int, workers: int, budget_s: float, spent_s: float) -> Sizing:
    """The search that fits the budget: every row, the profile's epochs and as many trials as fit (at least two, or
    as many as run at once up to four; at most 4x the profile's); where that many do not fit, fewer epochs (down by
    an evaluation's share of one), then fewer rows (halved, down to 256), then a single trial; else a refusal
    naming the smallest budget that fits one trial."""
    seconds = budget_s - spent_s
    available = int(figures["train_examples"])
    fewest, most = min(max(2, concurrent), 4), MAX_TRIALS_PER_PROFILE_TRIAL * spec.num_samples
    rows_options, epochs_options = row_options(available), epoch_options(spec)
    shortest = epochs_options[-1]
    for rows in rows_options:
        for epochs in epochs_options:
            trials = most_trials(figures, spec, epochs, rows, concurrent, workers, seconds, most)
            if trials >= fewest or (rows, epochs) == (rows_options[-1], shortest) and trials >= 1:
                predicted = fits(figures, spec, epochs, rows, trials, concurrent, workers)
                return Sizing(budget_s, trials, epochs, rows, available, min(concurrent, trials), spent_s,
                              predicted.wall_s, predicted.export_s or 0.0)
    smallest = smallest_budget(figures, spec, concurrent, workers, spent_s)
    raise UsageError(f"--budget {duration_text(budget_s)} is too short for one trial here ({shortest:g} epoch(s) on "
                     f"{rows_options[-1]:,} rows needs about {duration_text(smallest)} with the probe); give "
                     f"--budget {minutes_up(smallest)}m or more")


def epoch_options(spec: SearchSpec) -> list[float]:
    """The profile's epochs, then down by an evaluation's share of an epoch to one (or the profile's, when less):
    the trial lengths a sizing tries, longest first. A trial then ends at an evaluation, and a budget that does not
    fit whole epochs is used to within one evaluation's time, not one epoch's."""
    longest = Fraction(spec.fixed["epochs"]).limit_denominator(1000)
    share = Fraction(1, spec.fixed.get("evals_per_epoch", 1))
    shorter = max(0, math.floor((longest - 1) / share))
    return [spec.fixed["epochs"]] + [whole_or_fraction(longest - k * share) for k in range(1, shorter + 1)]


def whole_or_fraction(epochs: Fraction) -> float:
    """`epochs` as a setting: an int when whole (as a profile writes it), else a float rounded to steps by `fit`."""
    return int(epochs) if epochs.denominator == 1 else float(epochs)


def row_options(available: int) -> list[int]:
    """Every row, then halved down to MIN_ROWS: the training rows a sizing tries, most first."""
    options = [available]
    while options[-1] // 2 >= MIN_ROWS:
        options.append(options[-1] // 2)
    return options


def smallest_budget(figures: dict, spec: SearchSpec, concurrent: int, workers: int, spent_s: float) -> float:
    """The budget of one trial of the fewest epochs and rows a sizing tries."""
    rows = row_options(int(figures["train_examples"]))[-1]
    return spent_s + fits(figures, spec, epoch_options(spec)[-1], rows, 1, concurrent, workers).wall_s


def minutes_up(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))


def search_share(figures: dict, spec: SearchSpec, concurrent: int, workers: int, seconds: float, searches: int,
                 retrainings: int) -> float:
    """compare --budget: each search's budget, so that `searches` searches one after another, then `retrainings`
    whole trials of the configuration they are sized to (`concurrent` at once, each scored on the held-out split),
    end within `seconds`. Bisected from the shortest search that sizes a trial: a longer search budget may size longer
    trials (more epochs or rows), so the total grows by steps."""

    def total(each: float) -> float:
        # the retrainings are the trials of the search's sizing: the longest it may choose (with none of its
        # budget spent on start-up); `each` sizes a trial, as the bisection starts where one fits
        sizing = size(figures, spec, concurrent, workers, each, 0.0)
        at_once = min(concurrent, retrainings)
        trial = fits(figures, spec, sizing.epochs, sizing.train_rows, at_once, at_once, workers)
        retrain_s = math.ceil(retrainings / concurrent) * (trial.trial_s + figures.get("score_s", 0.0))
        return searches * each + RAY_START_S + ACTOR_START_S + retrain_s

    # from the shortest search that sizes one trial (below it nothing fits, and the bisection would take that for
    # too long): total grows with the search's budget from there, a step where the sizing takes more epochs or rows
    low, high = smallest_budget(figures, spec, concurrent, workers, SEARCH_START_S) + 1, seconds / searches
    if total(low) > seconds:
        raise UsageError(f"--budget {duration_text(seconds)} is too short for {searches} search(es) and "
                         f"{retrainings} retrainings here; give --budget {minutes_up(total(low))}m or more, or fewer "
                         "--seeds or --methods, or --paired-only")
    while high - low > 10:
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) <= seconds else (low, middle)
    return low


def sized(spec: SearchSpec, budget: str, request: LayoutRequest, source: str) -> tuple[Sizing, dict]:
    """`spec`'s search sized to `budget` (as --budget gives it) from a probe of one trial here, before Ray starts,
    with trials packed on this machine's GPUs by their measured memory; and the probe's figures."""
    figures, packed, layout = probed_layout(spec, request, source)
    sizing = size(figures, spec, layout.concurrent, layout.workers, parse_duration(budget), seconds_since_start())
    if packed is not request:
        sizing = dataclasses.replace(sizing, gpus_per_trial=packed.gpus_per_trial)
    print(sizing.line())
    return sizing, figures


def probed_layout(spec: SearchSpec, request: LayoutRequest, source: str) -> tuple[dict, LayoutRequest, Layout]:
    """For a budget: the probe's figures for a trial of `spec` here (on a trial's CPUs), the trial shape with trials
    packed on this machine's GPUs by the probed memory, and the layout it gives."""
    if not sizable(spec):
        raise UsageError(f"--budget sizes trials of the shared fit loop (epochs, rows); family {spec.family} trains "
                         "otherwise: give --num-samples instead")
    here = plan_layout(request, machine(), "this machine")
    figures = probed_figures(spec, source, max(1, int(here.cpus)), here.concurrent)
    packed = gpu_packed(request, figures)
    return figures, packed, plan_layout(packed, machine(), "this machine")


def sizable(spec: SearchSpec) -> bool:
    """Whether the family's trials run the shared fit loop, whose epochs and rows a budget sizes."""
    return {"evals_per_epoch", "max_train_examples"} <= set(spec.recipe.SETTINGS)


def gpu_packed(request: LayoutRequest, figures: dict) -> LayoutRequest:
    """On a GPU, without --gpus-per-trial: as many trials per GPU as its memory holds the probed peak, up to
    MAX_TRIALS_PER_GPU."""
    if figures["device"] != "cuda" or request.gpus_per_trial is not None:
        return request
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    per_gpu = min(MAX_TRIALS_PER_GPU, trials_per_gpu(figures["peak_memory_gib"], gpu_gib))
    return dataclasses.replace(request, gpus_per_trial=1 / per_gpu)


def probe_key(spec: SearchSpec, source: str, threads: int) -> str:
    """What a probe's figures depend on: the model, data and settings of a trial, this machine's hardware and how the
    probe measures."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    users = data_identity(spec.dataset.fields) if source == DATASET_SOURCE else None  # a shipped task's: its name
    what = {"family": spec.family, "task": spec.task, "dataset": users, "source": source,
            "config": trial_config(spec), "device": device, "cpu": cpu_model(), "threads": threads,
            "torch": torch.__version__, "probe": PROBE_METHOD}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_identity(block: dict) -> dict:
    """A user's data block as the probe's cache knows it: its files by their content hashes, wherever they lie (a
    copy elsewhere, or a benchmark's file rebuilt in a fresh folder, probes no more); a hub dataset by its id."""
    if not block.get("hashes"):
        return block
    return {key: value for key, value in block.items() if key not in ("path", "files", "test")}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def seconds_since_start() -> float:
    """Of the budget, what this process has spent (imports, checks, the probe)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def probed_figures(spec: SearchSpec, source: str, threads: int, concurrent: int) -> dict:
    """The probe's figures for a trial of `spec` on all its rows, with the slowdown of `concurrent` trials at once:
    measured here or cached by an earlier search."""
    uncapped = dataclasses.replace(spec, fixed={**spec.fixed, "max_train_examples": None})
    cached = CACHE_DIR / "probes" / f"{probe_key(uncapped, source, threads)}.json"
    if cached.is_file():
        print(f"budget: the figures of an earlier probe of this trial here ({cached})")
        figures = json.loads(cached.read_text())
    else:
        quiet_logs()  # the probe's model loads and data maps print as a trial's do: not at all
        own_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            figures = probe(uncapped, source, BUDGET_PROBE_STEPS, score=True)
        finally:
            torch.set_num_threads(own_threads)
    measured = with_slowdown(figures, concurrent)
    if measured is not figures or not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(measured, indent=2))
    return measured


def profile_budget(profile: str, spec: SearchSpec) -> str | None:
    """The gpu profile's budget when none is given (for the families a budget sizes)."""
    if profile != "gpu" or not sizable(spec):
        return None
    print(f"budget: {GPU_PROFILE_BUDGET} (the gpu profile's; set it with --budget)")
    return GPU_PROFILE_BUDGET


def paper_cost(spec: SearchSpec, request: LayoutRequest, source: str) -> str:
    """The published recipe's predicted hours and GPU-hours here, from a probe of one trial (cached as --budget's)."""
    if not sizable(spec):
        return f"paper: {spec.num_samples} trials of the published recipe (plan cannot time family {spec.family})"
    layout = plan_layout(request, machine(), "this machine")
    figures = probed_figures(spec, source, max(1, int(layout.cpus)), layout.concurrent)
    predicted = predict(figures, spec, trial_config(spec), figures["train_examples"],
                        min(layout.concurrent, spec.num_samples), layout.workers, spec.stops_early())
    hours = predicted.wall_s / 3600
    return (f"paper: {spec.num_samples} trials of the published recipe, about {hours:.1f} h here "
            f"({hours * machine()['GPU']:.1f} GPU-hours) predicted; --profile gpu --budget 1h sizes one to an hour")


def packed_request(request: LayoutRequest, budget: dict) -> LayoutRequest:
    """The command line's trial shape, with the GPU fraction a budget (a record's) packed by the probe's memory."""
    packed = budget.get("gpus_per_trial")
    return dataclasses.replace(request, gpus_per_trial=packed) if packed else request


def budget_outcome(stopped: dict, ended: int, trials: int, resume: str) -> str:
    """What a search stopped at its budget did; an error when no trial reported by then (nothing to export)."""
    minutes = stopped["after_s"] / 60
    if not stopped.get("reported", 1):
        raise Interrupted(f"budget reached {minutes:.1f} min into the trials before any trial reported an evaluation: "
                          "nothing to export (the trials ran slower than the probe predicted); run again with a "
                          f"longer --budget, or give this search another budget's time with: {resume}", code=1)
    cut = len(stopped["cut"])
    return (f"budget reached {minutes:.1f} min into the trials: {ended - cut} trial(s) ended, {cut} cut at their "
            f"latest evaluation, {trials - ended} never started")
