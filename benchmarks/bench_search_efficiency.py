"""Search efficiency: the compute that TPE with ASHA needs to reach the best validation score that random search
without early stopping finds with the same number of trials (goal: at most a third).

    python benchmarks/bench_search_efficiency.py [--trials 12] [--train-examples 2000] [--data-dir ../shared/data]

Both sides are `llmm_tune.search` on CoLA with the packaged MiniLM (the cpu profile's space and budget, no
warm start, the same seed and validation split, two trials at once): `--sampler tpe` with ASHA, and
`--sampler random --no-early-stopping`. Compute is trial-seconds (the sum of every trial's own time); the
curves take the trials in the order they ended, each adding its seconds and its best validation MCC.
Prints both curves, the compute at which TPE with ASHA first matches random search's best, the ratio, and
saves the plot to search_efficiency.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmm_tune.export import collect  # noqa: E402


def curve(experiment: Path) -> pd.DataFrame:
    """Trials in the order they ended: cumulative trial-seconds and the best validation MCC so far."""
    _, trials, _ = collect(str(experiment))
    ended = [pd.read_csv(experiment / f"trial_{t}" / "progress.csv")["timestamp"].iloc[-1] for t in trials["trial"]]
    trials = trials.assign(ended=ended).sort_values("ended")
    return pd.DataFrame({"trial": trials["trial"], "evaluations": trials["evaluations"],
                         "compute_s": trials["seconds"].cumsum(), "best_mcc": trials["val_mcc"].cummax()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=Path("search_efficiency.png"))
    args = parser.parse_args()
    space = yaml.safe_load((ROOT / "search_spaces" / "glue_cola.yaml").read_text())
    space["profiles"]["cpu"]["warm_start"] = []  # both searchers start from nothing
    space["profiles"]["cpu"]["fixed"]["max_train_examples"] = args.train_examples
    work = Path(tempfile.mkdtemp(prefix="search_efficiency_"))
    (work / "cola_efficiency.yaml").write_text(yaml.safe_dump(space))
    curves = {}
    for name, options in (("tpe_asha", ["--sampler", "tpe"]), ("random_full", ["--sampler", "random",
                                                                               "--no-early-stopping"])):
        command = [sys.executable, "-m", "llmm_tune.search", str(work / "cola_efficiency.yaml"), "--profile", "cpu",
                   "--data-dir", args.data_dir, "--num-samples", str(args.trials), "--storage", str(work),
                   "--name", name, "--no-export", "--cpus-per-trial", "1", *options]
        subprocess.run(command, check=True, cwd=ROOT)
        curves[name] = curve(work / name)
        print(f"\n{name}: best validation MCC so far against cumulative trial-seconds")
        print(curves[name].to_string(index=False, float_format="{:.4f}".format), flush=True)
    target = curves["random_full"]["best_mcc"].iloc[-1]
    random_s = curves["random_full"]["compute_s"].iloc[-1]
    reached = curves["tpe_asha"][curves["tpe_asha"]["best_mcc"] >= target]
    print(f"\nrandom search without early stopping: best val MCC {target:.4f} after {random_s:.0f} trial-s "
          f"({args.trials} trials)")
    if reached.empty:
        best = curves["tpe_asha"]["best_mcc"].iloc[-1]
        print(f"TPE with ASHA did not reach it: best {best:.4f} after {curves['tpe_asha']['compute_s'].iloc[-1]:.0f} "
              "trial-s")
    else:
        spent = reached["compute_s"].iloc[0]
        print(f"TPE with ASHA reached it after {spent:.0f} trial-s: {spent / random_s:.2f} of random search's compute "
              "(goal: at most 0.33)")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        axes.step(points["compute_s"], points["best_mcc"], where="post", label=name.replace("_", " + "))
    axes.axhline(target, color="grey", linestyle=":")
    axes.set_xlabel("cumulative trial-seconds")
    axes.set_ylabel("best validation MCC so far")
    axes.legend()
    figure.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"saved {args.out}; experiments in {work}")


if __name__ == "__main__":
    main()
