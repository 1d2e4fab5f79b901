"""Hyperparameter search: `python -m llmm_tune.search glue_cola`.

Ray Tune runs the trials (GPU fractions, clusters, checkpoints), Optuna's multivariate TPE picks
them (published configurations first), ASHA stops weak ones early; the finished search is exported
to `results/<task>/` (see `llmm_tune.export`). Every input is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from llmm_tune.errors import UsageError
from llmm_tune.experiment import (
    METADATA_FILE,
    command_line,
    git_commit,
    package_versions,
    read_metadata,
    write_metadata,
)
from llmm_tune.spaces import METHOD_CHOICES, PROFILES, SearchSpec, load_spec

DEFAULT_STORAGE = "ray_results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a search space in search_spaces/ (glue_cola, ...) or a YAML path")
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="paper: the published model and budget; cpu: packaged MiniLM, short runs; "
                             "auto (default): paper if a GPU is present, else cpu")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="llmm",
                        help="tune Llmm or one of its baselines with the same space and budget")
    parser.add_argument("--num-samples", type=int, help="trials (default: the profile's)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    parser.add_argument("--cpus-per-trial", type=float,
                        help="default: a quarter of the CPUs (at least 1) without GPUs, 4 with")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="GPUs per trial; fractions such as 0.25 pack several trials per GPU")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto, or ray://host:10001)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="where experiments are kept")
    parser.add_argument("--name", help="experiment name (default: <task>-<method>-<profile>)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment --name")
    parser.add_argument("--seed", type=int, help="seed of the searcher and of every trial")
    parser.add_argument("--data-dir", help="GLUE data folder, when the hub is unreachable "
                                           "(default: $LLMM_DATA_DIR)")
    parser.add_argument("--results", default="results", help="where the export writes tables")
    parser.add_argument("--no-export", action="store_true", help="skip the export at the end")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's hub repository run its own Python code (off by default)")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_concurrent"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name == "cpus_per_trial" and value == 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def choose_profile(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        print(f"profile: paper ({torch.cuda.device_count()} CUDA device(s) found)")
        return "paper"
    print("profile: cpu (no CUDA device found; --profile paper forces the published setup)")
    return "cpu"


def writable_dir(path: Path, flag: str) -> Path:
    path = path.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".llmm_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {path} is not writable ({error.strerror}); choose a folder you can "
                         "write to") from None
    return path


def plan_resources(args: argparse.Namespace, profile: str) -> tuple[float, float, int]:
    """(cpus per trial, gpus per trial, trials at once) for a local run, checked against this machine."""
    cpus = os.cpu_count() or 1
    gpus_here = torch.cuda.device_count()
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if gpus_here else 0.0)
    if args.address is None and gpus > gpus_here:
        raise UsageError(f"--gpus-per-trial {gpus} exceeds the {gpus_here} GPU(s) of this machine; "
                         "lower it or pass --address of a cluster with more")
    # Without GPUs, several narrow trials beat one wide one on these small models (MiniLM on 2 cores:
    # two 1-thread trials do 6.6 steps/s together, one 2-thread trial 5.0).
    per_trial = args.cpus_per_trial or float(max(1, cpus // 4) if gpus == 0 else min(4, cpus))
    if args.address is None and per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {per_trial:g} exceeds the {cpus} CPUs of this machine; lower it")
    fit = int(gpus_here // gpus) if gpus else int(cpus // per_trial)
    return per_trial, gpus, args.max_concurrent or max(1, fit)


def check_cluster(cpus: float, gpus: float) -> None:
    """Reject a trial shape no node can hold: its trials would wait forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpus and not any(n.get("GPU", 0) >= gpus for n in nodes):
        raise UsageError(f"--gpus-per-trial {gpus:g} exceeds every node of the cluster (largest has "
                         f"{max((n.get('GPU', 0) for n in nodes), default=0):g}); lower it")
    if not any(n.get("CPU", 0) >= cpus for n in nodes):
        raise UsageError(f"--cpus-per-trial {cpus:g} exceeds every node of the cluster; lower it")


def start_ray(address: str | None) -> None:
    """Join a cluster, or start a private local instance: loopback only, no dashboard."""
    # A trial that ends itself (divergence, out of memory) reports its reason without metrics.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune snapshots the experiment at every checkpoint (num_to_keep=1): that is what lets a killed
    # search resume from its latest checkpoints, so its warning about the snapshot rate is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        ray.init(include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")


