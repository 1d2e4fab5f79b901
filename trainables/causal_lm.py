"""Causal-LM family: supervised fine-tuning of any causal LM with Llmm adapters on its attention and MLP
projections, loss on the response tokens only (GENERATIVE.md).

`prepare` turns a task's rows into prompt/target token ids and carves validation from train;
`train` builds the quantised model (its LoftQ initialisation kept beside the experiment) and runs the
shared fit loop, validating on the target NLL (and, when selection asks for it, GSM8K exact match);
`score` rates a checkpoint once on the test split, beside the untuned model on the same examples.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from jinja2 import TemplateError
from torch import nn
from transformers import PreTrainedTokenizerBase

import llmm_tune  # the method (apply_llmm, ...) loads peft at first use; reading the family's settings does not
from llmm_tune.errors import UsageError
from llmm_tune.method.config import METHOD_SETTINGS, llmm_config
from llmm_tune.settings import COMMON, Setting, optional, positive_int, size
from llmm_tune.train.calibration import EVAL_SETTINGS, ReliabilityBins
from llmm_tune.train.data import SHARED_DATA_NAMES, SHARED_DATA_SETTINGS, Example
from llmm_tune.train.dataset import check_shipped, is_shipped, resolve, shipped_blocks, shipped_source
from llmm_tune.train.fit import FIT_SETTINGS, Reporter, default_device, epoch_clock, fit
from llmm_tune.train.lm_scoring import (
    encode,
    encode_conversation,
    greedy_generate,
    mean_nll,
    pad,
    response_loss,
    target_logprobs,
)
from llmm_tune.train.pretrained import is_causal_lm, load_causal_lm, tokenizer_for
from llmm_tune.train.progress import Progress
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.family import Task
from trainables.causal_data import (
    FORMATS,
    PAIRED,
    SHIPPED_FORMATS,
    CausalTask,
    exact_match,
    splits,
    test_split,
)

SETTINGS: dict[str, Setting] = {
    **COMMON, **METHOD_SETTINGS, **FIT_SETTINGS, **EVAL_SETTINGS,
    "max_source_length": Setting(positive_int, "an integer >= 1 (prompt tokens kept, from its end)", 384),
    "max_target_length": Setting(positive_int, "an integer >= 1 (response tokens kept)", 128),
    **SHARED_DATA_SETTINGS,
    "test_size": Setting(optional(size), "a fraction or a count (tasks shipped without a test split)", None),
    "max_new_tokens": Setting(positive_int, "an integer >= 1 (greedy decoding budget)", 256),
    "eval_tokens": Setting(positive_int, "an integer >= 1 (tokens per scoring batch)", 4096),
    "gradient_checkpointing": Setting(lambda v: isinstance(v, bool), "true or false (recompute activations in the "
                                      "backward pass: less memory, about a third more time)", False),
}
DATA_SETTINGS = (*SHARED_DATA_NAMES, "max_source_length", "max_target_length", "test_size")
GPU_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"  # --profile gpu: a Llama needing no gated login
HELD_OUT = "test"
clock = epoch_clock
REPORTED = {"ece": "min"}  # what every evaluation reports beside a task's metrics: the token-level ECE
GENERATION = {"exact_match": {"exact_match_flexible": "max", "exact_match_strict": "max"}}  # a block's
# `generation`: what greedy decoding of the held-out prompts is scored by (GSM8K: the extracted final number)
SHIPPED_FIELDS = {"grouped", "generation"}  # a shipped task's own fields beside train.dataset.SHIPPED_KEYS


def causal_task(context: TrialContext) -> CausalTask:
    return context.definition.details


def resolve_dataset(block: dict, where: str) -> dict:
    """A `dataset:` block checked against its data (llmm_tune.train.dataset); a chat template given as a file
    is read into it, so records carry the template itself. A shipped task's block is checked alone: its data is
    found where the trial runs."""
    if is_shipped(block):
        if "generation" in block and block["generation"] not in GENERATION:
            raise UsageError(f"{where}.generation: {block['generation']!r} is not one of {', '.join(GENERATION)}")
        return check_shipped(dict(block), SHIPPED_FORMATS, SHIPPED_FIELDS, where)
    template = block.get("chat_template")
    if isinstance(template, str) and Path(template).expanduser().is_file():
        block = {**block, "chat_template": Path(template).expanduser().read_text()}
    return resolve(block, {name: columns for name, (columns, _) in FORMATS.items()}, where)


def dataset_task(name: str, block: dict) -> Task:
    """The task a `dataset:` block defines (a shipped task's or the user's): selected on validation NLL unless the
    space says otherwise; preference data also reports how often the chosen reply is the likelier one, and a
    block's `generation` the scores of greedy decoding."""
    metrics = {"nll": "min", "perplexity": "min", **GENERATION.get(block.get("generation"), {})}
    if block["format"] in PAIRED:
        metrics["preference_accuracy"] = "max"
    return Task(name, metrics, "nll", CausalTask(name, SHIPPED_FORMATS[block["format"]][1], block), reported=REPORTED)


