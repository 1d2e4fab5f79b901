"""Generative tasks as prompt/target examples (GENERATIVE.md): each data format once (GSM8K's, Alpaca's,
HH-RLHF's and TRL's), a task's rows read as its `dataset:` block says (the user's files, or a shipped task's data
folder or hub dataset), split so that nothing of the held-out side leaks into training or selection."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llmm_tune.errors import UsageError
from llmm_tune.train.data import BadRows, Example, sample, split_off
from llmm_tune.train.dataset import HUB_SPLITS, TEST_SEED, is_shipped, load_rows, local_files, read_file

GSM8K_SUFFIX = "\nAnswer the above question. First think step by step and then answer the final number.\n"
FINAL = "The final answer is: "


def gsm8k(row: dict) -> Example | str:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        return "expected 'question' and 'answer' with '#### <number>' on its last line"
    gold = answer.rsplit("####", 1)[1].strip()
    return Example(question, question + GSM8K_SUFFIX, re.sub(r"####\s*", FINAL, answer), {"gold": gold})


ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def alpaca(row: dict) -> Example | str:
    instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        return "expected 'instruction', 'output' (text) and an optional 'input'"
    template = ALPACA_INPUT if extra else ALPACA_NO_INPUT
    return Example(instruction + "\n" + extra, template.format(instruction=instruction, input=extra), output)


ASSISTANT = "\n\nAssistant:"


def hh_rlhf(row: dict) -> Example | str:
    """Fine-tune on the chosen transcript's last reply given the dialogue before it; keep the rejected
    reply for preference accuracy when both share that dialogue."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or ASSISTANT not in chosen:
        return "expected 'chosen' and 'rejected' transcripts containing '\\n\\nAssistant:'"
    cut = chosen.rindex(ASSISTANT) + len(ASSISTANT)
    prompt, reply = chosen[:cut], chosen[cut:]
    first_turn = chosen.split("\n\nHuman:", 2)[1].split(ASSISTANT, 1)[0].strip() if "\n\nHuman:" in chosen else prompt
    paired = rejected[:cut] == prompt and rejected[cut:] != reply  # a pair to compare, not identical
    return Example(first_turn, prompt, reply, {"rejected": rejected[cut:]} if paired else {})


def text(row: dict) -> Example | str:
    value = row.get("text")
    return Example(value, "", value) if isinstance(value, str) and value else "expected a non-empty 'text'"


def prompt_completion(row: dict) -> Example | str:
    """Text, or TRL's conversational form: `prompt` and `completion` as message lists (`chat_example`). One
    format takes both, as TRL's one dataset type does: the columns are the same, each row's values say which."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if is_conversational(row, ("prompt", "completion")):
        turns = conversations(row, ("prompt", "completion"))
        return turns if isinstance(turns, str) else chat_example(turns["prompt"], turns["completion"])
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        return ("expected text in 'prompt' and a non-empty 'completion' (or both as message lists, "
                "[{role, content}, ...])")
    return Example(prompt, prompt, completion)


def preference(row: dict) -> Example | str:
    """Fine-tune on the chosen reply, keep the rejected one for preference accuracy. Without a `prompt` column
    the transcripts' shared beginning is the prompt (TRL's implicit prompt). In TRL's conversational form the
    values are message lists (`chat_preference`)."""
    if is_conversational(row, ("prompt", "chosen", "rejected")):
        return chat_preference(row)
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not isinstance(prompt, (str, type(None))):
        return "expected text in 'chosen' and 'rejected' (and 'prompt' when given), or message lists in all of them"
    if prompt is None:
        prompt = os.path.commonprefix([chosen, rejected])
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if not prompt or not chosen or chosen == rejected:
        return "expected a prompt (or transcripts sharing their beginning) and two different replies"
    return Example(prompt, prompt, chosen, {"rejected": rejected})


ROLES = ("system", "user", "assistant")
LISTS = (list, tuple, np.ndarray)  # a message list as JSON (list), a hub row or parquet (numpy array) holds it


def is_conversational(row: dict, names: tuple[str, ...]) -> bool:
    """Whether the row holds TRL's conversational form: a message list in any of the columns `names`."""
    return any(isinstance(row.get(name), LISTS) for name in names)


