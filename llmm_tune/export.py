"""Export searches as reproducible tables: `python -m llmm_tune.export EXPERIMENT [EXPERIMENT ...]`.

Writes to `results/<task>/`: every trial (trials.csv); per (method, quantiser, rank) the trial
best on validation, scored once on the held-out split (GLUE dev, a test split) by its family
(table.md, table.tex, configs/<row>.yaml); the best of those (best.yaml); Optuna's optimisation
history and parameter importances (PNG). Several experiments of one task (say --method llmm and
--method loftq) share one table. Works on finished and running experiments alike.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path, write_text
from llmm_tune.train.data import locate_source
from llmm_tune.tune import storage
from llmm_tune.tune.experiment import read_metadata
from llmm_tune.tune.family import load_family

TABLE_KEYS = ("method", "quant_method", "bits", "rank", "task", "lr", "scale", "K")
VERSION_KEYS = ("torch", "transformers", "peft", "bitsandbytes", "ray", "optuna")


def collect(experiment: str) -> tuple[dict, pd.DataFrame, dict]:
    """(metadata, one row per trial, trial id -> best checkpoint path) of an experiment."""
    from ray.tune import ExperimentAnalysis

    meta = read_metadata(experiment)
    if meta is None:
        raise UsageError(f"{experiment} is not an llmm-tune experiment (no llmm_experiment.json); pass a folder "
                         "under the search's --storage")
    metric, mode = meta["metric"], meta["mode"]
    kept = "last" if load_family(meta["family"]).TASKS[meta["task"]].selects == "last" else mode
    analysis = ExperimentAnalysis(experiment)
    rows, checkpoints = [], {}
    for trial in analysis.trials:
        last = trial.last_result or {}
        row = {"experiment": meta["name"], "trial": trial.trial_id, "number": _trial_number(trial),
               "status": trial.status,
               **{k: trial.config.get(k) for k in trial.config if k not in ("task", "metric", "mode")},
               "method": meta["method"], "task": meta["task"], "evaluations": last.get("training_iteration", 0),
               # the best of every report (a trial that failed after it reported keeps its score), or the
               # last for a task sequence
               f"val_{metric}": trial.metric_analysis.get(f"val_{metric}", {}).get(kept),
               "failure": last.get("failure"),
               "seconds": last.get("time_total_s"), "git_commit": meta["git_commit"],
               "versions": " ".join(f"{k}={meta['versions'].get(k)}" for k in VERSION_KEYS),
               "search_command": meta["command"]}
        rows.append(row)
        checkpoint = analysis.get_best_checkpoint(trial, metric=f"val_{metric}", mode=mode) \
            if trial.last_result else None
        if checkpoint is None and trial.last_result:
            checkpoint = train_checkpoint(analysis.trial_dataframes.get(trial.trial_id), metric, mode, experiment)
        if checkpoint is not None:
            checkpoints[trial.trial_id] = checkpoint
    return meta, pd.DataFrame(rows).sort_values("number", kind="stable"), checkpoints


def train_checkpoint(results: pd.DataFrame | None, metric: str, mode: str, experiment: str):
    """The best checkpoint of a multi-worker trial still kept: its Ray Train run keeps them and reports each
    one's path (`checkpoint_path`, inside the experiment's filesystem) with the metrics."""
    from ray.train import Checkpoint

    if results is None or "checkpoint_path" not in results:
        return None
    scored = results[results["checkpoint_path"].notna() & results[f"val_{metric}"].notna()]
    fs = storage.filesystem(experiment)[0]
    for path in scored.sort_values(f"val_{metric}", ascending=mode == "min", kind="stable")["checkpoint_path"]:
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


def data_source(meta: dict) -> str:
    """The search's data on this machine: its folder if still there, else as the record names it."""
    if meta.get("data_dir") and Path(meta["data_dir"]).is_dir():
        return meta["data_dir"]
    return str(locate_source(meta["data"]))


