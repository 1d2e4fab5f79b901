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