def conversations(row: dict, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, list[dict]] | str:
    """The row's message lists under `names` (those in `optional` may be absent or null), each a non-empty list of
    {role, content}; else what is wrong, naming the column."""
    found = {}
    for name in names:
        value = row.get(name)
        if value is None and name in optional:
            continue
        turns = list(value) if isinstance(value, LISTS) else None
        if not turns or not all(isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
                                for t in turns):
            both = f" (TRL's conversational form: message lists in {', '.join(names)})" if len(names) > 1 else ""
            return f"expected '{name}': a non-empty list of {{role, content}} with role one of {', '.join(ROLES)}{both}"
        found[name] = [{"role": t["role"], "content": t["content"]} for t in turns]
    return found


def chat_example(prompt: list[dict], completion: list[dict], **extra) -> Example | str:
    """A conversation rendered later with the model's chat template (`Example.extra["messages"]`), the loss on
    the assistant turns of its completion (from turn `extra["prompt_turns"]` on; the whole conversation's for the
    messages format). TRL's way: the prompt is rendered with the generation prompt, an assistant turn is what the
    template adds after what comes before it (`llmm_tune.train.lm_scoring.encode_conversation`)."""
    if not any(t["role"] == "assistant" for t in completion):
        return f"the {'completion' if prompt else 'conversation'} has no assistant turn (nothing to learn); add one " \
               "or drop the row"
    turns = prompt + completion
    key = next((t["content"] for t in turns if t["role"] == "user"), turns[0]["content"])
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return Example(key, "", turns[last]["content"], {"messages": turns, "prompt_turns": len(prompt), **extra})


def chat_preference(row: dict) -> Example | str:
    """TRL's conversational preference row: `chosen` and `rejected` message lists after an optional `prompt` one;
    without it, their shared leading turns are the prompt (TRL's implicit prompt)."""
    turns = conversations(row, ("prompt", "chosen", "rejected"), optional=("prompt",))
    if isinstance(turns, str):
        return turns
    chosen, rejected = turns["chosen"], turns["rejected"]
    prompt = turns.get("prompt")
    if prompt is None:
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt or chosen == rejected or not any(t["role"] == "assistant" for t in rejected):
        return ("expected a prompt (or conversations sharing their first turns) and two different replies, each "
                "with an assistant turn")
    return chat_example(prompt, chosen, rejected=rejected)


def messages(row: dict) -> Example | str:
    """A conversation, rendered later with the model's chat template (`chat_example`); the loss falls on the
    assistant turns only."""
    turns = conversations(row, ("messages",))
    return turns if isinstance(turns, str) else chat_example([], turns["messages"])


@dataclass(frozen=True)
class CausalTask:
    """A fine-tuning task: its name, how its rows become examples (its format's), and its `dataset:` block (a
    shipped task's or the user's), whose fields say the rest."""

    name: str
    parse: Callable[[dict], Example | str]
    dataset: dict = field(compare=False)

    @property
    def test_seed(self) -> int:
        return self.dataset.get("test_seed", TEST_SEED)

    @property
    def grouped(self) -> bool:
        """Whether examples sharing a key (HH-RLHF: a first Human turn) stay on one side of a split."""
        return self.dataset.get("grouped", False)


# A data format: the columns it needs and how a row becomes an example. prompt_completion and preference take text
# or TRL's conversational form (message lists), row by row: the columns alone cannot tell them apart. The user's
# data has its format inferred from its columns among FORMATS; a shipped task names its own (SHIPPED_FORMATS too).
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict], Example | str]]] = {
    "text": (("text",), text),
    "prompt_completion": (("prompt", "completion"), prompt_completion),
    "messages": (("messages",), messages),
    "alpaca": (("instruction", "output"), alpaca),
    "preference": (("chosen", "rejected"), preference),
}
SHIPPED_FORMATS = {**FORMATS, "gsm8k": (("question", "answer"), gsm8k), "hh_rlhf": (("chosen", "rejected"), hh_rlhf)}
PAIRED = ("preference", "hh_rlhf")  # formats whose examples keep a rejected reply: preference accuracy is scored