def build_tuner(spec: SearchSpec, metadata: dict, data, experiment: Path, resume: bool, trainable=None):
    """The Tuner of a new experiment, or of `experiment` resumed; `trainable` defaults to the GLUE one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from llmm_tune.progress import Progress
    from llmm_tune.searcher import make_searcher
    from trainables.glue import glue_trainable

    resources = metadata["resources"]
    trainable = tune.with_resources(tune.with_parameters(trainable or glue_trainable, data=data),
                                    {"cpu": resources["cpus_per_trial"], "gpu": resources["gpus_per_trial"]})
    if resume:
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    metric = f"best_val_{spec.metric}"
    searcher = make_searcher(spec.distributions(), metric, spec.warm_start, spec.num_samples, spec.fixed["seed"])
    stopping = spec.early_stopping
    evaluations = spec.fixed["epochs"] * spec.fixed["evals_per_epoch"]
    # rungs in epochs (grace_period 1: the first cut after one epoch), whatever evals_per_epoch is
    scheduler = ASHAScheduler(time_attr="epoch", metric=stopping["metric"], mode=stopping["mode"],
                              max_t=spec.fixed["epochs"], grace_period=stopping["grace_period"],
                              reduction_factor=stopping["reduction_factor"])
    return tune.Tuner(
        trainable,
        param_space={**spec.fixed, "task": spec.task, "metric": spec.metric,
                     "trust_remote_code": metadata["trust_remote_code"]},
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, resources["max_concurrent"]),
                                    scheduler=scheduler, num_samples=spec.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=experiment.name, storage_path=str(experiment.parent), verbose=0,
            callbacks=[Progress(metric, spec.num_samples, evaluations)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_order="max",
                                                    checkpoint_score_attribute=f"val_{spec.metric}"),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def prepare_data(spec: SearchSpec, source: str, trust_remote_code: bool):
    from llmm_tune.data import prepare
    from llmm_tune.models import load_tokenizer
    from llmm_tune.tasks import get_task

    fixed = spec.fixed
    tokenizer = load_tokenizer(fixed["model"], trust_remote_code=trust_remote_code)
    return prepare(get_task(spec.task), source, tokenizer, fixed["max_length"], fixed["validation_size"],
                   split_seed=fixed["seed"], max_train_examples=fixed["max_train_examples"])


def run(argv: list[str]) -> Path:
    args = parse_args(argv)
    from llmm_tune.progress import quiet_logs

    quiet_logs()
    from llmm_tune.data import check_source, resolve_data_dir
    from llmm_tune.tasks import get_task

    storage = writable_dir(Path(args.storage), "--storage")
    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name of the experiment to continue (see --storage)")
        experiment = storage / args.name
        if not (experiment / METADATA_FILE).is_file():
            raise UsageError(f"no experiment {args.name!r} under {storage} to resume; check --name and "
                             "--storage, or drop --resume to start it")
        metadata = read_metadata(experiment)
        spec = load_spec(metadata["space_file"], metadata["profile"], metadata["method"],
                         metadata["num_samples"])
        spec.fixed["seed"] = metadata["seed"]
    else:
        profile = choose_profile(args.profile)
        spec = load_spec(args.task, profile, args.method, args.num_samples)
        if args.seed is not None:
            spec.fixed["seed"] = args.seed
        name = args.name or f"{Path(args.task).stem}-{args.method}-{profile}"
        experiment = storage / name
        if experiment.exists():
            raise UsageError(f"experiment {name!r} already exists under {storage}; pass --resume to continue "
                             "it or --name to start a new one")
        cpus, gpus, concurrent = plan_resources(args, profile)
        metadata = {
            "task": spec.task, "space_file": str(spec.path), "profile": profile, "method": args.method,
            "metric": spec.metric, "seed": spec.fixed["seed"], "num_samples": spec.num_samples,
            "resources": {"cpus_per_trial": cpus, "gpus_per_trial": gpus, "max_concurrent": concurrent},
            "trust_remote_code": args.trust_remote_code,
            "command": command_line("llmm_tune.search", argv), "git_commit": git_commit(),
            "versions": package_versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    data_dir = resolve_data_dir(args.data_dir or metadata.get("data_dir"))
    metadata["data_source"] = check_source(get_task(spec.task), data_dir)
    metadata["data_dir"] = str(data_dir) if data_dir else None
    results = writable_dir(Path(args.results), "--results") if not args.no_export else None
    for note in spec.adjustments:
        print(note)

    data = prepare_data(spec, metadata["data_source"], metadata["trust_remote_code"])  # bad rows fail here
    start_ray(args.address)
    resources = metadata["resources"]
    if args.address:
        check_cluster(resources["cpus_per_trial"], resources["gpus_per_trial"])
    experiment.mkdir(parents=True, exist_ok=True)
    write_metadata(experiment, metadata)
    print(f"experiment {experiment} | {spec.task} {metadata['method']} {metadata['profile']} | "
          f"{spec.num_samples} trials, {resources['max_concurrent']} at once, "
          f"{resources['cpus_per_trial']:g} CPU + {resources['gpus_per_trial']:g} GPU each | "
          f"train {len(data.train)}, validation {len(data.validation)} | data: {metadata['data_source']}")
    build_tuner(spec, metadata, data, experiment, args.resume).fit()
    if results is not None:
        from llmm_tune.export import export

        export([experiment], results)
    return experiment


def main() -> None:
    try:
        run(sys.argv[1:])
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
