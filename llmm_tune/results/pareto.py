"""A multi-objective search's export (`search --objectives`): every trial's objectives with the non-dominated ones
marked (pareto.md), the first two objectives drawn with the front highlighted (pareto.png), a record of each
trial on the front (configs/trial-<id>.yaml, which `reproduce --trial ID` trains again), and best.yaml for the
trial the pick rule chooses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmm_tune.files import write_text
from llmm_tune.results.collect import Collected, score_held_out, trial_config
from llmm_tune.results.plots import save_figure
from llmm_tune.results.record import TRIAL_RECORD, ExportRecord, relative_to_cwd
from llmm_tune.tune.objectives import Objective

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PICK_WITHIN = 0.01  # the pick rule's window on the first objective, absolute


def non_dominated(table: pd.DataFrame, objectives: list[Objective]) -> pd.Series:
    """Per row of `table`, whether it is on the Pareto front: it has every objective's value and no other such row is
    at least as good on every objective and better on one."""
    values = table[[objective.key for objective in objectives]].astype(float)
    complete = values.notna().all(axis=1).to_numpy()
    signs = np.array([1.0 if objective.direction.maximises else -1.0 for objective in objectives])
    points = values.to_numpy() * signs  # every objective as one to maximise
    rivals = points[complete]
    front = [bool(whole) and not ((rivals >= point).all(axis=1) & (rivals > point).any(axis=1)).any()
             for point, whole in zip(points, complete)]
    return pd.Series(front, index=table.index)


def pick_rule(objectives: list[Objective]) -> str:
    """How best.yaml's trial is picked, in words (pareto.md, the export's line)."""
    first, second = objectives[:2]
    return (f"among the trials within {PICK_WITHIN} (absolute) of the best {first.key}, the one best on "
            f"{second.key} (ties: the better {first.key})")


def pick(table: pd.DataFrame, objectives: list[Objective]):
    """The index label of the row `pick_rule` chooses among the front of `table` (None: no row has every value)."""
    first, second = objectives[:2]
    front = table[non_dominated(table, objectives)]
    if front.empty:
        return None
    best = front[first.key].max() if first.direction.maximises else front[first.key].min()
    near = front[(front[first.key] - best).abs() <= PICK_WITHIN + 1e-12]
    ranks = pd.DataFrame({"second": near[second.key].map(second.direction.rank_key),
                          "first": near[first.key].map(first.direction.rank_key)})
    return ranks.sort_values(["second", "first"], kind="stable").index[0]


def export_pareto(trials: pd.DataFrame, collected: list[Collected], experiments: list[str], scored: dict,
                  out: Path) -> str:
    """pareto.md, pareto.png, configs/trial-<id>.yaml for each trial of the front, and best.yaml for the one the
    pick rule chooses (held-out scores from `scored`, {(experiment name, trial id): scores}, else scored here);
    what the export's line says of them ("" for a search without objectives, which writes none)."""
    objectives = collected[0].meta.objective_list
    if not objectives:
        return ""
    found = {c.meta.name: (c, experiment) for c, experiment in zip(collected, experiments)}
    front = non_dominated(trials, objectives)
    standing = [trial in found[name][0].checkpoints for name, trial in zip(trials["experiment"], trials["trial"])]
    label = pick(trials[standing], objectives)
    if label is None:
        return f"; no trial with a checkpoint has a value of every objective ({', '.join(o.key for o in objectives)})"
    picked = trials.loc[label]
    for _, row in trials[front].iterrows():
        path = out / TRIAL_RECORD.format(row["trial"])
        ExportRecord.of_trial(row, found[row["experiment"]][0].meta, {}, path).write(path)
    source, experiment = found[picked["experiment"]]
    held_out = scored.get((picked["experiment"], picked["trial"]))
    if held_out is None:
        held_out = score_held_out(trial_config(picked, source.meta), source.checkpoints[picked["trial"]],
                                  source.meta, experiment)
    for path in (out / "best.yaml", out / TRIAL_RECORD.format(picked["trial"])):
        ExportRecord.of_trial(picked, source.meta, held_out, path).write(path)
    write_text(out / "pareto.md", pareto_markdown(trials, objectives, front, picked, out))
    save_figure(pareto_figure(trials, objectives, front, picked), out / "pareto.png")
    return f", pareto.md, pareto.png; best.yaml: {pick_rule(objectives)}: trial {picked['trial']}"


