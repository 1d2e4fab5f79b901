"""Search efficiency on recorded learning curves (issue 26.2): search strategies replayed over a table that
`record_curves.py` wrote, through Optuna's own samplers and pruners, over many searcher seeds.

    python benchmarks/bench_search_efficiency.py cola [--trials 16] [--seeds 20]
    python benchmarks/bench_search_efficiency.py mrpc --transfer-from cola

Each trial asks Optuna for a configuration in the search's own space (`load_spec(task, "cpu")`: the distributions
Ray's `OptunaSearch` gets), replays the recorded configuration nearest to it (Gower distance: log-scaled ranges
and choices weigh alike), and reports the recorded evaluations one by one while the pruner lets it go on. A
stopped trial is told to the sampler as COMPLETE with its best value so far, as Ray's `OptunaSearch` tells it
when ASHA stops a trial. Optuna's `SuccessiveHalvingPruner` is the asynchronous successive halving (ASHA) that
Ray's `ASHAScheduler` runs: rungs at grace period x reduction factor^k, a trial goes on if it is in the top
1/reduction-factor of the rung. Compute is trial-seconds, the trials one after another.

The reference is random search without early stopping. For each seed: the compute a strategy spends to reach the
reference's final best (same seed, same number of trials), as a fraction of the reference's compute; and the best
validation score within fixed fractions of the reference's median compute. Prints median and interquartile range
over seeds per strategy, writes `<out>/<task>.md` and `<task>.png`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmm_tune.results.transfer import ranked_points  # noqa: E402
from llmm_tune.tune.direction import Direction  # noqa: E402
from llmm_tune.tune.experiment import git_commit  # noqa: E402
from llmm_tune.tune.searcher import startup_trials  # noqa: E402
from llmm_tune.tune.spaces import load_spec  # noqa: E402

CURVES = ROOT / "benchmarks" / "curves"
BUDGETS = (0.1, 0.2, 1 / 3, 0.5, 1.0)  # fractions of the reference's median compute


class Table:
    """A recorded table: each configuration's settings and its curve (values, cumulative trial-seconds)."""

    def __init__(self, path: Path):
        self.frame = pd.read_csv(path)
        self.metric = next(c for c in self.frame.columns if c.startswith("val_") and c != "val_loss")
        by_config = self.frame.groupby("config")
        self.settings = [c for c in self.frame.columns if c not in ("config", "evaluation", "epoch", self.metric,
                                                                    "val_loss", "trial_seconds")]
        self.configs = by_config[self.settings].first()
        self.curves = {c: (g[self.metric].to_numpy(), g["trial_seconds"].to_numpy()) for c, g in by_config}
        self.losses = {c: g["val_loss"].to_numpy() for c, g in by_config}
        self.evaluations_per_epoch = int(round(1 / by_config["epoch"].first().iloc[0]))
        self.evaluations = int(by_config["evaluation"].max().max())

    def nearest(self, params: dict, space: dict) -> int:
        """The recorded configuration nearest `params` (Gower distance over the space's settings)."""
        distance = np.zeros(len(self.configs))
        for name, entry in space.items():
            (kind, args), = entry.items()
            column = self.configs[name]
            if kind == "choice":
                distance += (column != params[name]).to_numpy()
            else:
                scale = np.log if kind == "loguniform" else (lambda x: x)
                distance += np.abs(scale(column.to_numpy()) - scale(params[name])) / (scale(args[1]) - scale(args[0]))
        return int(self.configs.index[np.argmin(distance)])

    def best(self) -> float:
        return float(self.frame[self.metric].max())


@dataclass(frozen=True)
class Strategy:
    sampler: Callable[[int, int], optuna.samplers.BaseSampler]  # (seed, trials) -> sampler
    pruner: Callable[[Table], optuna.pruners.BasePruner]
    warm_start: str = "none"  # "none", "space" (the profile's points) or "transfer" (--transfer-from's best)
    rungs_on: str = "metric"  # what ASHA ranks a rung's trials on: the selection metric or the validation "loss"


def tpe(startup: Callable[[int], int] = startup_trials):
    return lambda seed, trials: optuna.samplers.TPESampler(multivariate=True, seed=seed,
                                                           n_startup_trials=startup(trials))


