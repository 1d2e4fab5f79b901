"""The export's plots of an experiment: optimisation history, parameter importances, learning curves with ASHA's
rungs, and configurations in parallel coordinates."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from llmm_tune.files import atomic_path
from llmm_tune.results.collect import Collected, plain
from llmm_tune.tune.direction import Direction

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

MIN_IMPORTANCE_TRIALS = 10  # importances from fewer trials are mostly noise
NAMED_CURVES = 10  # the learning curves drawn in colour and named in the legend, the best trials'; the rest grey


def plots(trials: pd.DataFrame, found: Collected, out: Path) -> list[str]:
    """The experiment's optimisation history, parameter importances, learning curves and configurations in
    parallel coordinates; a plot that cannot be drawn is skipped, saying why. Returns what was written, with a
    caution for importances that rest on few trials."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    meta, spec, direction = found.meta, found.spec, found.context.direction
    own, column = trials[trials["experiment"] == meta.name], found.context.value_key
    clock, budget = spec.recipe.clock(spec.fixed, found.context)
    study = rebuilt_study(own, column, direction, f"{meta.task} {meta.method}", spec.distributions())
    few = len(study.trials) < MIN_IMPORTANCE_TRIALS
    caution = f" (on {len(study.trials)} trials: too few to trust)" if few else ""
    rungs = asha_rungs(spec.early_stopping, budget) if meta.early_stopping else []
    draws = {"history.png": lambda: history_figure(own, column, direction),
             "importance.png": lambda: importance_figure(study, column, caution),
             "curves.png": lambda: curves_figure(found.histories, own, column, clock, rungs, direction),
             "parallel.png": lambda: parallel_figure(study, column, len(spec.space))}
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API and few-trials notices: the plots are still right
        for name, draw in draws.items():
            with pyplot.style.context("default"):  # Optuna's plots would leave their style (ggplot) to the next
                try:
                    figure = draw()
                except (ValueError, RuntimeError) as error:  # e.g. importances need 2+ varied trials
                    print(f"skipped {name}: {error}")
                    continue
                save_figure(figure, out / name)
            written.append(name + (caution if name == "importance.png" else ""))
    return written


