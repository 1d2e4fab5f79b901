"""Searches exported as reproducible tables under `results/<task>/`: every trial (trials.csv); per (method,
quantiser, rank) the trial best on validation, scored once on the held-out split by its family (table.md,
table.tex, configs/<row>.yaml); the best of those (best.yaml); the first experiment's plots; for a search with
several objectives, its Pareto front (pareto.md, pareto.png) and best.yaml by the pick rule (results/pareto.py).
Several experiments of one task (say --method llmm and --method loftq) share one table."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd

from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path, write_text
from llmm_tune.results.collect import VERSION_KEYS, Collected, collect, plain, score_held_out, trial_config
from llmm_tune.results.pareto import export_pareto
from llmm_tune.results.plots import plots, reliability_plot
from llmm_tune.results.record import ExportRecord
from llmm_tune.train.progress import Progress
from llmm_tune.tune import storage
from llmm_tune.tune.context import validation_key
from llmm_tune.tune.experiment import ExperimentRecord
from llmm_tune.tune.family import load_family

TABLE_KEYS = ("method", "quant_method", "bits", "rank", "task", "lr", "scale", "K")
CONSOLE_LEAVES_OUT = (" brier", " nll", " temperature", "_ts")  # held-out columns the console does not print


class Provenance(NamedTuple):
    """What a table row was made by: the command that reproduces it, the commit(s) and the package versions."""

    reproduce: str
    git_commit: str
    versions: dict


class Chosen(NamedTuple):
    """A table row: the trial best on validation in its (experiment, quantiser, rank), with its held-out scores."""

    trial: pd.Series
    meta: ExperimentRecord
    held_out: dict



def export(experiments: list[str], results: Path) -> Path:
    """Write `results/<task>/` for `experiments` (finished or running); returns that folder."""
    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    experiments = [storage.resolve(e) for e in experiments]
    collected = [collect(e) for e in experiments]
    tasks = {(found.meta.family, found.meta.task, found.meta.metric, str(found.meta.objectives))
             for found in collected}
    if len(tasks) != 1:
        raise UsageError(f"experiments mix tasks, selection metrics or objectives {sorted(tasks)}; export one at a "
                         "time")
    out = results / collected[0].meta.task
    trials = pd.concat([found.trials for found in collected], ignore_index=True)
    with atomic_path(out / "trials.csv") as tmp:
        trials.to_csv(tmp, index=False)
    chosen = table_rows(experiments, collected)
    shown, records = write_records(chosen, out)
    write_tables(shown, records, chosen[0], out, "".join(budget_text(found) for found in collected))
    split = load_family(chosen[0].meta.family).HELD_OUT
    written = plots(trials, collected[0], out) + reliability_plot(chosen[0].held_out, split, out)
    front = export_pareto(trials, collected, experiments,
                          {(row.meta.name, row.trial["trial"]): row.held_out for row in chosen}, out)
    print(f"exported {len(trials)} trials of {len(experiments)} experiment(s) to {out}: trials.csv, table.md, "
          f"table.tex, best.yaml, configs/, {', '.join(written)}{front}")
    # the console's table stays readable: table.md has the brier, nll and temperature-scaled columns too
    print(shown.drop(columns=["reproduce", "commit", *(c for c in shown if c.endswith(CONSOLE_LEAVES_OUT))])
          .to_string(index=False))
    return out


def table_rows(experiments: list[str], collected: list[Collected]) -> list[Chosen]:
    """Per experiment, quantiser and rank, the trial best on validation with its held-out scores, best first."""
    context = collected[0].context
    picks = []  # (trial row, record, experiment, checkpoint)
    for experiment, found in zip(experiments, collected):
        scored = found.scored()
        for _, group in scored.fillna({"bits": -1, "quant_method": "-"}).groupby(["quant_method", "bits", "rank"]):
            best = found.trials.loc[context.direction.best_label(group[context.value_key])]  # as collected
            picks.append((best, found.meta, experiment, found.checkpoints[best["trial"]]))
    if not picks:
        raise UsageError(f"no trial of {', '.join(str(e) for e in experiments)} has a checkpoint yet; "
                         "export again once trials have reported")
    chosen = []
    with Progress(f"export: scoring the held-out split ({context.recipe.HELD_OUT}), rows", len(picks)) as progress:
        for best, meta, experiment, checkpoint in picks:
            chosen.append(Chosen(best, meta, score_held_out(trial_config(best, meta), checkpoint, meta, experiment)))
            progress.advance()
    return sorted(chosen, key=lambda row: context.direction.rank_key(row.trial[context.value_key]))


def write_records(chosen: list[Chosen], out: Path) -> tuple[pd.DataFrame, list[ExportRecord]]:
    """Each row's record (configs/<row>.yaml; the best one also as best.yaml); the table as shown."""
    metric, split = chosen[0].meta.metric, load_family(chosen[0].meta.family).HELD_OUT
    rows, records = [], []
    for best, meta, held_out in chosen:
        row_id = f"{meta.method}-{best['quant_method'] or 'fp'}-{best['bits'] or 'fp'}-r{best['rank']}"
        record = ExportRecord.of_trial(best, meta, held_out, out / "configs" / f"{row_id}.yaml")
        record.write(out / "configs" / f"{row_id}.yaml")
        records.append(record)
        numbers = [k for k, v in held_out.items() if isinstance(v, (int, float))]  # the rest: held_out_details
        first = [metric] if metric in numbers else []
        rows.append({**{k: plain(best.get(k)) for k in TABLE_KEYS}, f"val {metric}": best[validation_key(metric)],
                     **{f"{split} {k}": held_out[k] for k in first + [k for k in numbers if k not in first]},
                     "seed": best["seed"], "trial": best["trial"],
                     "commit": meta.git_commit[:12] + ("-dirty" if meta.git_commit.endswith("-dirty") else ""),
                     "reproduce": record.reproduce})
    best, meta, held_out = chosen[0]
    ExportRecord.of_trial(best, meta, held_out, out / "best.yaml").write(out / "best.yaml")
    table = pd.DataFrame(rows)
    return table.assign(lr=table["lr"].map("{:.1e}".format),
                        scale=table["scale"].map(lambda value: setting_text(value, "{:g}")),
                        **{c: table[c].map("{:.4f}".format) for c in table if c.startswith(("val ", f"{split} "))}), \
        records