def random_sampler(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def asha(grace_epochs: float = 1, reduction_factor: int = 2):
    """Optuna's ASHA with Ray's grace period (in epochs) and reduction factor, on the table's evaluations."""
    return lambda table: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, round(grace_epochs * table.evaluations_per_epoch)), reduction_factor=reduction_factor,
        min_early_stopping_rate=0)


def no_pruning(table: Table) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def hyperband(table: Table) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=table.evaluations_per_epoch, reduction_factor=2,
                                          max_resource=table.evaluations)


STRATEGIES = {
    "random (reference)": Strategy(random_sampler, no_pruning),
    "random + ASHA": Strategy(random_sampler, asha()),
    "TPE": Strategy(tpe(), no_pruning),
    "TPE + ASHA": Strategy(tpe(), asha()),
    "TPE + ASHA on val loss + space warm starts": Strategy(tpe(), asha(), "space", rungs_on="loss"),
    "TPE + Hyperband": Strategy(tpe(), hyperband),
    "GP + ASHA": Strategy(lambda seed, trials: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=startup_trials(trials)), asha()),
    "QMC (Sobol) + ASHA": Strategy(lambda seed, trials: optuna.samplers.QMCSampler(seed=seed), asha()),
}


def defaults_sweep(table: Table) -> dict[str, Strategy]:
    """The default's neighbours, each with the space's warm starts: grace periods the budget holds, in whole
    epochs (Ray's ASHA would place a half-epoch rung at the next whole-epoch report: evaluations fall at 0.48,
    1.0, 1.48, ... epochs), reduction factors, TPE's random start-up trials."""
    epochs = table.evaluations / table.evaluations_per_epoch
    return {**{f"TPE + ASHA on {on} grace {g} rf {rf}": Strategy(tpe(), asha(g, rf), "space", rungs_on=on)
               for on in ("metric", "loss") for g in (1, 2, 3) if g < epochs for rf in (2, 3, 4)},
            **{f"TPE start-up {n} + ASHA": Strategy(tpe(lambda trials, n=n: n), asha(), "space")
               for n in (2, 4, 5, 8)}}


def replay(table: Table, spec, strategy: Strategy, seed: int, trials: int, warm: list[dict]) -> np.ndarray:
    """One search: each evaluation it made as (cumulative trial-seconds, value), in order."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # named: HyperbandPruner assigns a trial's bracket from a hash of the study's name (random if unnamed)
    study = optuna.create_study(study_name=f"replay-{seed}", direction="maximize" if spec.mode == "max" else "minimize",
                                sampler=strategy.sampler(seed, trials), pruner=strategy.pruner(table))
    for point in warm[:trials]:
        study.enqueue_trial(point)
    distributions, spent, log = spec.distributions(), 0.0, []
    for _ in range(trials):
        trial = study.ask(distributions)
        config = table.nearest(trial.params, spec.space)
        values, seconds = table.curves[config]
        ranked = values if strategy.rungs_on == "metric" else -table.losses[config]  # the pruner keeps the highest
        best, used = -math.inf, len(values)
        for step, value in enumerate(values, start=1):
            trial.report(float(ranked[step - 1]), step)
            best = max(best, value)
            log.append((spent + seconds[step - 1], value))
            if step < len(values) and trial.should_prune():
                used = step
                break
        spent += seconds[used - 1]
        study.tell(trial, float(best))  # COMPLETE with its best so far, as Ray's OptunaSearch tells a stopped trial
    return np.array(log)


def transferred(curves: Path, source: str, spec, top: int) -> list[dict]:
    """The best `top` configurations of another task's table, moved into this space by `--warm-start-from`'s
    own code (`transfer.ranked_points`, which ranks the trials of a results folder the export wrote); then the
    space's own warm starts."""
    table = Table(curves / f"{source}.csv")
    finals = table.configs.assign(**{table.metric: table.frame.groupby("config")[table.metric].max()})
    trials = finals.rename_axis("trial").reset_index()
    points = [point for point, _, _ in ranked_points(trials, table.metric, Direction("max"), spec.space, top, source)]
    return points + [point for point in spec.warm_start if point not in points]  # then the space's, as `search` does


