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
from pathlib import Path

from llmm_tune.cli import command_parser
from llmm_tune.cli import main as run_command
from llmm_tune.results.tables import export


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
