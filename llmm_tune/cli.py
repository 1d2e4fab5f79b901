"""What the commands users type share: their parsers' form, the options search, plan and compare take alike
(profile, trial shape, data, storage), and one way to end (bad input: one line, exit 2; a stopped search: its
line and code)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from llmm_tune.errors import Interrupted, UsageError
from llmm_tune.method.config import BASELINES
from llmm_tune.results.transfer import DEFAULT_TOP
from llmm_tune.train.data import BAD_ROW_POLICIES
from llmm_tune.tune import storage
from llmm_tune.tune.cluster import LayoutRequest, address
from llmm_tune.tune.spaces import PROFILES
from llmm_tune.tune.strategy import QMC_FROM_TRIALS, SAMPLERS

COMMANDS = ("search", "export", "compare", "reproduce", "export_adapter", "plan")
DEFAULT_STORAGE = "ray_results"
NOT_OPTIONS = ("task", "name", "resume", "write_space")  # what names the experiment rather than how it searches


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default in its help (an option whose help says its
    default in words, or that is off or unset by default, says so itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def command_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m llmm_tune.{command}", description=description,
                                   formatter_class=_HelpFormatter)


def main(run: Callable[[list[str]], object]) -> None:
    """Run a command on the process's arguments; bad input ends as one line and exit code 2."""
    try:
        run(sys.argv[1:])
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.code)


def search_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The options of `search`; `compare` passes what it does not take itself through to its searches."""
    parser = command_parser("search", description)
    parser.add_argument("task", help="a shipped search space (glue_cola, gsm8k, ...; llmm-tune search --help lists "
                                     "them) or a YAML path")
    add_profile_option(parser)
    parser.add_argument("--method", choices=tuple(BASELINES), default="llmm",
                        help="tune Llmm or one of its baselines with the same space and budget")
    add_model_option(parser)
    parser.add_argument("--num-samples", type=int, help="trials (default: the profile's)")
    add_budget_option(parser)
    add_layout_options(parser)
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="where experiments are kept: a folder (an NFS mount on a cluster) or an s3:// or "
                             "gs:// URI (endpoint and credentials from the usual environment variables)")
    parser.add_argument("--optuna-storage", help="a database URL for the Optuna study (default: a journal file in "
                                                 "the experiment folder, for optuna-dashboard)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="auto",
                        help="how trials are proposed after the warm starts: Optuna's multivariate TPE, uniformly at "
                             "random, or a Sobol sequence (qmc); auto: random search below "
                             f"{QMC_FROM_TRIALS} trials, qmc with ASHA from there (what replays of recorded searches "
                             "found best; docs/search.md)")
    parser.add_argument("--no-early-stopping", action="store_true",
                        help="run every trial to its end (no ASHA; a given --sampler keeps ASHA unless this is set)")
    parser.add_argument("--objectives", metavar="METRIC:MODE,...",
                        help="optimise several reported validation metrics at once, e.g. mcc:max,ece:min: the first "
                             "(a metric of the task, in its direction) selects trials in place of the space's metric "
                             "and is the one ASHA stops on; the export adds the Pareto front (default: the space's "
                             "metric alone)")
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
    parser.add_argument("--write-space", metavar="FILE",
                        help="write the resolved search space (with the inferred format and labels) to FILE and stop")
    return parser


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the model every trial fine-tunes: a hub id, a local folder or a packaged "
                                        "name (default: the profile's)")


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


def space_overrides(options: dict) -> dict:
    """The fixed settings the command line sets: what a new experiment and its resumption both apply."""
    given = {"seed": options["seed"], "model": options["model"], "on_bad_row": options["on_bad_row"],
             "fsdp": options["fsdp"] or None}
    return {name: value for name, value in given.items() if value is not None}


def add_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", metavar="DURATION",
                        help="wall time for the whole search, export included (45m, 2h, 1h30m): a probe of one trial "
                             "here sizes the trials, their epochs and rows to it, and at the budget running trials end "
                             "at their latest evaluation (default: the profile's trials, however long they take)")


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                        help="paper: the published model and recipe (hours to days); gpu: the published recipe sized "
                             "to --budget (default 1h) and the GPU's memory, with --model or an ungated model per "
                             "family; cpu: packaged small models, short runs; auto: gpu if a GPU is present, else cpu")


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


def parse_search_args(argv: list[str], description: str | None = None) -> argparse.Namespace:
    """`search`'s options, parsed and checked."""
    args = search_parser(description).parse_args(argv)
    if storage.is_uri(args.results):
        raise UsageError(f"--results {args.results} must be a folder (the export writes files there); URIs are for "
                         "--storage")
    check_counts(args)
    check_budget(args)
    if args.objectives is not None:
        if args.resume:
            raise UsageError("a resumed search keeps the objectives it was started with; drop --objectives")
        from llmm_tune.tune.objectives import parse_objectives

        parse_objectives(args.objectives)  # the form here; the metrics against the task once the space is read
    return args


def check_budget(args: argparse.Namespace) -> None:
    """--budget is a duration, and it decides the trials of a new search."""
    if args.budget is None:
        return
    from llmm_tune.tune.budget import parse_duration

    parse_duration(args.budget)
    if address(getattr(args, "address", None)):
        raise UsageError("--budget sizes a search from a probe on this machine; on a cluster give --num-samples (and "
                         "the space's epochs) instead")
    if args.num_samples is not None:
        raise UsageError("--budget sizes the number of trials itself; drop --num-samples (or --budget)")
    if getattr(args, "resume", False):
        raise UsageError("a resumed search keeps the budget it was sized to; drop --budget")


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
    """`auto` means the same in every command: gpu when CUDA is present, else cpu."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        print(f"profile: gpu ({torch.cuda.device_count()} CUDA device(s) found; --profile paper runs the published "
              "recipe in full)")
        return "gpu"
    print("profile: cpu (no CUDA device found; --profile paper forces the published setup)")
    return "cpu"




def parse_command(command: str, tokens: list[str]) -> argparse.Namespace:
    """`tokens` parsed as `python -m llmm_tune.<command>` would parse them, running nothing (argparse's
    SystemExit on bad options). A command whose options pass through to another (compare's to its searches)
    parses them with its own `parse_all`."""
    if command not in COMMANDS:
        raise UsageError(f"unknown command llmm_tune.{command}; the commands are {', '.join(COMMANDS)}")
    module = importlib.import_module(f"llmm_tune.{command}")
    if hasattr(module, "parse_all"):
        return module.parse_all(tokens)[0]
    return module.build_parser().parse_args(tokens)
