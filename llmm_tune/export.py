"""Export searches as reproducible tables: `python -m llmm_tune.export EXPERIMENT [EXPERIMENT ...]`.

Writes to `results/<task>/`: every trial (trials.csv); per (method, quantiser, rank) the trial
best on validation, scored once on the held-out split (GLUE dev, a test split) by its family
(table.md, table.tex, configs/<row>.yaml); the best of those (best.yaml); the first experiment's
optimisation history, parameter importances, learning curves and parallel coordinates (PNG). Several
experiments of one task (say --method llmm and --method loftq) share one table. Works on finished and
running experiments alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd
import pyarrow.fs as pafs
import yaml

from llmm_tune.cli import command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path, write_text
from llmm_tune.train.data import locate_source
from llmm_tune.train.progress import Progress
from llmm_tune.tune import storage
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import ExperimentRecord, read_record
from llmm_tune.tune.family import load_family
from llmm_tune.tune.spaces import SearchSpec

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

TABLE_KEYS = ("method", "quant_method", "bits", "rank", "task", "lr", "scale", "K")
VERSION_KEYS = ("torch", "transformers", "peft", "bitsandbytes", "ray", "optuna")
MIN_IMPORTANCE_TRIALS = 10  # importances from fewer trials are mostly noise
NAMED_CURVES = 10  # the learning curves drawn in colour and named in the legend, the best trials'; the rest grey


class Collected(NamedTuple):
    """What an experiment holds, read once: Ray's reading of every trial's reports grows with the trials."""

    meta: ExperimentRecord
    spec: SearchSpec  # the space as the experiment resolved it
    context: TrialContext  # what its trials were told
    trials: pd.DataFrame  # one row per trial
    checkpoints: dict  # trial id -> the checkpoint that stands for it
    histories: dict[str, pd.DataFrame]  # trial id -> its reports


def collect(experiment: str) -> Collected:
    """An experiment's record, trials, standing checkpoints and reports."""
    from ray.tune import ExperimentAnalysis

    meta = read_record(experiment)
    if meta is None:
        raise UsageError(f"{experiment} is not an llmm-tune experiment (no llmm_experiment.json); pass a folder "
                         "under the search's --storage")
    spec = meta.spec()
    context, fixed = meta.context(experiment), spec.fixed
    kept = "last" if context.selects == "last" else context.mode
    analysis = ExperimentAnalysis(experiment)
    rows, checkpoints = [], {}
    for trial in analysis.trials:
        last = trial.last_result or {}
        config = {**fixed, **trial.config}  # a trial's config holds what was searched (older ones: everything)
        clock, budget = context.recipe.clock(config, context)
        rows.append({"experiment": meta.name, "trial": trial.trial_id, "number": _trial_number(trial),
                     "status": trial.status, **config, "method": meta.method, "task": meta.task,
                     "evaluations": last.get("training_iteration", 0),
                     # the best of every report (a trial that failed after it reported keeps its score), or the
                     # last for a task sequence
                     context.value_key: trial.metric_analysis.get(context.value_key, {}).get(kept),
                     "failure": last.get("failure"), "seconds": last.get("time_total_s"),
                     # ended by ASHA before the end of its budget (as the console says it)
                     "stopped_early": trial.status == "TERMINATED" and last.get("failure") is None
                     and last.get(clock, budget) < budget,
                     "warm_start": meta.warm_start_origin(config),
                     "git_commit": meta.git_commit,
                     "versions": " ".join(f"{k}={meta.versions.get(k)}" for k in VERSION_KEYS),
                     "search_command": meta.command})
        checkpoint = analysis.get_best_checkpoint(trial, metric=context.value_key, mode=context.mode) \
            if trial.last_result else None
        if checkpoint is None and trial.last_result:
            checkpoint = train_checkpoint(analysis.trial_dataframes.get(trial.trial_id), context, experiment)
        # an unfinished trial's checkpoint may be gone (tune/trainable.py's StartsAgainWhenItsCheckpointIsGone says how)
        if checkpoint is not None and trial.status != "TERMINATED" and not storage.checkpoint_exists(checkpoint):
            print(f"trial {trial.trial_id} ({trial.status.lower()}): its checkpoint {checkpoint.path} is gone, so it "
                  "has no held-out score", file=sys.stderr)
        elif checkpoint is not None:
            checkpoints[trial.trial_id] = checkpoint
    return Collected(meta, spec, context, pd.DataFrame(rows).sort_values("number", kind="stable"), checkpoints,
                     analysis.trial_dataframes)