def parallel_figure(study: optuna.Study, column: str, settings: int) -> Figure:
    """Optuna's parallel coordinates with room per axis (one axis's labels, normal_float, clear the next's) and
    its lines in the darker 55% of its colour map: Blues' light end drew the worst trials white on white."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from optuna.visualization import matplotlib as optuna_plots

    figure = optuna_plots.plot_parallel_coordinate(study, target_name=column).figure
    coloured = (c for axes in figure.axes for c in axes.collections
                if isinstance(c, LineCollection) and c.get_array() is not None)  # not the colour bar's outline
    for lines in coloured:
        cmap = lines.get_cmap()
        span = (0.45, 1.0) if sum(cmap(0.0)[:3]) > sum(cmap(1.0)[:3]) else (0.0, 0.55)  # the light end first?
        lines.set_cmap(ListedColormap(cmap(np.linspace(*span, 256))))
    figure.set_size_inches(1.8 * (settings + 1) + 1.5, 4.8)
    return figure


def rebuilt_study(trials: pd.DataFrame, column: str, direction: Direction, name: str,
                  distributions: dict) -> optuna.Study:
    """An in-memory Optuna study of the scored trials (settings and `column`'s value), for Optuna's plots: it holds
    what the export reads, wherever the search kept its own study."""
    import optuna

    study = optuna.create_study(direction=direction.optuna, study_name=name)
    for _, row in trials[trials[column].notna()].iterrows():
        study.add_trial(optuna.trial.create_trial(params={k: plain(row[k]) for k in distributions},
                                                  distributions=distributions, value=float(row[column])))
    return study


def history_figure(trials: pd.DataFrame, column: str, direction: Direction) -> Figure:
    """Each scored trial's value by its number in trials.csv, those ASHA stopped early marked apart, and the best so
    far (Optuna's own history numbers the trials from 0 and knows no early stopping)."""
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    scored = trials[trials[column].notna()].sort_values("number")
    stopped = scored["stopped_early"].astype(bool)
    figure, axes = pyplot.subplots(figsize=(6.4, 4))
    axes.scatter(scored["number"][~stopped], scored[column][~stopped], label="trial")
    axes.scatter(scored["number"][stopped], scored[column][stopped], marker="x", color="tab:orange",
                 label="stopped early by ASHA")
    best = direction.best_so_far(scored[column])
    axes.step(scored["number"], best, where="post", color="tab:red", label="best so far")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="trial (trials.csv number)", ylabel=column, title="Optimisation history")
    axes.legend()
    return figure


def importance_figure(study: optuna.Study, column: str, caution: str) -> Figure:
    """Optuna's parameter importances, the caution (importances from few trials) in the title."""
    from optuna.visualization import matplotlib as optuna_plots

    axes = optuna_plots.plot_param_importances(study, target_name=column)
    axes.set_title(axes.get_title(loc="left") + caution, loc="left")  # where Optuna puts its title
    return axes.figure


def curves_figure(histories: dict[str, pd.DataFrame], trials: pd.DataFrame, column: str, clock: str,
                  rungs: list[float], direction: Direction) -> Figure:
    """Each trial's value at each report against the family's clock, one line per trial (the NAMED_CURVES best in
    colour and in the legend, the others grey: a legend of hundreds says nothing), with ASHA's rungs (where it may
    stop a trial) as vertical lines."""
    from matplotlib import pyplot
    from matplotlib.collections import LineCollection

    curves = []  # (trial row, its scored reports)
    for _, trial in trials.iterrows():
        reports = histories.get(trial["trial"])
        if reports is not None and column in reports:
            curves.append((trial, reports[reports[column].notna()]))
    curves.sort(key=lambda curve: direction.rank_key(curve[0][column]))
    figure, axes = pyplot.subplots(figsize=(6.4, 4))
    others = [reports[[clock, column]].to_numpy() for _, reports in curves[NAMED_CURVES:]]
    if others:
        axes.add_collection(LineCollection(others, colors="lightgrey", linewidths=0.8,
                                           label=f"{len(others)} other trials"))
    for trial, reports in curves[:NAMED_CURVES]:
        axes.plot(reports[clock], reports[column], marker=".", label=f"trial {trial['number']}")
    for milestone in rungs:
        axes.axvline(milestone, color="grey", linestyle=":", linewidth=1)
    axes.autoscale_view()
    axes.set(xlabel=clock, ylabel=column, title="Learning curves" + (" (dotted: ASHA's rungs)" if rungs else ""))
    axes.legend(fontsize="small", ncol=2)
    return figure


def asha_rungs(stopping: dict, budget: float) -> list[float]:
    """Where ASHA may stop a trial, as Ray's ASHAScheduler places its rungs: grace_period times each power of
    reduction_factor, below the budget."""
    rungs, milestone = [], stopping["grace_period"]
    while milestone < budget:
        rungs.append(milestone)
        milestone *= stopping["reduction_factor"]
    return rungs


def reliability_plot(held_out: dict, split: str, out: Path) -> list[str]:
    """reliability.png for a classifier's best configuration (its held-out scores carry `reliability` bins): the
    held-out split's and each shift set's accuracy against confidence per bin, and the bins' counts; [] otherwise."""
    if "reliability" not in held_out:
        return []
    from matplotlib import pyplot

    sets = {split: held_out["reliability"], **{f"{name} (shift)": found["reliability"] for name, found in
                                               held_out.get("shift", {}).items()}}
    with pyplot.style.context("default"):
        save_figure(reliability_figure(sets), out / "reliability.png")
    return ["reliability.png"]


def save_figure(figure: Figure, path: Path) -> None:
    """`figure` as a PNG at `path`, written crash-safe, then closed."""
    from matplotlib import pyplot

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot.close(figure)


def reliability_figure(sets: dict[str, dict]) -> Figure:
    """Top: each set's accuracy against its mean confidence per bin (a calibrated model lies on the diagonal);
    bottom: the predictions per bin (llmm_tune.train.calibration's equal-width bins)."""
    from matplotlib import pyplot

    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(6.4, 6), sharex=True, height_ratios=(2, 1))
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    width = 1 / len(next(iter(sets.values()))["upper"]) / len(sets)
    for i, (name, bins) in enumerate(sets.items()):
        filled = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None]
        top.plot([c for c, _ in filled], [a for _, a in filled], marker="o", label=name)
        edges = [upper - 1 / len(bins["upper"]) + i * width for upper in bins["upper"]]
        bottom.bar(edges, bins["count"], width=width, align="edge", label=name)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability (top-label confidence, 15 bins)")
    top.legend(fontsize="small")
    bottom.set(xlabel="confidence", ylabel="predictions")
    return figure
