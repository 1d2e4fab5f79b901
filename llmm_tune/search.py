"""Hyperparameter search: `python -m llmm_tune.search glue_cola`.

Ray Tune runs the trials (GPU fractions, clusters, checkpoints), Optuna's multivariate TPE picks
them (published configurations first), ASHA stops weak ones early; the finished search is exported
to `results/<task>/` (see `llmm_tune.export`). Any task family works the same way: the search space
names it. Every input is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from llmm_tune.cli import Interrupted, command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.files import write_text
from llmm_tune.method.config import BASELINES
from llmm_tune.train.data import BAD_ROW_POLICIES, portable_source, resolve_data_dir
from llmm_tune.tune import storage, trackers
from llmm_tune.tune.cluster import (
    Layout,
    LayoutRequest,
    address,
    check_job_paths,
    check_layout,
    describe,
    machine,
    plan_layout,
    start_ray,
)
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import (
    ExperimentRecord,
    command_line,
    fresh_name,
    git_commit,
    package_versions,
    read_record,
)
from llmm_tune.tune.spaces import PROFILES, SearchSpec, load_spec, space_name
from llmm_tune.tune.termination import interrupted_code, stop_on_sigterm
from llmm_tune.tune.transfer import DEFAULT_TOP, warm_start_from

DEFAULT_STORAGE = "ray_results"
# What a multi-worker trial itself holds while its Ray Train workers run: a little memory, no CPU, so the
# workers can take every CPU (Tune needs a non-empty request).
TRAIN_DRIVER = {"memory": 64 * 2**20}
NOT_OPTIONS = ("task", "name", "resume", "write_space")  # what names the experiment rather than how it searches


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("search", __doc__)
    parser.add_argument("task", help="a search space in search_spaces/ (glue_cola, gsm8k, ...) or a YAML path")
    add_profile_option(parser)
    parser.add_argument("--method", choices=tuple(BASELINES), default="llmm",
                        help="tune Llmm or one of its baselines with the same space and budget")
    parser.add_argument("--model", help="the model every trial fine-tunes: a hub id, a local folder or a packaged "
                                        "name (default: the profile's)")
    parser.add_argument("--num-samples", type=int, help="trials (default: the profile's)")
    add_layout_options(parser)
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="where experiments are kept: a folder (an NFS mount on a cluster) or an s3:// or "
                             "gs:// URI (endpoint and credentials from the usual environment variables)")
    parser.add_argument("--optuna-storage", help="a database URL for the Optuna study (default: a journal file in "
                                                 "the experiment folder, for optuna-dashboard)")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                        help="how trials are proposed: Optuna's multivariate TPE or uniformly at random")
    parser.add_argument("--no-early-stopping", action="store_true",
                        help="run every trial to its end (no ASHA): a baseline for what early stopping saves")
    parser.add_argument("--name", help="experiment name (default: <task>-<method>-<profile>, numbered if taken)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment --name")
    parser.add_argument("--seed", type=int, help="seed of the searcher and of every trial (default: the space's)")
    parser.add_argument("--warm-start-from", nargs="+", metavar="PATH",
                        help="earlier searches (results folders the export wrote, or experiment folders) whose best "
                             "configurations, moved into this space, run first (default: the space's warm starts only)")
    parser.add_argument("--warm-starts", type=int, metavar="K",
                        help=f"how many of each earlier search's best configurations (default: {DEFAULT_TOP})")
    parser.add_argument("--data-dir", help="data folder, when the hub is unreachable (default: $LLMM_DATA_DIR)")
    parser.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES,
                        help="a data row without the expected fields: stop naming it (error, the space's default) "
                             "or skip it")
    parser.add_argument("--results", default="results", help="where the export writes tables")
    parser.add_argument("--no-export", action="store_true", help="skip the export at the end")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's hub repository run its own Python code (off by default)")
    parser.add_argument("--tracker", action="append", choices=("mlflow", "wandb"),
                        help="log the search and its trials to MLflow or Weights & Biases (repeatable; where to, from "
                             "MLFLOW_TRACKING_URI / WANDB_PROJECT and their other usual variables)")
    add_data_options(parser)
    return parser


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """Your own data, for the spaces with a `dataset:` block (sft, classify, or your YAML's)."""
    group = parser.add_argument_group("your data (search sft|classify --data ..., or a YAML with a dataset: block)")
    group.add_argument("--data", help="a data file (.jsonl .json .csv .tsv .parquet, or .gz of the text ones), a "
                                      "folder of train/test files, or a hub dataset id")
    group.add_argument("--test-data", help="a held-out file (default: the data's test split, else a seeded 10%% of it)")
    group.add_argument("--format", help="the data's format (default: inferred from its columns); sft: text, "
                                        "prompt_completion, messages, alpaca, preference; classify: single, pair")
    group.add_argument("--columns", help="our column names mapped to yours, e.g. prompt=question,completion=answer "
                                         "or text=review,label=stars")
    group.add_argument("--chat-template", help="a Jinja chat template file, for messages data with a model "
                                               "without one")
    group.add_argument("--write-space", metavar="FILE",
                       help="write the resolved search space (with the inferred format and labels) to FILE and stop")


def dataset_options(options: dict) -> dict:
    """The command line's data options as keys of a `dataset:` block."""
    given = {"path": options.get("data"), "test": options.get("test_data"), "format": options.get("format"),
             "chat_template": options.get("chat_template")}
    if options.get("columns"):
        pairs = [item.split("=", 1) for item in options["columns"].split(",")]
        if not all(len(pair) == 2 and all(pair) for pair in pairs):
            raise UsageError(f"--columns {options['columns']}: expected ours=yours pairs separated by commas, e.g. "
                             "prompt=question,completion=answer")
        given["columns"] = {ours.strip(): yours.strip() for ours, yours in pairs}
    return {key: value for key, value in given.items() if value is not None}


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="paper: the published model and budget; cpu: packaged small models, short runs; "
                             "auto: paper if a GPU is present, else cpu")