def train_checkpoint(results: pd.DataFrame | None, context: TrialContext, experiment: str):
    """The checkpoint that stands for a multi-worker trial, if still kept: its Ray Train run keeps them and
    reports each one's path (`checkpoint_path`, inside the experiment's filesystem) with the metrics. The best
    on the selection metric, or the latest for a task judged by its last report."""
    from ray.train import Checkpoint

    if results is None or "checkpoint_path" not in results:
        return None
    scored = results[results["checkpoint_path"].notna() & results[context.value_key].notna()]
    if context.selects == "last":
        ranked = scored.sort_values("training_iteration", ascending=False, kind="stable")
    else:
        ranked = scored.sort_values(context.value_key, ascending=context.mode == "min", kind="stable")
    fs = storage.filesystem(experiment)[0]
    for path in ranked["checkpoint_path"]:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return Checkpoint(path, filesystem=fs)
    return None


def _trial_number(trial) -> int:
    """The order in which the searcher proposed the trial (Tune's tag starts with it: `3_K=1,...`)."""
    head = trial.experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def best_row(trials: pd.DataFrame, column: str, mode: str) -> pd.Series:
    """The row of `trials` whose `column` is best in direction `mode` (NaN rows never chosen)."""
    scored = trials[trials[column].notna()]
    return scored.loc[(scored[column] if mode == "max" else -scored[column]).idxmax()]


def data_source(meta: ExperimentRecord) -> str:
    """The search's data on this machine: its folder if still there, else as the record names it."""
    if meta.data_dir and Path(meta.data_dir).is_dir():
        return meta.data_dir
    return str(locate_source(meta.data))


def score_held_out(config: dict, checkpoint, meta: ExperimentRecord, experiment: str) -> dict[str, float]:
    """The held-out metrics of a checkpoint: only the export and `reproduce` ever read that split."""
    context = meta.context(experiment)
    with checkpoint.as_directory() as directory:
        return context.recipe.score(config, context, directory, data_source(meta))


def trial_config(best: pd.Series, meta: ExperimentRecord) -> dict:
    """The trial's settings, as its family names them."""
    settings = load_family(meta.family).SETTINGS
    return {k: _plain(best[k]) for k in settings if k in best}


def reproduction_record(best: pd.Series, meta: ExperimentRecord, held_out: dict, path: Path) -> dict:
    """Everything needed to re-train `best` and check its numbers, as written to `path`."""
    config = trial_config(best, meta)
    split = load_family(meta.family).HELD_OUT
    return {
        "family": meta.family, "task": meta.task, "method": meta.method, "experiment": best["experiment"],
        "trial": best["trial"], "config": config,
        "validation": {"metric": meta.metric, "mode": meta.mode, "value": _plain(best[f"val_{meta.metric}"]),
                       "split": f"{config['validation_size']} of train, seed {meta.seed}, nothing of {split}"},
        "held_out": {"split": split, "scores": held_out},
        "data": {"source": meta.data, "validation_seed": meta.seed, **dataset_record(meta.space_yaml)},
        "seed": config["seed"], "trust_remote_code": meta.trust_remote_code,
        "git_commit": meta.git_commit, "versions": meta.versions,
        "search_command": meta.command,
        "reproduce": f"python -m llmm_tune.reproduce {relative_to_cwd(path)} --seeds {config['seed']}",
    }


def dataset_record(space_yaml: str) -> dict:
    """The user's data as the search resolved it (files named portably, their content hashes), when it had its own."""
    dataset = TrialContext.dataset_in(space_yaml)
    return {} if dataset is None else {"dataset": json.loads(dataset)}


