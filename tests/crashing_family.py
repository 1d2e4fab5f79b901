"""A family kept outside `trainables/` (loaded by its dotted path): GLUE, with a deterministic bug right after
every evaluation's report, as a crash a retry from the checkpoint cannot fix."""

from __future__ import annotations

from trainables.glue import (  # noqa: F401  (the family interface, re-exported)
    DATA_SETTINGS,
    HELD_OUT,
    SETTINGS,
    TASKS,
    check_data,
    clock,
    prepare,
    score,
)
from trainables.glue import train as glue_train


def train(config: dict, data, report, resume: str | None = None) -> None:
    def report_then_crash(metrics: dict, directory: str) -> None:
        report(metrics, directory)
        raise RuntimeError("injected bug: index 7 is out of bounds")

    glue_train(config, data, report_then_crash, resume)
