"""Re-train an exported configuration: `python -m llmm_tune.reproduce results/cola/best.yaml --seeds 0 1 2`.

Runs the trial's recipe without Tune for each seed (same validation split as the search), scores
the best-validation checkpoint once on the held-out split, and reports mean and standard deviation.
The data is found as the record names it (relative to the project, `$LLMM_DATA_DIR`, or the hub),
or where --data-dir / LLMM_DATA_DIR point.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from llmm_tune.errors import UsageError
from llmm_tune.export import relative_to_cwd
from llmm_tune.files import write_text
from llmm_tune.train.data import locate_source, portable_source
from llmm_tune.tune.experiment import command_line, git_commit, package_versions
from llmm_tune.tune.family import load_family, replaces


def reproduce_seed(record: dict, seed: int, data, source: str, work: Path) -> dict[str, float]:
    """Train once with `seed`; the validation metrics and held-out scores of the checkpoint that stands for the
    run (the best on validation, or the last for a task sequence)."""
    recipe = load_family(record["family"])
    config = {**record["config"], "seed": seed, "trust_remote_code": record.get("trust_remote_code", False)}
    metric, mode, task = config["metric"], config["mode"], recipe.TASKS[record["task"]]
    best = {"value": None, "metrics": {}}
    best_dir = work / f"seed{seed}"

    def keep_best(metrics: dict, directory: str) -> None:
        if replaces(task, mode, metrics[f"val_{metric}"], best["value"]):
            best.update(value=metrics[f"val_{metric}"], metrics=metrics)
            shutil.rmtree(best_dir, ignore_errors=True)
            shutil.copytree(directory, best_dir)

    recipe.train(config, data, keep_best)
    held_out = recipe.score(config, str(best_dir), source)
    validation = {k: v for k, v in best["metrics"].items() if k.startswith("val_")}
    return {**validation, **{f"{recipe.HELD_OUT}_{k}": v for k, v in held_out.items()}}


def version_drift(recorded: dict) -> list[str]:
    """Packages whose installed version differs from the one a record was made with."""
    installed = package_versions()
    return [f"{name} {installed.get(name)} (record: {version})" for name, version in recorded.items()
            if name not in ("llmm-tune", "python") and installed.get(name) != version]


def read_record(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path} not found; pass a best.yaml or configs/*.yaml written by llmm_tune.export")
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or not {"family", "config", "data"} <= set(record):
        raise UsageError(f"{path} is not an export record (no family/config/data); pass a file written by "
                         "llmm_tune.export")
    return record


def reproduce(path: Path, seeds: list[int], data_dir: str | None = None, threads: int | None = None,
              trust_remote_code: bool = False) -> dict:
    import torch

    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    record = read_record(path)
    if record.get("trust_remote_code") and not trust_remote_code:
        raise UsageError(f"{path} was searched with --trust-remote-code; pass it here too if you trust "
                         f"the code of {record['config']['model']}")
    drift = version_drift(record["versions"])
    if drift:
        print(f"warning: installed versions differ from the record's: {', '.join(drift)}; scores may differ "
              "(bash .ci/setup installs the locked versions)")
    if threads:
        torch.set_num_threads(threads)
    recipe = load_family(record["family"])
    found = locate_source(record["data"]["source"], data_dir)
    source = recipe.check_data(record["task"], None if found == "hub" else found)
    config = {**record["config"], "seed": record["data"]["validation_seed"], "trust_remote_code": trust_remote_code}
    data = recipe.prepare(config, source)
    with tempfile.TemporaryDirectory() as work:
        runs = {seed: reproduce_seed(record, seed, data, source, Path(work)) for seed in seeds}
    summary = {}
    for key in [k for k, v in runs[seeds[0]].items() if isinstance(v, (int, float))]:
        values = [runs[s][key] for s in seeds]
        summary[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    data_named = portable_source(str(source), data_dir)  # as the record names data: no path of this machine
    config_path = str(relative_to_cwd(path))
    options = [*(["--threads", str(threads)] if threads else []), *(["--data-dir", data_named] if data_dir else [])]
    report = {"config": config_path, "seeds": seeds, "runs": runs, "summary": summary, "data": data_named,
              "git_commit": git_commit(), "versions": package_versions(),
              "reproduce": command_line("llmm_tune.reproduce", [config_path, "--seeds", *map(str, seeds), *options]),
              "recorded": {"validation": record["validation"], "held_out": record["held_out"]}}
    out = path.with_name(path.stem + ".reproduced.yaml")
    write_text(out, yaml.safe_dump(report, sort_keys=False))
    for key, stats in summary.items():
        print(f"{key}: {stats['mean']:.4f} +- {stats['std']:.4f} over seeds {seeds}")
    print(f"recorded by the search: val {record['validation']['value']:.4f}, {record['held_out']['split']} "
          f"{record['held_out']['scores']} (seed {record['seed']}); written {out}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="best.yaml or configs/<row>.yaml from llmm_tune.export")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", help="data folder (default: $LLMM_DATA_DIR, else the record's)")
    parser.add_argument("--threads", type=int, help="CPU threads (the search's per-trial CPUs match it exactly)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="needed when the search used it: the model's repository runs its own code")
    args = parser.parse_args()
    try:
        reproduce(args.config, args.seeds, args.data_dir, args.threads, args.trust_remote_code)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
