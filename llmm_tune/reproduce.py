"""Re-train an exported configuration: `python -m llmm_tune.reproduce results/cola/best.yaml --seeds 0 1 2`.

Runs the trial's recipe without Tune for each seed (same validation split as the search), scores
the best-validation checkpoint on the GLUE dev set, and reports mean and standard deviation.
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
from llmm_tune.files import write_text


def reproduce_seed(record: dict, seed: int, data, work: Path) -> dict[str, float]:
    """Train once with `seed`; the validation score and dev scores of the best checkpoint."""
    from llmm_tune.export import score_dev
    from trainables.glue import train

    config = {**record["config"], "seed": seed, "trust_remote_code": record.get("trust_remote_code", False)}
    metric = config["metric"]
    best = {"value": None}
    best_dir = work / f"seed{seed}"

    def keep_best(metrics: dict, directory: str) -> None:
        value = metrics[f"val_{metric}"]
        if best["value"] is None or value > best["value"]:
            best["value"] = value
            shutil.rmtree(best_dir, ignore_errors=True)
            shutil.copytree(directory, best_dir)

    train(config, data, keep_best)
    dev = score_dev(config, str(best_dir), {"data_source": record["data"]["source"],
                                            "trust_remote_code": config["trust_remote_code"]})
    return {f"val_{metric}": best["value"], **{f"dev_{k}": v for k, v in dev.items()}}


def reproduce(path: Path, seeds: list[int], data_dir: str | None = None, threads: int | None = None,
              trust_remote_code: bool = False) -> dict:
    import torch

    from llmm_tune.data import check_source, prepare, resolve_data_dir
    from llmm_tune.models import load_tokenizer
    from llmm_tune.progress import quiet_logs
    from llmm_tune.tasks import get_task

    quiet_logs()
    if not path.is_file():
        raise UsageError(f"{path} not found; pass a best.yaml or configs/*.yaml written by llmm_tune.export")
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or "config" not in record or "data" not in record:
        raise UsageError(f"{path} is not an export record (no config/data); pass a file written by llmm_tune.export")
    if record.get("trust_remote_code") and not trust_remote_code:
        raise UsageError(f"{path} was searched with --trust-remote-code; pass it here too if you trust "
                         f"the code of {record['config']['model']}")
    if threads:
        torch.set_num_threads(threads)
    config, source = record["config"], record["data"]["source"]
    task = get_task(config["task"])
    if data_dir or source != "hub":
        source = check_source(task, resolve_data_dir(data_dir or source))
    tokenizer = load_tokenizer(config["model"], trust_remote_code=trust_remote_code)
    data = prepare(task, source, tokenizer, config["max_length"],
                   config["validation_size"], split_seed=record["data"]["validation_seed"],
                   max_train_examples=config.get("max_train_examples"))
    record["data"]["source"] = source
    with tempfile.TemporaryDirectory() as work:
        runs = {seed: reproduce_seed(record, seed, data, Path(work)) for seed in seeds}
    summary = {}
    for key in runs[seeds[0]]:
        values = [runs[s][key] for s in seeds]
        summary[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    report = {"config": str(path), "seeds": seeds, "runs": runs, "summary": summary,
              "recorded": {"validation": record["validation"], "dev": record["dev"]}}
    out = path.with_name(path.stem + ".reproduced.yaml")
    write_text(out, yaml.safe_dump(report, sort_keys=False))
    for key, stats in summary.items():
        print(f"{key}: {stats['mean']:.4f} +- {stats['std']:.4f} over seeds {seeds}")
    print(f"recorded by the search: val {record['validation']['value']:.4f}, dev {record['dev']} "
          f"(seed {record['seed']}); written {out}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmm_tune.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="best.yaml or configs/<row>.yaml from llmm_tune.export")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", help="GLUE data folder (default: the one the search used)")
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
