"""Classification and regression tasks as their `dataset:` blocks define them (a shipped GLUE task's: its hub
dataset, its files in the GLUE folder layout, label names and metrics; or the user's data): how rows are read and
checked, and how predictions are scored."""

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
from llmm_tune.train.dataset import (
    SUFFIXES,
    content_hash,
    is_shipped,
    load_rows,
    portable,
    raw_splits,
    read_file,
    shipped_blocks,
)
from llmm_tune.tune.family import Task


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
class GlueTask:
    """A task as its `dataset:` block defines it: its text columns (the hub's, for a shipped task; ours, for the
    user's data), its label count (1: regression), how predictions are scored and its label names."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1: regression
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    dataset: dict = field(compare=False)
    label_names: tuple[str, ...] | None = None  # label i's name (None: regression)

    @property
    def own_data(self) -> bool:
        """Whether the rows are the user's (resolved where the search started), not a shipped task's."""
        return not is_shipped(self.dataset)


def _task(glue: GlueTask, *metrics: str) -> Task:
    """Every GLUE metric is better higher; the validation loss lower; a classifier also reports its calibration."""
    return Task(glue.name, {**{m: "max" for m in metrics}, "loss": "min"}, metrics[0], glue,
                reported=dict(CALIBRATION) if glue.num_labels > 1 else {})


# A user's classification data: one text or a pair, and a label (integers, strings, or real numbers: regression).
FORMATS = {"single": ("text", "label"), "pair": ("text", "text_pair", "label")}


SCORED = {"classification": ("mcc", "accuracy", "f1"), "regression": ("pearson", "spearman")}  # a block's `metrics`


def dataset_task(name: str, block: dict) -> Task:
    """The task a `dataset:` block defines: a shipped task's (its label names and metrics given) or the user's
    classification or regression (the label set read from train, as the block records it); the first metric
    selects unless the space says otherwise."""
    labels = block["labels"]
    columns = FORMATS[block["format"]][:-1]
    if is_shipped(block):  # the hub's column names
        columns = tuple((block.get("columns") or {}).get(ours, ours) for ours in columns)
    if labels == "regression":
        metrics = block.get("metrics") or SCORED["regression"]
        return _task(GlueTask(name, columns, 1, _regression, block), *metrics)
    names = tuple(str(label) for label in labels)
    metrics = block.get("metrics") or (("accuracy", "f1", "mcc") if len(labels) == 2 else ("accuracy", "mcc"))
    return _task(GlueTask(name, columns, len(labels), _classification(*metrics), block, label_names=names),
                 *metrics)


TASKS = {name: dataset_task(name, block) for name, block in shipped_blocks("glue").items()}


def load_splits(task: GlueTask, source: str, on_bad_row: str = "error") -> tuple[Dataset, Dataset]:
    """(train, dev) with columns text_a, [text_b,] label."""
    if task.own_data:
        bad_rows = BadRows(on_bad_row)
        return tuple(Dataset.from_dict(_user_columns(task, rows, bad_rows, split))
                     for split, rows in zip(("train", "test"), load_rows(task.dataset, on_bad_row)))
    return tuple(load_shipped(task, split, source, on_bad_row) for split in ("train", "test"))


def load_shipped(task: GlueTask, split: str, source: str, on_bad_row: str = "error") -> Dataset:
    """A shipped task's split ("train", or "test": its dev set) from the hub or its file under the data folder."""
    if source == "hub":  # the block's splits: ours -> the hub's
        names = dict(zip(task.text_columns, ["text_a", "text_b"]))
        return load_dataset(task.dataset["path"], task.dataset.get("name"), split=task.dataset["splits"][split]
                            ).rename_columns(names).select_columns([*names.values(), "label"])
    local = task.dataset["local"]
    return Dataset.from_dict(read_local(task, Path(source) / local["folder"] / local["files"][split],
                                        BadRows(on_bad_row)))


