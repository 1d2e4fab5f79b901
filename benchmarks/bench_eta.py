"""How well a budgeted search predicts its own end: the plan before Ray starts and the status line's ETA along the
run, against when the search really ended, for the README's main job and one `search sft --data` search.

    python benchmarks/bench_eta.py [--budget 11m] [--data-dir ../shared/data] [--only main|sft]

Each search runs as a user runs it (its own process, a fresh storage and results folder, the probe cache kept in
`$LLMM_CACHE_DIR`: empty it to count the probe). Printed per search: the sizing line's predicted wall time against
the measured one, and the ETA's predicted end of the trials at a quarter and at half of their span against their
real end (the last status line), as an error in percent of that span. The sft file is 600 rows of the shared
Alpaca subset, built at run time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZED = re.compile(r"^budget .*: about ([\d.]+) min predicted")
STATUS = re.compile(r"^\[(\d+)m(\d+)s\] trials: .* ETA (\d+)m(\d+)s")
FRACTIONS = (0.25, 0.5)


def alpaca_file(data_dir: Path, folder: Path, rows: int = 600) -> Path:
    """`rows` rows of the shared Alpaca subset as instruction/input/output JSON lines."""
    records = json.loads((data_dir / "alpaca" / "alpaca_5000_subset_pr152.json").read_text())[:rows]
    path = folder / f"alpaca{rows}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run(command: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """The command's wall time and its stdout lines, each with the seconds since the start it was printed at."""
    started, lines = time.monotonic(), []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip()))
            print(line, end="", flush=True)
    if process.returncode:
        sys.exit(f"error: {' '.join(command)} exited with {process.returncode}")
    return time.monotonic() - started, lines


def eta_errors(lines: list[tuple[float, str]]) -> dict[float, tuple[float, float]]:
    """At each fraction of the trials' span: (the ETA's error in percent of the span, the minute it was read at)."""
    status = [(at, STATUS.match(line).groups()) for at, line in lines if STATUS.match(line)]
    first_at, first = status[0]
    begin = first_at - (int(first[0]) * 60 + int(first[1]))  # the trials' start, by the line's own clock
    end = status[-1][0]  # the trials' end: the status line printed as the last trial ended
    errors = {}
    for fraction in FRACTIONS:
        at, groups = min(status, key=lambda item: abs(item[0] - begin - fraction * (end - begin)))
        predicted_end = at + int(groups[2]) * 60 + int(groups[3])
        errors[fraction] = (100 * (predicted_end - end) / (end - begin), (at - begin) / 60)
    return errors


def measure(name: str, command: list[str]) -> str:
    wall, lines = run(command)
    predicted = next(float(SIZED.match(line).group(1)) for _, line in lines if SIZED.match(line))
    etas = ", ".join(f"at {fraction:.0%} ({minute:.1f} min) {error:+.0f}%"
                     for fraction, (error, minute) in eta_errors(lines).items())
    error = 100 * (predicted * 60 - wall) / wall
    return (f"{name}: plan {predicted:.1f} min, measured {wall / 60:.1f} min ({error:+.0f}%); ETA of the trials' "
            f"end {etas}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="11m", help="each search's --budget (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--only", choices=("main", "sft"), help="one of the two searches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        common = ["--budget", args.budget, "--storage", str(folder / "runs"), "--results", str(folder / "results")]
        searches = {"main job (search glue_cola)": ["glue_cola", "--data-dir", str(args.data_dir)],
                    "search sft --data (600 Alpaca rows)": ["sft", "--data", str(alpaca_file(args.data_dir, folder))]}
        chosen = {name: argv for name, argv in searches.items() if args.only is None or name.startswith(
            {"main": "main", "sft": "search sft"}[args.only])}
        summary = [measure(name, [sys.executable, "-m", "llmm_tune.search", *argv, *common])
                   for name, argv in chosen.items()]
    print("\n".join(summary))


if __name__ == "__main__":
    main()
