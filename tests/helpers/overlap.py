"""Work for `probe.concurrency_slowdown` that counts, instead of timing, how many processes run it at once."""

from __future__ import annotations

import os
import time
from pathlib import Path


def processes_at_once(threads: int, steps: int = 12) -> float:
    """The most processes seen in this function at once (this one included) over half a second, from a folder
    ($OVERLAP_DIR) where each leaves a marker named by its pid while it runs."""
    folder = Path(os.environ["OVERLAP_DIR"])
    marker = folder / str(os.getpid())
    marker.touch()
    seen = 0
    for _ in range(10):
        seen = max(seen, len(list(folder.iterdir())))
        time.sleep(0.05)
    marker.unlink()
    return float(seen)


def disturbed_at_first(threads: int, steps: int = 12) -> float:
    """As `processes_at_once`, but the first timed round of processes at once reads 5x longer, as if another program
    was busy for a moment (the warm-up, `steps=1`, and a process alone are not disturbed). The rounds are counted in
    a file beside $OVERLAP_DIR."""
    seen = processes_at_once(threads, steps)
    if seen < 2 or steps == 1:
        return seen
    rounds = Path(os.environ["OVERLAP_DIR"]).parent / "rounds"
    token = f"{os.getpid()}-{time.time_ns()}"
    with rounds.open("a") as log:
        log.write(token + "\n")
    return seen * 5 if rounds.read_text().splitlines().index(token) < seen else seen
