"""GLUE family: fine-tune a sequence classifier with Llmm and report validation scores.

The recipe reads top to bottom: `prepare` tokenises train and a validation split carved from it
(seeded, never a text that is also in dev), `train` builds the quantised model and runs the shared
fit loop, `score` rates a checkpoint on the GLUE dev set, which only the export and reproduce read,
and on the space's shift sets. A classifier's every evaluation also scores its calibration (ECE, Brier, NLL:
llmm_tune.train.calibration); with `draws`, predictions are the mean of that many adapter samples' probabilities.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

import llmm_tune  # the method (apply_llmm, ...) loads peft at first use; reading the family's settings does not
from llmm_tune.errors import UsageError
from llmm_tune.method.config import METHOD_SETTINGS, llmm_config
from llmm_tune.method.model import draws_needed, mean_over_draws
from llmm_tune.settings import COMMON, Setting, positive_int
from llmm_tune.train.calibration import EVAL_SETTINGS, calibration, fit_temperature, reliability
from llmm_tune.train.data import (
    SHARED_DATA_NAMES,
    SHARED_DATA_SETTINGS,
    by_length,
    carve_validation,
    lengths,
)
from llmm_tune.train.dataset import check_shipped, is_shipped, load_rows, resolve, shipped_source
from llmm_tune.train.fit import FIT_SETTINGS, Reporter, default_device, epoch_clock, fit
from llmm_tune.train.pretrained import load_classifier, load_tokenizer, model_config
from llmm_tune.tune.context import TrialContext
from trainables.glue_data import FORMATS, SCORED, TASKS, GlueTask, label_set, load_shift, load_splits
from trainables.glue_data import dataset_task as dataset_task  # the family's: a task from the user's data
from trainables.glue_data import resolve_shift as resolve_shift  # the family's: a space's shift set checked

SETTINGS: dict[str, Setting] = {
    **COMMON, **METHOD_SETTINGS, **FIT_SETTINGS, **EVAL_SETTINGS,
    "max_length": Setting(positive_int, "an integer >= 1"),
    **SHARED_DATA_SETTINGS,
}
GPU_MODEL = "microsoft/deberta-v3-base"  # --profile gpu's model: the paper's encoder, ungated
HELD_OUT = "dev"  # the split `score` reads
DATA_SETTINGS = (*SHARED_DATA_NAMES, "max_length")
SHIPPED_FIELDS = {"columns", "labels", "metrics"}  # a shipped task's own fields beside train.dataset.SHIPPED_KEYS
VALIDATION_FILE = "validation_logits.npz"  # in a classifier's checkpoints: what temperature scaling is fitted on
clock = epoch_clock


def glue_task(context: TrialContext) -> GlueTask:
    return context.definition.details


def resolve_dataset(block: dict, where: str) -> dict:
    """A `dataset:` block checked against its data (llmm_tune.train.dataset), with train's label set recorded. A
    shipped task's block is checked alone: its data is found where the trial runs."""
    if is_shipped(block):
        labels = block.get("labels")
        if labels != "regression" and not (isinstance(labels, list) and len(labels) >= 2):
            raise UsageError(f"{where}.labels: name the task's labels in index order (two or more), or write "
                             "labels: regression")
        kind = "regression" if labels == "regression" else "classification"
        if not set(block.get("metrics") or ()) <= set(SCORED[kind]):
            raise UsageError(f"{where}.metrics: a {kind} scores {', '.join(SCORED[kind])}; got {block['metrics']}")
        return check_shipped(dict(block), FORMATS, SHIPPED_FIELDS, where)
    block = resolve(block, FORMATS, where)
    if "labels" not in block:
        block["labels"] = label_set(load_rows(block, "skip")[0], where)
    return block


def check_data(task: str, data_dir: Path | None) -> str:
    return shipped_source(task, TASKS[task].details.dataset, data_dir)


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
    for entry in shift_sets(context):  # a shift set that cannot be read stops here, before any trial
        load_shift(glue_task(context), entry, source, config["on_bad_row"])
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