def reach(log: np.ndarray, target: float) -> float:
    """The compute at which a search's evaluations first reach `target` (inf if never)."""
    hits = log[log[:, 1] >= target - 1e-12]
    return float(hits[0, 0]) if len(hits) else math.inf


def best_within(log: np.ndarray, budget: float) -> float:
    within = log[log[:, 0] <= budget]
    return float(within[:, 1].max()) if len(within) else math.nan


def quartiles(values: list[float]) -> str:
    q1, median, q3 = np.quantile(np.array(values), [0.25, 0.5, 0.75], method="inverted_cdf")
    return f"{median:.2f} [{q1:.2f}, {q3:.2f}]".replace("inf", "∞").replace("nan", "n/a")


def summarise(logs: dict[str, list[np.ndarray]], reference: str) -> tuple[pd.DataFrame, dict, float]:
    """Per strategy: compute to reach the reference's best (fraction of its compute, per seed) and the best value
    at fixed budgets, as median [IQR] over seeds; and the raw ratios and the median reference compute."""
    targets = [log[:, 1].max() for log in logs[reference]]
    spent = [log[-1, 0] for log in logs[reference]]
    median_spent = float(np.median(spent))
    rows, ratios = [], {}
    for name, runs in logs.items():
        ratios[name] = [reach(log, t) / s for log, t, s in zip(runs, targets, spent)]
        row = {"strategy": name, "compute to reach random's best (median [IQR])": quartiles(ratios[name]),
               "reached": f"{sum(math.isfinite(r) for r in ratios[name])}/{len(runs)}"}
        for fraction in BUDGETS:
            row[f"best at {fraction:.2g}"] = quartiles([best_within(log, fraction * median_spent) for log in runs])
        rows.append(row)
    return pd.DataFrame(rows), ratios, median_spent


