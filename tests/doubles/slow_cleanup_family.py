"""A family kept outside `trainables/` (loaded by its dotted path): GLUE, with a clean-up that takes 6 s
after the trial's last report, longer than Ray Tune waits by default (2 s) before it reuses the trial's
actor for the next trial."""

from __future__ import annotations

import time

from trainables import glue

CLEANUP_SECONDS = 6.0


def __getattr__(name: str):  # the rest of the family interface: GLUE's
    return getattr(glue, name)


def train(config: dict, context, data, report, resume: str | None = None) -> None:
    try:
        glue.train(config, context, data, report, resume)
    finally:
        time.sleep(CLEANUP_SECONDS)  # as a stopped trial's clean-up on a loaded machine (freeing a large model)
