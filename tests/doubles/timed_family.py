"""A family without a model whose trials take time as a real one's do (loaded by its dotted path): GLUE's settings
and CoLA's metrics, 2,000 rows of no data, every optimizer step sleeping STEP_S seconds and every evaluation
EVAL_S, on `fit`'s schedule. A trial (no `max_steps`) steps `TIMED_FAMILY_SLOWER` times slower than the probe
(two runs with `max_steps`) measures, so a budgeted search can be made to meet its deadline with trials running."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from llmm_tune.train.fit import Schedule
from trainables import glue

ROWS, STEP_S, EVAL_S = 2000, 0.01, 0.05
STATE_FILE = "state.json"


def __getattr__(name: str):  # the rest of the family interface: GLUE's
    return getattr(glue, name)


def check_data(task: str, data_dir: Path | None) -> str:
    return "hub"


def prepare(config: dict, context, source: str) -> SimpleNamespace:
    rows = min(ROWS, config["max_train_examples"] or ROWS)
    return SimpleNamespace(train=list(range(rows)), sizes=f"train {rows}")


def mcc(config: dict, step: int, steps: int) -> float:
    """Rises with training, highest at lr 10^-2.5."""
    return step / steps * (1 - abs(math.log10(config["lr"]) + 2.5))


def train(config: dict, context, data, report, resume: str | None = None) -> None:
    schedule = Schedule.of(config, len(data.train))
    slower = 1.0 if config.get("max_steps") else float(os.environ.get("TIMED_FAMILY_SLOWER", "1"))
    first = 1 if resume is None else json.loads((Path(resume) / STATE_FILE).read_text())["step"] + 1
    started, evaluating = time.perf_counter(), 0.0
    for step in range(first, schedule.total_steps + 1):
        time.sleep(STEP_S * slower)
        if step not in schedule.eval_at:
            continue
        began = time.perf_counter()
        time.sleep(EVAL_S)
        evaluating += time.perf_counter() - began
        value = mcc(config, step, schedule.total_steps)
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / STATE_FILE).write_text(json.dumps({"step": step, "mcc": value}))
            report({"val_mcc": value, "val_loss": 1 - value, "epoch": schedule.epochs_done(step), "step": step,
                    "seconds": time.perf_counter() - started, "eval_seconds": evaluating}, directory)


def score(config: dict, context, checkpoint: str, source: str) -> dict[str, float]:
    return {"mcc": json.loads((Path(checkpoint) / STATE_FILE).read_text())["mcc"]}