def pareto_markdown(trials: pd.DataFrame, objectives: list[Objective], front: pd.Series, picked: pd.Series,
                    out: Path) -> str:
    """Every trial's objectives, the front first, with the pick rule and how to train a point of the front again."""
    keys = [objective.key for objective in objectives]
    table = trials.assign(front=front.map({True: "yes", False: ""}),
                          picked=(trials["trial"] == picked["trial"]).map({True: "best.yaml", False: ""}))
    order = table[keys[0]].map(objectives[0].direction.rank_key)
    table = table.assign(order=order, off=~front).sort_values(["off", "order"], kind="stable")
    shown = table[["trial", "number", "method", "status", *keys, "front", "picked"]]
    shown = shown.assign(**{key: shown[key].map(lambda v: "" if v != v else f"{v:.4f}") for key in keys})
    task = trials["task"].iloc[0]
    return (f"# {task}: the Pareto front of {', '.join(objective.words for objective in objectives)}\n\n"
            "Every trial with its value of each objective at the report that stands for it (its best "
            f"{keys[0]}). A trial on the front (`front`: yes) is non-dominated: no other trial is at least as good "
            "on every objective and better on one.\n\n"
            f"Pick rule (best.yaml): {pick_rule(objectives)}: trial {picked['trial']}.\n\n"
            f"Each trial of the front has its record, configs/trial-<ID>.yaml; train one again with `python -m "
            f"llmm_tune.reproduce {relative_to_cwd(out / 'best.yaml')} --trial ID --seeds 0 1 2`.\n\n"
            + shown.to_markdown(index=False) + "\n")


def point_labels(drawn: pd.DataFrame, x: str, y: str) -> dict[tuple[float, float], str]:
    """One label per place on the plot, naming every trial drawn there: a trial within a hundredth of the axes'
    spans of a labelled one (untrained classifiers often tie) joins its label, where its own would overprint."""
    spans = [max(float(drawn[key].max() - drawn[key].min()), 1e-12) for key in (x, y)]
    labels: dict[tuple[float, float], list[str]] = {}
    for _, row in drawn.iterrows():
        place = (float(row[x]), float(row[y]))
        near = next((at for at in labels if all(abs(a - b) <= span / 100 for a, b, span in zip(at, place, spans))),
                    place)
        labels.setdefault(near, []).append(str(row["trial"]))
    return {place: ", ".join(trials) for place, trials in labels.items()}


def pareto_figure(trials: pd.DataFrame, objectives: list[Objective], front: pd.Series, picked: pd.Series) -> Figure:
    """The first two objectives of every trial that has them, the front highlighted, each point labelled by its
    trial id and best.yaml's ringed."""
    from matplotlib import pyplot

    x, y = objectives[0], objectives[1]
    drawn = trials[trials[x.key].notna() & trials[y.key].notna()]
    on = front[drawn.index]
    over = f" (over all {len(objectives)} objectives)" if len(objectives) > 2 else ""
    with pyplot.style.context("default"):
        figure, axes = pyplot.subplots(figsize=(6.4, 4.8))
        axes.scatter(drawn[x.key][~on], drawn[y.key][~on], color="tab:grey", label="dominated")
        axes.scatter(drawn[x.key][on], drawn[y.key][on], color="tab:red", zorder=3, label=f"Pareto front{over}")
        axes.scatter([picked[x.key]], [picked[y.key]], s=180, facecolors="none", edgecolors="black", zorder=4,
                     label="best.yaml (the pick rule)")
        for (at_x, at_y), label in point_labels(drawn, x.key, y.key).items():
            axes.annotate(label, (at_x, at_y), xytext=(4, 4), textcoords="offset points", fontsize="x-small")
        axes.margins(0.08)  # room for the labels of the points at the edges
        axes.set(xlabel=x.words, ylabel=y.words, title="Trials and their Pareto front")
        axes.legend(fontsize="small")
    return figure
