"""GLUE tasks: where their data lives (hub and the GLUE folder layout), how rows are read and checked,
and how predictions are scored."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, load_dataset
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from llmm_tune.errors import UsageError
from llmm_tune.settings import is_number
from llmm_tune.train.calibration import SCORES as CALIBRATION
from llmm_tune.train.data import BadRows
from llmm_tune.train.dataset import SUFFIXES, content_hash, load_rows, portable, raw_splits, read_file
from llmm_tune.tune.family import Task

HUB_DATASET = "nyu-mll/glue"


# Scored with scikit-learn and SciPy, the functions the `evaluate` library's GLUE metric calls,
# because `evaluate.load("glue", ...)` fetches that metric from the hub at run time.
def _classification(*names: str) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    scorers = {"mcc": matthews_corrcoef, "accuracy": accuracy_score, "f1": f1_score}

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
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    local: LocalFiles | None  # None: the rows come from `dataset`
    hub_dev: str = "validation"
    label_names: tuple[str, ...] | None = None  # label i's name (None: regression)
    dataset: dict | None = field(default=None, compare=False)  # the user's data (llmm_tune.train.dataset)


def _task(glue: GlueTask, *metrics: str) -> Task:
    """Every GLUE metric is better higher; the validation loss lower; a classifier also reports its calibration."""
    return Task(glue.name, {**{m: "max" for m in metrics}, "loss": "min"}, metrics[0], glue,
                reported=dict(CALIBRATION) if glue.num_labels > 1 else {})


# A user's classification data: one text or a pair, and a label (integers, strings, or real numbers: regression).
FORMATS = {"single": ("text", "label"), "pair": ("text", "text_pair", "label")}


def dataset_task(name: str, block: dict) -> Task:
    """The user's classification (or regression) task: the label set read from train, as the block records it."""
    labels = block["labels"]
    columns = FORMATS[block["format"]][:-1]
    if labels == "regression":
        return _task(GlueTask(name, columns, 1, _regression, None, dataset=block), "pearson", "spearman")
    names = tuple(str(label) for label in labels)
    metrics = ("accuracy", "f1", "mcc") if len(labels) == 2 else ("accuracy", "mcc")
    return _task(GlueTask(name, columns, len(labels), _classification(*metrics), None, label_names=names,
                          dataset=block), *metrics)


_NLI = {"entailment": 0, "not_entailment": 1}
TASKS = {t.name: t for t in [
    _task(GlueTask("cola", ("sentence",), 2, _classification("mcc"),
                   LocalFiles("CoLA", "train.tsv", "dev.tsv", (3, 1), fields=4),
                   label_names=("unacceptable", "acceptable")), "mcc"),
    _task(GlueTask("mrpc", ("sentence1", "sentence2"), 2, _classification("accuracy", "f1"),
                   LocalFiles("MRPC", "train.tsv", "dev.tsv", ("#1 String", "#2 String", "Quality"),
                              encoding="utf-8-sig"), label_names=("not_equivalent", "equivalent")),
          "accuracy", "f1"),
    _task(GlueTask("stsb", ("sentence1", "sentence2"), 1, _regression,
                   LocalFiles("STS-B", "train.tsv", "dev.tsv", ("sentence1", "sentence2", "score"))),
          "pearson", "spearman"),
    _task(GlueTask("sst2", ("sentence",), 2, _classification("accuracy"),
                   LocalFiles("SST-2", "train.tsv", "dev.tsv", ("sentence", "label")),
                   label_names=("negative", "positive")), "accuracy"),
    _task(GlueTask("rte", ("sentence1", "sentence2"), 2, _classification("accuracy"),
                   LocalFiles("RTE", "train.parquet", "validation.parquet", ("sentence1", "sentence2", "label")),
                   label_names=tuple(_NLI)),
          "accuracy"),
    _task(GlueTask("qnli", ("question", "sentence"), 2, _classification("accuracy"),
                   LocalFiles("QNLI", "train.tsv", "dev.tsv", ("question", "sentence", "label"), label_map=_NLI),
                   label_names=tuple(_NLI)),
          "accuracy"),
    _task(GlueTask("mnli", ("premise", "hypothesis"), 3, _classification("accuracy"),
                   LocalFiles("MNLI", "train.tsv", "dev_matched.tsv", ("sentence1", "sentence2", "gold_label"),
                              label_map={"entailment": 0, "neutral": 1, "contradiction": 2}),
                   hub_dev="validation_matched", label_names=("entailment", "neutral", "contradiction")), "accuracy"),
    _task(GlueTask("qqp", ("question1", "question2"), 2, _classification("accuracy", "f1"),
                   LocalFiles("QQP", "train.tsv", "dev.tsv", ("question1", "question2", "is_duplicate")),
                   label_names=("not_duplicate", "duplicate")),
          "accuracy", "f1"),
]}


