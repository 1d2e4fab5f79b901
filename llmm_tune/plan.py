"""Capacity planning: `python -m llmm_tune.plan glue_cola --profile cpu [--gpus 4 --gpu-memory 80]`.

Probes one trial of the search as configured (a few optimizer steps and one evaluation with the
model and data of the profile, LoftQ computed then read from its disk cache, the held-out split
scored once), or reads the figures of an earlier probe (`--figures FILE`, written by
`--save-figures FILE`), then predicts: memory per trial and trials per GPU at fractional packing,
the time of a whole trial, trials per hour, and the wall time of the configured search with ASHA,
simulated with the search's own rungs and concurrency. Every figure says how it was obtained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from llmm_tune.cli import (
    add_budget_option,
    add_data_options,
    add_model_option,
    add_profile_option,
    add_trial_shape_options,
    check_budget,
    check_counts,
    choose_profile,
    command_parser,
    dataset_options,
    layout_request,
)
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.method.config import BASELINES
from llmm_tune.train.data import resolve_data_dir
from llmm_tune.tune.cluster import MAX_TRIALS_PER_GPU, machine, plan_layout, trials_per_gpu
from llmm_tune.tune.probe import (
    ACTOR_START_S,
    EXPORT_OVERHEAD_S,
    PROBE_STEPS,
    RAY_START_S,
    TUNE_OVERHEAD_S,
    predict,
    probe,
    slowdown,
    trial_config,
    with_slowdown,
)
from llmm_tune.tune.spaces import SearchSpec, load_spec
from llmm_tune.tune.strategy import QMC_FROM_TRIALS


def measure(args: argparse.Namespace, spec: SearchSpec) -> tuple[dict, str]:
    """The probe's figures (measured here, or read from --figures) and how they were obtained."""
    if args.figures:
        if not Path(args.figures).is_file():
            raise UsageError(f"--figures {args.figures} not found; write one with --save-figures FILE")
        figures = json.loads(Path(args.figures).read_text())
        how = f"recorded in {args.figures} ({figures['device']}, {figures['threads']} threads)"
    else:
        source = spec.context().source(resolve_data_dir(args.data_dir))
        here = plan_layout(layout_request(args), machine(), "this machine")
        torch.set_num_threads(max(1, int(here.cpus)))
        figures = with_slowdown(probe(spec, source, args.probe_steps, not args.no_score), here.concurrent)
        how = f"measured here ({figures['device']}, {figures['threads']} threads, {args.probe_steps} steps)"
        if args.save_figures:
            Path(args.save_figures).write_text(json.dumps(figures, indent=2))
    return figures, how


def budgeted(args: argparse.Namespace, spec: SearchSpec) -> tuple[SearchSpec, dict, str]:
    """The search `search --budget` would run (its sizing line printed), and the probe's figures it was sized by."""
    from llmm_tune.tune.budget import sized

    source = spec.context().source(resolve_data_dir(args.data_dir))
    sizing, figures = sized(spec, args.budget, layout_request(args), source)
    figures = {**figures, "train_examples": sizing.train_rows}
    return sizing.applied(spec), figures, f"of --budget's probe ({figures['device']}, {figures['threads']} threads)"


def planned_gpus(args: argparse.Namespace) -> tuple[float, float | None]:
    """(GPUs of the planned machine, GiB per GPU or None): the options', else this machine's."""
    if args.gpus is not None:
        return args.gpus, args.gpu_memory
    gpus = machine()["GPU"]
    own_memory = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpus else None
    return gpus, args.gpu_memory or own_memory


def planned_layout(args: argparse.Namespace, figures: dict, gpus: float, gpu_memory: float | None):
    """(the trial layout on the planned machine of `gpus` GPUs of `gpu_memory` GiB, trials per GPU by memory or
    None)."""
    # a GPU plan is for GPU machines: their CPUs bind only when given
    cpus = args.cpus or (math.inf if gpus else float(os.cpu_count() or 1))
    resources = {"CPU": cpus, "GPU": float(gpus)}
    asked, per_gpu = layout_request(args), None
    if gpus and gpu_memory:
        per_gpu = trials_per_gpu(figures["peak_memory_gib"], gpu_memory)
        if asked.gpus_per_trial is None:  # pack as many trials per GPU as its memory holds, as a search does
            asked = dataclasses.replace(asked, gpus_per_trial=1 / min(per_gpu, MAX_TRIALS_PER_GPU))
    return plan_layout(asked, resources, "the planned machine"), per_gpu


