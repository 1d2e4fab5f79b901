"""Calibration of a predictive distribution: the formulas every family scores with, and temperature scaling.

With p the predicted class probabilities of an example, y its label and N examples:
- ECE, top-label expected calibration error over `BINS` = 15 equal-width confidence bins: a prediction whose top
  probability c = max_k p_k satisfies b/15 < c <= (b+1)/15 falls in bin b (c = 0 in bin 0); with n_b predictions in
  bin b, acc_b the share of them whose top class is y and conf_b their mean c, ECE = sum_b (n_b / N) |acc_b - conf_b|.
- Brier score: the mean over examples of sum_k (p_k - [k = y])^2 (0 is perfect, 2 the worst).
- NLL: the mean over examples of -log p_y.
- Temperature scaling: one scalar T > 0, fitted on the validation split to minimise its NLL of softmax(z / T) (z:
  the logits), then applied to another split's logits; it changes confidence, never the predicted class.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from llmm_tune.settings import Setting, non_negative_int

BINS = 15
SCORES = {"ece": "min", "brier": "min", "nll": "min"}  # what `calibration` returns, each better lower
TEMPERATURES = (0.05, 20.0)  # the bounds of the search over log T
EVAL_SETTINGS: dict[str, Setting] = {
    "draws": Setting(non_negative_int, "an integer >= 0 (adapter samples whose probabilities evaluation averages; "
                     "0: the mean adapter)", 0),
}


class ReliabilityBins:
    """Counts, summed confidences and right answers per confidence bin; filled batch by batch (a causal LM's tokens)
    or at once, so ECE never needs every prediction in memory."""

    def __init__(self, bins: int = BINS) -> None:
        self.count = np.zeros(bins, dtype=np.int64)
        self.confidence = np.zeros(bins)
        self.correct = np.zeros(bins)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Predictions with top-label probability `confidence`, `correct` where their top label is the true one."""
        confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
        bins = len(self.count)
        index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
        self.count += np.bincount(index, minlength=bins)
        self.confidence += np.bincount(index, weights=confidence, minlength=bins)
        self.correct += np.bincount(index, weights=np.asarray(correct, dtype=np.float64).reshape(-1), minlength=bins)

    def ece(self) -> float:
        """Top-label ECE of what was added (NaN before anything was)."""
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float(np.abs(self.correct - self.confidence).sum() / total)  # n_b |acc_b - conf_b| = |sums' gap|

    def as_dict(self) -> dict:
        """Per bin: its range's upper edge, its count, mean confidence and accuracy (None where empty), for the
        reliability diagram."""
        filled = np.maximum(self.count, 1)
        return {"upper": [round((b + 1) / len(self.count), 6) for b in range(len(self.count))],
                "count": self.count.tolist(),
                "confidence": [float(c) if n else None for c, n in zip(self.confidence / filled, self.count)],
                "accuracy": [float(a) if n else None for a, n in zip(self.correct / filled, self.count)]}


def reliability(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> ReliabilityBins:
    """The bins of a split's predictions softmax(logits / temperature) (logits: examples x classes)."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    bins = ReliabilityBins()
    bins.add(np.exp(log_probs.max(axis=-1)), log_probs.argmax(axis=-1) == np.asarray(labels))
    return bins


def brier_score(log_probs: np.ndarray, labels: np.ndarray) -> float:
    probs = np.exp(log_probs)
    truth = np.eye(probs.shape[-1])[labels]
    return float(((probs - truth) ** 2).sum(axis=-1).mean())


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def calibration(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """ECE, Brier score and NLL of softmax(logits / temperature): any log-probabilities are logits too."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    labels = np.asarray(labels, dtype=np.int64)
    return {"ece": reliability(log_probs, labels).ece(), "brier": brier_score(log_probs, labels),
            "nll": nll(log_probs, labels)}  # log_softmax leaves log-probabilities as they are


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURES that minimises the NLL of softmax(logits / T): a bounded search over log T (the NLL is
    convex in 1 / T, so it has one minimum)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    found = minimize_scalar(lambda log_t: nll(log_softmax(logits / math.exp(log_t), axis=-1), labels),
                            bounds=tuple(map(math.log, TEMPERATURES)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))