def load_splits(task: GlueTask, source: str, on_bad_row: str = "error") -> tuple[Dataset, Dataset]:
    """(train, dev) with columns text_a, [text_b,] label."""
    if task.dataset is not None:
        bad_rows = BadRows(on_bad_row)
        return tuple(Dataset.from_dict(_user_columns(task, rows, bad_rows, split))
                     for split, rows in zip(("train", "test"), load_rows(task.dataset, on_bad_row)))
    if source == "hub":
        return tuple(_hub_split(task, split) for split in ("train", task.hub_dev))
    folder = Path(source) / "glue" / task.local.folder
    return tuple(Dataset.from_dict(read_local(task, folder / name, BadRows(on_bad_row)))
                 for name in (task.local.train, task.local.dev))


def load_dev(task: GlueTask, source: str, on_bad_row: str = "error") -> Dataset:
    """A shipped task's dev split alone (a shift set: QNLI's train is not in the shared data)."""
    if source == "hub":
        return _hub_split(task, task.hub_dev)
    return Dataset.from_dict(read_local(task, Path(source) / "glue" / task.local.folder / task.local.dev,
                                        BadRows(on_bad_row)))


def _hub_split(task: GlueTask, split: str) -> Dataset:
    names = dict(zip(task.hub_columns, ["text_a", "text_b"]))
    return load_dataset(HUB_DATASET, task.name, split=split).rename_columns(names).select_columns(
        [*names.values(), "label"])


def read_local(task: GlueTask, path: Path, bad_rows: BadRows) -> dict[str, list]:
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
        rows, index = _read_tsv(path, spec, bad_rows)
    names = ["text_a", "label"] if len(spec.columns) == 2 else ["text_a", "text_b", "label"]
    columns: dict[str, list] = {name: [] for name in names}
    for line, row in rows:
        values = [row[i] for i in index]
        label = _label(task, values[-1])
        if label is None:
            bad_rows.add(f"{path}:{line}: bad label {values[-1]!r} for {task.name}")
            continue
        for name, value in zip(names[:-1], values[:-1]):
            columns[name].append(str(value))
        columns["label"].append(label)
    bad_rows.done(path)
    return columns


def _user_columns(task: GlueTask, rows: list[tuple[str, dict]], bad_rows: BadRows, split: str) -> dict[str, list]:
    """A user's rows as columns text_a, [text_b,] label (the label's index in the recorded label set)."""
    index = None if task.label_names is None else label_index(task)
    return _columns(task.hub_columns, index, rows, bad_rows, split)


def label_index(task: GlueTask) -> dict:
    """A classifier's label as rows give it -> its index: the recorded label set's values (the user's data), else
    the label names and the indices themselves."""
    if task.dataset is not None:
        return {label: i for i, label in enumerate(task.dataset["labels"])}
    return {**{name: i for i, name in enumerate(task.label_names)}, **{i: i for i in range(task.num_labels)}}


def _columns(texts: tuple[str, ...], index: dict | None, rows: list[tuple[str, object]], bad_rows: BadRows,
             split: str) -> dict[str, list]:
    """Rows holding the columns `texts` and label as columns text_a, [text_b,] label: the label's index in `index`,
    or a number (None: a regression)."""
    names = ["text_a", "text_b"][:len(texts)]
    columns: dict[str, list] = {name: [] for name in [*names, "label"]}
    for at, row in rows:
        row = row if isinstance(row, dict) else {}  # a line that is no JSON object lacks every column
        texts_found = [row.get(c) for c in texts]
        label = row.get("label")
        if not all(isinstance(t, str) and t for t in texts_found):
            bad_rows.add(f"{at}: expected text in {list(texts)}")
        elif index is not None and label not in index:
            bad_rows.add(f"{at}: label {label!r} is not one of the task's {list(index)}")
        elif index is None and not is_number(label):
            bad_rows.add(f"{at}: label {label!r} is not a number (a regression task)")
        else:
            for name, value in zip(names, texts_found):
                columns[name].append(value)
            columns["label"].append(float(label) if index is None else index[label])
    bad_rows.done(split)
    return columns


