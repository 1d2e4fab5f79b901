"""Hyperparameter search: `python -m llmm_tune.search glue_cola`.

Ray Tune runs the trials (GPU fractions, clusters, checkpoints), Optuna's multivariate TPE picks
them (published configurations first), ASHA stops weak ones early; the finished search is exported
to `results/<task>/` (see `llmm_tune.export`). Any task family works the same way: the search space
names it. Every input is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmm_tune.cli import (
    DEFAULT_STORAGE,
    NOT_OPTIONS,
    choose_profile,
    dataset_options,
    layout_request,
    parse_search_args,
    search_parser,
    space_overrides,
)
from llmm_tune.cli import main as run_command
from llmm_tune.errors import Interrupted, UsageError
from llmm_tune.files import write_text
from llmm_tune.results.collect import ended_trials
from llmm_tune.results.tables import export
from llmm_tune.results.transfer import DEFAULT_TOP, warm_start_from
from llmm_tune.train.data import portable_source, resolve_data_dir
from llmm_tune.tune import storage, trackers
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
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import (
    ExperimentRecord,
    command_line,
    fresh_name,
    git_commit,
    package_versions,
    read_budget_stop,
    read_record,
)
from llmm_tune.tune.launch import build_tuner, run_trials, search_log
from llmm_tune.tune.objectives import as_record, objectives_text, selecting
from llmm_tune.tune.spaces import SearchSpec, load_spec, space_name
from llmm_tune.tune.strategy import default_strategy, strategy_text
from llmm_tune.tune.termination import interrupted_code, stop_on_sigterm


def build_parser() -> argparse.ArgumentParser:
    return search_parser(__doc__)


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


def new_experiment(args: argparse.Namespace, argv: list[str], storage_dir: str) -> tuple[SearchSpec, str,
                                                                                          ExperimentRecord]:
    profile = choose_profile(args.profile)
    options = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS}
    overrides = space_overrides(options)
    spec = load_spec(args.task, profile, args.method, args.num_samples, dataset=dataset_options(options),
                     overrides=overrides)
    spec, objectives = selecting(spec, args.objectives, profile, args.method, overrides)  # the first selects
    spec = dataclasses.replace(spec, early_stopping_on=False if args.no_early_stopping else
                               None if args.sampler == "auto" else True)
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
    from llmm_tune.tune.budget import paper_cost, profile_budget, sized

    sizing, budget = None, args.budget or profile_budget(profile, spec)
    if budget:  # the search sized to the budget by a probe of one trial here, after every cheaper check
        sizing, _ = sized(spec, budget, layout_request(args), data_source(spec, args))
        overrides |= sizing.overrides()
        spec = sizing.applied(spec)
    elif profile == "paper" and machine()["GPU"]:
        print(paper_cost(spec, layout_request(args), data_source(spec, args)))
    sampler = default_strategy(spec.num_samples)[0] if args.sampler == "auto" else args.sampler
    print(f"searcher: {strategy_text(sampler, spec.stops_early())} after the space's warm starts"
          + (f" (the default at {spec.num_samples} trials; --sampler sets it)" if args.sampler == "auto" else "")
          + (f"\n{objectives_text(objectives, spec.stops_early())}" if objectives else ""))
    record = ExperimentRecord(
        name=name, family=spec.family, task=spec.task, space=space_name(spec.path), space_yaml=spec.text,
        profile=profile, method=args.method, metric=spec.metric, mode=spec.mode, seed=spec.fixed["seed"],
        model=spec.fixed["model"], num_samples=spec.num_samples, overrides=overrides, options=options,
        command=command_line("llmm_tune.search", [*argv, *([] if args.name else ["--name", name])]),
        git_commit=git_commit(), versions=package_versions(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
        trust_remote_code=args.trust_remote_code, sampler=sampler, early_stopping=spec.stops_early(),
        warm_starts=warm_starts, budget=dataclasses.asdict(sizing) if sizing else {},
        objectives=as_record(objectives))
    return spec, storage.join(storage_dir, name), record


def data_source(spec: SearchSpec, args: argparse.Namespace) -> str:
    return spec.context().source(resolve_data_dir(args.data_dir))


def resumed_experiment(args: argparse.Namespace, storage_dir: str) -> tuple[SearchSpec, str, ExperimentRecord]:
    if not args.name:
        raise UsageError("--resume needs --name of the experiment to continue (see --storage)")
    experiment = storage.join(storage_dir, args.name)
    record = read_record(experiment)
    if record is None:
        raise UsageError(f"no experiment {args.name!r} under {storage_dir} to resume; check --name and --storage, "
                         "or drop --resume to start it")
    return record.spec(), experiment, record


@dataclass
class Prepared:
    """A search checked and ready before Ray starts: its space, experiment, record, context, data and how to resume."""

    spec: SearchSpec
    experiment: str
    record: ExperimentRecord
    context: TrialContext
    data: object  # the family's prepared train and validation data
    source: str  # where the data came from
    results: Path | None  # where the export writes; None: no export
    cluster: str | None  # an existing Ray cluster's address
    resume: str  # the command that continues the search


def run(argv: list[str]) -> str:
    args = parse_search_args(argv, __doc__)
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
    prepared = prepare(args, spec, experiment, record)
    launch(prepared, args)
    finish(prepared)
    return experiment


def prepare(args: argparse.Namespace, spec: SearchSpec, experiment: str, record: ExperimentRecord) -> Prepared:
    """Check every input and prepare the data, before Ray starts."""
    context = record.context(experiment)
    data_dir = resolve_data_dir(args.data_dir or record.data_dir)
    source = context.source(data_dir)
    record.data_dir = str(data_dir) if data_dir else None  # this machine's, to resume here
    record.data = portable_source(source, args.data_dir)  # what records carry
    results = None if args.no_export else Path(storage.writable(args.results, "--results"))
    cluster = address(args.address)
    if not args.resume and not cluster:
        from llmm_tune.tune.budget import packed_request

        request = packed_request(layout_request(args), record.budget)
        record.resources = plan_layout(request, machine(), "this machine").to_record()
    for note in spec.adjustments:
        print(note)
    data = spec.recipe.prepare(spec.fixed, context, source)  # bad rows and models fail here, before Ray
    from llmm_tune.tune.console import caps

    for line in caps(spec, record, data):
        print(line)
    trackers.check_installed(record.tracker_names)
    trackers.start(record.tracker_names, record)  # the search's own run in each tracker, reopened on resume
    resume = (f"python -m llmm_tune.search {args.task} --resume --name {record.name}"
              + (f" --storage {args.storage}" if args.storage != DEFAULT_STORAGE else ""))
    return Prepared(spec, experiment, record, context, data, source, results, cluster, resume)


def launch(prepared: Prepared, args: argparse.Namespace) -> None:
    """Start Ray (or join the cluster), lay the trials out on it and run them."""
    spec, record, experiment = prepared.spec, prepared.record, prepared.experiment
    with search_log(experiment) as log:
        resources = start_ray(prepared.cluster)
        stop_on_sigterm()  # SIGTERM (preemption, `ray job stop`) now ends the search as Ctrl+C does
        if not args.resume and prepared.cluster:
            record.resources = plan_layout(layout_request(args), resources, "the cluster").to_record()
        layout = Layout.from_record(record.resources)
        if prepared.cluster:
            check_layout(layout)
        record.write(experiment)
        from llmm_tune.tune.console import data_named, data_sizes

        print(f"experiment {experiment} | {spec.task} {record.method} {record.profile} | {spec.num_samples} trials, "
              f"{describe(layout)} | {data_sizes(prepared.data)} | data: {data_named(spec, prepared.source)}")
        print(f"logs: {log} and each trial's folder; resume with: {prepared.resume}")
        tuner = build_tuner(spec, record, prepared.context, prepared.data, experiment, args.resume,
                            args.optuna_storage)
        run_trials(tuner, log, prepared.resume)


def finish(prepared: Prepared) -> None:
    """A search that ran all its trials is exported and its tracker runs end; a stopped one says how to continue."""
    ended, stopped = ended_trials(prepared.experiment), read_budget_stop(prepared.experiment)
    if stopped:
        from llmm_tune.tune.budget import budget_outcome

        print(budget_outcome(stopped, ended, prepared.spec.num_samples, prepared.resume))
    elif ended < prepared.spec.num_samples:  # Ctrl+C or SIGTERM: Tune saved its state and returned early
        raise Interrupted(f"search interrupted with {ended} of {prepared.spec.num_samples} trials ended; nothing "
                          f"exported; continue with: {prepared.resume}", code=interrupted_code())
    table = None if prepared.results is None else export([prepared.experiment], prepared.results)
    trackers.finish(prepared.record.tracker_names, prepared.record, table)


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