def relative_to_cwd(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it, as a user would type it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _plain(value):
    """numpy scalars and NaN as plain YAML values."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and value != value else value


def latex(table: pd.DataFrame, records: list[dict], caption: str) -> str:
    def cell(value) -> str:
        return str(value).replace("_", r"\_").replace("%", r"\%")

    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(table.columns) + "}",
             r"\toprule", " & ".join(cell(c) for c in table.columns) + r" \\", r"\midrule"]
    for (_, row), record in zip(table.iterrows(), records):
        lines.append(" & ".join(cell(v) for v in row) + r" \\")
        lines.append(f"% reproduce: {record['reproduce']} | commit {record['git_commit']} | "
                     + " ".join(f"{k}={record['versions'].get(k)}" for k in VERSION_KEYS))
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{cell(caption)}}}", r"\end{table}", ""]
    return "\n".join(lines)


def plots(trials: pd.DataFrame, found: Collected, out: Path) -> list[str]:
    """The experiment's optimisation history, parameter importances, learning curves and configurations in
    parallel coordinates; a plot that cannot be drawn is skipped, saying why. Returns what was written, with a
    caution for importances that rest on few trials."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    meta, spec = found.meta, found.spec
    own, column = trials[trials["experiment"] == meta.name], f"val_{meta.metric}"
    clock, budget = spec.recipe.clock(spec.fixed, found.context)
    study = rebuilt_study(own, meta, spec.distributions())
    few = len(study.trials) < MIN_IMPORTANCE_TRIALS
    caution = f" (on {len(study.trials)} trials: too few to trust)" if few else ""
    rungs = asha_rungs(spec.early_stopping, budget) if meta.early_stopping else []
    draws = {"history.png": lambda: history_figure(own, column, meta.mode),
             "importance.png": lambda: importance_figure(study, column, caution),
             "curves.png": lambda: curves_figure(found.histories, own, column, clock, rungs, meta.mode),
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
                with atomic_path(out / name) as tmp:
                    figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            pyplot.close(figure)
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


def rebuilt_study(trials: pd.DataFrame, meta: ExperimentRecord, distributions: dict) -> optuna.Study:
    """An in-memory Optuna study of the scored trials (settings and value), for Optuna's plots: it holds what the
    export reads, wherever the search kept its own study."""
    import optuna

    study = optuna.create_study(direction="maximize" if meta.mode == "max" else "minimize",
                                study_name=f"{meta.task} {meta.method}")
    column = f"val_{meta.metric}"
    for _, row in trials[trials[column].notna()].iterrows():
        study.add_trial(optuna.trial.create_trial(params={k: _plain(row[k]) for k in distributions},
                                                  distributions=distributions, value=float(row[column])))
    return study


def history_figure(trials: pd.DataFrame, column: str, mode: str) -> Figure:
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
    best = scored[column].cummax() if mode == "max" else scored[column].cummin()
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
                  rungs: list[float], mode: str) -> Figure:
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
    curves.sort(key=lambda curve: (pd.isna(curve[0][column]), curve[0][column] * (1 if mode == "min" else -1)))
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


def export(experiments: list[str], results: Path) -> Path:
    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    experiments = [storage.resolve(e) for e in experiments]
    collected = [collect(e) for e in experiments]
    metas = [found.meta for found in collected]
    tasks = {(m.family, m.task, m.metric) for m in metas}
    if len(tasks) != 1:
        raise UsageError(f"experiments mix tasks or selection metrics {sorted(tasks)}; export one at a time")
    out = results / metas[0].task
    trials = pd.concat([found.trials for found in collected], ignore_index=True)
    with atomic_path(out / "trials.csv") as tmp:
        trials.to_csv(tmp, index=False)
    chosen = table_rows(experiments, collected)
    shown, records = write_records(chosen, out)
    write_tables(shown, records, chosen[0], out)
    written = plots(trials, collected[0], out)
    print(f"exported {len(trials)} trials of {len(experiments)} experiment(s) to {out}: trials.csv, table.md, "
          f"table.tex, best.yaml, configs/, {', '.join(written)}")
    print(shown.drop(columns=["reproduce", "commit"]).to_string(index=False))
    return out


def table_rows(experiments: list[str], collected: list[Collected]) -> list[tuple]:
    """Per experiment, quantiser and rank, the trial best on validation with its held-out scores: (validation
    score, trial row, record, held-out scores), best first."""
    meta = collected[0].meta
    value, mode = f"val_{meta.metric}", meta.mode
    picks = []  # (trial row, record, experiment, checkpoint)
    for experiment, found in zip(experiments, collected):
        df, checkpoints = found.trials, found.checkpoints
        scored = df[df[value].notna() & df["trial"].isin(checkpoints)]
        for _, group in scored.fillna({"bits": -1, "quant_method": "-"}).groupby(["quant_method", "bits", "rank"]):
            best = df.loc[best_row(group, value, mode).name]  # the row as collected (group holds fill values)
            picks.append((best, found.meta, experiment, checkpoints[best["trial"]]))
    if not picks:
        raise UsageError(f"no trial of {', '.join(str(e) for e in experiments)} has a checkpoint yet; "
                         "export again once trials have reported")
    chosen = []
    with Progress(f"export: scoring the held-out split ({load_family(meta.family).HELD_OUT}), rows", len(picks)) \
            as progress:
        for best, meta, experiment, checkpoint in picks:
            held_out = score_held_out(trial_config(best, meta), checkpoint, meta, experiment)
            chosen.append((best[value], best, meta, held_out))
            progress.advance()
    return sorted(chosen, key=lambda item: -item[0] if mode == "max" else item[0])


def write_records(chosen: list[tuple], out: Path) -> tuple[pd.DataFrame, list[dict]]:
    """Each row's reproduction record (configs/<row>.yaml; the best one also as best.yaml); the table as shown."""
    meta = chosen[0][2]
    metric, split = meta.metric, load_family(meta.family).HELD_OUT
    rows, records = [], []
    for _, best, meta, held_out in chosen:
        row_id = f"{meta.method}-{best['quant_method'] or 'fp'}-{best['bits'] or 'fp'}-r{best['rank']}"
        record = reproduction_record(best, meta, held_out, out / "configs" / f"{row_id}.yaml")
        write_text(out / "configs" / f"{row_id}.yaml", yaml.safe_dump(record, sort_keys=False))
        records.append(record)
        numbers = [k for k, v in held_out.items() if isinstance(v, (int, float))]  # the rest: held_out_details
        first = [metric] if metric in numbers else []
        rows.append({**{k: _plain(best.get(k)) for k in TABLE_KEYS}, f"val {metric}": best[f"val_{metric}"],
                     **{f"{split} {k}": held_out[k] for k in first + [k for k in numbers if k not in first]},
                     "seed": best["seed"], "trial": best["trial"],
                     "commit": meta.git_commit[:12] + ("-dirty" if meta.git_commit.endswith("-dirty") else ""),
                     "reproduce": record["reproduce"]})
    _, best, meta, held_out = chosen[0]
    write_text(out / "best.yaml", yaml.safe_dump(reproduction_record(best, meta, held_out, out / "best.yaml"),
                                                 sort_keys=False))
    table = pd.DataFrame(rows)
    return table.assign(lr=table["lr"].map("{:.1e}".format),
                        scale=table["scale"].map(lambda value: setting_text(value, "{:g}")),
                        **{c: table[c].map("{:.4f}".format) for c in table if c.startswith(("val ", f"{split} "))}), \
        records


def write_tables(shown: pd.DataFrame, records: list[dict], first: tuple, out: Path) -> None:
    """table.md (with the family's details of the best configuration) and table.tex."""
    _, best, meta, held_out = first
    task, split = meta.task, load_family(meta.family).HELD_OUT
    versions = " ".join(f"{k}={meta.versions.get(k)}" for k in VERSION_KEYS)
    direction = "higher" if meta.mode == "max" else "lower"
    details = getattr(load_family(meta.family), "held_out_details", None)
    best_details = f"\n\n## The best configuration ({best['trial']}) on {split}\n\n{details(held_out)}" \
        if details else ""
    write_text(out / "table.md", f"# {task}: best configuration per method, quantiser and rank\n\n"
               f"Selected on validation (val_{meta.metric}, {direction} is better, carved from train); {split} scored "
               f"once, here.\n\n" + shown.to_markdown(index=False) + best_details + f"\n\nVersions: {versions}\n")
    write_text(out / "table.tex", latex(shown.drop(columns=["reproduce"]), records,
                                        f"{task}: best validation configuration per method, quantiser and "
                                        f"rank; {split} scored once. {versions}"))


def setting_text(value, form: str = "{}") -> str:
    """A setting as table text, "-" where the method has none (None or NaN: lora's bits, scale)."""
    return "-" if value is None or value != value else form.format(value)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__)
    parser.add_argument("experiments", nargs="+", help="experiment folders (under the search's --storage)")
    parser.add_argument("--results", default="results", help="output root")
    return parser


def run(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    return export(args.experiments, Path(args.results))


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
