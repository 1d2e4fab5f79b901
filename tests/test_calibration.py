"""Calibration and predictive distributions: the formulas on hand-computed predictions, the predictive of adapter
draws (probabilities averaged, seeded, the training stream untouched), temperature scaling, the causal LM's
token-level ECE, and a space's shift sets (checked where the space is read, scored and recorded)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from scipy.special import log_softmax
from torch import nn
from transformers import BatchEncoding

from llmm_tune import LlmmConfig, apply_llmm
from llmm_tune.errors import UsageError
from llmm_tune.method.model import adapter_noise, llmm_layers
from llmm_tune.results.plots import reliability_plot
from llmm_tune.results.record import ExportRecord
from llmm_tune.train.calibration import ReliabilityBins, calibration, fit_temperature, reliability
from llmm_tune.train.dataset import portable
from llmm_tune.train.lm_scoring import pad, target_logits, target_logprobs
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import tiny_bert
from trainables import glue

# five predictions over three classes; top-label confidences 0.70 and 0.73 share bin 10 of 15 ((0.667, 0.733]),
# 0.62, 0.78 and 0.50 fall alone in bins 9, 11 and 7
PROBS = np.array([[0.70, 0.20, 0.10], [0.62, 0.28, 0.10], [0.11, 0.11, 0.78], [0.25, 0.50, 0.25],
                  [0.05, 0.73, 0.22]])
LABELS = np.array([0, 1, 2, 1, 0])  # right, wrong, right, right, wrong


def test_ece_brier_and_nll_equal_the_formulas_on_hand_computed_predictions():
    scores = calibration(np.log(PROBS), LABELS)  # log-probabilities are logits
    # bin 10: accuracy 1/2, confidence 0.715; the others: |1 - 0.78|, |0 - 0.62|, |1 - 0.50|
    assert scores["ece"] == pytest.approx((2 * abs(0.5 - 0.715) + 0.62 + 0.22 + 0.50) / 5)  # 0.354
    squared = [0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2, 0.62 ** 2 + 0.72 ** 2 + 0.1 ** 2, 0.11 ** 2 * 2 + 0.22 ** 2,
               0.25 ** 2 * 2 + 0.5 ** 2, 0.95 ** 2 + 0.73 ** 2 + 0.22 ** 2]
    assert scores["brier"] == pytest.approx(sum(squared) / 5)  # 0.59684
    assert scores["nll"] == pytest.approx(-sum(map(math.log, [0.70, 0.28, 0.78, 0.50, 0.05])) / 5)
    bins = reliability(np.log(PROBS), LABELS).as_dict()
    assert bins["count"][10] == 2 and bins["accuracy"][10] == 0.5 and bins["confidence"][10] == pytest.approx(0.715)
    assert sum(bins["count"]) == 5 and bins["accuracy"][0] is None


def test_bins_filled_in_batches_give_the_ece_of_all_at_once():
    confidence = np.random.default_rng(0).uniform(0, 1, 1000)
    correct = np.random.default_rng(1).uniform(0, 1, 1000) < confidence ** 2
    whole, parts = ReliabilityBins(), ReliabilityBins()
    whole.add(confidence, correct)
    for start in range(0, 1000, 300):
        parts.add(confidence[start:start + 300], correct[start:start + 300])
    assert parts.ece() == pytest.approx(whole.ece()) and whole.ece() > 0.05
    assert math.isnan(ReliabilityBins().ece())


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3)) + 1.2 * np.eye(3)[labels]  # about 60% right
    logits *= 5  # and far too sure of it
    temperature = fit_temperature(logits[:1000], labels[:1000])  # fitted on "validation"
    before, after = calibration(logits[1000:], labels[1000:]), calibration(logits[1000:], labels[1000:], temperature)
    assert temperature > 2
    assert after["nll"] < before["nll"] - 0.3 and after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"]
    grid = np.exp(np.linspace(np.log(0.1), np.log(20), 400))  # the fitted T is the grid's best
    best = grid[np.argmin([calibration(logits[:1000], labels[:1000], t)["nll"] for t in grid])]
    assert temperature == pytest.approx(best, rel=0.02)


class Tiny(nn.Module):
    """Two linear layers; the output as a Hugging Face model gives it (logits, loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> BatchEncoding:
        logits = self.fc2(torch.relu(self.fc1(x)))
        return BatchEncoding({"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)})


def tiny_llmm() -> nn.Module:
    torch.manual_seed(0)
    model = apply_llmm(Tiny(), LlmmConfig(rank=4, K=2, scale=1.0, bits=None, target_modules=("fc1", "fc2")))
    with torch.no_grad():
        for layer in llmm_layers(model).values():
            layer.B_mean.normal_(std=0.5)
            layer.A_moments.normal_(std=0.5)
            layer.B_moments.normal_(std=0.5)
    return model.eval()


def collate(rows: list[dict]) -> BatchEncoding:
    return BatchEncoding({"x": torch.tensor([r["x"] for r in rows]),
                          "labels": torch.tensor([r["labels"] for r in rows])})


SPLIT = Dataset.from_dict({"x": torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).tolist(),
                           "labels": [0, 1, 2, 0, 1, 2]})
TASK = glue.TASKS["mnli"].details  # three classes


def test_draws_0_predict_with_the_mean_adapter_and_draws_average_probabilities_not_logits():
    model, x = tiny_llmm(), torch.tensor(SPLIT["x"])
    labels = torch.tensor(SPLIT["labels"])
    state = torch.get_rng_state()
    mean = glue.predict(model, SPLIT, TASK, collate, 2, "cpu", draws=0)
    after_mean = torch.get_rng_state()  # the data loader draws its seed from it, as it always did
    torch.set_rng_state(state)
    with torch.no_grad():
        # the mean adapter, in predict's batches of 2 (one pass of 6 takes other kernels on some CPUs: AVX512)
        batched = torch.cat([model(x[i:i + 2], labels[i:i + 2])["logits"] for i in range(0, len(x), 2)])
        assert np.array_equal(mean.logits, batched.numpy())
        with adapter_noise(model, seed=5):  # the same samples predict draws on every batch (of 2 here)
            samples = [model(x, labels)["logits"] for _ in range(3)]
    torch.set_rng_state(state)
    drawn = glue.predict(model, SPLIT, TASK, collate, 2, "cpu", draws=3, seed=5)
    probabilities = torch.stack(samples).softmax(dim=-1).mean(dim=0)
    assert np.allclose(drawn.logits, probabilities.log().numpy(), atol=1e-6)  # the mean of the probabilities
    assert not np.allclose(drawn.logits, torch.stack(samples).mean(dim=0).log_softmax(dim=-1).numpy(), atol=1e-3)
    assert not np.allclose(drawn.logits, log_softmax(mean.logits, axis=-1), atol=1e-3)  # the draws differ from it
    assert drawn.loss == pytest.approx(-probabilities.log()[range(6), labels].mean().item(), rel=1e-6)
    assert torch.equal(torch.get_rng_state(), after_mean)  # the draws leave the training stream as it was
    again = glue.predict(model, SPLIT, TASK, collate, 3, "cpu", draws=3, seed=5)
    assert np.allclose(again.logits, drawn.logits, atol=1e-6)  # seeded: reproducible, whatever the batching
    assert not any(layer.sample_in_eval for layer in llmm_layers(model).values())


def test_the_token_level_ece_comes_from_the_nll_pass_and_matches_the_target_logits(tiny_llama):
    torch.manual_seed(1)
    features = [{"input_ids": torch.randint(3, 128, (n,)).tolist(), "labels": [-100] * 4 + list(range(5, n + 1))}
                for n in (9, 12, 7)]
    bins = ReliabilityBins()
    logprobs = target_logprobs(tiny_llama, features, 0, "cpu", bins=bins)
    assert logprobs == target_logprobs(tiny_llama, features, 0, "cpu")  # the NLL is what it was
    with torch.no_grad():
        logits, targets = target_logits(tiny_llama.eval(), pad(features, 0))
    assert sum(bins.count) == len(targets) == sum(n for _, n in logprobs)
    assert bins.ece() == pytest.approx(calibration(logits.numpy(), targets.numpy())["ece"], abs=1e-6)


def test_a_shift_set_is_checked_where_the_space_is_read(tmp_path):
    def space(shift: str) -> str:
        path = tmp_path / "space.yaml"
        path.write_text(f"extends: glue_rte\nshift: {shift}\n")
        return str(path)

    assert json.loads(load_spec("glue_rte_qnli", "cpu", "llmm").shift) == [{"name": "qnli", "task": "qnli"}]
    for shift, error in [("[{name: m, task: mnli}]", "are not rte's"), ("[{name: q}]", "exactly one of task"),
                         ("[{name: q, task: qnli}, {name: q, task: qnli}]", "a name of its own"),
                         ("{name: q, task: qnli}", "must be a list"), ("[{name: q, task: nope}]", "not a shipped"),
                         (f"[{{name: q, files: {tmp_path}/none.jsonl}}]", "is not a data file")]:
        with pytest.raises(UsageError, match=error):
            load_spec(space(shift), "cpu", "llmm")
    with pytest.raises(UsageError, match="regression"):
        load_spec(str(write(tmp_path / "stsb.yaml", "extends: glue_stsb\nshift: [{name: q, task: qnli}]\n")), "cpu",
                  "llmm")
    rows = tmp_path / "mine.jsonl"
    rows.write_text('{"text": "a", "text_pair": "b", "label": "entailment"}\n{"text": "c", "text_pair": "d", '
                    '"label": 1}\n')
    (entry,) = json.loads(load_spec(space(f"[{{name: mine, files: {rows}}}]"), "cpu", "llmm").shift)
    assert entry["files"] == portable(rows) and entry["hash"].startswith("sha256:")  # named as every data file is
    assert glue.load_shift(glue.TASKS["rte"].details, entry, "unused")["label"] == [0, 1]
    rows.write_text('{"text": "a", "text_pair": "b", "label": "neutral"}\n')
    with pytest.raises(UsageError, match="'neutral' is not one of"):
        load_spec(space(f"[{{name: mine, files: {rows}}}]"), "cpu", "llmm")


def write(path, text: str):
    path.write_text(text)
    return path


def test_the_shift_set_is_scored_recorded_and_drawn(tmp_path, data_dir):
    spec = load_spec("glue_rte_qnli", "cpu", "llmm")
    context = spec.context()
    config = {**spec.fixed, "lr": 1e-3, "scale": 100.0, "rank": 4, "K": 1, "bits": 4, "quant_method": "normal_float",
              "model": str(tiny_bert(tmp_path / "bert")), "max_train_examples": 16, "validation_size": 8,
              "test_examples": 12, "batch_size": 4, "epochs": 1, "evals_per_epoch": 1, "loftq_iters": 1,
              "max_length": 32}
    data = glue.prepare(config, context, str(data_dir))
    kept = []
    glue.train(config, context, data, lambda metrics, d: kept.append((metrics, shutil.copytree(d, tmp_path / "c"))))
    (metrics, checkpoint), = kept
    assert {"val_accuracy", "val_ece", "val_brier", "val_nll", "val_loss"} <= set(metrics)  # recorded, not selected
    assert context.metric == "accuracy" and "ece" not in context.definition.metrics  # selection as it was
    assert (checkpoint / glue.VALIDATION_FILE).is_file()
    scores = glue.score(config, context, str(checkpoint), str(data_dir))
    shifted = scores["shift"]["qnli"]
    for found in (scores, shifted):
        assert {"accuracy", "ece", "brier", "nll", "temperature", "ece_ts", "brier_ts", "nll_ts"} <= set(found)
        assert sum(found["reliability"]["count"]) == 12 and 0 <= found["ece"] <= 1
    assert scores["temperature"] == shifted["temperature"]  # one T, fitted on validation
    assert "| qnli (shift) |" in glue.held_out_details(scores)
    assert reliability_plot(scores, "dev", tmp_path) == ["reliability.png"]
    assert (tmp_path / "reliability.png").stat().st_size > 0
    record = ExportRecord("glue", "rte", "llmm", "e", "t", config, {"metric": "accuracy", "mode": "max"},
                          {"split": "dev", "scores": scores}, {"source": "x", "shift": json.loads(spec.shift)}, 0,
                          False, "c", {}, "s", "r")
    assert record.context().shift == spec.shift == TrialContext.shift_in(spec.text)