TASKS = {name: dataset_task(name, block) for name, block in shipped_blocks("causal_lm").items()}


def check_data(task: str, data_dir: Path | None) -> str:
    return shipped_source(task, TASKS[task].details.dataset, data_dir)


@dataclass
class CausalData:
    """Tokenised train and validation examples (prompt masked), shared by every trial of a search."""

    train: Dataset
    validation: Dataset
    validation_examples: list[Example]  # for exact match and preference accuracy
    train_lengths: list[int]


def task_tokenizer(config: dict, context: TrialContext) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with the chat template the user's data block names (if any)."""
    dataset = causal_task(context).dataset
    return tokenizer_for(config["model"], context.trust_remote_code, dataset.get("chat_template"))


def tokenize(examples: list[Example], tokenizer, config: dict, replies: list | None = None) -> Dataset:
    """Each example's prompt and target (or the given replies instead: texts, or a conversation's completion
    turns), the prompt masked in the labels; a conversation rendered by the chat template, the assistant turns
    of its completion alone in the labels."""
    replies = replies or [e.target for e in examples]
    return Dataset.from_list([
        encode_chat(tokenizer, e, reply if isinstance(reply, list) else None, config) if "messages" in e.extra
        else encode(tokenizer, e.prompt, reply, config["max_source_length"], config["max_target_length"])
        for e, reply in zip(examples, replies)])


def encode_chat(tokenizer: PreTrainedTokenizerBase, example: Example, completion: list[dict] | None,
                config: dict) -> dict[str, list[int]]:
    """A conversation example (or its prompt with another completion) rendered by the chat template; a template
    that refuses it, or renders its prompt otherwise within the whole, stops with the row named."""
    turns, start = example.extra["messages"], example.extra["prompt_turns"]
    try:
        return encode_conversation(tokenizer, turns[:start] + completion if completion else turns,
                                   config["max_source_length"] + config["max_target_length"], learnt_from=start)
    except (UsageError, TemplateError) as error:
        raise UsageError(f"{example.extra.get('at', 'a conversation')}: {error}") from None


