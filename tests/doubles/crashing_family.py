"""A family kept outside `trainables/` (loaded by its dotted path): GLUE, with a deterministic bug right after
every evaluation's report, as a crash a retry from the checkpoint cannot fix."""

from __future__ import annotations

from trainables import glue


def __getattr__(name: str):  # the rest of the family interface: GLUE's
    return getattr(glue, name)


def train(config: dict, context, data, report, resume: str | None = None) -> None:
    def report_then_crash(metrics: dict, directory: str) -> None:
        report(metrics, directory)
        raise RuntimeError("injected bug: index 7 is out of bounds")

    glue.train(config, context, data, report_then_crash, resume)
