"""GLUE data: from the hub where reachable, else from a data directory; a validation split carved
from train for model selection; tokenised once per search and shared by every trial."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from llmm_tune.errors import UsageError
from llmm_tune.tasks import GlueTask, read_local

HUB_DATASET = "nyu-mll/glue"
DATA_DIR_ENV = "LLMM_DATA_DIR"


def resolve_data_dir(option: str | None) -> Path | None:
    """The data directory from --data-dir or LLMM_DATA_DIR (absolute: trials run elsewhere)."""
    value = option or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"data directory {value} does not exist; pass --data-dir DIR or set {DATA_DIR_ENV} "
                         "to a folder holding glue/<Task>/")
    return path


def hub_reachable() -> bool:
    """A quick probe: `load_dataset` itself retries for about half a minute before it gives up."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(HUB_DATASET, timeout=5)
        return True
    except Exception:
        return False


def check_source(task: GlueTask, data_dir: Path | None) -> str:
    """Where this task's data will come from ("hub" or the folder), or a UsageError saying how to fix it."""
    if data_dir is not None:
        folder = data_dir / "glue" / task.local.folder
        for name in (task.local.train, task.local.dev):
            if not (folder / name).is_file():
                raise UsageError(f"{folder / name} not found; {task.name} needs glue/{task.local.folder}/"
                                 f"{name} under --data-dir, or drop --data-dir to load it from the hub")
        return str(data_dir)
    if hub_reachable():
        return "hub"
    raise UsageError(f"no data for {task.name}: the Hugging Face hub is unreachable and no data directory is "
                     f"set; pass --data-dir DIR (holding glue/{task.local.folder}/) or set {DATA_DIR_ENV}")


def load_splits(task: GlueTask, source: str) -> tuple[Dataset, Dataset]:
    """(train, dev) with columns text_a, [text_b,] label."""
    if source == "hub":
        glue = load_dataset(HUB_DATASET, task.name)
        names = dict(zip(task.hub_columns, ["text_a", "text_b"]))
        train, dev = (glue[s].rename_columns(names).select_columns([*names.values(), "label"])
                      for s in ("train", task.hub_dev))
        return train, dev
    folder = Path(source) / "glue" / task.local.folder
    return (Dataset.from_dict(read_local(task, folder / task.local.train)),
            Dataset.from_dict(read_local(task, folder / task.local.dev)))


def _texts(split: Dataset) -> list[tuple[str, ...]]:
    columns = [split[c] for c in ("text_a", "text_b") if c in split.column_names]
    return list(zip(*columns))


def carve_validation(train: Dataset, dev: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split train into (train, validation) with a seeded draw: `size` < 1 is a fraction of train,
    else a count. Examples whose text also occurs in dev never enter validation."""
    count = round(size * len(train)) if size < 1 else int(size)
    dev_texts = set(_texts(dev))
    candidates = [i for i, text in enumerate(_texts(train)) if text not in dev_texts]
    if not 0 < count < len(candidates):
        raise UsageError(f"validation_size {size} gives {count} of {len(candidates)} eligible train examples; "
                         "use a fraction in (0, 1) or a smaller count")
    chosen = np.random.default_rng(seed).choice(candidates, size=count, replace=False)
    held_out = set(chosen.tolist())
    kept = [i for i in range(len(train)) if i not in held_out]
    return train.select(kept), train.select(sorted(held_out))


def tokenize(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Token ids and labels only (`labels`, as the models expect); padding happens per batch."""
    pair = "text_b" in split.column_names

    def encode(batch: dict) -> dict:
        texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        return tokenizer(*texts, truncation=True, max_length=max_length)

    encoded = split.map(encode, batched=True, remove_columns=[c for c in split.column_names if c != "label"])
    return encoded.rename_column("label", "labels")


def lengths(split: Dataset) -> list[int]:
    return [len(ids) for ids in split["input_ids"]]


def by_length(split: Dataset) -> Dataset:
    """The split in order of token count, so evaluation batches carry little padding."""
    return split.select(np.argsort(lengths(split), kind="stable"))


@dataclass
class GlueData:
    """Tokenised train and validation splits: what every trial of a search receives."""

    train: Dataset
    validation: Dataset
    train_lengths: list[int]  # for length-grouped batches


def prepare(task: GlueTask, source: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
            validation_size: float, split_seed: int, max_train_examples: int | None = None) -> GlueData:
    train, dev = load_splits(task, source)
    train, validation = carve_validation(train, dev, validation_size, split_seed)
    if max_train_examples is not None and max_train_examples < len(train):
        train = train.shuffle(seed=split_seed).select(range(max_train_examples))
    train = tokenize(train, tokenizer, max_length)
    return GlueData(train, by_length(tokenize(validation, tokenizer, max_length)), lengths(train))


def prepare_dev(task: GlueTask, source: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """The GLUE dev set, tokenised: scored once, for the final table only."""
    return by_length(tokenize(load_splits(task, source)[1], tokenizer, max_length))
