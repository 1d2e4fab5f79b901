"""Data helpers every family shares: where data comes from (the hub or a data folder, recorded so a
record works on another machine), validation splits carved from train, bad rows, length order, and the
prompt/target examples of the generative recipes with their seeded draws."""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from llmm_tune.errors import UsageError
from llmm_tune.project import ROOT
from llmm_tune.settings import Setting, count, optional, positive_int, size

DATA_DIR_ENV = "LLMM_DATA_DIR"

BAD_ROW_POLICIES = ("error", "skip")
DATASET_SOURCE = "dataset"  # a task whose search space names its data (`dataset:`): no data folder, no hub task
# The data settings every family has: how validation is carved from train, how much of train and of the held-out
# split is read, what a bad row does. A family adds its own (a tokenizer's lengths, a sequence's order).
SHARED_DATA_SETTINGS: dict[str, Setting] = {
    "validation_size": Setting(size, "a fraction in (0, 1) or a whole count (carved from train)", 0.1),
    "max_train_examples": Setting(optional(positive_int), "an integer >= 1 or null (all)", None),
    "test_examples": Setting(optional(positive_int), "an integer >= 1 or null (the whole held-out split)", None),
    "on_bad_row": Setting(lambda v: v in BAD_ROW_POLICIES, f"one of {list(BAD_ROW_POLICIES)}", "error"),
}
SHARED_DATA_NAMES = ("model", "seed", *SHARED_DATA_SETTINGS)  # what shapes a family's prepared data: never searched


def resolve_data_dir(option: str | None) -> Path | None:
    """The data directory from --data-dir or LLMM_DATA_DIR (absolute: trials run elsewhere), its links kept as
    given (a record names the folder as the user did, not where a link of this machine points)."""
    value = option or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(os.path.abspath(Path(value).expanduser()))
    if not path.is_dir():
        raise UsageError(f"data directory {value} does not exist; pass --data-dir DIR or set {DATA_DIR_ENV} "
                         "to the folder holding the data (e.g. ../shared/data)")
    return path


