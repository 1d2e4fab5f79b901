"""10,000 trials through the real driver and through bare Ray Tune, on this machine.

    python benchmarks/bench_many_trials.py [--trials 10000] [--skip-bare]

Ours: `python -m llmm_tune.search` (Optuna TPE, ASHA, a checkpoint per report, each trial keeping its latest and
best, the console, the export) over a family without a model (tests/doubles/instant_family.py: 3 reports per
trial). Bare: the same trials through Ray Tune alone (Tuner, OptunaSearch with the same multivariate TPE, ASHA, a
function reporting the same values with a checkpoint each), nothing of ours, with Ray's default CheckpointConfig: it
keeps every checkpoint. Bare Ray Tune told to keep one (num_to_keep=1) snapshots its whole experiment after every
checkpoint, which grows with the trials: 137 ms a trial at 400 trials, hours at 10,000 (docs/benchmarks.md).
Prints the wall time per trial of both and their ratio, over the whole run and in the steady state (after the
first quarter or 1,000 trials: start-up, imports and Ray's launch are not per-trial costs); the driver's resident
memory, current and peak, after every 1,000 trials (read from /proc every second, matched to the trials' last
reports); the experiment folder's size, Ray's experiment state per trial and the Optuna journal's size; the
export's time and peak memory. Goals (issue 26): overhead within 1.2x of bare Ray Tune, driver memory growth under
50 MB per 1,000 trials, the export of 10,000 trials under 60 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmm_tune.tune.searcher import JOURNAL, startup_trials  # noqa: E402
from tests.helpers.search_fixtures import ENV, tiny_space  # noqa: E402

REPORTS = 3
BARE = textwrap.dedent("""
    import json, math, sys, tempfile
    from pathlib import Path
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    from optuna.samplers import TPESampler

    trials, reports, storage, startup = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import ray
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")  # the loopback, as ours

    def trainable(config):
        for epoch in range(1, reports + 1):
            value = epoch / reports * (1 - abs(math.log10(config["lr"]) + 2.5))
            with tempfile.TemporaryDirectory() as directory:
                Path(directory, "value.json").write_text(json.dumps({"epoch": epoch, "mcc": value}))
                tune.report({"val_mcc": value, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(directory))

    space = {"lr": tune.loguniform(1e-3, 1e-2), "scale": tune.loguniform(10, 1000), "rank": tune.choice([4, 8]),
             "K": tune.choice([1, 2]), "quant_method": tune.choice(["normal_float", "uniform"])}
    # the sampler ours runs (searcher.make_searcher): the ratio is then the cost of our code, not of a sampler
    sampler = TPESampler(multivariate=True, seed=0, n_startup_trials=startup)
    searcher = ConcurrencyLimiter(OptunaSearch(metric="val_mcc", mode="max", sampler=sampler), 2)
    asha = ASHAScheduler(time_attr="epoch", metric="val_mcc", mode="max", max_t=reports, grace_period=1,
                         reduction_factor=2)
    tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
               tune_config=tune.TuneConfig(search_alg=searcher, scheduler=asha, num_samples=trials, reuse_actors=True),
               run_config=tune.RunConfig(name="bare", storage_path=storage, verbose=0)).fit()
""")


@dataclass
class Sampled:
    """A process's resident memory (MiB), current and peak, sampled every second while it runs."""

    seconds: float = 0.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (time, current, peak)

    def at(self, moment: float) -> tuple[float, float]:
        earlier = [s for s in self.samples if s[0] <= moment] or self.samples[:1]
        return earlier[-1][1], earlier[-1][2]


def memory_mib(pid: int) -> tuple[float, float] | None:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (FileNotFoundError, ProcessLookupError):
        return None
    if "VmRSS" not in fields:  # exited, not yet reaped
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_sampled(command: list[str], log: Path) -> Sampled:
    """Run `command` (its output to `log`), sampling the driver's memory every second."""
    sampled, started = Sampled(), time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)

        def sample() -> None:
            while process.poll() is None:
                if (memory := memory_mib(process.pid)) is not None:
                    sampled.samples.append((time.time(), *memory))
                time.sleep(1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    sampled.seconds = time.time() - started
    if code != 0:
        sys.exit(f"error: {' '.join(command[:4])} ... exited {code}; see {log}")
    return sampled


def size_mib(path: Path) -> float:
    """A file's or a folder's size."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def state_file(experiment: Path) -> Path:
    return max(experiment.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)


def state_kib_per_trial(experiment: Path, trials: int) -> float:
    """Ray's experiment state (the file it rewrites whole at every snapshot) per trial."""
    return size_mib(state_file(experiment)) * 1024 / trials


def ray_record_kib_per_trial(experiment: Path) -> float:
    """What Ray Tune's driver keeps of each finished trial: the trial's objects rebuilt from the experiment state,
    with the JSON Ray caches of each for its snapshots, as tracemalloc counts them. Most of a driver's memory growth
    per trial."""
    import tracemalloc

    from ray.tune.experiment import Trial

    saved = json.loads(state_file(experiment).read_text())["trial_data"]
    tracemalloc.start()
    trials = []
    for trial_json, run_json in saved:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_json)
        trial.get_json_state()  # Ray caches a trial's JSON from its first snapshot on
        trials.append(trial)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held / len(trials) / 1024


