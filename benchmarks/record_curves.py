"""Recorded learning curves (issue 26.1): a fixed design of configurations over a task's cpu-profile space, every
one trained to the full budget by the real driver, every evaluation's validation metric and trial-seconds kept.

    python benchmarks/record_curves.py glue_cola --train-examples 800 --validation-size 400
    python benchmarks/record_curves.py glue_mrpc --train-examples 800

The design is the profile's warm-start points followed by a scrambled Sobol sequence (scipy's, seed 0) over
the profile's space: log-uniform settings on the log scale, a choice by the point's bin. `llmm_tune.search`
runs them in that order as its warm starts, without early stopping, two at a time. The table
(`benchmarks/curves/<task>.csv`, one row per evaluation) is what `bench_search_efficiency.py` replays;
`<task>.txt` beside it names the command, the commit and the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import yaml
from scipy.stats import qmc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmm_tune.project import SPACES_DIR  # noqa: E402
from llmm_tune.tune.experiment import git_commit  # noqa: E402

CURVES = ROOT / "benchmarks" / "curves"
SETTINGS = ("lr", "scale", "rank", "K", "bits", "quant_method")


def profile_space(space: dict) -> dict:
    """The cpu profile's distributions: the space with the profile's replacements."""
    return {**space["space"], **space["profiles"]["cpu"].get("space", {})}


def design(distributions: dict, warm_start: list[dict], size: int) -> list[dict]:
    """The warm-start points, then Sobol points up to `size` configurations."""
    names = [n for n in SETTINGS if n in distributions]
    sobol = qmc.Sobol(d=len(names), scramble=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # balance needs 2^m points; 48 is the count
        points = sobol.random(size - len(warm_start))
    configs = []
    for point in points:
        config = {}
        for name, u in zip(names, point):
            (kind, values), = distributions[name].items()
            if kind == "loguniform":
                low, high = (math.log(v) for v in values)
                config[name] = float(f"{math.exp(low + u * (high - low)):.4g}")
            else:
                config[name] = values[min(int(u * len(values)), len(values) - 1)]
        configs.append(config)
    return [dict(point) for point in warm_start] + configs


def table(experiment: Path, metric: str, configs: list[dict]) -> pd.DataFrame:
    """One row per evaluation: the design's index, the configuration, the evaluation, its metric, its validation
    loss (what ASHA may rank on instead) and seconds."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    rows = []
    for trial in analysis.trials:
        chosen = {name: trial.config[name] for name in SETTINGS}
        index = next(i for i, config in enumerate(configs) if all(config[n] == chosen[n] for n in SETTINGS))
        progress = analysis.trial_dataframes[trial.trial_id]
        rows.append(pd.DataFrame({"config": index, **chosen, "evaluation": progress["training_iteration"],
                                  "epoch": progress["epoch"], metric: progress[metric],
                                  "val_loss": progress["val_loss"], "trial_seconds": progress["time_total_s"]}))
    return pd.concat(rows).sort_values(["config", "evaluation"]).reset_index(drop=True)


def machine() -> str:
    """The CPU's model name and count (trial-seconds depend on them)."""
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE) \
        if Path("/proc/cpuinfo").exists() else [platform.processor()]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a shipped search space (glue_cola, glue_mrpc)")
    parser.add_argument("--configs", type=int, default=48, help="configurations, warm starts included (default: 48)")
    parser.add_argument("--train-examples", type=int, default=800, help="training rows per trial (default: 800)")
    parser.add_argument("--validation-size", type=float, default=None,
                        help="validation rows (a count) or fraction of train (default: the space's)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                        help="the data folder (default: ../shared/data)")
    args = parser.parse_args()
    path = SPACES_DIR / f"{args.task}.yaml"
    space = yaml.safe_load(path.read_text()) if path.is_file() else {}
    if "cpu" not in space.get("profiles", {}):
        parser.error(f"no llmm_tune/search_spaces/{args.task}.yaml with a cpu profile; choose glue_cola or glue_mrpc")
    profile = space["profiles"]["cpu"]
    profile.setdefault("fixed", {})
    configs = design(profile_space(space), profile.get("warm_start", []), args.configs)
    profile["warm_start"], profile["num_samples"] = configs, len(configs)
    profile["fixed"]["max_train_examples"] = args.train_examples
    if args.validation_size is not None:
        profile["fixed"]["validation_size"] = int(args.validation_size) if args.validation_size >= 1 \
            else args.validation_size
    work = Path(tempfile.mkdtemp(prefix=f"curves_{args.task}_"))
    (work / f"{args.task}_curves.yaml").write_text(yaml.safe_dump(space))
    subprocess.run([sys.executable, "-m", "llmm_tune.search", str(work / f"{args.task}_curves.yaml"),
                    "--profile", "cpu", "--data-dir", args.data_dir, "--storage", str(work), "--name", "curves",
                    "--no-export", "--no-early-stopping", "--cpus-per-trial", "1"], check=True, cwd=ROOT)
    metric = f"val_{space['metric']}"
    curves = table(work / "curves", metric, configs)
    CURVES.mkdir(exist_ok=True)
    out = CURVES / f"{args.task.removeprefix('glue_')}.csv"
    out.write_text(curves.to_csv(index=False, float_format="%.6g"))
    out.with_suffix(".txt").write_text(
        f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}\n"
        f"commit: {git_commit()}\nmachine: {machine()}, one trial per CPU, two at once\n")
    finals = curves.groupby("config")[metric].max()
    print(f"{len(finals)} configurations, {len(curves)} evaluations -> {out}; best {metric} {finals.max():.4f}, "
          f"median {finals.median():.4f}; experiment in {work / 'curves'}")


if __name__ == "__main__":
    main()
