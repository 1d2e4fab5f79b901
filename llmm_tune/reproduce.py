"""Re-train an exported configuration: `python -m llmm_tune.reproduce results/cola/best.yaml --seeds 0 1 2`.

Runs the trial's recipe without Tune for each seed (same validation split as the search), scores
the best-validation checkpoint once on the held-out split, and reports mean and standard deviation.
The data is found as the record names it (relative to the project, `$LLMM_DATA_DIR`, or the hub),
or where --data-dir / LLMM_DATA_DIR point. `--trial ID` trains a trial of a multi-objective search's Pareto
front instead (pareto.md lists them; the export keeps each one's record as configs/trial-ID.yaml).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from llmm_tune.cli import command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.errors import UsageError
from llmm_tune.files import write_text
from llmm_tune.results.record import ExportRecord, relative_to_cwd, trial_record
from llmm_tune.train.data import portable_source
from llmm_tune.tune.experiment import command_line, git_commit, package_versions
from llmm_tune.tune.runner import train_and_score


def version_drift(recorded: dict) -> list[str]:
    """Packages whose installed version differs from the one a record was made with."""
    installed = package_versions()
    return [f"{name} {installed.get(name)} (record: {version})" for name, version in recorded.items()
            if name not in ("llmm-tune", "python") and installed.get(name) != version]


def reproduce(path: Path, seeds: list[int], data_dir: str | None = None, threads: int | None = None,
              trust_remote_code: bool = False) -> dict:
    import torch

    from llmm_tune.tune.console import quiet_logs

    quiet_logs()
    record = ExportRecord.read(path)
    if record.trust_remote_code and not trust_remote_code:
        raise UsageError(f"{path} was searched with --trust-remote-code; pass it here too if you trust "
                         f"the code of {record.config['model']}")
    drift = version_drift(record.versions)
    if drift:
        print(f"warning: installed versions differ from the record's: {', '.join(drift)}; scores may differ "
              "(bash .ci/setup installs the locked versions)")
    threads = threads or record.threads  # as the trial ran: the same threads sum in the same order
    if threads:
        torch.set_num_threads(threads)
    context = record.context(trust_remote_code)
    data, source = record.prepare_data(context, data_dir)
    with tempfile.TemporaryDirectory() as work:
        runs = {seed: train_and_score(context, {**record.settings(), "seed": seed}, data, source, Path(work))
                for seed in seeds}
    report = reproduction_report(path, record, runs, seeds, str(source), data_dir, threads)
    out = path.with_name(path.stem + ".reproduced.yaml")
    write_text(out, yaml.safe_dump(report, sort_keys=False))
    for key, stats in report["summary"].items():
        print(f"{key}: {stats['mean']:.4f} +- {stats['std']:.4f} over seeds {seeds}")
    print(f"recorded by the search: val {record.validation['value']:.4f}, {record.held_out['split']} "
          f"{record.held_out['scores']} (seed {record.seed}); written {out}")
    return report


def reproduction_report(path: Path, record: ExportRecord, runs: dict, seeds: list[int], source: str,
                        data_dir: str | None,
                        threads: int | None) -> dict:
    """The runs, their mean and standard deviation, and what reproduces them (no path of this machine)."""
    summary = {}
    for key in [k for k, v in runs[seeds[0]].items() if isinstance(v, (int, float))]:
        values = [runs[s][key] for s in seeds]
        summary[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    data_named = portable_source(source, data_dir)  # as the record names data
    config_path = str(relative_to_cwd(path))
    options = [*(["--threads", str(threads)] if threads else []), *(["--data-dir", data_named] if data_dir else [])]
    return {"config": config_path, "seeds": seeds, "runs": runs, "summary": summary, "data": data_named,
            "git_commit": git_commit(), "versions": package_versions(),
            "reproduce": command_line("llmm_tune.reproduce", [config_path, "--seeds", *map(str, seeds), *options]),
            "recorded": {"validation": record.validation, "held_out": record.held_out}}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("reproduce", __doc__)
    parser.add_argument("config", type=Path, help="best.yaml or configs/<row>.yaml from llmm_tune.export")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run each")
    parser.add_argument("--data-dir", help="data folder (default: $LLMM_DATA_DIR, else the record's)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the record's, those its trial ran with, "
                                                    "which match it exactly; else torch's)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="needed when the search used it: the model's repository runs its own code")
    parser.add_argument("--trial", metavar="ID",
                        help="train this trial of the record's search instead: a trial on the Pareto front of a search "
                             "with --objectives (pareto.md), whose record the export wrote to configs/trial-ID.yaml")
    return parser


def run(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    config = args.config if args.trial is None else trial_record(args.config, args.trial)
    return reproduce(config, args.seeds, args.data_dir, args.threads, args.trust_remote_code)


def main() -> None:
    run_command(run)


if __name__ == "__main__":
    main()