@dataclass
class Predictions:
    """A split's predictions: the mean adapter's logits, or with draws the log of the predictive's probabilities
    (a regression's mean output); the labels; the mean loss."""

    logits: np.ndarray
    labels: np.ndarray
    loss: float


@torch.no_grad()
def predict(model: nn.Module, split: Dataset, task: GlueTask, collate, batch_size: int, device: str, draws: int = 0,
            seed: int = 0) -> Predictions:
    """`split`'s predictions in eval mode: the adapters' means (`draws` 0: one forward a batch, its loss the model's),
    else the mean of `draws` adapter samples' probabilities (a regression's outputs), drawn seeded with `seed`: the
    same samples for every batch, so the predictive does not depend on the batching."""
    draws = draws_needed(model, draws)
    logits, labels, loss_sum = [], [], 0.0
    for batch in DataLoader(split, batch_size=batch_size, collate_fn=collate):
        batch = batch.to(device)
        if draws:
            logits.append(sampled(model, batch, draws, seed, task.num_labels == 1).cpu().numpy())
        else:
            output = model(**batch)
            loss_sum += output.loss.item() * len(batch["labels"])
            logits.append(output.logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    if not draws:
        return Predictions(logits, labels, loss_sum / len(split))
    loss = np.mean((logits.reshape(-1) - labels) ** 2) if task.num_labels == 1 else calibration(logits, labels)["nll"]
    return Predictions(logits, labels, float(loss))


def sampled(model: nn.Module, batch, draws: int, seed: int, regression: bool) -> torch.Tensor:
    """The predictive of `draws` adapter samples on a batch: the log of their mean probabilities (a regression:
    their mean output)."""
    def forward() -> torch.Tensor:
        logits = model(**batch).logits.float()
        return logits if regression else logits.log_softmax(dim=-1)

    return mean_over_draws(model, draws, forward, seed, log_space=not regression)


def scores_of(predictions: Predictions, task: GlueTask, temperature: float | None = None) -> dict[str, float]:
    """The loss and the task's metrics; a classifier's ECE, Brier score and NLL too, and with `temperature` the
    three after temperature scaling (`<name>_ts`) and T itself."""
    scores = {"loss": predictions.loss, **task.score(predictions.labels, predictions.logits)}
    if task.num_labels > 1:
        scores |= calibration(predictions.logits, predictions.labels)
        if temperature is not None:
            scaled = calibration(predictions.logits, predictions.labels, temperature)
            scores |= {"temperature": temperature, **{f"{name}_ts": value for name, value in scaled.items()}}
    return scores


def train(config: dict, context: TrialContext, data: GlueData, report: Reporter, resume: str | None = None,
          device: str | None = None) -> None:
    """Fine-tune, evaluating on the validation split `evals_per_epoch` times per epoch; a classifier's checkpoints
    keep the validation logits of their evaluation, which temperature scaling is fitted on at scoring."""
    device = device or default_device()
    model = build_model(config, context, device)
    collate = DataCollatorWithPadding(glue_tokenizer(config, context), return_tensors="pt")
    task = glue_task(context)
    latest: dict[str, Predictions] = {}

    def validate() -> dict[str, float]:
        latest["validation"] = predict(model, data.validation, task, collate, config["batch_size"] * 2, device,
                                       config.get("draws", 0), config["seed"])
        return scores_of(latest["validation"], task)

    def report_with_logits(metrics: dict, directory: str) -> None:
        if task.num_labels > 1:
            kept = latest["validation"]
            np.savez(Path(directory) / VALIDATION_FILE, logits=kept.logits, labels=kept.labels)
        report(metrics, directory)

    fit(config, model, data.train, data.train_lengths, collate, validate, report_with_logits, resume, device)


def score(config: dict, context: TrialContext, checkpoint: str, source: str) -> dict:
    """The GLUE dev loss and metrics of a checkpoint (its first `test_examples` rows when that is set); for a
    classifier also its calibration, before and after temperature scaling (T fitted on the checkpoint's validation
    logits), and its reliability bins; the space's shift sets scored alike, under "shift"."""
    device = default_device()
    task = glue_task(context)
    train, dev = load_splits(task, source, config["on_bad_row"])
    tokenizer = glue_tokenizer(config, context)
    held_out = functools.partial(score_split, model_of(config, context, checkpoint, device), task, tokenizer,
                                 config, device, fitted_temperature(checkpoint))
    dev = first_rows(dev, config["test_examples"])
    scores = held_out(dev)
    if task.own_data and task.label_names is not None:  # the user's classes: the bar to clear
        scores["majority_accuracy"] = majority_accuracy(train["label"], dev["label"])
    shift = {entry["name"]: held_out(first_rows(load_shift(task, entry, source, config["on_bad_row"]),
                                                config["test_examples"])) for entry in shift_sets(context)}
    return {**scores, **({"shift": shift} if shift else {})}


def score_split(model: nn.Module, task: GlueTask, tokenizer: PreTrainedTokenizerBase, config: dict, device: str,
                temperature: float | None, split: Dataset) -> dict:
    """A held-out split's scores (`scores_of`); a classifier's reliability bins too, for the export's diagram."""
    predictions = predict(model, by_length(tokenize(split, tokenizer, config["max_length"])), task,
                          DataCollatorWithPadding(tokenizer, return_tensors="pt"), config["batch_size"] * 2, device,
                          config.get("draws", 0), config["seed"])
    scores = scores_of(predictions, task, temperature)
    if task.num_labels > 1:
        scores["reliability"] = reliability(predictions.logits, predictions.labels).as_dict()
    return scores


def first_rows(split: Dataset, rows: int | None) -> Dataset:
    return split if rows is None else split.select(range(min(rows, len(split))))


def fitted_temperature(checkpoint: str) -> float | None:
    """T fitted on the validation logits a classifier's checkpoint keeps; None without them (a regression's, or a
    checkpoint from before they were kept)."""
    path = Path(checkpoint) / VALIDATION_FILE
    if not path.is_file():
        return None
    with np.load(path) as kept:
        return fit_temperature(kept["logits"], kept["labels"])


def shift_sets(context: TrialContext) -> list[dict]:
    """The space's resolved `shift:` entries (none without one)."""
    return json.loads(context.shift) if context.shift else []


def model_of(config: dict, context: TrialContext, checkpoint: str, device: str) -> nn.Module:
    return llmm_tune.load_adapter(build_model(config, context, device), checkpoint).eval()


def majority_accuracy(train_labels: list[int], held_out_labels: list[int]) -> float:
    """The held-out accuracy of always answering train's most frequent class."""
    majority = np.bincount(train_labels).argmax()
    return float(np.mean(np.asarray(held_out_labels) == majority))


def held_out_details(scores: dict) -> str:
    """A classifier's scores and calibration on dev and on each shift set, as Markdown (the export writes it under
    the table for the best configuration); nothing for a regression."""
    if "ece" not in scores:
        return ""
    sets = {f"{HELD_OUT} (held out)": scores, **{f"{name} (shift)": found for name, found in
                                                 scores.get("shift", {}).items()}}
    columns = [key for key, value in scores.items() if isinstance(value, float) and key != "majority_accuracy"]
    lines = ["ECE: top-label, 15 equal-width confidence bins. `_ts`: after temperature scaling (one T, fitted on the "
             "validation logits of this checkpoint). reliability.png draws the bins.", "",
             "| split | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, found in sets.items():
        lines.append(f"| {name} | " + " | ".join(f"{found[c]:.4f}" if c in found else "" for c in columns) + " |")
    return "\n".join(lines)
