"""What a profile's warm starts score when a budget shortens their trials: each warm start trained for each number of
epochs and seed, outside Tune, as a search's trial trains (one thread each, `--at-once` at a time), then scored once
on the held-out split. Per epochs and seed it prints each warm start's validation and held-out score and the one a
search of those warm starts would pick (the best validation score); per epochs, how many picks clear `--floor`.

    python benchmarks/bench_short_trials.py --epochs 2 2.5 3 4 --seeds 0 1 2 --data-dir ../shared/data
    python benchmarks/bench_short_trials.py --epochs 2 --set batch_size=16 lr=3e-4 --data-dir ../shared/data
    python benchmarks/bench_short_trials.py --task glue_mrpc --epochs 1 2 --seeds 0 --floor 0.7

The README's main job sizes the cpu profile's CoLA trials down to the epochs that fit its budget on the machine at
hand: this measures what that costs in score (docs/benchmarks.md, capacity plan). A trial of 2 epochs takes about
3 minutes on the 2-core EPYC, two at once.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from llmm_tune.errors import UsageError
from llmm_tune.train.data import resolve_data_dir
from llmm_tune.tune.direction import Direction
from llmm_tune.tune.spaces import load_spec


def trained_and_scored(task: str, profile: str, point: dict, epochs: float, seed: int, data_dir: str | None) -> dict:
    """One trial of `point` (a warm start, with --set's settings) at `epochs` and `seed`, on one thread: its
    validation and held-out scores."""
    import torch

    from llmm_tune.tune.console import quiet_logs
    from llmm_tune.tune.runner import train_and_score

    quiet_logs()
    torch.set_num_threads(1)
    spec = load_spec(task, profile, "llmm")
    config = {**spec.fixed, **point, "epochs": int(epochs) if epochs.is_integer() else epochs, "seed": seed}
    context = spec.context()
    source = context.source(resolve_data_dir(data_dir))
    data = spec.recipe.prepare(config, context, source)
    with tempfile.TemporaryDirectory() as work:
        return train_and_score(context, config, data, source, Path(work))


def point_name(point: dict) -> str:
    """A warm start as the table's header names it: its quantiser, bits and lr (those it sets)."""
    quantiser = "-".join(str(point[key]) for key in ("quant_method", "bits") if key in point)
    return " ".join(filter(None, [quantiser, f"lr {point['lr']:g}" if "lr" in point else ""])) or str(point)


def report(spec, runs: dict, epochs: list[float], seeds: list[int], floor: float, settings: dict) -> None:
    """The table of scores, and per epochs the picks that clear the floor."""
    metric, held_out = f"val_{spec.metric}", f"{spec.recipe.HELD_OUT}_{spec.metric}"
    names = [point_name({**point, **settings}) for point in spec.warm_start]
    print(f"{spec.task}, profile's fixed settings{f' with {settings}' if settings else ''}:")
    print(f"| epochs | seed | {' | '.join(f'{name}: val / {held_out}' for name in names)} | picked: {held_out} |")
    print("|---|---|" + "---|" * (len(names) + 1))
    direction = Direction(spec.mode)
    for each in epochs:
        cleared = 0
        for seed in seeds:
            scores = [runs[index, each, seed] for index in range(len(names))]
            picked = min(scores, key=lambda scored: direction.rank_key(scored[metric]))
            cleared += direction.at_least_as_good(picked[held_out], floor)
            cells = " | ".join(f"{scored[metric]:.4f} / {scored[held_out]:.4f}" for scored in scores)
            print(f"| {each:g} | {seed} | {cells} | {picked[held_out]:.4f} |")
        print(f"{each:g} epochs: {cleared} of {len(seeds)} picks at {held_out} >= {floor}")


def setting_value(text: str):
    """A --set value: a number as Python reads it (PyYAML's YAML 1.1 reads 3e-4 as text), else YAML's (true, null)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def checked_settings(items: list[str], epochs: list[float], known: dict) -> dict:
    """--set's KEY=VALUE items as settings, each (and each of --epochs) valid for the family, or a UsageError: a
    misspelt key would otherwise be ignored by the trials, and the table would measure the recipe it meant to change."""
    if any("=" not in item for item in items):
        raise UsageError(f"--set takes KEY=VALUE, got {' '.join(items)}")
    settings = {key: setting_value(value) for key, value in (item.split("=", 1) for item in items)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UsageError(f"--set: unknown setting(s) {unknown}; the family's: {sorted(known)}")
    checks = [*settings.items(), *(("epochs", each) for each in epochs)]
    for name, value in checks:
        if not known[name].test(value):
            raise UsageError(f"{name} must be {known[name].need}, got {value!r}")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="glue_cola")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--epochs", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--floor", type=float, default=0.22, help="the held-out score a pick should reach")
    parser.add_argument("--at-once", type=int, default=2, help="trials trained at once, one thread each")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings laid over every warm start (a YAML value each), to try another recipe")
    parser.add_argument("--data-dir", help="data folder (default: $LLMM_DATA_DIR)")
    args = parser.parse_args()
    try:
        spec = load_spec(args.task, args.profile, "llmm")
        settings = checked_settings(args.set, args.epochs, spec.recipe.SETTINGS)
    except UsageError as error:
        parser.error(str(error))
    if not spec.warm_start:
        parser.error(f"{args.task} --profile {args.profile} has no warm starts to train")
    jobs = list(itertools.product(range(len(spec.warm_start)), args.epochs, args.seeds))
    with ProcessPoolExecutor(args.at_once) as pool:
        futures = {(point, epochs, seed): pool.submit(trained_and_scored, args.task, args.profile,
                                                      {**spec.warm_start[point], **settings}, epochs, seed,
                                                      args.data_dir)
                   for point, epochs, seed in jobs}
        runs = {job: future.result() for job, future in futures.items()}
    report(spec, runs, args.epochs, args.seeds, args.floor, settings)


if __name__ == "__main__":
    main()
