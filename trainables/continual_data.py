"""The continual-learning benchmark (CONTINUAL.md): O-LoRA's CL_Benchmark tasks as prompt/label examples, a
sequence read from its space's `dataset:` list (one {name, group} block a task, in order: the published orders are
the shipped cl_order spaces), validation carved from each task's train, and exact match on the label string."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from llmm_tune.errors import UsageError
from llmm_tune.train.data import BadRows, Example, sample, split_off
from llmm_tune.train.dataset import TEST_SEED, read_file

BENCHMARK = Path("cl_benchmark") / "O-LoRA"  # under the data folder: CL_Benchmark/<group>/<task>/, configs/
SPLIT_FILES = {"train": "train.json", "test": "test.json"}  # dev.json is a copy of test.json: never used
TEMPLATE = "Task:{group}\nDataset:{name}\n{instruction}Option: {labels} \n{text}\nAnswer:"
KEYS = {"name", "group"}  # a task's block in a continual space's `dataset:` list


@dataclass(frozen=True)
class BenchmarkTask:
    """A task of the benchmark as its space's `dataset:` list names it: its name and its group (the folder it lies
    in, and the instruction and the `Task:` line of its prompt)."""

    name: str
    group: str


def check_sequence(blocks: object, where: str) -> list[dict]:
    """A continual space's `dataset:`: a list of one or more task blocks ({name, group}), names distinct; a
    UsageError naming the entry otherwise."""
    if not isinstance(blocks, list) or not blocks:
        raise UsageError(f"{where}: must list the sequence's tasks in order, e.g. [{{name: MNLI, group: NLI}}]")
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) != KEYS or not all(
                isinstance(v, str) and v for v in block.values()):
            raise UsageError(f"{where}[{i}]: {block!r} must be {{name: TASK, group: GROUP}} (the task's folder under "
                             "CL_Benchmark/GROUP/ of the data folder)")
    names = [block["name"] for block in blocks]
    if len(set(names)) < len(names):
        raise UsageError(f"{where}: a task is listed twice in {names}; list each task once")
    return blocks


def sequence(blocks: list[dict]) -> tuple[BenchmarkTask, ...]:
    """The tasks of a checked `dataset:` list, in its order."""
    return tuple(BenchmarkTask(block["name"], block["group"]) for block in blocks)


def is_order(value) -> bool:
    return value is None or (isinstance(value, list) and len(value) >= 1 and all(
        isinstance(v, str) and v for v in value) and len(set(value)) == len(value))


def order_of(config: dict, tasks: tuple[BenchmarkTask, ...], where: str) -> tuple[BenchmarkTask, ...]:
    """The trial's sequence: the tasks the `order` setting picks from the space's list (`tasks`), in its order,
    else the whole list; a UsageError names a task the list lacks."""
    if not config.get("order"):
        return tasks
    listed = {task.name: task for task in tasks}
    unknown = [name for name in config["order"] if name not in listed]
    if unknown:
        raise UsageError(f"order (fixed.order): {', '.join(unknown)} not in the dataset: list of {where} "
                         f"({', '.join(listed)}); pick tasks from that list, or use a space whose list has them "
                         "(cl_order4..6 list all 15 of the benchmark)")
    return tuple(listed[name] for name in config["order"])


def task_folder(root: Path, task: BenchmarkTask) -> Path:
    return root / BENCHMARK / "CL_Benchmark" / task.group / task.name


def check_files(root: Path, tasks: tuple[BenchmarkTask, ...], where: str) -> None:
    """Every task of `tasks` has its train and test splits and its labels; a UsageError names the first gap."""
    for task in tasks:
        for file in (*SPLIT_FILES.values(), "labels.json"):
            path = task_folder(root, task) / file
            if not path.is_file():
                raise UsageError(f"{path} not found: task {task.name} of {where} needs train.json, test.json and "
                                 f"labels.json; take {task.name} out of the order (the space's dataset: list, or "
                                 "fixed.order) or add the complete benchmark (O-LoRA's CL_Benchmark) under --data-dir")
    instructions = root / BENCHMARK / "configs" / "instruction_config.json"
    if not instructions.is_file():
        raise UsageError(f"{instructions} not found; the prompts need O-LoRA's instruction_config.json there")


def normalise(text: str) -> str:
    """Lower-cased, punctuation stripped, whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def load_task(root: Path, task: BenchmarkTask, split: str, on_bad_row: str) -> list[Example]:
    """A task's split as examples: the prompt of CONTINUAL.md, the label string as target. A row whose label is
    not in the task's labels.json stops the run (or is skipped with on_bad_row=skip), naming file and row."""
    folder, name, group = task_folder(root, task), task.name, task.group
    labels = json.loads((folder / "labels.json").read_text())
    instructions = json.loads((root / BENCHMARK / "configs" / "instruction_config.json").read_text())
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


def train_and_validation(root: Path, task: BenchmarkTask, config: dict) -> tuple[list[Example], list[Example]]:
    """Validation carved from the task's train (seeded; no text shared with its test split), the rest capped at
    `max_train_examples`."""
    train = load_task(root, task, "train", config["on_bad_row"])
    test_texts = {e.key for e in load_task(root, task, "test", config["on_bad_row"])}
    kept, held = split_off([e.key for e in train], config["validation_size"], config["seed"], excluded=test_texts)
    return sample([train[i] for i in kept], config["max_train_examples"], config["seed"]), [train[i] for i in held]


def test_split(root: Path, task: BenchmarkTask, config: dict) -> list[Example]:
    """The task's test split (the same seeded `test_examples` of it for every trial)."""
    return sample(load_task(root, task, "test", config["on_bad_row"]), config["test_examples"], TEST_SEED)


def exact_match(generations: list[str], examples: list[Example]) -> float:
    """Share of generations equal to the label after `normalise` (the text after the prompt's "Answer:")."""
    hits = [normalise(g) == normalise(e.target) for g, e in zip(generations, examples)]
    return sum(hits) / max(1, len(hits))