def trial_ends(experiment: Path) -> list[float]:
    """When each trial made its last report (Ray's `timestamp`, whole seconds), in order. Not the files' times: Ray
    writes the trial folders under its storage path when the search ends."""
    return sorted(json.loads(f.read_text().splitlines()[-1])["timestamp"] for f in experiment.glob("*/result.json"))


def growth_per_1000(sampled: Sampled, ends: list[float], warm_up: int) -> float:
    """The driver's resident memory growth per 1,000 trials after the first `warm_up` trials (imports, Ray's
    start-up and the first trials' allocations are not growth)."""
    warm_up = min(warm_up, len(ends))
    first, last = sampled.at(ends[warm_up - 1])[0], sampled.at(ends[-1])[0]
    return (last - first) / max(1, len(ends) - warm_up) * 1000


def steady_ms_per_trial(ends: list[float], warm_up: int) -> float:
    """Wall milliseconds per trial after the first `warm_up` trials ended: the per-trial cost without start-up."""
    warm_up = min(warm_up, len(ends) - 1)
    return (ends[-1] - ends[warm_up - 1]) / (len(ends) - warm_up) * 1e3


def print_memory(name: str, sampled: Sampled, ends: list[float], every: int) -> None:
    for count in range(every, len(ends) + 1, every):
        current, peak = sampled.at(ends[count - 1])
        print(f"{name}: after {count:6d} trials, driver memory {current:7.1f} MiB (peak {peak:7.1f} MiB)")
    print(f"{name}: memory growth {growth_per_1000(sampled, ends, every):.1f} MiB per 1,000 trials after the first "
          f"{min(every, len(ends))} (goal < 50 MB)")


def print_time(name: str, sampled: Sampled, ends: list[float], every: int) -> float:
    """Print the wall time per trial, whole and steady; return the steady figure."""
    steady = steady_ms_per_trial(ends, every)
    print(f"{name}: {sampled.seconds:.0f} s, {sampled.seconds / len(ends) * 1e3:.0f} ms per trial over the whole run, "
          f"{steady:.0f} ms per trial after the first {every}")
    return steady


def ours(trials: int, work: Path, every: int) -> tuple[Sampled, Path]:
    space = tiny_space(work, work / "no-model", "instant", family="tests.doubles.instant_family", epochs=REPORTS)
    command = [sys.executable, "-m", "llmm_tune.search", str(space), "--profile", "cpu", "--num-samples", str(trials),
               "--cpus-per-trial", "1", "--storage", str(work / "runs"), "--name", "ours", "--no-export"]
    sampled = run_sampled(command, work / "ours.log")
    experiment = work / "runs" / "ours"
    print_memory("ours", sampled, trial_ends(experiment), every)
    return sampled, experiment


def export(experiment: Path, work: Path) -> None:
    sampled = run_sampled([sys.executable, "-m", "llmm_tune.export", str(experiment), "--results",
                           str(work / "results")], work / "export.log")
    peak = max(s[2] for s in sampled.samples) if sampled.samples else float("nan")
    print(f"export: {sampled.seconds:.1f} s, peak memory {peak:.0f} MiB (goal < 60 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--skip-bare", action="store_true", help="run our driver only")
    args = parser.parse_args()
    every = 1000 if args.trials >= 2000 else max(1, args.trials // 4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mine, experiment = ours(args.trials, work, every)
        steady = print_time("ours", mine, trial_ends(experiment), every)
        print(f"ours: experiment folder {size_mib(experiment):.1f} MiB, Ray's experiment state "
              f"{state_kib_per_trial(experiment, args.trials):.1f} KiB a trial, Optuna journal "
              f"{size_mib(experiment / JOURNAL):.2f} MiB")
        record = ray_record_kib_per_trial(experiment)
        print(f"ours: Ray Tune's record of a finished trial in the driver {record:.1f} KiB (rebuilt from the state, "
              "with the JSON Ray caches of it)")
        export(experiment, work)
        if not args.skip_bare:
            (work / "bare.py").write_text(BARE)
            bare = run_sampled([sys.executable, str(work / "bare.py"), str(args.trials), str(REPORTS),
                                str(work / "runs"), str(startup_trials(args.trials))], work / "bare.log")
            ends = trial_ends(work / "runs" / "bare")
            print_memory("bare", bare, ends, every)
            bare_steady = print_time("bare", bare, ends, every)
            print(f"bare: experiment folder {size_mib(work / 'runs' / 'bare'):.1f} MiB, Ray's experiment state "
                  f"{state_kib_per_trial(work / 'runs' / 'bare', args.trials):.1f} KiB a trial, Ray Tune's record of a "
                  f"finished trial {ray_record_kib_per_trial(work / 'runs' / 'bare'):.1f} KiB")
            print(f"ratio, ours / bare: {mine.seconds / bare.seconds:.3f} over the whole run, "
                  f"{steady / bare_steady:.3f} per trial after the first {every} (goal <= 1.2)")


if __name__ == "__main__":
    main()