def score_held_out(config: dict, checkpoint, meta: dict, experiment: str) -> dict[str, float]:
    """The held-out metrics of a checkpoint: only the export and `reproduce` ever read that split."""
    from llmm_tune.tune.trainable import LOFTQ_CACHE

    config = {**config, "trust_remote_code": meta.get("trust_remote_code", False),
              "loftq_cache": storage.join(experiment, LOFTQ_CACHE)}
    with checkpoint.as_directory() as directory:
        return load_family(meta["family"]).score(config, directory, data_source(meta))


def trial_config(best: pd.Series, meta: dict) -> dict:
    settings = load_family(meta["family"]).SETTINGS
    return {k: _plain(best[k]) for k in settings if k in best} | {
        "task": meta["task"], "metric": meta["metric"], "mode": meta["mode"]}


def reproduction_record(best: pd.Series, meta: dict, held_out: dict, path: Path) -> dict:
    """Everything needed to re-train `best` and check its numbers, as written to `path`."""
    config = trial_config(best, meta)
    split = load_family(meta["family"]).HELD_OUT
    return {
        "family": meta["family"], "task": meta["task"], "method": meta["method"], "experiment": best["experiment"],
        "trial": best["trial"], "config": config,
        "validation": {"metric": meta["metric"], "mode": meta["mode"], "value": _plain(best[f"val_{meta['metric']}"]),
                       "split": f"{config['validation_size']} of train, seed {meta['seed']}, nothing of {split}"},
        "held_out": {"split": split, "scores": held_out},
        "data": {"source": meta["data"], "validation_seed": meta["seed"]},
        "seed": config["seed"], "trust_remote_code": meta.get("trust_remote_code", False),
        "git_commit": meta["git_commit"], "versions": meta["versions"],
        "search_command": meta["command"],
        "reproduce": f"python -m llmm_tune.reproduce {relative_to_cwd(path)} --seeds {config['seed']}",
    }


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