def add_trial_shape_options(parser: argparse.ArgumentParser) -> None:
    """The shape of a trial and how many run at once: options `search` and `plan` share."""
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    parser.add_argument("--cpus-per-trial", type=float,
                        help="CPUs per trial, or per worker with --workers-per-trial (default: a quarter of the "
                             "CPUs, at least 1, without GPUs; 4 with)")
    parser.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial (or per worker); fractions such as 0.25 pack several trials per GPU "
                             "(default: 1 when the machine has GPUs, else 0)")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="data-parallel workers per trial (a Ray Train run; gloo on CPU, nccl on GPU)")


def add_layout_options(parser: argparse.ArgumentParser) -> None:
    add_trial_shape_options(parser)
    parser.add_argument("--fsdp", action="store_true",
                        help="shard each trial's model over its workers (FSDP) instead of copying it to each: for a "
                             "model one device cannot hold")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto, or ray://host:10001; default: this "
                                          "machine, or the job's cluster inside ray job submit)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if storage.is_uri(args.results):
        raise UsageError(f"--results {args.results} must be a folder (the export writes files there); URIs are for "
                         "--storage")
    check_counts(args)
    return args


def check_counts(args: argparse.Namespace) -> None:
    """Counts of trials and resources that are given must be positive."""
    for name in ("num_samples", "max_concurrent", "workers_per_trial", "warm_starts"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name == "cpus_per_trial" and value == 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def layout_request(options: argparse.Namespace | dict) -> LayoutRequest:
    values = options if isinstance(options, dict) else vars(options)
    return LayoutRequest(values["cpus_per_trial"], values["gpus_per_trial"], values["workers_per_trial"],
                         values["max_concurrent"])


def choose_profile(requested: str) -> str:
    """`auto` means the same in every command: paper when CUDA is present, else cpu."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        print(f"profile: paper ({torch.cuda.device_count()} CUDA device(s) found)")
        return "paper"
    print("profile: cpu (no CUDA device found; --profile paper forces the published setup)")
    return "cpu"


def space_overrides(options: dict) -> dict:
    """The fixed settings the command line sets: what a new experiment and its resumption both apply."""
    given = {"seed": options["seed"], "model": options["model"], "on_bad_row": options["on_bad_row"],
             "fsdp": options["fsdp"] or None}
    return {name: value for name, value in given.items() if value is not None}


def written_space(text: str, overrides: dict) -> str:
    """The space's YAML with the command line's fixed settings (--model, --seed, ...) in the top-level and every
    profile's `fixed:`, where they win as they do on the command line: the file searches as the command did. A block
    that searches such a setting keeps searching it (in a trial, the searched value wins there too)."""
    if not overrides:
        return text
    raw = yaml.safe_load(text)
    blocks = [raw, *(block for block in (raw.get("profiles") or {}).values() if isinstance(block, dict))]
    for block in blocks:
        searched = block.get("space") or {}
        block["fixed"] = {**(block.get("fixed") or {}),
                          **{name: value for name, value in overrides.items() if name not in searched}}
    return yaml.safe_dump(raw, sort_keys=False)


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
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    searcher = make_searcher(spec.distributions(), f"best_{context.value_key}", spec.mode, spec.warm_start,
                             spec.num_samples, spec.fixed["seed"], study_storage(experiment, optuna_storage),
                             record.name, record.sampler)
    clock = spec.recipe.clock(spec.fixed, context)
    parent, name = experiment.rstrip("/").rsplit("/", 1) if storage.is_uri(experiment) else \
        (str(Path(experiment).parent), Path(experiment).name)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, layout.concurrent),
                                    scheduler=scheduler(spec, record, clock), num_samples=spec.num_samples,
                                    reuse_actors=True, trial_dirname_creator=trial_folder),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=0, log_to_file=True,
            callbacks=[Progress(spec.metric, spec.mode, spec.num_samples, clock, context.selects),
                       ForgetFinishedTrialsMetricWindows(), ReturnFreedHeap(), DeleteSupersededCheckpoints(),
                       *trackers.callbacks(record.tracker_names, record)],
            # Tune keeps every checkpoint it is told of; DeleteSupersededCheckpoints keeps each trial's latest and best
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, **context.checkpoint_ranking()),
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def scheduler(spec: SearchSpec, record: ExperimentRecord, clock: tuple[str, float]):
    """ASHA on the space's early-stopping settings, counting in the family's clock; FIFO without early stopping."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not record.early_stopping:
        return FIFOScheduler()
    stopping = spec.early_stopping
    return ASHAScheduler(time_attr=clock[0], metric=stopping["metric"], mode=stopping["mode"], max_t=clock[1],
                         grace_period=stopping["grace_period"], reduction_factor=stopping["reduction_factor"])


def new_experiment(args: argparse.Namespace, argv: list[str], storage_dir: str) -> tuple[SearchSpec, str,
                                                                                          ExperimentRecord]:
    profile = choose_profile(args.profile)
    options = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS}
    overrides = space_overrides(options)
    spec = load_spec(args.task, profile, args.method, args.num_samples, dataset=dataset_options(options),
                     overrides=overrides)
    if spec.fixed.get("fsdp") and "fsdp" not in spec.recipe.SETTINGS:
        raise UsageError(f"--fsdp: the {spec.family} family trains each trial in one process (fit's sharding "
                         "does not apply to it); drop --fsdp")
    warm_starts = warm_start_from(args.warm_start_from or [], spec, args.warm_starts or DEFAULT_TOP)
    if spec.fixed.get("fsdp") and args.workers_per_trial < 2:
        raise UsageError("fsdp shards each trial's model over its workers; add --workers-per-trial 2 or more")
    if args.name and storage.exists(storage.join(storage_dir, args.name)):
        raise UsageError(f"experiment {args.name!r} already exists under {storage_dir}; pass --resume to "
                         "continue it or another --name")
    name = args.name or fresh_name(storage_dir, f"{Path(args.task).stem}-{args.method}-{profile}")
    record = ExperimentRecord(
        name=name, family=spec.family, task=spec.task, space=space_name(spec.path), space_yaml=spec.text,
        profile=profile, method=args.method, metric=spec.metric, mode=spec.mode, seed=spec.fixed["seed"],
        model=spec.fixed["model"], num_samples=spec.num_samples, overrides=overrides, options=options,
        command=command_line("llmm_tune.search", [*argv, *([] if args.name else ["--name", name])]),
        git_commit=git_commit(), versions=package_versions(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
        trust_remote_code=args.trust_remote_code, sampler=args.sampler, early_stopping=not args.no_early_stopping,
        warm_starts=warm_starts)
    return spec, storage.join(storage_dir, name), record


def resumed_experiment(args: argparse.Namespace, storage_dir: str) -> tuple[SearchSpec, str, ExperimentRecord]:
    if not args.name:
        raise UsageError("--resume needs --name of the experiment to continue (see --storage)")
    experiment = storage.join(storage_dir, args.name)
    record = read_record(experiment)
    if record is None:
        raise UsageError(f"no experiment {args.name!r} under {storage_dir} to resume; check --name and --storage, "
                         "or drop --resume to start it")
    return record.spec(), experiment, record


def run(argv: list[str]) -> str:
    args = parse_args(argv)
    from llmm_tune.tune.console import quiet_logs, quiet_ray

    quiet_ray()
    quiet_logs()
    check_job_paths(args.storage, None if args.no_export else args.results, args.data_dir)
    storage_dir = storage.writable(args.storage, "--storage")
    spec, experiment, record = (resumed_experiment(args, storage_dir) if args.resume
                                else new_experiment(args, argv, storage_dir))
    if args.write_space:
        write_text(args.write_space, written_space(spec.text, record.overrides))
        print(f"wrote the resolved search space to {args.write_space}; edit it and run: "
              f"python -m llmm_tune.search {args.write_space}")
        return experiment
    context = record.context(experiment)
    data_dir = resolve_data_dir(args.data_dir or record.data_dir)
    source = context.source(data_dir)
    record.data_dir = str(data_dir) if data_dir else None  # this machine's, to resume here
    record.data = portable_source(source, args.data_dir)  # what records carry
    results = None if args.no_export else Path(storage.writable(args.results, "--results"))
    cluster = address(args.address)
    if not args.resume and not cluster:
        record.resources = plan_layout(layout_request(args), machine(), "this machine").to_record()
    for note in spec.adjustments:
        print(note)
    data = spec.recipe.prepare(spec.fixed, context, source)  # bad rows and models fail here, before Ray
    tracked = record.tracker_names
    trackers.check_installed(tracked)
    trackers.start(tracked, record)  # the search's own run in each tracker, reopened on resume
    resume = (f"python -m llmm_tune.search {args.task} --resume --name {record.name}"
              + (f" --storage {args.storage}" if args.storage != DEFAULT_STORAGE else ""))
    with search_log(experiment) as log:
        resources = start_ray(cluster)
        stop_on_sigterm()  # SIGTERM (preemption, `ray job stop`) now ends the search as Ctrl+C does
        if not args.resume and cluster:
            record.resources = plan_layout(layout_request(args), resources, "the cluster").to_record()
        layout = Layout.from_record(record.resources)
        if cluster:
            check_layout(layout)
        record.write(experiment)
        print(f"experiment {experiment} | {spec.task} {record.method} {record.profile} | {spec.num_samples} trials, "
              f"{describe(layout)} | {data_sizes(data)} | data: {data_named(spec, source)}")
        print(f"logs: {log} and each trial's folder; resume with: {resume}")
        run_trials(build_tuner(spec, record, context, data, experiment, args.resume, args.optuna_storage), log, resume)
    finish(spec, record, experiment, results, resume)
    return experiment


def finish(spec: SearchSpec, record: ExperimentRecord, experiment: str, results: Path | None, resume: str) -> None:
    """A search that ran all its trials is exported and its tracker runs end; a stopped one says how to continue."""
    ended = ended_trials(experiment)
    if ended < spec.num_samples:  # Ctrl+C or SIGTERM: Tune saved its state and returned early
        raise Interrupted(f"search interrupted with {ended} of {spec.num_samples} trials ended; nothing exported; "
                          f"continue with: {resume}", code=interrupted_code())
    table = None
    if results is not None:
        from llmm_tune.export import export

        table = export([experiment], results)
    trackers.finish(record.tracker_names, record, table)


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


def data_sizes(data) -> str:
    """What the console says of the prepared data: the family's own summary, else its splits' sizes."""
    return getattr(data, "sizes", None) or " | ".join(f"{k} {len(v)}" for k, v in vars(data).items()
                                                      if hasattr(v, "__len__") and k in ("train", "validation"))


def data_named(spec: SearchSpec, source: str) -> str:
    """The data as the console names it: the space's own data block's path, else the folder or "hub"."""
    return json.loads(spec.dataset)["path"] if spec.dataset else source


def ended_trials(experiment: str) -> int:
    """Trials the saved experiment state records as ended (Tune marks the ones it stopped on Ctrl+C as
    terminated in memory, but saves them as pending, which is what a resume reads)."""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(experiment).trials)


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
