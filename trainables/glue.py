"""GLUE family: fine-tune a sequence classifier with Llmm and report validation scores.

The recipe reads top to bottom: `prepare` tokenises train and a validation split carved from it
(seeded, never a text that is also in dev), `train` builds the quantised model and runs the shared
fit loop, `score` rates a checkpoint on the GLUE dev set, which only the export and reproduce read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

import llmm_tune  # the method (apply_llmm, ...) loads peft at first use; reading the family's settings does not
from llmm_tune.method.config import METHOD_SETTINGS, llmm_config
from llmm_tune.settings import COMMON, Setting, optional, positive_int, size
from llmm_tune.train.data import BAD_ROW_POLICIES, by_length, carve_validation, lengths, local_or_hub
from llmm_tune.train.dataset import load_rows, resolve
from llmm_tune.train.fit import FIT_SETTINGS, Reporter, default_device, epoch_clock, fit
from llmm_tune.train.pretrained import load_classifier, load_tokenizer, model_config
from llmm_tune.tune.context import TrialContext
from trainables.glue_data import FORMATS, HUB_DATASET, TASKS, GlueTask, label_set, load_splits
from trainables.glue_data import dataset_task as dataset_task  # the family's: a task from the user's data

SETTINGS: dict[str, Setting] = {
    **COMMON, **METHOD_SETTINGS, **FIT_SETTINGS,
    "max_length": Setting(positive_int, "an integer >= 1"),
    "validation_size": Setting(size, "a fraction in (0, 1) or a whole count", 0.1),
    "max_train_examples": Setting(optional(positive_int), "an integer >= 1 or null (all)", None),
    "test_examples": Setting(optional(positive_int), "an integer >= 1 or null (the whole dev set)", None),
    "on_bad_row": Setting(lambda v: v in BAD_ROW_POLICIES, f"one of {list(BAD_ROW_POLICIES)}", "error"),
}
GPU_MODEL = "microsoft/deberta-v3-base"  # --profile gpu's model: the paper's encoder, ungated
HELD_OUT = "dev"  # the split `score` reads
DATA_SETTINGS = ("model", "max_length", "validation_size", "max_train_examples", "seed", "on_bad_row")
clock = epoch_clock


def glue_task(context: TrialContext) -> GlueTask:
    return context.definition.details


def resolve_dataset(block: dict, where: str) -> dict:
    """A `dataset:` block checked against its data (llmm_tune.train.dataset), with train's label set recorded."""
    block = resolve(block, FORMATS, where)
    if "labels" not in block:
        block["labels"] = label_set(load_rows(block, "skip")[0], where)
    return block


def check_data(task: str, data_dir: Path | None) -> str:
    local = TASKS[task].details.local
    return local_or_hub(task, data_dir, Path("glue", local.folder), (local.train, local.dev), HUB_DATASET)


@dataclass
class GlueData:
    """Tokenised train and validation splits: what every trial of a search receives."""

    train: Dataset
    validation: Dataset
    train_lengths: list[int]  # for length-grouped batches


def _texts(split: Dataset) -> list[tuple[str, ...]]:
    return list(zip(*(split[c] for c in ("text_a", "text_b") if c in split.column_names)))


def tokenize(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Token ids and labels only (`labels`, as the models expect); padding happens per batch."""
    pair = "text_b" in split.column_names

    def encode(batch: dict) -> dict:
        texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        return tokenizer(*texts, truncation=True, max_length=max_length)

    encoded = split.map(encode, batched=True, remove_columns=[c for c in split.column_names if c != "label"])
    return encoded.rename_column("label", "labels")


def prepare(config: dict, context: TrialContext, source: str) -> GlueData:
    model_config(config["model"], context.trust_remote_code)  # a model that cannot load stops here
    train, dev = load_splits(glue_task(context), source, config["on_bad_row"])
    train, validation = carve_validation(train, _texts(train), set(_texts(dev)), config["validation_size"],
                                         config["seed"])
    if config["max_train_examples"] is not None and config["max_train_examples"] < len(train):
        train = train.shuffle(seed=config["seed"]).select(range(config["max_train_examples"]))
    tokenizer = glue_tokenizer(config, context)
    train = tokenize(train, tokenizer, config["max_length"])
    return GlueData(train, by_length(tokenize(validation, tokenizer, config["max_length"])), lengths(train))


def build_model(config: dict, context: TrialContext, device: str) -> nn.Module:
    torch.manual_seed(config["seed"])  # the task head's initialisation
    model = load_classifier(config["model"], glue_task(context).num_labels, trust_remote_code=context.trust_remote_code)
    adapted = llmm_tune.apply_llmm(model, llmm_config(config), init_device=device, loftq_cache=context.loftq_store())
    return adapted.to(device)


def glue_tokenizer(config: dict, context: TrialContext) -> PreTrainedTokenizerBase:
    return load_tokenizer(config["model"], trust_remote_code=context.trust_remote_code)


@torch.no_grad()
def evaluate(model: nn.Module, split: Dataset, task: GlueTask, collate, batch_size: int,
             device: str) -> dict[str, float]:
    """Mean loss and the task's metrics on `split`, with the adapters' means (eval mode)."""
    logits, labels, loss_sum = [], [], 0.0
    for batch in DataLoader(split, batch_size=batch_size, collate_fn=collate):
        batch = batch.to(device)
        output = model(**batch)
        loss_sum += output.loss.item() * len(batch["labels"])
        logits.append(output.logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    return {"loss": loss_sum / len(split), **task.score(np.concatenate(labels), np.concatenate(logits))}


def train(config: dict, context: TrialContext, data: GlueData, report: Reporter, resume: str | None = None,
          device: str | None = None) -> None:
    """Fine-tune, evaluating on the validation split `evals_per_epoch` times per epoch."""
    device = device or default_device()
    model = build_model(config, context, device)
    collate = DataCollatorWithPadding(glue_tokenizer(config, context), return_tensors="pt")

    def validate() -> dict[str, float]:
        return evaluate(model, data.validation, glue_task(context), collate, config["batch_size"] * 2, device)

    fit(config, model, data.train, data.train_lengths, collate, validate, report, resume, device)


def score(config: dict, context: TrialContext, checkpoint: str, source: str) -> dict[str, float]:
    """The GLUE dev loss and metrics of a checkpoint (its first `test_examples` rows when that is set)."""
    device = default_device()
    task = glue_task(context)
    train, dev = load_splits(task, source, config["on_bad_row"])
    if config["test_examples"] is not None:
        dev = dev.select(range(min(config["test_examples"], len(dev))))
    tokenizer = glue_tokenizer(config, context)
    scores = evaluate(model_of(config, context, checkpoint, device),
                      by_length(tokenize(dev, tokenizer, config["max_length"])), task,
                      DataCollatorWithPadding(tokenizer, return_tensors="pt"), config["batch_size"] * 2, device)
    if task.dataset is not None and task.label_names is not None:  # the user's classes: the bar to clear
        scores["majority_accuracy"] = majority_accuracy(train["label"], dev["label"])
    return scores


def model_of(config: dict, context: TrialContext, checkpoint: str, device: str) -> nn.Module:
    return llmm_tune.load_adapter(build_model(config, context, device), checkpoint).eval()


def majority_accuracy(train_labels: list[int], held_out_labels: list[int]) -> float:
    """The held-out accuracy of always answering train's most frequent class."""
    majority = np.bincount(train_labels).argmax()
    return float(np.mean(np.asarray(held_out_labels) == majority))