def label_set(rows: list[tuple[str, dict]], where: str) -> list | str:
    """Train's labels as the block records them: the sorted distinct values, or "regression" when they are
    real numbers that are not all whole."""
    values = [row.get("label") for _, row in rows]
    if any(isinstance(v, float) and not float(v).is_integer() for v in values if is_number(v)):
        return "regression"
    distinct = sorted({int(v) if is_number(v) else v for v in values if v is not None and v != ""},
                      key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        raise UsageError(f"{where}: the label column holds a single class ({distinct}); a classifier needs two or "
                         "more (check --columns label=...)")
    return distinct


def _read_tsv(path: Path, spec: LocalFiles, bad_rows: BadRows) -> tuple[list[tuple[int, list[str]]], list[int]]:
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
            bad_rows.add(f"{path}:{line}: expected {width} tab-separated fields, found {len(row)}")
            continue
        rows.append((line, row))
    return rows, index


def _label(task: GlueTask, value) -> int | float | None:
    """The label as the model needs it, or None when it is not one of the task's."""
    try:
        if task.num_labels == 1:
            return float(value)
        label = task.local.label_map[value] if task.local.label_map else int(value)
        return label if 0 <= label < task.num_labels else None
    except (KeyError, ValueError, TypeError):
        return None


def _shift_texts(task: GlueTask) -> tuple[str, ...]:
    """The text columns of a shift file: the user's format's, or `text` and `text_pair` for a shipped task."""
    return task.hub_columns if task.dataset is not None else FORMATS["single" if len(task.hub_columns) == 1
                                                                      else "pair"][:-1]


def resolve_shift(entry: dict, trained: Task, where: str) -> dict:
    """A space's `shift:` entry checked against the trained task: `task`, a shipped GLUE task whose dev set has the
    trained task's label set, or `files`, a data file with columns text, [text_pair,] label (a label by name or
    index), named portably with its content hash; a UsageError naming the fix otherwise."""
    glue = trained.details
    if glue.num_labels == 1:
        raise UsageError(f"{where}: {trained.name} is a regression; shift sets are scored for classifiers only")
    if "task" in entry:
        other = TASKS.get(entry["task"])
        if other is None or glue.dataset is not None:
            raise UsageError(f"{where}.task: {entry['task']!r} is not a shipped GLUE task ({', '.join(TASKS)})"
                             + ("; a space on your own data names its shift sets by files:" if other else ""))
        if other.details.label_names != glue.label_names:
            raise UsageError(f"{where}.task: {other.name}'s labels {list(other.details.label_names or ['(scores)'])} "
                             f"are not {trained.name}'s {list(glue.label_names)}; a shift set needs the same labels")
        return dict(entry)
    if "hash" in entry:  # resolved already (a record's)
        return dict(entry)
    path = Path(str(entry["files"])).expanduser()
    if not path.is_file() or not path.name.endswith(SUFFIXES):
        raise UsageError(f"{where}.files: {entry['files']} is not a data file ({', '.join(SUFFIXES)}); name one "
                         "with columns text, [text_pair,] label")
    _columns(_shift_texts(glue), label_index(glue), list(read_file(path)), BadRows("error"), str(path))
    return {"name": entry["name"], "files": portable(path), "hash": content_hash(path)}


def load_shift(task: GlueTask, entry: dict, source: str, on_bad_row: str = "error") -> Dataset:
    """A resolved shift entry's rows as columns text_a, [text_b,] label (labels as the trained task's indices)."""
    if "task" in entry:
        return load_dev(TASKS[entry["task"]].details, source, on_bad_row)
    rows = raw_splits({"path": entry["files"], "files": {"test": entry["files"]},
                       "hashes": {"test": entry["hash"]}})["test"]
    return Dataset.from_dict(_columns(_shift_texts(task), label_index(task), rows, BadRows(on_bad_row),
                                      entry["files"]))