def read_local(task: GlueTask, path: Path, bad_rows: BadRows) -> dict[str, list]:
    """Rows of a GLUE file as columns text_a, [text_b,] label; bad rows name their file and line."""
    spec = task.dataset["local"]  # folder, files, the file's columns (text_a, [text_b,] label: header names, or
    # indices without header), fields per row without header, encoding
    columns = spec["columns"]
    if not path.is_file():
        raise UsageError(f"data file {path} not found; point --data-dir (or LLMM_DATA_DIR) at a folder "
                         f"holding {spec['folder']}/{path.name}")
    if path.suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"cannot read {path}: {error}; check the file and its permissions") from None
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise UsageError(f"{path}: columns {missing} missing; expected {list(columns)}")
        rows = [(i + 2, list(row)) for i, row in enumerate(table[list(columns)].itertuples(index=False))]
        index = list(range(len(columns)))
    else:
        rows, index = _read_tsv(path, spec, bad_rows)
    names = ["text_a", "label"] if len(columns) == 2 else ["text_a", "text_b", "label"]
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
    return _columns(task.text_columns, index, rows, bad_rows, split)


def label_index(task: GlueTask) -> dict:
    """A classifier's label as rows give it -> its index: the recorded label set's values (the user's data), else
    the label names and the indices themselves."""
    if task.own_data:
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


def _read_tsv(path: Path, spec: dict, bad_rows: BadRows) -> tuple[list[tuple[int, list[str]]], list[int]]:
    try:
        with open(path, encoding=spec.get("encoding", "utf-8"), newline="") as f:
            lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}; check the file and its permissions") from None
    if spec.get("fields") is not None:
        width, index, first = spec["fields"], list(spec["columns"]), 1
    else:
        header = lines[0] if lines else []
        missing = [c for c in spec["columns"] if c not in header]
        if missing:
            raise UsageError(f"{path}:1: header lacks columns {missing}; expected {list(spec['columns'])}")
        width, index, first = len(header), [header.index(c) for c in spec["columns"]], 2
        lines = lines[1:]
    rows = []
    for line, row in enumerate(lines, start=first):
        if len(row) != width:
            bad_rows.add(f"{path}:{line}: expected {width} tab-separated fields, found {len(row)}")
            continue
        rows.append((line, row))
    return rows, index


def _label(task: GlueTask, value) -> int | float | None:
    """The label as the model needs it (a label name's index, or the index itself), or None when it is not one of
    the task's."""
    try:
        if task.num_labels == 1:
            return float(value)
        names = {name: i for i, name in enumerate(task.label_names)}
        label = names[value] if value in names else int(value)
        return label if 0 <= label < task.num_labels else None
    except (KeyError, ValueError, TypeError):
        return None


def _shift_texts(task: GlueTask) -> tuple[str, ...]:
    """The text columns of a shift file: the user's format's, or `text` and `text_pair` for a shipped task."""
    return task.text_columns if task.own_data else FORMATS[task.dataset["format"]][:-1]


def resolve_shift(entry: dict, trained: Task, where: str) -> dict:
    """A space's `shift:` entry checked against the trained task: `task`, a shipped GLUE task whose dev set has the
    trained task's label set, or `files`, a data file with columns text, [text_pair,] label (a label by name or
    index), named portably with its content hash; a UsageError naming the fix otherwise."""
    glue = trained.details
    if glue.num_labels == 1:
        raise UsageError(f"{where}: {trained.name} is a regression; shift sets are scored for classifiers only")
    if "task" in entry:
        other = TASKS.get(entry["task"])
        if other is None or glue.own_data:
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
        return load_shipped(TASKS[entry["task"]].details, "test", source, on_bad_row)
    rows = raw_splits({"path": entry["files"], "files": {"test": entry["files"]},
                       "hashes": {"test": entry["hash"]}})["test"]
    return Dataset.from_dict(_columns(_shift_texts(task), label_index(task), rows, BadRows(on_bad_row),
                                      entry["files"]))