def hub_reachable(dataset: str) -> bool:
    """A quick probe: `load_dataset` itself retries for about half a minute before it gives up."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(dataset, timeout=5)
        return True
    except Exception:
        return False


def local_or_hub(task: str, data_dir: Path | None, folder: Path, files: Iterable[str], hub_dataset: str) -> str:
    """Where a task's data will come from (a family's `check_data`): the data folder, when given and holding
    every file of `files` under `folder`; else the hub, when it answers; else a UsageError saying how to fix it."""
    if data_dir is not None:
        missing = [data_dir / folder / name for name in files if not (data_dir / folder / name).is_file()]
        if missing:
            raise UsageError(f"{missing[0]} not found; {task} needs {folder}/ under --data-dir (see ../shared/data), "
                             "or drop --data-dir to load it from the hub")
        return str(data_dir)
    if hub_reachable(hub_dataset):
        return "hub"
    raise UsageError(f"no data for {task}: the Hugging Face hub is unreachable and no data directory is set; "
                     f"pass --data-dir DIR (holding {folder}/) or set {DATA_DIR_ENV}")


def portable_source(source: str, data_dir_option: str | None) -> str:
    """How a record names its data so it resolves on another machine: "hub", "$LLMM_DATA_DIR" when the
    folder came from that variable, else the folder relative to the project root when it lies inside
    the project's parent (e.g. ../shared/data), else the absolute path. A space's own data block names
    its files itself (`dataset`)."""
    if source in ("hub", DATASET_SOURCE):
        return source
    if not data_dir_option and os.environ.get(DATA_DIR_ENV):
        return f"${DATA_DIR_ENV}"
    path = Path(os.path.abspath(source))  # not resolved: ../shared may be a link to a folder of this machine
    if path.is_relative_to(ROOT.parent):
        return os.path.relpath(path, ROOT)
    return str(path)


def locate_source(recorded: str, data_dir_option: str | None = None) -> Path | str:
    """The data a record names, found on this machine: --data-dir or LLMM_DATA_DIR first, else the
    recorded folder (relative to the project root), else "hub"."""
    if recorded == DATASET_SOURCE:
        return recorded
    override = resolve_data_dir(data_dir_option)
    if override is not None:
        return override
    if recorded == "hub":
        return "hub"
    if recorded == f"${DATA_DIR_ENV}":
        raise UsageError(f"the record reads its data from ${DATA_DIR_ENV}, which is not set here; set it or pass "
                         "--data-dir DIR")
    path = Path(os.path.normpath(ROOT / recorded))  # links kept, as portable_source names them
    if not path.is_dir():
        raise UsageError(f"the record's data folder {recorded} (relative to {ROOT}) does not exist here; pass "
                         f"--data-dir DIR or set {DATA_DIR_ENV} to where the data is")
    return path


class BadRows:
    """A data row that lacks what its task needs either stops the run naming its file and line ("error")
    or is skipped, and the skipped rows are counted on the console ("skip"): never silently."""

    def __init__(self, policy: str):
        self.policy, self.skipped = policy, []

    def add(self, problem: str) -> None:
        if self.policy == "error":
            raise UsageError(f"{problem}; fix or remove that row, or pass --on-bad-row skip")
        self.skipped.append(problem)

    def done(self, path) -> None:
        if self.skipped:
            print(f"skipped {len(self.skipped)} bad row(s) of {path} (--on-bad-row skip); first: {self.skipped[0]}")
        self.skipped = []


@dataclass(frozen=True)
class Example:
    """A prompt and the target a generative task trains on (or scores)."""

    key: str  # what must not cross between splits (a question, an instruction, a first Human turn)
    prompt: str
    target: str
    extra: dict = field(default_factory=dict)  # gold answer (GSM8K), rejected reply (HH-RLHF), task (a sequence)


def sample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded draw of `size` examples in their original order (all of them when `size` is None): the
    files are grouped by source (HH-RLHF's four subsets), so their first rows are no sample."""
    if size is None or size >= len(examples):
        return examples
    return [examples[i] for i in sorted(np.random.default_rng(seed).choice(len(examples), size, replace=False))]


def split_off(keys: Sequence[Hashable], size: float, seed: int, excluded: set | frozenset = frozenset(),
              grouped: bool = False) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of a seeded draw: `size` < 1 is a fraction of all examples, else a count.
    An example whose key is in `excluded` (texts of another held-out split) is never held out; with
    `grouped`, examples sharing a key are held out together, so near-duplicates stay on one side."""
    wanted = count(size, len(keys))
    candidates = [i for i, key in enumerate(keys) if key not in excluded]
    if not 0 < wanted < len(candidates):
        raise UsageError(f"a held-out size of {size} gives {wanted} of {len(candidates)} eligible examples; "
                         "use a fraction in (0, 1) or a smaller count")
    rng = np.random.default_rng(seed)
    if not grouped:
        held_out = set(rng.choice(candidates, size=wanted, replace=False).tolist())
    else:
        members: dict = {}
        for i in candidates:
            members.setdefault(keys[i], []).append(i)
        groups = list(members.values())
        held_out = set()
        for group in rng.permutation(len(groups)):
            if len(held_out) >= wanted:
                break
            held_out.update(groups[group])
    return [i for i in range(len(keys)) if i not in held_out], sorted(held_out)


def carve_validation(train: Dataset, keys: Sequence[Hashable], excluded: set, size: float,
                     seed: int) -> tuple[Dataset, Dataset]:
    """Split train into (train, validation) with `split_off`: nothing whose key is in `excluded` (the
    held-out split's texts) enters validation."""
    kept, held_out = split_off(keys, size, seed, excluded)
    return train.select(kept), train.select(held_out)


def lengths(split: Dataset) -> list[int]:
    return [len(ids) for ids in split["input_ids"]]


def by_length(split: Dataset) -> Dataset:
    """The split in order of token count, so evaluation batches carry little padding."""
    return split.select(np.argsort(lengths(split), kind="stable"))
