"""The continual-learning benchmark (CONTINUAL.md): O-LoRA's CL_Benchmark tasks as prompt/label examples, the
published task orders, validation carved from each task's train, and exact match on the label string."""

from __future__ import annotations

import json
import string
from pathlib import Path

from llmm_tune.errors import UsageError
from llmm_tune.train.data import BadRows, Example, sample, split_off
from llmm_tune.train.dataset import TEST_SEED, read_file

BENCHMARK = Path("cl_benchmark") / "O-LoRA"  # under the data folder: CL_Benchmark/<group>/<task>/, configs/
GROUPS = {"dbpedia": "TC", "amazon": "SC", "yahoo": "TC", "agnews": "TC", "yelp": "SC", "IMDB": "SC", "SST-2": "SC",
          "MNLI": "NLI", "CB": "NLI", "RTE": "NLI", "QQP": "QQP", "WiC": "WiC", "COPA": "COPA", "BoolQA": "BoolQA",
          "MultiRC": "MultiRC"}
# The published orders (O-LoRA's orders 1-3, GORP's 4-6; task_orders.json beside the data says where from), by
# task name: the search space cl_order1.yaml runs task cl_order1.
_LONG = ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia", "agnews",
         "MultiRC", "yahoo")
ORDERS = {
    "cl_order1": ("dbpedia", "amazon", "yahoo", "agnews"),
    "cl_order2": ("dbpedia", "amazon", "agnews", "yahoo"),
    "cl_order3": ("yahoo", "amazon", "agnews", "dbpedia"),
    "cl_order4": _LONG,
    "cl_order5": ("MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
               "yelp", "amazon", "yahoo"),
    "cl_order6": ("yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
               "MultiRC", "BoolQA", "WiC"),
}
# Offline: order 4 without the five tasks the shared copy lacks splits of (yahoo, dbpedia, yelp, IMDB, MultiRC).
ORDERS["cl_local"] = tuple(t for t in _LONG if t not in ("yahoo", "dbpedia", "yelp", "IMDB", "MultiRC"))
SPLIT_FILES = {"train": "train.json", "test": "test.json"}  # dev.json is a copy of test.json: never used
TEMPLATE = "Task:{group}\nDataset:{name}\n{instruction}Option: {labels} \n{text}\nAnswer:"


def is_order(value) -> bool:
    return value is None or (isinstance(value, list) and len(value) >= 1 and all(v in GROUPS for v in value)
                             and len(set(value)) == len(value))


def order_of(config: dict, task: str) -> tuple[str, ...]:
    """The trial's sequence: the `order` setting, else the task's published order."""
    return tuple(config["order"]) if config.get("order") else ORDERS[task]


def task_folder(root: Path, name: str) -> Path:
    return root / BENCHMARK / "CL_Benchmark" / GROUPS[name] / name


def check_files(root: Path, order: tuple[str, ...], where: str) -> None:
    """Every task of `order` has its train and test splits and its labels; a UsageError names the first gap."""
    for name in order:
        for file in (*SPLIT_FILES.values(), "labels.json"):
            path = task_folder(root, name) / file
            if not path.is_file():
                raise UsageError(f"{path} not found: task {name} of {where} needs train.json, test.json and "
                                 f"labels.json; take {name} out of the order (search space: fixed.order) or add "
                                 "the complete benchmark (O-LoRA's CL_Benchmark) under --data-dir")
    instructions = root / BENCHMARK / "configs" / "instruction_config.json"
    if not instructions.is_file():
        raise UsageError(f"{instructions} not found; the prompts need O-LoRA's instruction_config.json there")


def normalise(text: str) -> str:
    """Lower-cased, punctuation stripped, whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def load_task(root: Path, name: str, split: str, on_bad_row: str) -> list[Example]:
    """A task's split as examples: the prompt of CONTINUAL.md, the label string as target. A row whose label is
    not in the task's labels.json stops the run (or is skipped with on_bad_row=skip), naming file and row."""
    folder = task_folder(root, name)
    labels = json.loads((folder / "labels.json").read_text())
    instructions = json.loads((root / BENCHMARK / "configs" / "instruction_config.json").read_text())
    group = GROUPS[name]
    # a group without one (COPA) carries its question in the text itself
    instruction = instructions[group][0]["instruction"] if group in instructions else ""
    bad_rows, examples = BadRows(on_bad_row), []
    path = folder / SPLIT_FILES[split]
    for at, row in read_file(path):
        text, label = (row.get("sentence"), row.get("label")) if isinstance(row, dict) else (None, None)
        if not isinstance(text, str) or not isinstance(label, str):
            bad_rows.add(f"{at}: expected 'sentence' and 'label' (text)")
        elif label not in labels:
            bad_rows.add(f"{at}: label {label!r} is not one of {folder / 'labels.json'}: {labels}")
        else:
            prompt = TEMPLATE.format(group=group, name=name, instruction=instruction, labels=", ".join(labels),
                                     text=text)
            examples.append(Example(text, prompt, label, {"task": name}))
    bad_rows.done(path)
    return examples


def train_and_validation(root: Path, name: str, config: dict) -> tuple[list[Example], list[Example]]:
    """Validation carved from the task's train (seeded; no text shared with its test split), the rest capped at
    `max_train_examples`."""
    train = load_task(root, name, "train", config["on_bad_row"])
    test_texts = {e.key for e in load_task(root, name, "test", config["on_bad_row"])}
    kept, held = split_off([e.key for e in train], config["validation_size"], config["seed"], excluded=test_texts)
    return sample([train[i] for i in kept], config["max_train_examples"], config["seed"]), [train[i] for i in held]


def test_split(root: Path, name: str, config: dict) -> list[Example]:
    """The task's test split (the same seeded `test_examples` of it for every trial)."""
    return sample(load_task(root, name, "test", config["on_bad_row"]), config["test_examples"], TEST_SEED)


def exact_match(generations: list[str], examples: list[Example]) -> float:
    """Share of generations equal to the label after `normalise` (the text after the prompt's "Answer:")."""
    hits = [normalise(g) == normalise(e.target) for g, e in zip(generations, examples)]
    return sum(hits) / max(1, len(hits))

