"""A family kept outside `trainables/` (loaded by its dotted path): GLUE's CoLA judged by its LAST report, as a
task sequence is, with a validation MCC that falls at every report (1/step), so the best report and the last
one are different checkpoints."""

from __future__ import annotations

from llmm_tune.tune.family import Task
from trainables import glue

TASKS = {"cola": Task("cola", glue.TASKS["cola"].metrics, "mcc", glue.TASKS["cola"].details, selects="last")}


def __getattr__(name: str):  # the rest of the family interface: GLUE's
    return getattr(glue, name)


def train(config: dict, context, data, report, resume: str | None = None) -> None:
    def falling(metrics: dict, directory: str) -> None:
        report({**metrics, "val_mcc": 1.0 / metrics["step"]}, directory)

    glue.train(config, context, data, falling, resume)