def plot(logs: dict[str, list[np.ndarray]], ratios: dict, median_spent: float, metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(13, 0.45 * len(logs) + 2.5))
    names = list(logs)
    capped = [[min(r, 1.5) for r in ratios[name]] for name in names]
    left.boxplot(capped, orientation="horizontal", tick_labels=names, whis=(0, 100))
    left.axvline(1 / 3, color="green", linestyle=":", label="goal: a third")
    left.set_xlabel("compute to reach random search's best / random search's compute (1.5: not reached)")
    left.legend(loc="lower right")
    grid = np.linspace(0, 1.5 * median_spent, 61)
    for name in names:
        curves = np.array([[best_within(log, b) for b in grid] for log in logs[name]])
        right.plot(grid / median_spent, np.nanmedian(curves, axis=0), label=name)
    right.set_xlabel("compute / random search's median compute")
    right.set_ylabel(f"best {metric} so far (median over seeds)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def by_trial_count(table: Table, spec, counts: list[int], seeds: int) -> str:
    """The searchers a search may default to, with the profile's rungs and warm starts, replayed at each trial count:
    each one's median compute to reach random search's best (same seed, same count) and how often it did."""
    stopping = spec.early_stopping
    rungs = asha(stopping["grace_period"], stopping["reduction_factor"])
    qmc = STRATEGIES["QMC (Sobol) + ASHA"].sampler
    samplers = {"random": random_sampler, "QMC (Sobol)": qmc, "TPE": tpe()}
    strategies = {"random (reference)": STRATEGIES["random (reference)"],
                  "random + space warm starts": Strategy(random_sampler, no_pruning, "space"),
                  **{f"{name} + ASHA{' + space warm starts' if warm == 'space' else ''}": Strategy(sampler, rungs, warm)
                     for warm in ("none", "space") for name, sampler in samplers.items()}}
    warm = {"none": [], "space": spec.warm_start}
    columns = {}
    for count in counts:
        logs = {name: [replay(table, spec, s, seed, count, warm[s.warm_start]) for seed in range(seeds)]
                for name, s in strategies.items()}
        summary, _, _ = summarise(logs, "random (reference)")
        columns[f"{count} trials"] = [f"{median} ({reached})" for median, reached in zip(
            summary["compute to reach random's best (median [IQR])"].str.split(" ").str[0], summary["reached"])]
    frame = pd.DataFrame({"strategy": list(strategies), **columns})
    return (f"# {table.metric} by trial count: {seeds} seeds, the cpu profile's rungs (grace "
            f"{stopping['grace_period']:g}, rf {stopping['reduction_factor']:g}) and warm starts\n\nEach cell: the "
            "median compute to reach random search's best (fraction of random search's compute at that count; "
            "∞: not reached in most seeds) and in how many seeds it was reached.\n\n"
            f"{frame.to_markdown(index=False)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a table in benchmarks/curves/ (cola, mrpc)")
    parser.add_argument("--trials", type=int, default=16, help="trials per search (default: 16)")
    parser.add_argument("--seeds", type=int, default=20, help="searcher seeds per strategy (default: 20)")
    parser.add_argument("--transfer-from", help="another task's table: also warm-start from its best configurations")
    parser.add_argument("--curves", type=Path, default=CURVES, help="where the tables are (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "search_efficiency")
    parser.add_argument("--counts", type=int, nargs="+",
                        help="instead: the searchers a profile may default to, at each of these trial counts")
    args = parser.parse_args()
    if not (args.curves / f"{args.task}.csv").is_file():
        sys.exit(f"error: no table {args.curves / args.task}.csv; record it with benchmarks/record_curves.py "
                 f"glue_{args.task}, or pass --curves DIR")
    table = Table(args.curves / f"{args.task}.csv")
    spec = load_spec(f"glue_{args.task}", "cpu", "llmm")
    if spec.mode != "max":
        sys.exit(f"error: glue_{args.task} minimises its metric; the replay keeps the highest value")
    if args.counts:
        report = by_trial_count(table, spec, args.counts, args.seeds) + (
            f"\ncommand: python benchmarks/bench_search_efficiency.py {' '.join(sys.argv[1:])} (commit {git_commit()}, "
            f"optuna {optuna.__version__}); the table: benchmarks/curves/{args.task}.txt\n")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.task}_by_trials.md").write_text(report)
        print(report)
        return
    sweep = defaults_sweep(table)
    stopping = spec.early_stopping
    default = f"TPE + ASHA + space warm starts (default: grace {stopping['grace_period']:g}, rf " \
              f"{stopping['reduction_factor']:g})"
    strategies = {**STRATEGIES, default: Strategy(tpe(), asha(stopping["grace_period"],
                                                              stopping["reduction_factor"]), "space"), **sweep}
    warm = {"none": [], "space": spec.warm_start}
    if args.transfer_from:  # the default's sampler and rungs, warm-started from the other table's best
        for top in (1, 3, 5):
            warm[f"transfer {top}"] = transferred(args.curves, args.transfer_from, spec, top)
            strategies[f"default + {args.transfer_from}'s best {top}"] = replace(strategies[default],
                                                                                 warm_start=f"transfer {top}")
    logs = {name: [replay(table, spec, s, seed, args.trials, warm[s.warm_start]) for seed in range(args.seeds)]
            for name, s in strategies.items()}
    summary, ratios, median_spent = summarise(logs, "random (reference)")
    args.out.mkdir(parents=True, exist_ok=True)
    plot({n: logs[n] for n in logs if n not in sweep}, ratios, median_spent, table.metric,
         args.out / f"{args.task}.png")
    report = (f"# {args.task}: {args.trials} trials per search, {args.seeds} seeds, replayed on "
              f"benchmarks/curves/{args.task}.csv ({len(table.configs)} configurations; best {table.metric} "
              f"{table.best():.4f})\n\nCompute: fraction of random search's compute (no early stopping, same "
              f"seed, same trials; median {median_spent:.0f} trial-s). Best {table.metric} within a fraction of "
              f"it. Each: median [interquartile range] over seeds.\n\n{summary.to_markdown(index=False)}\n\n"
              f"command: python benchmarks/bench_search_efficiency.py {' '.join(sys.argv[1:])} (commit "
              f"{git_commit()}, optuna {optuna.__version__}); the table: benchmarks/curves/{args.task}.txt\n")
    (args.out / f"{args.task}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