def plan(args: argparse.Namespace) -> dict:
    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    profile = choose_profile(args.profile)
    spec = load_spec(args.task, profile, args.method, args.num_samples, dataset=dataset_options(vars(args)),
                     overrides={"model": args.model} if args.model else None)
    recipe = spec.recipe
    if "evals_per_epoch" not in recipe.SETTINGS:
        raise UsageError(f"plan models trials of the shared fit loop (epochs, evaluations per epoch); family "
                         f"{spec.family} trains otherwise: time a short search of it instead (--num-samples 1)")
    spec, figures, how = budgeted(args, spec) if args.budget else (spec, *measure(args, spec))
    gpus, gpu_memory = planned_gpus(args)
    layout, per_gpu = planned_layout(args, figures, gpus, gpu_memory)
    time_attr, epochs = recipe.clock(spec.fixed, spec.context())
    concurrent = min(layout.concurrent, spec.num_samples)
    predicted = predict(figures, spec, trial_config(spec), figures["train_examples"], concurrent, layout.workers,
                        early_stopping=spec.stops_early())
    trial_s, steps, evals, export_s = predicted.trial_s, predicted.steps, predicted.evaluations, predicted.export_s
    lines = [
        f"plan for {spec.task} ({profile} profile, {args.method}): {spec.num_samples} trials, {concurrent} at "
        f"once, {layout.workers} worker(s) of {layout.cpus:g} CPU + {layout.gpus:g} GPU each; figures {how}",
        f"memory per trial: {figures['peak_memory_gib']:.2f} GiB peak (measured: resident high-water mark or CUDA "
        "peak of the probe)"
        + (f"; {per_gpu} trial(s) fit in a {gpu_memory:g} GiB GPU (--gpus-per-trial {1 / per_gpu:.3g}), planned "
           f"with --gpus-per-trial {layout.gpus:.3g}" if per_gpu else ""),
        f"trial start: {figures['build_cold_s']:.1f} s with LoftQ computed, {figures['build_warm_s']:.1f} s from the "
        "experiment's LoftQ cache (measured)",
        f"a whole trial: {trial_s / 60:.1f} min = start + {steps} steps x {figures['step_s']:.2f} s + {len(evals)} "
        f"evaluations x {figures['eval_s']:.1f} s (measured per step and evaluation, counted from the config)"
        + (f", x {slowdown(figures, concurrent):.2f} with {concurrent} trials at once (measured here: "
           f"{figures['slowdown']['factor']:.2f} with {figures['slowdown']['trials']})"
           if slowdown(figures, concurrent) > 1 else ""),
        (f"ASHA (grace {spec.early_stopping['grace_period']}, reduction {spec.early_stopping['reduction_factor']}, "
         f"{time_attr} up to {epochs:g}): a trial runs {predicted.mean_fraction:.0%} of its budget on average "
         "(simulated with random trial quality)" if spec.stops_early() else
         f"no early stopping (the default below {QMC_FROM_TRIALS} trials): every trial runs its whole budget"),
        f"trials per hour: {concurrent * 3600 / (predicted.mean_fraction * trial_s + TUNE_OVERHEAD_S):.1f} "
        "(estimated from the above)",
        f"export: {'not predicted (--no-score)' if export_s is None else f'{export_s / 60:.1f} min'}"
        + ("" if export_s is None else f" = {EXPORT_OVERHEAD_S:.0f} s of clean-up, tables and plots + "
                                       f"{predicted.table_rows:.1f} table rows expected x {figures['score_s']:.0f} s "
                                       "to score the held-out split (measured)"),
        f"wall time of the search: {predicted.wall_s / 60:.1f} min (data {figures['prepare_s']:.0f} s + Ray "
        f"{RAY_START_S + ACTOR_START_S:.0f} s + trials {predicted.makespan_s / 60:.1f} min + LoftQ of the first trials "
        f"{predicted.cold_s:.0f} s + export)",
    ]
    if gpus and figures["device"] == "cpu":
        lines.append("note: these figures come from a CPU; for a GPU plan probe on a GPU machine "
                     "(--save-figures FILE there, --figures FILE here)")
    if layout.gpus and layout.gpus < 1:
        lines.append(f"note: trials sharing a GPU share its compute; the plan counts each at its probed speed, "
                     f"so {concurrent} at once is the throughput's upper bound")
    print("\n".join(lines))
    return {**figures, **dataclasses.asdict(predicted)}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("plan", __doc__)
    parser.add_argument("task", help="a shipped search space (glue_cola, gsm8k, ...) or a YAML path")
    add_profile_option(parser)
    parser.add_argument("--method", choices=tuple(BASELINES), default="llmm", help="the search's method")
    add_model_option(parser)
    parser.add_argument("--num-samples", type=int, help="trials (default: the profile's)")
    add_budget_option(parser)
    parser.add_argument("--gpus", type=float, help="GPUs of the machine or cluster to plan for (default: this "
                                                    "machine's)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU, for fractional packing (default: this "
                                                         "machine's GPU's, when planning for this machine)")
    parser.add_argument("--cpus", type=float,
                        help="CPUs to plan for (default: this machine's; when GPUs are planned, not a limit)")
    add_trial_shape_options(parser)
    parser.add_argument("--data-dir", help="data folder for the probe (default: $LLMM_DATA_DIR)")
    add_data_options(parser)
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="optimizer steps the probe times")
    parser.add_argument("--no-score", action="store_true", help="skip timing the held-out scoring (slow for GSM8K)")
    parser.add_argument("--figures", help="read the figures of an earlier probe instead of probing")
    parser.add_argument("--save-figures", help="write this probe's figures to a JSON file")
    return parser


def run(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    check_counts(args)
    check_budget(args)
    return plan(args)


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