def plots(trials: pd.DataFrame, metas: list[dict], out: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances, from a study rebuilt from the trials."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    from llmm_tune.tune.spaces import load_spec

    meta = metas[0]
    spec = load_spec(meta["space"], meta["profile"], meta["method"], meta["num_samples"], text=meta["space_yaml"])
    distributions = spec.distributions()
    study = optuna.create_study(direction="maximize" if meta["mode"] == "max" else "minimize",
                                study_name=f"{meta['task']} {meta['method']}")
    value_column = f"val_{meta['metric']}"
    for _, row in trials[trials["experiment"] == trials["experiment"].iloc[0]].iterrows():
        if pd.isna(row[value_column]):
            continue
        params = {k: _plain(row[k]) for k in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row[value_column])))
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API and few-trials notices: the plots are still right
        for name, draw in (("history.png", optuna_plots.plot_optimization_history),
                           ("importance.png", optuna_plots.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances need 2+ varied trials
                print(f"skipped {name}: {error}")
                continue
            with atomic_path(out / name) as tmp:
                axes.figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            matplotlib.pyplot.close(axes.figure)
            written.append(name)
    return written


def export(experiments: list[str], results: Path) -> Path:
    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    experiments = [storage.resolve(e) for e in experiments]
    collected = [collect(e) for e in experiments]
    metas = [m for m, _, _ in collected]
    tasks = {(m["family"], m["task"], m["metric"]) for m in metas}
    if len(tasks) != 1:
        raise UsageError(f"experiments mix tasks or selection metrics {sorted(tasks)}; export one at a time")
    task, metric, mode = metas[0]["task"], metas[0]["metric"], metas[0]["mode"]
    split = load_family(metas[0]["family"]).HELD_OUT
    out = results / task
    trials = pd.concat([df for _, df, _ in collected], ignore_index=True)
    with atomic_path(out / "trials.csv") as tmp:
        trials.to_csv(tmp, index=False)

    value = f"val_{metric}"
    sign = 1 if mode == "max" else -1
    chosen = []  # (validation score, best trial row, metadata, held-out scores) per table row
    for experiment, (meta, df, checkpoints) in zip(experiments, collected):
        scored = df[df[value].notna() & df["trial"].isin(checkpoints)]
        for _, group in scored.fillna({"bits": -1, "quant_method": "-"}).groupby(["quant_method", "bits", "rank"]):
            best = df.loc[best_row(group, value, mode).name]  # the row as collected (group holds fill values)
            held_out = score_held_out(trial_config(best, meta), checkpoints[best["trial"]], meta, experiment)
            chosen.append((best[value], best, meta, held_out))
    if not chosen:
        raise UsageError(f"no trial of {', '.join(str(e) for e in experiments)} has a checkpoint yet; "
                         "export again once trials have reported")
    chosen.sort(key=lambda item: -sign * item[0])
    rows, records = [], []
    for _, best, meta, held_out in chosen:
        row_id = f"{meta['method']}-{best['quant_method'] or 'fp'}-{best['bits'] or 'fp'}-r{best['rank']}"
        record = reproduction_record(best, meta, held_out, out / "configs" / f"{row_id}.yaml")
        write_text(out / "configs" / f"{row_id}.yaml", yaml.safe_dump(record, sort_keys=False))
        records.append(record)
        numbers = [k for k, v in held_out.items() if isinstance(v, (int, float))]  # the rest: held_out_details
        first = [metric] if metric in numbers else []
        rows.append({**{k: _plain(best.get(k)) for k in TABLE_KEYS}, f"val {metric}": best[value],
                     **{f"{split} {k}": held_out[k] for k in first + [k for k in numbers if k not in first]},
                     "seed": best["seed"], "trial": best["trial"],
                     "commit": meta["git_commit"][:12] + ("-dirty" if meta["git_commit"].endswith("-dirty") else ""),
                     "reproduce": record["reproduce"]})
    _, best, meta, held_out = chosen[0]
    write_text(out / "best.yaml", yaml.safe_dump(reproduction_record(best, meta, held_out, out / "best.yaml"),
                                                 sort_keys=False))
    table = pd.DataFrame(rows)
    shown = table.assign(lr=table["lr"].map("{:.1e}".format),
                         scale=table["scale"].map(lambda value: setting_text(value, "{:g}")),
                         **{c: table[c].map("{:.4f}".format) for c in table if c.startswith(("val ", f"{split} "))})
    versions = " ".join(f"{k}={metas[0]['versions'].get(k)}" for k in VERSION_KEYS)
    direction = "higher" if mode == "max" else "lower"
    details = getattr(load_family(meta["family"]), "held_out_details", None)
    best_details = f"\n\n## The best configuration ({best['trial']}) on {split}\n\n{details(held_out)}" \
        if details else ""
    write_text(out / "table.md", f"# {task}: best configuration per method, quantiser and rank\n\n"
               f"Selected on validation ({value}, {direction} is better, carved from train); {split} scored once, "
               f"here.\n\n" + shown.to_markdown(index=False) + best_details + f"\n\nVersions: {versions}\n")
    write_text(out / "table.tex", latex(shown.drop(columns=["reproduce"]), records,
                                        f"{task}: best validation configuration per method, quantiser and "
                                        f"rank; {split} scored once. {versions}"))
    written = plots(trials, metas, out)
    print(f"exported {len(trials)} trials of {len(experiments)} experiment(s) to {out}: trials.csv, table.md, "
          f"table.tex, best.yaml, configs/, {', '.join(written)}")
    print(shown.drop(columns=["reproduce", "commit"]).to_string(index=False))
    return out


def setting_text(value, form: str = "{}") -> str:
    """A setting as table text, "-" where the method has none (None or NaN: lora's bits, scale)."""
    return "-" if value is None or value != value else form.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="experiment folders (under the search's --storage)")
    parser.add_argument("--results", default="results", help="output root (default: results)")
    args = parser.parse_args()
    try:
        export(args.experiments, Path(args.results))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
