"""GLUE recipe: fine-tune a sequence classifier with Llmm and report validation scores.

`train` is the whole recipe; `glue_trainable` runs it as a Ray Tune function trainable, and
`llmm_tune.reproduce` runs it without Tune. A trial's `config` holds every setting (see
`llmm_tune.spaces.SETTINGS`) plus `task` and `metric`; selection only ever sees the validation
split carved from train, never the GLUE dev set.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from llmm_tune import LlmmConfig, apply_llmm, load_adapter
from llmm_tune.checkpoint import load_training_state, save_training_state
from llmm_tune.data import GlueData
from llmm_tune.errors import FAILURE_KEY, TrialFailure, failure_reason
from llmm_tune.models import load_classifier, load_tokenizer
from llmm_tune.tasks import GlueTask, get_task

Reporter = Callable[[dict, str], None]  # (metrics, checkpoint directory)


def llmm_config(config: dict) -> LlmmConfig:
    """The method's settings of a trial; None marks a setting its baseline does not use."""
    defaults = LlmmConfig()
    return LlmmConfig(
        rank=config["rank"], K=config["K"], bits=config["bits"], alpha=config["alpha"],
        scale=config["scale"] if config["scale"] is not None else defaults.scale,
        quant_method=config["quant_method"] or defaults.quant_method,
        loftq_iters=config["loftq_iters"], dropout=config["dropout"], init=config["init"],
    )


def build_model(config: dict, device: str) -> nn.Module:
    torch.manual_seed(config["seed"])  # the task head's initialisation
    model = load_classifier(config["model"], get_task(config["task"]).num_labels,
                            trust_remote_code=config.get("trust_remote_code", False))
    return apply_llmm(model, llmm_config(config), init_device=device).to(device)


def restore_model(config: dict, checkpoint: str, device: str) -> nn.Module:
    """A trial's model with the adapter of one of its checkpoints, in eval mode."""
    return load_adapter(build_model(config, device), checkpoint).eval()


def collator(config: dict) -> DataCollatorWithPadding:
    tokenizer = load_tokenizer(config["model"], trust_remote_code=config.get("trust_remote_code", False))
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


@torch.no_grad()
def evaluate(model: nn.Module, split: Dataset, task: GlueTask, collate, batch_size: int,
             device: str) -> dict[str, float]:
    """Mean loss and the task's metrics on `split`, with the adapters' means (eval mode)."""
    model.eval()
    logits, labels, loss_sum = [], [], 0.0
    for batch in DataLoader(split, batch_size=batch_size, collate_fn=collate):
        batch = batch.to(device)
        output = model(**batch)
        loss_sum += output.loss.item() * len(batch["labels"])
        logits.append(output.logits.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train()
    return {"loss": loss_sum / len(split), **task.score(np.concatenate(labels), np.concatenate(logits))}


def train(config: dict, data: GlueData, report: Reporter, resume: str | None = None,
          device: str | None = None) -> None:
    """Fine-tune, evaluating `evals_per_epoch` times per epoch; each evaluation is reported with a
    checkpoint that resumes the run exactly (adapter, optimizer, schedule, random state, position)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task, metric = get_task(config["task"]), config["metric"]
    model = build_model(config, device)
    collate = collator(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    batch_size, accum = config["batch_size"], config["grad_accum"]
    batches_per_epoch = math.ceil(len(data.train) / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * config["epochs"]
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config["warmup_ratio"] * total_steps),
                                                total_steps)
    evals = config["evals_per_epoch"]
    eval_at = {e * steps_per_epoch + round(k * steps_per_epoch / evals)
               for e in range(config["epochs"]) for k in range(1, evals + 1)}
    progress = {"step": 0, "best": None, "loss_sum": 0.0, "loss_count": 0}
    if resume is not None:
        progress = load_training_state(resume, model, optimizer, scheduler)
    model.train()
    started = time.time()
    while progress["step"] < total_steps:
        epoch = progress["step"] // steps_per_epoch
        order = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)  # same per epoch on resume
        sampler = LengthGroupedSampler(batch_size, lengths=data.train_lengths, generator=order)
        loader = DataLoader(data.train, batch_size=batch_size, sampler=sampler, collate_fn=collate)
        done = (progress["step"] - epoch * steps_per_epoch) * accum
        for index, batch in enumerate(islice(loader, done, None), start=done):
            loss = model(**batch.to(device)).loss
            if not math.isfinite(value := loss.item()):
                raise TrialFailure(f"diverged: training loss {value} at step {progress['step']}; "
                                   "lower lr or raise scale")
            (loss / accum).backward()
            progress["loss_sum"] += value
            progress["loss_count"] += 1
            if (index + 1) % accum and index + 1 < batches_per_epoch:
                continue
            torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            if progress["step"] in eval_at:
                scores = evaluate(model, data.validation, task, collate, batch_size * 2, device)
                if not math.isfinite(scores["loss"]):
                    raise TrialFailure(f"diverged: validation loss {scores['loss']} at step {progress['step']}; "
                                       "lower lr or raise scale")
                value = scores[metric]
                progress["best"] = value if progress["best"] is None else max(progress["best"], value)
                result = {
                    "epoch": progress["step"] / steps_per_epoch, "step": progress["step"],
                    "train_loss": progress["loss_sum"] / max(progress["loss_count"], 1),
                    **{f"val_{k}": v for k, v in scores.items()}, f"best_val_{metric}": progress["best"],
                    "lr": scheduler.get_last_lr()[0], "seconds": time.time() - started,
                }
                progress["loss_sum"], progress["loss_count"] = 0.0, 0
                with tempfile.TemporaryDirectory() as directory:
                    save_training_state(directory, model, optimizer, scheduler, progress)
                    report(result, directory)


def glue_trainable(config: dict, data: GlueData) -> None:
    """Ray Tune function trainable: resumes from Tune's checkpoint when a trial is restored."""
    from ray import tune

    from llmm_tune.progress import quiet_logs

    quiet_logs()
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    checkpoint = tune.get_checkpoint()

    def report(metrics: dict, directory: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    try:
        if checkpoint is None:
            train(config, data, report)
        else:
            with checkpoint.as_directory() as directory:
                train(config, data, report, resume=str(Path(directory)))
        return
    except Exception as error:  # divergence and out of memory end the trial, not the search
        reason = failure_reason(error)
        if reason is None:
            raise  # a bug: Tune records it and retries from the last checkpoint (FailureConfig)
    gc.collect()  # the failed model's memory, before this worker takes the next trial
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tune.report({FAILURE_KEY: reason})
