"""Orchestration overhead of a search: N trainings under Ray Tune vs the same N back to back.

    python benchmarks/bench_search.py [--space glue_cola] [--trials 4] [--data-dir ../shared/data]

Both sides run the real recipe of the space's family (`train`, under Tune through `llmm_tune.tune.trainable`)
on the same tokenised data with the same configurations (the cpu profile's warm starts, 1 epoch),
one trial at a time with every CPU, so the difference is what Tune adds: worker start-up, passing
the data through the object store, reporting, checkpoint syncing and the searcher and scheduler
bookkeeping. Ray's own start-up (`ray.init`) is printed apart. Trial start latency is measured with
an empty trainable: from Tune launching a trial to its first line of code. Then a trial's own start
(loading the model and its LoftQ initialisation) without the on-disk LoftQ cache, with it empty (the
first trial of a search computes and stores it) and with it filled (every later trial, on any worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmm_tune.method import loftq  # noqa: E402
from llmm_tune.train.data import resolve_data_dir  # noqa: E402
from llmm_tune.tune.cluster import Layout  # noqa: E402
from llmm_tune.tune.console import quiet_logs  # noqa: E402
from llmm_tune.tune.context import TrialContext  # noqa: E402
from llmm_tune.tune.spaces import load_spec  # noqa: E402
from llmm_tune.tune.trainable import trainable  # noqa: E402


def configs(spec, trials: int, train_examples: int) -> list[dict]:
    base = {**spec.fixed, "epochs": 1, "evals_per_epoch": 2, "max_train_examples": train_examples}
    return [{**base, **spec.warm_start[i % len(spec.warm_start)], "seed": i} for i in range(trials)]


def back_to_back(context: TrialContext, runs: list[dict], data) -> float:
    started = time.perf_counter()
    for config in runs:
        context.recipe.train(config, context, data, lambda metrics, directory: None)
    return time.perf_counter() - started


def under_tune(context: TrialContext, runs: list[dict], data, cpus: int, storage: str) -> float:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    layout = Layout(cpus=cpus, gpus=0, workers=1, concurrent=1).to_record()
    trial = tune.with_resources(tune.with_parameters(trainable, context=context, data=data, experiment=storage,
                                                     layout=layout, fixed={}), {"cpu": cpus})  # runs: whole configs
    tuner = tune.Tuner(trial, param_space=runs[0],
                       tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(points_to_evaluate=runs,
                                                                                    max_concurrent=1),
                                                   num_samples=len(runs), reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=storage, name="bench", verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    started = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - started
    assert not results.errors, results.errors
    return elapsed


def start_latency(trials: int, storage: str) -> list[float]:
    """Seconds from the end of one empty trial (or fit()) to the start of the next."""
    from ray import tune

    def empty(config: dict) -> None:
        tune.report({"entered": time.time()})

    tuner = tune.Tuner(empty, tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
                       run_config=tune.RunConfig(storage_path=storage, name="latency", verbose=0))
    launched = time.time()
    entered = sorted(r.metrics["entered"] for r in tuner.fit())
    return [b - a for a, b in zip([launched, *entered[:-1]], entered)]


def model_start(context: TrialContext, config: dict, cache: str) -> list[float]:
    """Seconds to build a trial's model: no LoftQ cache, an empty one (computed and stored), a filled one."""
    seconds = []
    for loftq_cache in (None, cache, cache):
        loftq.CACHE.clear()  # the in-memory LoftQ cache a worker keeps between its trials: measure the disk's
        started = time.perf_counter()
        context.recipe.build_model(config, dataclasses.replace(context, loftq_cache=loftq_cache), "cpu")
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="glue_cola", help="a shipped search space (e.g. gsm8k)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=4000, help="train examples per trial")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    quiet_logs()
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    spec = load_spec(args.space, "cpu", "llmm")
    context = TrialContext.of(spec.family, spec.task, spec.metric)
    runs = configs(spec, args.trials, args.train_examples)
    data = context.recipe.prepare(runs[0], context, str(resolve_data_dir(args.data_dir)))
    # each figure is printed as soon as it is measured: a long run cut short keeps what it has
    with tempfile.TemporaryDirectory() as cache:
        start = model_start(context, runs[0], cache)
    print(f"model start (load + LoftQ, {runs[0]['loftq_iters']} iterations): no LoftQ cache {start[0]:.1f} s | "
          f"empty cache (compute and store) {start[1]:.1f} s | filled cache {start[2]:.1f} s", flush=True)
    baseline = back_to_back(context, runs, data)
    print(f"{args.trials} trials of {spec.task} ({args.train_examples} train examples, 1 epoch, 2 evaluations), "
          f"{cpus} CPU(s), one at a time: back to back in one process {baseline:.1f} s", flush=True)

    import ray

    started = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")
    ray_start = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as storage:
        tuned = under_tune(context, runs, data, cpus, storage)
        print(f"under Ray Tune: {tuned:.1f} s | ratio {tuned / baseline:.3f} (goal <= 1.10) | ray.init "
              f"{ray_start:.1f} s (once per search)", flush=True)
        latency = start_latency(max(args.trials, 4), storage)
    print(f"trial start latency: first {latency[0]:.2f} s, then median {statistics.median(latency[1:]):.2f} s")

if __name__ == "__main__":
    main()
