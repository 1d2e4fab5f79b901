"""Hyperparameter search: `python -m llmm_tune.search glue_cola`.

Ray Tune runs the trials (GPU fractions, clusters, checkpoints), Optuna's multivariate TPE picks
them (published configurations first), ASHA stops weak ones early; the finished search is exported
to `results/<task>/` (see `llmm_tune.export`). Any task family works the same way: the search space
names it. Every input is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmm_tune.errors import UsageError
from llmm_tune.train.data import BAD_ROW_POLICIES, portable_source, resolve_data_dir
from llmm_tune.tune import storage
from llmm_tune.tune.cluster import (
    Layout,
    address,
    check_job_paths,
    check_layout,
    describe,
    machine,
    plan_layout,
    start_ray,
)
from llmm_tune.tune.experiment import (
    command_line,
    fresh_name,
    git_commit,
    package_versions,
    read_metadata,
    write_metadata,
)
from llmm_tune.tune.spaces import METHOD_CHOICES, PROFILES, SearchSpec, load_spec, space_name

DEFAULT_STORAGE = "ray_results"
# What a multi-worker trial itself holds while its Ray Train workers run: a little memory, no CPU, so the
# workers can take every CPU (Tune needs a non-empty request).
TRAIN_DRIVER = {"memory": 64 * 2**20}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a search space in search_spaces/ (glue_cola, gsm8k, ...) or a YAML path")
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="paper: the published model and budget; cpu: packaged small models, short runs; "
                             "auto (default): paper if a GPU is present, else cpu")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="llmm",
                        help="tune Llmm or one of its baselines with the same space and budget")
    parser.add_argument("--model", help="the model every trial fine-tunes: a hub id, a local folder or a packaged "
                                        "name (default: the profile's)")
    parser.add_argument("--num-samples", type=int, help="trials (default: the profile's)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    parser.add_argument("--cpus-per-trial", type=float,
                        help="CPUs per trial, or per worker with --workers-per-trial (default: a quarter of the "
                             "CPUs, at least 1, without GPUs; 4 with)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="GPUs per trial (or per worker); fractions such as 0.25 pack several trials per GPU")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="data-parallel workers per trial (a Ray Train run; gloo on CPU, nccl on GPU)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard each trial's model over its workers (FSDP) instead of copying it to each: for a "
                             "model one device cannot hold")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto, or ray://host:10001)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="where experiments are kept: a folder (an NFS mount on a cluster) or an s3:// or "
                             "gs:// URI (endpoint and credentials from the usual environment variables)")
    parser.add_argument("--optuna-storage", help="a database URL for the Optuna study (default: a journal file in "
                                                 "the experiment folder, for optuna-dashboard)")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                        help="how trials are proposed: Optuna's multivariate TPE (default) or uniformly at random")
    parser.add_argument("--no-early-stopping", action="store_true",
                        help="run every trial to its end (no ASHA): a baseline for what early stopping saves")
    parser.add_argument("--name", help="experiment name (default: <task>-<method>-<profile>, numbered if taken)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment --name")
    parser.add_argument("--seed", type=int, help="seed of the searcher and of every trial")
    parser.add_argument("--data-dir", help="data folder, when the hub is unreachable (default: $LLMM_DATA_DIR)")
    parser.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES,
                        help="a data row without the expected fields: stop naming it (error, default) or skip it")
    parser.add_argument("--results", default="results", help="where the export writes tables")
    parser.add_argument("--no-export", action="store_true", help="skip the export at the end")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's hub repository run its own Python code (off by default)")
    args = parser.parse_args(argv)
    if storage.is_uri(args.results):
        raise UsageError(f"--results {args.results} must be a folder (the export writes files there); URIs are for "
                         "--storage")
    for name in ("num_samples", "max_concurrent", "workers_per_trial"):
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


def build_tuner(spec: SearchSpec, metadata: dict, data, experiment: str, resume: bool, optuna_storage: str | None):
    """The Tuner of a new experiment, or of `experiment` resumed."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from llmm_tune.tune.console import Progress
    from llmm_tune.tune.searcher import make_searcher, study_storage
    from llmm_tune.tune.trainable import trainable

    layout = Layout.from_record(metadata["resources"])
    # a multi-worker trial is a Ray Train run: its workers reserve their own resources, and the trial
    # itself only waits for them (the concurrency limit keeps the trials within what the cluster holds)
    own = {"cpu": layout.cpus, "gpu": layout.gpus} if layout.workers == 1 else TRAIN_DRIVER
    trainable = tune.with_resources(tune.with_parameters(trainable, family=spec.family, data=data,
                                                         experiment=experiment, layout=metadata["resources"]), own)
    if resume:
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    metric = f"best_val_{spec.metric}"
    searcher = make_searcher(spec.distributions(), metric, spec.mode, spec.warm_start, spec.num_samples,
                             spec.fixed["seed"], study_storage(experiment, optuna_storage), metadata["name"],
                             metadata.get("sampler", "tpe"))
    last = spec.recipe.TASKS[spec.task].selects == "last"  # keep the latest checkpoint, not the best
    time_attr, budget = spec.recipe.clock({**spec.fixed, "task": spec.task})
    stopping = spec.early_stopping
    scheduler = FIFOScheduler() if not metadata.get("early_stopping", True) else ASHAScheduler(
        time_attr=time_attr, metric=stopping["metric"], mode=stopping["mode"], max_t=budget,
        grace_period=stopping["grace_period"], reduction_factor=stopping["reduction_factor"])
    parent, name = experiment.rstrip("/").rsplit("/", 1) if storage.is_uri(experiment) else \
        (str(Path(experiment).parent), Path(experiment).name)
    return tune.Tuner(
        trainable,
        param_space={**spec.fixed, "task": spec.task, "metric": spec.metric, "mode": spec.mode,
                     "trust_remote_code": metadata["trust_remote_code"]},
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, layout.concurrent),
                                    scheduler=scheduler, num_samples=spec.num_samples, reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=0, log_to_file=True,
            callbacks=[Progress(spec.metric, spec.mode, spec.num_samples, (time_attr, budget),
                                spec.recipe.TASKS[spec.task].selects)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_order=spec.mode,
                                                    checkpoint_score_attribute=None if last else f"val_{spec.metric}"),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def new_experiment(args: argparse.Namespace, argv: list[str], storage_dir: str) -> tuple[SearchSpec, str, dict]:
    profile = choose_profile(args.profile)
    spec = load_spec(args.task, profile, args.method, args.num_samples)
    if args.seed is not None:
        spec.fixed["seed"] = args.seed
    if args.model:
        spec.fixed["model"] = args.model
    if args.on_bad_row:
        spec.fixed["on_bad_row"] = args.on_bad_row
    if args.fsdp:
        if "fsdp" not in spec.recipe.SETTINGS:
            raise UsageError(f"--fsdp: the {spec.family} family trains with a loop of its own, not the shared fit "
                             "loop that shards; drop --fsdp")
        spec.fixed["fsdp"] = True
    if spec.fixed.get("fsdp") and args.workers_per_trial < 2:
        raise UsageError("fsdp shards each trial's model over its workers; add --workers-per-trial 2 or more")
    if args.name:
        if storage.exists(storage.join(storage_dir, args.name)):
            raise UsageError(f"experiment {args.name!r} already exists under {storage_dir}; pass --resume to "
                             "continue it or another --name")
        name = args.name
    else:
        name = fresh_name(storage_dir, f"{Path(args.task).stem}-{args.method}-{profile}")
    metadata = {
        "name": name, "family": spec.family, "task": spec.task, "space": space_name(spec.path), "space_yaml": spec.text,
        "profile": profile, "method": args.method, "metric": spec.metric, "mode": spec.mode,
        "seed": spec.fixed["seed"], "model": spec.fixed["model"], "num_samples": spec.num_samples,
        "on_bad_row": spec.fixed["on_bad_row"], "fsdp": spec.fixed.get("fsdp", False),
        "trust_remote_code": args.trust_remote_code,
        "sampler": args.sampler, "early_stopping": not args.no_early_stopping,
        "command": command_line("llmm_tune.search", [*argv, *([] if args.name else ["--name", name])]),
        "git_commit": git_commit(), "versions": package_versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return spec, storage.join(storage_dir, name), metadata


def resumed_experiment(args: argparse.Namespace, storage_dir: str) -> tuple[SearchSpec, str, dict]:
    if not args.name:
        raise UsageError("--resume needs --name of the experiment to continue (see --storage)")
    experiment = storage.join(storage_dir, args.name)
    metadata = read_metadata(experiment)
    if metadata is None:
        raise UsageError(f"no experiment {args.name!r} under {storage_dir} to resume; check --name and --storage, "
                         "or drop --resume to start it")
    spec = load_spec(metadata["space"], metadata["profile"], metadata["method"], metadata["num_samples"],
                     text=metadata["space_yaml"])
    spec.fixed.update(seed=metadata["seed"], model=metadata["model"], on_bad_row=metadata["on_bad_row"])
    if metadata.get("fsdp"):
        spec.fixed["fsdp"] = True
    return spec, experiment, metadata


def run(argv: list[str]) -> str:
    args = parse_args(argv)
    from llmm_tune.tune.console import LOG_FILE, log_to_file, quiet_logs, quiet_ray

    quiet_ray()
    quiet_logs()
    check_job_paths(args)
    storage_dir = storage.writable(args.storage, "--storage")
    spec, experiment, metadata = (resumed_experiment(args, storage_dir) if args.resume
                                  else new_experiment(args, argv, storage_dir))
    recipe = spec.recipe
    data_dir = resolve_data_dir(args.data_dir or metadata.get("data_dir"))
    source = recipe.check_data(spec.task, data_dir)
    metadata["data_dir"] = str(data_dir) if data_dir else None  # this machine's, to resume here
    metadata["data"] = portable_source(source, args.data_dir)  # what records carry
    results = None if args.no_export else Path(storage.writable(args.results, "--results"))
    cluster = address(args)
    if not args.resume and not cluster:
        metadata["resources"] = plan_layout(args, machine(), "this machine").to_record()
    for note in spec.adjustments:
        print(note)

    data = recipe.prepare({**spec.fixed, "task": spec.task, "trust_remote_code": metadata["trust_remote_code"]},
                          source)  # bad rows and models fail here, before Ray
    log = storage.join(experiment, LOG_FILE)
    local_log = Path(experiment) / LOG_FILE if not storage.is_uri(experiment) else \
        Path(tempfile.mkdtemp(prefix="llmm_search_")) / LOG_FILE  # uploaded at the end
    log_to_file(local_log)
    resources = start_ray(cluster)
    if not args.resume and cluster:
        metadata["resources"] = plan_layout(args, resources, "the cluster").to_record()
    layout = Layout.from_record(metadata["resources"])
    if cluster:
        check_layout(layout)
    write_metadata(experiment, metadata)
    sizes = getattr(data, "sizes", None) or " | ".join(f"{k} {len(v)}" for k, v in vars(data).items()
                                                       if hasattr(v, "__len__") and k in ("train", "validation"))
    print(f"experiment {experiment} | {spec.task} {metadata['method']} {metadata['profile']} | "
          f"{spec.num_samples} trials, {describe(layout)} | {sizes} | data: {source}")
    resume = (f"python -m llmm_tune.search {args.task} --resume --name {metadata['name']}"
              + (f" --storage {args.storage}" if args.storage != DEFAULT_STORAGE else ""))
    print(f"logs: {log} and each trial's folder; resume with: {resume}")
    try:
        build_tuner(spec, metadata, data, experiment, args.resume, args.optuna_storage).fit()
    except Exception as error:  # Ray itself failed: the state saved at the last checkpoint is what resumes
        logging.getLogger("ray.tune").exception("the search stopped")
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise Interrupted(f"the search stopped: {type(error).__name__}: {reason} (traceback in {log}); continue "
                          f"with: {resume}", code=1) from None
    finally:
        if storage.is_uri(experiment):
            storage.write_bytes(log, local_log.read_bytes())
            shutil.rmtree(local_log.parent, ignore_errors=True)
    ended = ended_trials(experiment)
    if ended < spec.num_samples:  # Ctrl+C: Tune saved its state and returned early
        raise Interrupted(f"search interrupted with {ended} of {spec.num_samples} trials ended; nothing exported; "
                          f"continue with: {resume}")
    if results is not None:
        from llmm_tune.export import export

        export([experiment], results)
    return experiment


def ended_trials(experiment: str) -> int:
    """Trials the saved experiment state records as ended (Tune marks the ones it stopped on Ctrl+C as
    terminated in memory, but saves them as pending, which is what a resume reads)."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(experiment).trials)


class Interrupted(Exception):
    """The search stopped before its end, its state saved: Ctrl+C (exit code 130) or a failure of Ray (1)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def main() -> None:
    try:
        run(sys.argv[1:])
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.code)


if __name__ == "__main__":
    main()