def budget_text(found: Collected) -> str:
    """A --budget search's plan beside what it measured, for table.md: the planner is checked on every run."""
    if not found.meta.budget:
        return ""
    sizing, spans = found.meta.budget, [h for h in found.histories.values() if len(h)]
    ran = (max(h["timestamp"].max() for h in spans) - min((h["timestamp"] - h["time_total_s"]).min() for h in spans)
           if spans else 0.0)
    predicted, trials = sizing["spent_s"] + sizing["predicted_s"], sizing["predicted_s"] - sizing["export_s"]
    cut = found.trials.loc[found.trials["cut_by_budget"], "trial"].tolist()
    cut_text = (f" Cut by the budget at their latest evaluation, so scored short of their epochs: {', '.join(cut)}."
                if cut else "")
    return (f"\n\n{found.meta.name}: sized to --budget {sizing['budget_s'] / 60:g} min, {sizing['num_samples']} "
            f"trials x up to {sizing['epochs']:g} epochs on {sizing['train_rows']:,} of {sizing['available_rows']:,} "
            f"rows, {sizing['concurrent']} at once; predicted {predicted / 60:.1f} min in all, of which the trials "
            f"{trials / 60:.1f} min with Ray's start; the trials ran {ran / 60:.1f} min (the first start to the last "
            f"report).{cut_text}")


def write_tables(shown: pd.DataFrame, records: list[ExportRecord], first: Chosen, out: Path, notes: str = "") -> None:
    """table.md (with the family's details of the best configuration and `notes`) and table.tex."""
    best, meta, held_out = first
    family = load_family(meta.family)
    task, split = meta.task, family.HELD_OUT
    details = getattr(family, "held_out_details", lambda scores: "")(held_out)  # "": nothing to add
    best_details = f"\n\n## The best configuration ({best['trial']}) on {split}\n\n{details}" if details else ""
    write_text(out / "table.md", f"# {task}: best configuration per method, quantiser and rank\n\n"
               f"Selected on validation ({validation_key(meta.metric)}, {records[0].direction.word} is better, carved "
               f"from train); {split} scored once, here.\n\n" + shown.to_markdown(index=False) + best_details
               + notes + f"\n\nVersions: {versions_text(meta.versions)}\n")
    write_text(out / "table.tex", latex(shown.drop(columns=["reproduce"]), records,
                                        f"{task}: best validation configuration per method, quantiser and "
                                        f"rank; {split} scored once. {versions_text(meta.versions)}"))


def versions_text(versions: dict) -> str:
    """The package versions a table's numbers were made with, on one line."""
    return " ".join(f"{k}={versions.get(k)}" for k in VERSION_KEYS)


def latex(table: pd.DataFrame, records: list[Provenance | ExportRecord], caption: str) -> str:
    """`table` as a LaTeX table, each row followed by a comment with its reproduce command, commit and versions."""
    def cell(value) -> str:
        return str(value).replace("_", r"\_").replace("%", r"\%")

    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(table.columns) + "}",
             r"\toprule", " & ".join(cell(c) for c in table.columns) + r" \\", r"\midrule"]
    for (_, row), record in zip(table.iterrows(), records):
        lines.append(" & ".join(cell(v) for v in row) + r" \\")
        lines.append(f"% reproduce: {record.reproduce} | commit {record.git_commit} | {versions_text(record.versions)}")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{cell(caption)}}}", r"\end{table}", ""]
    return "\n".join(lines)


def setting_text(value, form: str = "{}") -> str:
    """A setting as table text, "-" where the method has none (None or NaN: lora's bits, scale)."""
    return "-" if value is None or value != value else form.format(value)