def _examples(task: CausalTask, rows: Iterator[tuple[str, object]], bad_rows: BadRows, where: str) -> list[Example]:
    """The rows' examples; a conversation keeps where its row is (`extra["at"]`): the chat template may refuse it."""
    examples = []
    for at, row in rows:
        parsed = task.parse(row) if isinstance(row, dict) else "not a JSON object"
        if isinstance(parsed, str):
            bad_rows.add(f"{at}: {parsed}")
        else:
            examples.append(replace(parsed, extra={**parsed.extra, "at": at}) if "messages" in parsed.extra
                            else parsed)
    bad_rows.done(where)
    return examples


def load(task: CausalTask, source: str, on_bad_row: str) -> dict[str, list[Example]]:
    """The task's rows by split: "train" and "test", or "all" when the test split must be carved."""
    bad_rows = BadRows(on_bad_row)
    block = task.dataset
    if not is_shipped(block):
        train, test = load_rows(block, on_bad_row)
        return {"train": _examples(task, train, bad_rows, "train"), "test": _examples(task, test, bad_rows, "test")}
    if source == "hub":
        from datasets import load_dataset

        splits = load_dataset(block["path"], block.get("name"))
        return {ours: _examples(task, ((f"{block['path']} {theirs} row {i}", dict(r))
                                       for i, r in enumerate(splits[theirs])), bad_rows, f"{block['path']} {theirs}")
                for ours, theirs in block.get("splits", HUB_SPLITS).items()}
    folder = Path(source) / block["local"]["folder"]
    return {split: [e for name in names for e in _examples(task, read_file(folder / name), bad_rows, folder / name)]
            for split, names in local_files(block).items()}


def splits(task: CausalTask, source: str, config: dict) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test). A task shipped as one pool has its test split carved first (seeded,
    `test_size`); validation comes from train (seeded, `validation_size`) and never holds a key that is
    also in test. Examples sharing a key stay on one side (HH-RLHF: its first Human turn)."""
    train, test = train_and_test(task, source, config)
    kept, held = split_off([e.key for e in train], config["validation_size"], config["seed"],
                           excluded={e.key for e in test}, grouped=task.grouped)
    train, validation = [train[i] for i in kept], [train[i] for i in held]
    return sample(train, config["max_train_examples"], config["seed"]), validation, scored_test(task, test, config)


def test_split(task: CausalTask, source: str, config: dict) -> list[Example]:
    """The test examples `splits` gives, without the training seed's carve of validation."""
    return scored_test(task, train_and_test(task, source, config)[1], config)


def scored_test(task: CausalTask, test: list[Example], config: dict) -> list[Example]:
    return sample(test, config["test_examples"], task.test_seed)  # the same test examples for every trial and seed


def train_and_test(task: CausalTask, source: str, config: dict) -> tuple[list[Example], list[Example]]:
    rows = load(task, source, config["on_bad_row"])
    if "all" in rows:
        if config["test_size"] is None:
            raise UsageError(f"{task.name} from {source} has no test split; set test_size (a fraction or a count)")
        pool = rows["all"]
        kept, held = split_off([e.key for e in pool], config["test_size"], task.test_seed, grouped=task.grouped)
        return [pool[i] for i in kept], [pool[i] for i in held]
    return rows["train"], rows["test"]


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def extract_answer(generation: str, strict: bool) -> float | None:
    """GSM8K answer extraction: the number right after the first "The final answer is:" (else after
    "####"): a model that goes on to invent a next question answers that one later. Without one,
    `strict=False` takes the last number anywhere (lm-evaluation-harness's flexible match). Commas and `$`
    are stripped."""
    for marker in (FINAL.strip(), "####"):
        if marker in generation:
            found = NUMBER.match(generation.split(marker, 1)[1].lstrip())
            if found:
                return _number(found.group())
    if strict:
        return None
    numbers = NUMBER.findall(generation)
    return _number(numbers[-1]) if numbers else None


def exact_match(generations: list[str], golds: list[str], strict: bool) -> float:
    """Share of generations whose extracted number equals the gold answer numerically."""
    hits = [extract_answer(g, strict) == _number(gold) for g, gold in zip(generations, golds)]
    return sum(hits) / max(1, len(hits))
