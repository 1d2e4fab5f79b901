"""Does tuned Llmm beat tuned baselines? `python -m llmm_tune.compare glue_cola --methods llmm loftq qlora lora
--seeds 0 1 2 [search options]`.

For each method the same search (`llmm_tune.search TASK --method M`: the space minus the settings the
method does not use, the same number of trials, ASHA schedule, validation split and searcher seed), each in
its own process; then each method's best validation configuration is trained again with every seed and
scored once on the held-out split (Ray tasks with a search trial's resources and threads, as many at
once as the search ran trials). Written to results/compare/<task>/: table.md and table.tex (per method
the mean and standard deviation over seeds, the mean of the split's other metrics, the compute spent in
trial-seconds, and the difference to the first method with a 95% interval from a paired t-test over
seeds: seed s gives every method the same data order and initial draws), scores.csv (every method and
seed) and seeds.png.

A killed compare continues where it stopped: a finished search is reused, an unfinished one resumed (when
asked with the options it was started with; other options stop with an error, not a stale answer), and each
retrained seed is kept in results/compare/<task>/runs.json as soon as it ends. A retraining that fails
lets the others finish; the compare then stops, names it, and retries it when run again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from llmm_tune.cli import (
    DEFAULT_STORAGE,
    NOT_OPTIONS,
    add_profile_option,
    choose_profile,
    command_parser,
    dataset_options,
    layout_request,
    parse_search_args,
    search_parser,
    space_overrides,
)
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.files import atomic_path, write_text
from llmm_tune.method.config import BASELINES
from llmm_tune.results.collect import best_trial, collect, data_source, ended_trials, trial_config
from llmm_tune.results.tables import Provenance, latex, setting_text, versions_text
from llmm_tune.train.data import resolve_data_dir
from llmm_tune.train.progress import Progress
from llmm_tune.tune import storage
from llmm_tune.tune.cluster import address
from llmm_tune.tune.context import TrialContext, validation_key
from llmm_tune.tune.experiment import ExperimentRecord, command_line, git_commit, read_record
from llmm_tune.tune.family import load_family
from llmm_tune.tune.spaces import load_spec, space_path

RUNS_FILE = "runs.json"
CALIBRATION_TITLES = {"ece": "ECE", "brier": "Brier", "nll": "NLL"}  # paired.md's columns of the calibration scores


def paired_interval(values: list[float], reference: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the per-seed differences values[s] - reference[s]: Student's t interval of a paired
    test (NaN bounds with fewer than two seeds)."""
    differences = [v - r for v, r in zip(values, reference)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(
        len(differences))
    return mean, mean - half, mean + half


def run_search(task: str, method: str, profile: str, storage_dir: str, options: list[str]) -> str:
    """The method's search experiment: reused when finished, resumed when not, else started."""
    name = f"{Path(task).stem}-{method}-{profile}-compare"
    experiment = storage.join(storage_dir, name)
    record = read_record(experiment)
    search = [task, "--storage", storage_dir, "--name", name, "--no-export", "--method", method, "--profile", profile,
              *options]
    if record is None:
        print(f"{method}: searching ({name})")
    else:
        check_same_settings(record, search)
        if ended_trials(experiment) >= record.num_samples:
            print(f"{method}: search {name} finished before, reused")
            return experiment
        print(f"{method}: resuming search {name}")
        search = [task, "--storage", storage_dir, "--name", name, "--no-export", "--resume"]
    if subprocess.run([sys.executable, "-m", "llmm_tune.search", *search]).returncode != 0:
        raise UsageError(f"the {method} search stopped (see above); run the same compare again to continue it")
    return experiment


def check_same_settings(record: ExperimentRecord, search: list[str]) -> None:
    """A search is reused or resumed only with the options it was started with: a compare asking for more trials
    or another model must not silently get the old search's. The options as the search parsed them (order and
    spelling aside) against its record's; where the storage lies may differ."""
    if not record.options:
        raise UsageError(f"search {record.name} was started by an older llmm-tune that did not record its options; "
                         "compare afresh with another --storage and --results")
    asked = {k: v for k, v in vars(parse_search_args(search)).items() if k not in NOT_OPTIONS}
    # a search's --budget from compare's depends on when it was split (the probe may be cached): a resumed search
    # keeps the sizing it was started with
    changed = [f"{key} {record.options.get(key)} (now {asked[key]})" for key in asked
               if key not in ("storage", "budget") and record.options.get(key) != asked[key]]
    if changed:
        raise UsageError(f"search {record.name} was started with other settings: {', '.join(changed)}; pass the "
                         "options it was started with to continue it, or another --storage and --results to compare "
                         "afresh")


def searched_best(experiment: str) -> tuple[ExperimentRecord, pd.Series, float]:
    """(record, the trial best on validation, the search's trial-seconds)."""
    found = collect(experiment)
    return found.meta, best_trial(found), float(found.trials["seconds"].fillna(0).sum())


def retrain_seed(context: TrialContext, config: dict, seed: int, data_seed: int, source: str, threads: int) -> dict:
    """One retraining, in a Ray worker: `config` trained with `seed` on the search's splits (`data_seed`), with the
    torch threads of a search trial (so seed s repeats a search trial of seed s)."""
    import torch

    from llmm_tune.tune.console import quiet_logs
    from llmm_tune.tune.runner import train_and_score

    quiet_logs()
    torch.set_num_threads(threads)
    data = context.recipe.prepare({**config, "seed": data_seed}, context, source)
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        scores = train_and_score(context, {**config, "seed": seed}, data, source, Path(work))
    shift = {f"shift_{name}_{k}": v for name, found in scores.pop(f"{context.recipe.HELD_OUT}_shift", {}).items()
             for k, v in found.items()}
    return {"seconds": time.time() - started, "threads": threads, "git_commit": git_commit(),
            **{k: v for k, v in {**scores, **shift}.items() if isinstance(v, (int, float))}}


@dataclass(frozen=True)
class Retraining:
    """One run to train: `method` with `seed` at `config`, the configuration of `trial` of `meta`'s search."""

    key: str  # in runs.json: method/seed, or method@reference/seed for a paired run
    method: str
    seed: int
    meta: ExperimentRecord
    trial: str
    config: dict


def retrainings(chosen: dict, methods: list[str], seeds: list[int], paired: bool,
                draws: tuple[int, ...] = ()) -> list[Retraining]:
    """Each searched method's (`chosen`) own best configuration with every seed; with `paired`, every other of
    `methods` also at the first method's best configuration with only its own settings changed (BASELINES: loftq
    sets K = 0, qlora its zero init and NF4, lora full precision), so a difference is the method's alone, not its
    search's luck, and the first method again with each of `draws` (its predictive the mean of that many adapter
    samples' probabilities, in validation and scoring alike)."""
    runs = [Retraining(f"{m}/{s}", m, s, meta, best["trial"], trial_config(best, meta))
            for m, (meta, best, _) in chosen.items() for s in seeds]
    if paired:
        reference, (meta, best, _) = next(iter(chosen.items()))
        runs += [Retraining(f"{m}@{reference}/{s}", m, s, meta, best["trial"],
                            {**trial_config(best, meta), **BASELINES[m]}) for m in methods[1:] for s in seeds]
        runs += [Retraining(f"{draws_label(reference, d)}/{s}", reference, s, meta, best["trial"],
                            {**trial_config(best, meta), "draws": d}) for d in draws for s in seeds]
    return runs


def draws_label(method: str, draws: int) -> str:
    return f"{method} draws {draws}"


def retrain(jobs: list[Retraining], runs: dict, runs_path: Path, cluster: str | None) -> None:
    """Train each job not in `runs` yet, as Ray tasks with a search trial's resources, at most as many at once as
    the search ran; keep each result as soon as it ends."""
    import ray

    from llmm_tune.tune.cluster import start_ray

    todo = [job for job in jobs if job.key not in runs or runs[job.key]["trial"] != job.trial]
    if not todo:
        return
    start_ray(cluster)
    failed = []
    progress = Progress("compare: retraining runs", len(todo)).start()
    try:
        running: dict = {}
        while todo or running:
            while todo and len(running) < todo[0].meta.resources["max_concurrent"]:
                job = todo.pop(0)
                resources = job.meta.resources
                context = job.meta.context()
                task = ray.remote(retrain_seed).options(num_cpus=resources["cpus_per_trial"],
                                                        num_gpus=resources["gpus_per_trial"])
                threads = max(1, int(resources["cpus_per_trial"]))
                running[task.remote(context, job.config, job.seed, job.meta.seed, data_source(job.meta),
                                    threads)] = job
                print(f"{job.key.split('/')[0]}: training trial {job.trial}'s configuration with seed {job.seed}")
            (finished,), _ = ray.wait(list(running), num_returns=1)
            job = running.pop(finished)
            progress.advance()
            try:
                scores = ray.get(finished)
            except ray.exceptions.RayError as error:  # one failed run stops neither the others nor what they keep
                print(f"{job.method}: seed {job.seed} failed: {error}", file=sys.stderr)  # the worker's traceback
                failed.append(job.key)
                continue
            runs[job.key] = {"method": job.method, "seed": job.seed, "trial": job.trial, "config": job.config, **scores}
            with atomic_path(runs_path) as tmp:
                tmp.write_text(json.dumps(runs, indent=1))
    finally:
        progress.finish()
        ray.shutdown()
    if failed:
        raise UsageError(f"retraining {', '.join(failed)} failed (the cause is above); the finished ones are kept "
                         f"in {runs_path}; run the same compare again to retry the failed ones")


def search_budget(args: argparse.Namespace, options: list[str], profile: str, searches: int, jobs: int) -> str:
    """Each search's --budget, from compare's: what leaves time for the `jobs` retrainings after the searches,
    sized on a probe of one trial of the first method here (the baselines' trials are taken to cost the same)."""
    from llmm_tune.tune.budget import parse_duration, probed_layout, search_share, seconds_since_start

    search_args = parse_search_args([args.task, *options])
    spec = load_spec(args.task, profile, args.methods[0], dataset=dataset_options(vars(search_args)),
                     overrides=space_overrides(vars(search_args)))
    source = spec.context().source(resolve_data_dir(search_args.data_dir))
    figures, _, layout = probed_layout(spec, layout_request(search_args), source)
    seconds = parse_duration(args.budget) - seconds_since_start()
    each = search_share(figures, spec, layout.concurrent, layout.workers, seconds, searches, jobs)
    print(f"compare budget {args.budget}: {searches} search(es) of {each / 60:.1f} min each, then {jobs} "
          f"retraining(s), {layout.concurrent} at once")
    return f"{int(each)}s"


def cluster_address(options: list[str]) -> str | None:
    """The cluster the searches join (their `--address`, passed through), for the retraining too."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--address")
    return address(parser.parse_known_args(options)[0].address)


def build_parser() -> argparse.ArgumentParser:
    """compare's own options; every other option passes through to its searches (`python -m llmm_tune.search`)."""
    parser = command_parser("compare", __doc__)
    parser.add_argument("task", help="a search space (glue_cola, gsm8k, ...) or a YAML path")
    parser.add_argument("--methods", nargs="+", choices=tuple(BASELINES), default=list(BASELINES),
                        help="the first is the reference the others are compared with")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="retraining seeds, one run each")
    parser.add_argument("--paired", action="store_true",
                        help="also retrain every other method at the first method's (llmm's) best configuration with "
                             "only its own settings changed, seed by seed: the method's effect without the search's")
    parser.add_argument("--draws", nargs="+", type=int, default=[], metavar="N",
                        help="with --paired: llmm also retrained at its best configuration predicting with the mean "
                             "of N adapter samples' probabilities (in validation and scoring), a run per seed and N")
    parser.add_argument("--paired-only", action="store_true",
                        help="the paired runs alone, at a fraction of the compute: search the first method only, "
                             "retrain it and the others at its best configuration; writes paired.md, not table.md")
    add_profile_option(parser)
    parser.add_argument("--budget", metavar="DURATION",
                        help="wall time for the whole compare (45m, 2h): a probe of one llmm trial here splits it "
                             "into a --budget for each search, sized so that the retrainings fit after them "
                             "(default: each search runs the profile's trials)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="where the searches are kept")
    parser.add_argument("--results", default="results", help="results/compare/<task>/ is written under it")
    return parser


def parse_all(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """compare's options, and the rest, checked to be options its searches take."""
    args, options = build_parser().parse_known_args(argv)
    search_parser().parse_args([args.task, *options])
    return args, options


def run(argv: list[str]) -> Path:
    args, options = parse_all(argv)
    if len(set(args.methods)) != len(args.methods) or len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--methods and --seeds must not repeat a value")
    if any(o in ("--method", "--name", "--resume", "--no-export") for o in options):
        raise UsageError("compare names, resumes and exports its searches itself; drop --method, --name, --resume "
                         "and --no-export")
    paired = args.paired or args.paired_only
    if paired and (args.methods[0] != "llmm" or len(args.methods) < 2):
        raise UsageError("--paired retrains the other methods at llmm's configuration (its K and scale have no "
                         "value in theirs): pass --methods llmm and at least one baseline, llmm first")
    if args.draws and (not paired or min(args.draws) < 1 or len(set(args.draws)) != len(args.draws)):
        raise UsageError("--draws N scores llmm's paired runs with N adapter samples: pass it with --paired or "
                         "--paired-only, each N a different integer >= 1")
    if args.budget:  # checked as a search checks it: a duration, no --num-samples, no cluster
        parse_search_args([args.task, *options, "--budget", args.budget])
    profile = choose_profile(args.profile)
    load_spec(args.task, profile, args.methods[0])  # a bad space stops here, before any search
    storage_dir = storage.writable(args.storage, "--storage")
    searched = args.methods[:1] if args.paired_only else args.methods
    jobs = len(args.seeds) * (len(searched) + (len(args.methods) - 1 + len(args.draws) if paired else 0))
    if args.budget:
        options = [*options, "--budget", search_budget(args, options, profile, len(searched), jobs)]
    chosen = {m: searched_best(run_search(args.task, m, profile, storage_dir, options)) for m in searched}
    out = Path(args.results) / "compare" / chosen[args.methods[0]][0].task
    runs_path = out / RUNS_FILE
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    to_train = retrainings(chosen, args.methods, args.seeds, paired, tuple(args.draws))
    retrain(to_train, runs, runs_path, cluster_address(options))
    if paired:
        write_paired(args, chosen, runs, out, argv)
    return out if args.paired_only else write_tables(args, chosen, runs, out, argv, space_path(args.task).stem)


def changed_settings(method: str, config: dict) -> str:
    """What `method` changes of the reference's configuration (its BASELINES entry), as `K 2 -> 0, ...`."""
    changes = [f"{k} {value_text(config.get(k))} -> {value_text(v)}" for k, v in BASELINES[method].items()
               if config.get(k) != v]
    return ", ".join(changes) or "nothing"


def value_text(value) -> str:
    """A setting in paired.md: a searched float to 4 significant digits (scale 1347, not 1346.9427...)."""
    return setting_text(value, "{:.4g}") if isinstance(value, float) else setting_text(value)


def provenance(argv: list[str], chosen: dict, made: list[dict], space: str) -> tuple[str, Provenance]:
    """The footer a table ends with (the command, the space, the commits and versions its numbers were made with; a
    table written again later keeps them) and the same as a record for table.tex."""
    meta = next(iter(chosen.values()))[0]
    command = command_line("llmm_tune.compare", argv)
    commits = sorted({m.git_commit for m, _, _ in chosen.values()}
                     | {run.get("git_commit", "not recorded") for run in made})
    footer = (f"\n\nCommand: `{command}` | space: {space} | commit {', '.join(commits)} | "
              + versions_text(meta.versions) + "\n")
    return footer, Provenance(command, ", ".join(commits), meta.versions)


def write_paired(args, chosen: dict, runs: dict, out: Path, argv: list[str]) -> None:
    """paired.md and paired.csv: every other method (and llmm at each --draws) at the reference's best
    configuration, each seed's held-out score minus the reference's own with that seed, with a 95% paired interval;
    for a classifier, the calibration of each held-out set (the split, then each shift set) alike."""
    reference, (meta, best, _) = next(iter(chosen.items()))
    split = load_family(meta.family).HELD_OUT
    score = f"{split}_{meta.metric}"
    config = trial_config(best, meta)
    own = [runs[f"{reference}/{s}"] for s in args.seeds]
    variants = {draws_label(reference, d): ([runs[f"{draws_label(reference, d)}/{s}"] for s in args.seeds],
                                            f"draws {config.get('draws', 0)} -> {d}") for d in args.draws}
    variants |= {m: ([runs[f"{m}@{reference}/{s}"] for s in args.seeds], changed_settings(m, config))
                 for m in args.methods[1:]}
    rows, made = [], [{**run, "paired_with": ""} for run in own]
    for label, (paired, changed) in variants.items():
        made += [{**run, "method": label, "paired_with": reference} for run in paired]
        difference, low, high = paired_interval([run[score] for run in paired], [run[score] for run in own])
        rows.append({"method": label, "changed": changed,
                     f"{split} {meta.metric} mean": f"{mean_of(paired, score):.4f}",
                     f"{reference} mean": f"{mean_of(own, score):.4f}",
                     f"difference to {reference}": f"{difference:+.4f}", "95% interval": f"[{low:+.4f}, {high:+.4f}]"})
    setting = ", ".join(f"{k} {value_text(best[k])}" for k in ("quant_method", "bits", "rank", "lr", "scale", "K"))
    direction = meta.direction.word
    header = (f"# {meta.task}: every method at {reference}'s best configuration (trial {best['trial']}: {setting}), "
              f"only its own settings changed, seeds {args.seeds}, scored once on {split}\n\nThe difference is the "
              f"method's {split} {meta.metric} minus {reference}'s with the same seed ({direction} is better); its 95% "
              "interval is a paired t-test over seeds. Each method's own tuned result: table.md.\n\n")
    sets = [split, *sorted(key[len("shift_"):-len("_ece")] for key in own[0]
                           if key.startswith("shift_") and key.endswith("_ece"))]
    calibration = "".join(calibration_section(reference, own, variants, name, meta.metric, split) for name in sets)
    footer, _ = provenance(argv, chosen, made, space_path(args.task).stem)
    table = pd.DataFrame(rows)
    write_text(out / "paired.md", header + table.to_markdown(index=False, disable_numparse=True) + calibration
               + footer)
    with atomic_path(out / "paired.csv") as tmp:
        pd.DataFrame(made).drop(columns=["config"]).to_csv(tmp, index=False)
    print(f"wrote {out}: paired.md, paired.csv (at {reference}'s configuration)")
    print(table.to_string(index=False))


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.fmean(run[key] for run in runs)


def calibration_section(reference: str, own: list[dict], variants: dict, name: str, metric: str, split: str) -> str:
    """A held-out set's calibration table in paired.md ('' where it has none: a regression): per method the means
    over seeds of the metric, ECE, Brier and NLL before and after temperature scaling (T fitted on the validation
    split), and the paired difference to the reference in ECE and in temperature-scaled NLL with 95% intervals."""
    prefix = split if name == split else f"shift_{name}"
    if f"{prefix}_ece" not in own[0]:
        return ""
    rows = []
    for label, paired in {reference: own, **{k: v for k, (v, _) in variants.items()}}.items():
        row = {"method": label, metric: f"{mean_of(paired, f'{prefix}_{metric}'):.4f}"}
        row |= {f"{title}{' (T)' if ts else ''}": f"{mean_of(paired, f'{prefix}_{key}{ts}'):.4f}"
                for ts in ("", "_ts") for key, title in CALIBRATION_TITLES.items()}
        for key, title in (("ece", "ECE"), ("nll_ts", "NLL (T)")):
            difference, low, high = paired_interval([run[f"{prefix}_{key}"] for run in paired],
                                                    [run[f"{prefix}_{key}"] for run in own])
            row[f"{title} - {reference} [95%]"] = ("-" if paired is own else
                                                    f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]")
        rows.append(row)
    where = split if name == split else f"{name} (a distribution shift: trained on the task, scored on {name})"
    return (f"\n\n## Calibration on {where}\n\nMeans over the seeds; lower is better for ECE (15 equal-width bins, "
            "top label), Brier and NLL. (T): after temperature scaling, one scalar fitted on the run's validation "
            "logits; it never changes a prediction. The last two columns: the paired difference to "
            f"{reference} with its 95% interval.\n\n" + pd.DataFrame(rows).to_markdown(index=False,
                                                                                         disable_numparse=True))


def write_tables(args, chosen: dict, runs: dict, out: Path, argv: list[str], space: str) -> Path:
    meta = next(iter(chosen.values()))[0]
    split, metric = load_family(meta.family).HELD_OUT, meta.metric
    score = f"{split}_{metric}"
    made = [runs[f"{m}/{s}"] for m in args.methods for s in args.seeds]
    scores = pd.DataFrame(made)
    if score not in scores:
        raise UsageError(f"the {meta.family} family's score() returns no {metric}; it must return every metric "
                         "of its task (llmm_tune/family.py)")
    reference = args.methods[0]
    ref_values = scores[scores["method"] == reference].sort_values("seed")[score].tolist()
    # the split's other metrics (MRPC's F1, GSM8K's exact match), not the untuned model's, which every method shares
    others = [c for c in scores.columns if c.startswith(f"{split}_") and c != score and "_untuned_" not in c]
    rows = []
    for method, (_, best, search_seconds) in chosen.items():
        mine = scores[scores["method"] == method].sort_values("seed")
        values = mine[score].tolist()
        difference, low, high = paired_interval(values, ref_values)
        rows.append({"method": method, "trial": best["trial"], f"val {metric}": f"{best[validation_key(metric)]:.4f}",
                     f"{split} {metric} mean": f"{statistics.fmean(values):.4f}",
                     f"{split} {metric} std": f"{statistics.stdev(values) if len(values) > 1 else 0.0:.4f}",
                     **{f"{c.replace('_', ' ', 1)} mean": f"{mine[c].mean():.4f}" for c in others},
                     f"difference to {reference}": "-" if method == reference else f"{difference:+.4f}",
                     "95% interval": "-" if method == reference else f"[{low:+.4f}, {high:+.4f}]",
                     "search trial-s": round(search_seconds), "retrain s": round(mine["seconds"].sum()),
                     "quant_method": setting_text(best["quant_method"]),
                     **{k: setting_text(best[k], "{:.0f}") for k in ("bits", "rank", "K")},
                     "lr": setting_text(best["lr"], "{:.1e}"), "scale": setting_text(best["scale"], "{:g}")})
    table = pd.DataFrame(rows)
    footer, record = provenance(argv, chosen, made, space)
    direction = meta.direction.word
    header = (f"# {meta.task}: each method tuned with the same search, its best validation configuration "
              f"retrained with seeds {args.seeds} and scored once on {split}\n\n"
              f"{metric}: {direction} is better. The difference is each method's {split} mean minus {reference}'s, "
              f"its 95% interval from a paired t-test over seeds; an interval that holds 0 is no evidence either "
              f"way.\n\n")
    align = ["left" if c in ("method", "trial", "quant_method") else "right" for c in table]  # numbers as
    # formatted above (tabulate would re-parse "0.7200" as 0.72)
    write_text(out / "table.md", header + table.to_markdown(index=False, disable_numparse=True, colalign=align)
               + footer)
    write_text(out / "table.tex", latex(table, [record] * len(table),
                                        f"{meta.task}: tuned methods over seeds {args.seeds}, {split}"))
    with atomic_path(out / "scores.csv") as tmp:
        scores.drop(columns=["config"]).to_csv(tmp, index=False)
    plot_seeds(scores, score, direction, args.methods, out / "seeds.png")
    print(f"wrote {out}: table.md, table.tex, scores.csv, seeds.png, {RUNS_FILE}")
    print(table.drop(columns=["quant_method", "bits", "rank", "K", "lr", "scale"]).to_string(index=False))
    return out


def plot_seeds(scores: pd.DataFrame, score: str, direction: str, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(1.6 * len(methods) + 1, 3.2))
    for x, method in enumerate(methods):
        values = scores[scores["method"] == method][score]
        axes.scatter([x] * len(values), values, color="tab:blue")
        axes.hlines(values.mean(), x - 0.25, x + 0.25, color="black")
    axes.set_xticks(range(len(methods)), methods)
    axes.set_ylabel(f"{score} ({direction} is better)")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot.close(figure)


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
