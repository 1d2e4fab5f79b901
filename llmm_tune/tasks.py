"""GLUE tasks: where their data lives (hub and the GLUE folder layout) and how they are scored."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from llmm_tune.errors import UsageError


# Scored with scikit-learn and SciPy, the functions the `evaluate` library's GLUE metric calls,
# because `evaluate.load("glue", ...)` fetches that metric from the hub at run time.
def _classification(*names: str) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    scorers = {
        "mcc": lambda y, p: matthews_corrcoef(y, p),
        "accuracy": lambda y, p: accuracy_score(y, p),
        "f1": lambda y, p: f1_score(y, p),
    }

    def score(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
        predictions = logits.argmax(axis=-1)
        return {name: float(scorers[name](labels, predictions)) for name in names}

    return score


def _regression(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    predictions = logits.reshape(-1)
    return {"pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0])}


@dataclass(frozen=True)
class LocalFiles:
    """A task's files in the GLUE folder layout (`<data-dir>/glue/<folder>/`)."""

    folder: str
    train: str
    dev: str
    columns: tuple[str | int, ...]  # text_a, [text_b,] label: header names, or indices without header
    fields: int | None = None  # fields per row when there is no header
    encoding: str = "utf-8"
    label_map: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GlueTask:
    name: str
    hub_columns: tuple[str, ...]  # text columns of nyu-mll/glue
    num_labels: int  # 1: regression
    metric: str  # default selection metric
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    local: LocalFiles
    hub_dev: str = "validation"


_NLI = {"entailment": 0, "not_entailment": 1}
TASKS = {t.name: t for t in [
    GlueTask("cola", ("sentence",), 2, "mcc", _classification("mcc"),
             LocalFiles("CoLA", "train.tsv", "dev.tsv", (3, 1), fields=4)),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, "accuracy", _classification("accuracy", "f1"),
             LocalFiles("MRPC", "train.tsv", "dev.tsv", ("#1 String", "#2 String", "Quality"),
                        encoding="utf-8-sig")),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, "pearson", _regression,
             LocalFiles("STS-B", "train.tsv", "dev.tsv", ("sentence1", "sentence2", "score"))),
    GlueTask("sst2", ("sentence",), 2, "accuracy", _classification("accuracy"),
             LocalFiles("SST-2", "train.tsv", "dev.tsv", ("sentence", "label"))),
    GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy", _classification("accuracy"),
             LocalFiles("RTE", "train.parquet", "validation.parquet", ("sentence1", "sentence2", "label"))),
    GlueTask("qnli", ("question", "sentence"), 2, "accuracy", _classification("accuracy"),
             LocalFiles("QNLI", "train.tsv", "dev.tsv", ("question", "sentence", "label"), label_map=_NLI)),
    GlueTask("mnli", ("premise", "hypothesis"), 3, "accuracy", _classification("accuracy"),
             LocalFiles("MNLI", "train.tsv", "dev_matched.tsv", ("sentence1", "sentence2", "gold_label"),
                        label_map={"entailment": 0, "neutral": 1, "contradiction": 2}),
             hub_dev="validation_matched"),
    GlueTask("qqp", ("question1", "question2"), 2, "accuracy", _classification("accuracy", "f1"),
             LocalFiles("QQP", "train.tsv", "dev.tsv", ("question1", "question2", "is_duplicate"))),
]}


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise UsageError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def read_local(task: GlueTask, path: Path) -> dict[str, list]:
    """Rows of a GLUE file as columns text_a, [text_b,] label; bad rows name their file and line."""
    spec = task.local
    if not path.is_file():
        raise UsageError(f"data file {path} not found; point --data-dir (or LLMM_DATA_DIR) at a folder "
                         f"holding glue/{spec.folder}/{path.name}")
    if path.suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"cannot read {path}: {error}; check the file and its permissions") from None
        missing = [c for c in spec.columns if c not in table.columns]
        if missing:
            raise UsageError(f"{path}: columns {missing} missing; expected {list(spec.columns)}")
        rows = [(i + 2, list(row)) for i, row in enumerate(table[list(spec.columns)].itertuples(index=False))]
        index = list(range(len(spec.columns)))
    else:
        rows, index = _read_tsv(path, spec)
    names = ["text_a", "label"] if len(spec.columns) == 2 else ["text_a", "text_b", "label"]
    columns: dict[str, list] = {name: [] for name in names}
    for line, row in rows:
        values = [row[i] for i in index]
        for name, value in zip(names[:-1], values[:-1]):
            columns[name].append(str(value))
        columns["label"].append(_label(task, values[-1], path, line))
    return columns


def _read_tsv(path: Path, spec: LocalFiles) -> tuple[list[tuple[int, list[str]]], list[int]]:
    try:
        with open(path, encoding=spec.encoding, newline="") as f:
            lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}; check the file and its permissions") from None
    if spec.fields is not None:
        width, index, first = spec.fields, list(spec.columns), 1
    else:
        header = lines[0] if lines else []
        missing = [c for c in spec.columns if c not in header]
        if missing:
            raise UsageError(f"{path}:1: header lacks columns {missing}; expected {list(spec.columns)}")
        width, index, first = len(header), [header.index(c) for c in spec.columns], 2
        lines = lines[1:]
    rows = []
    for line, row in enumerate(lines, start=first):
        if len(row) != width:
            raise UsageError(f"{path}:{line}: expected {width} tab-separated fields, found {len(row)}; "
                             "fix or remove that row")
        rows.append((line, row))
    return rows, index


def _label(task: GlueTask, value, path: Path, line: int) -> int | float:
    spec = task.local
    try:
        if task.num_labels == 1:
            return float(value)
        label = spec.label_map[value] if spec.label_map else int(value)
        if not 0 <= label < task.num_labels:
            raise ValueError
        return label
    except (KeyError, ValueError, TypeError):
        raise UsageError(f"{path}:{line}: bad label {value!r} for {task.name}; fix or remove that row") from None