def check_chat_template(config: dict, examples: list[Example], tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.chat_template is None and any("messages" in e.extra for e in examples):
        raise UsageError(f"model {config['model']!r} has no chat template for the conversations in the data; pass "
                         "--chat-template FILE (a Jinja template) or choose a model that has one (an instruct model)")


def prepare(config: dict, context: TrialContext, source: str) -> CausalData:
    if not is_causal_lm(config["model"], context.trust_remote_code):
        raise UsageError(f"model {config['model']!r} is not a causal LM; the causal_lm family needs a decoder with a "
                         "language-modelling head (smollm2, meta-llama/Llama-2-7b-hf, ...): set model in the YAML")
    tokenizer = task_tokenizer(config, context)
    train, validation, _ = splits(causal_task(context), source, config)
    check_chat_template(config, train + validation, tokenizer)
    train_set = tokenize(train, tokenizer, config)
    return CausalData(train_set, tokenize(validation, tokenizer, config), validation,
                      [len(ids) for ids in train_set["input_ids"]])


def build_model(config: dict, context: TrialContext, device: str) -> nn.Module:
    torch.manual_seed(config["seed"])
    model = load_causal_lm(config["model"], trust_remote_code=context.trust_remote_code)
    model.config.use_cache = False  # training; generation turns the cache on per call
    if config["gradient_checkpointing"]:  # non-reentrant: recomputation replays the adapters' noise draws
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapted = llmm_tune.apply_llmm(model, llmm_config(config), init_device=device, loftq_cache=context.loftq_store())
    return adapted.to(device)


def preference_accuracy(model: nn.Module, examples: list[Example], chosen: list[tuple[float, int]], tokenizer,
                        config: dict, device: str) -> float:
    """Share of non-identical pairs whose chosen final reply gets a higher mean token log-likelihood than the
    rejected one, given their shared dialogue; `chosen` holds the chosen replies' (sum, count) already."""
    pairs = [i for i, e in enumerate(examples) if "rejected" in e.extra]
    if not pairs:
        return float("nan")
    encoded = tokenize([examples[i] for i in pairs], tokenizer, config, [examples[i].extra["rejected"] for i in pairs])
    rejected = target_logprobs(model, list(encoded), tokenizer.pad_token_id, device, config["eval_tokens"],
                               config.get("draws", 0), config.get("seed", 0))
    wins = [chosen[i][0] / max(chosen[i][1], 1) > r[0] / max(r[1], 1) for i, r in zip(pairs, rejected)]
    return sum(wins) / len(wins)


def gsm8k_exact_match(model: nn.Module, examples: list[Example], tokenizer, config: dict, device: str,
                      progress: str | None = None) -> dict[str, float]:
    """Exact match of greedy decoding; with `progress`, a line every 30 seconds of how far it is."""
    with Progress(progress, len(examples)) if progress else contextlib.nullcontext() as tracker:
        generations = greedy_generate(model, tokenizer, [e.prompt for e in examples], config["max_new_tokens"],
                                      config["batch_size"] * 4, device, progress=tracker)
    golds = [e.extra["gold"] for e in examples]
    return {"exact_match_strict": exact_match(generations, golds, strict=True),
            "exact_match_flexible": exact_match(generations, golds, strict=False)}


def evaluate(model: nn.Module, examples: list[Example], encoded: Dataset, tokenizer, config: dict, task: Task,
             device: str, generate: bool, progress: str | None = None) -> dict[str, float]:
    """Target NLL and perplexity, and in the same pass the token-level ECE of the top-1 next-token probability
    (llmm_tune.train.calibration), with the mean adapter or the predictive of `draws` adapter samples; plus the
    task's own metrics: preference accuracy (HH-RLHF) and, with `generate`, exact match of the extracted answer
    (GSM8K, decoded with the mean adapter), its decoding's progress shown as `progress` says."""
    bins = ReliabilityBins()
    logprobs = target_logprobs(model, list(encoded), tokenizer.pad_token_id, device, config["eval_tokens"],
                               config.get("draws", 0), config.get("seed", 0), bins)
    nll = mean_nll(logprobs)
    scores = {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "ece": bins.ece()}
    if "preference_accuracy" in task.metrics:
        scores["preference_accuracy"] = preference_accuracy(model, examples, logprobs, tokenizer, config, device)
    if "exact_match_flexible" in task.metrics and generate:
        if device == "cpu" and hasattr(model, "llmm_config"):  # decoding re-reads every weight per token: a
            # merged float model is faster here than dequantising the base at every step
            model = llmm_tune.merge_llmm(copy.deepcopy(model))
        scores |= gsm8k_exact_match(model, examples, tokenizer, config, device, progress)
    return scores


def train(config: dict, context: TrialContext, data: CausalData, report: Reporter, resume: str | None = None,
          device: str | None = None) -> None:
    device = device or default_device()
    model = build_model(config, context, device)
    tokenizer = task_tokenizer(config, context)
    # decoding on validation only when it selects, or is another objective of the search
    generate = any(metric.startswith("exact_match") for metric in (context.metric, *context.objectives))

    def validate() -> dict[str, float]:
        return evaluate(model, data.validation_examples, data.validation, tokenizer, config, context.definition,
                        device, generate)

    fit(config, model, data.train, data.train_lengths, functools.partial(pad, pad_id=tokenizer.pad_token_id),
        validate, report, resume, device, loss=response_loss)


# What the untuned model's test scores depend on. Not the seed: the test examples are drawn with the task's own
# seed, so one process (a search's export, compare's retraining worker) decodes the untuned model once.
UNTUNED_KEYS = ("model", "max_source_length", "max_target_length", "test_size", "test_examples", "on_bad_row",
                "max_new_tokens", "eval_tokens", "batch_size")


@functools.cache
def _untuned(config_items: tuple, context: TrialContext, source: str) -> dict[str, float]:
    """The pretrained model's scores on the same test examples (computed once per process)."""
    config = dict(config_items)
    device = default_device()
    tokenizer = task_tokenizer(config, context)
    test = test_split(causal_task(context), source, config)
    model = load_causal_lm(config["model"], trust_remote_code=context.trust_remote_code).to(device)
    return evaluate(model, test, tokenize(test, tokenizer, config), tokenizer, config, context.definition, device,
                    generate=True, progress=f"decoding {context.task}'s test split with the untuned model")


def score(config: dict, context: TrialContext, checkpoint: str, source: str) -> dict[str, float]:
    """Test metrics of a checkpoint (GSM8K: strict and flexible exact match by greedy decoding; Alpaca:
    perplexity; HH-RLHF: perplexity and preference accuracy), each beside the untuned model's."""
    device = default_device()
    tokenizer = task_tokenizer(config, context)
    test = test_split(causal_task(context), source, config)
    model = llmm_tune.load_adapter(build_model(config, context, device), checkpoint).eval()
    tuned = evaluate(model, test, tokenize(test, tokenizer, config), tokenizer, config, context.definition, device,
                     generate=True, progress=f"decoding {context.task}'s test split with the tuned model")
    untuned = _untuned(tuple((k, config.get(k)) for k in UNTUNED_KEYS), without_cache(context), source)
    return {**tuned, **{f"untuned_{k}": v for k, v in untuned.items()}}


def without_cache(context: TrialContext) -> TrialContext:
    """The context as the untuned model's scores depend on it (not on where LoftQ is kept): one key per task."""
    return dataclasses.replace(context, loftq_cache=None)
