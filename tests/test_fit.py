"""The shared fit loop on a one-weight model: plan counts the steps and evaluations fit runs, and the step
loop's hook sees each step's accumulated gradient."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import BatchEncoding

import llmm_tune.train.fit as fit_loop
from llmm_tune.plan import run as plan
from llmm_tune.train.fit import Batches, Hooks, Schedule, fit, train_steps
from llmm_tune.tune.probe import trial_config
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import tiny_space

EXAMPLES = 50


def squared(model: nn.Module, batch) -> torch.Tensor:
    return model(batch["x"].unsqueeze(1)).pow(2).mean()


def toy() -> tuple[nn.Module, Batches]:
    """y = w x with w = 1, on x = 1 .. EXAMPLES, all of length 1."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    train = Dataset.from_dict({"x": [float(i + 1) for i in range(EXAMPLES)]})
    collate = lambda rows: BatchEncoding({"x": torch.tensor([r["x"] for r in rows])})  # noqa: E731
    return model, Batches(train, [1] * EXAMPLES, collate, "cpu", seed=0)


@pytest.mark.parametrize(("length", "evaluations"), [
    ({"max_steps": 7}, [0.4, 0.6, 1.0, 1.4]),  # cut short mid-epoch: the clock says where it stopped
    ({"epochs": 1.5}, [0.4, 0.6, 1.0, 1.5]),  # a fraction ends on a whole step (7 at 5 an epoch), reported as set
])
def test_the_plan_counts_the_steps_and_evaluations_that_fit_runs(tmp_path, monkeypatch, length, evaluations):
    """Epochs that end inside an accumulation, evaluations between whole steps, and max_steps or a fraction of an
    epoch ending mid-epoch: plan predicts the optimizer steps fit takes and the epochs at which it reports."""
    space = tiny_space(tmp_path, tmp_path / "unused", batch_size=4, grad_accum=3, evals_per_epoch=3, **length)
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"device": "cpu", "threads": 1, "prepare_s": 1.0, "train_examples": EXAMPLES,
                                   "build_cold_s": 2.0, "build_warm_s": 1.0, "first_steps_s": 0.2, "step_s": 0.1,
                                   "eval_s": 0.5, "peak_memory_gib": 1.0}))
    planned = plan([str(space), "--figures", str(figures)])
    steps, reports = [], []
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    monkeypatch.setattr(fit_loop, "save_training_state", lambda *args: None)  # a checkpoint holds an adapter
    model, data = toy()
    fit(trial_config(load_spec(str(space), "cpu", "llmm")), model, data.train, data.lengths, data.collate,
        lambda: {"loss": 0.0}, lambda metrics, directory: reports.append(metrics), loss=squared)
    assert planned["steps"] == len(steps) == reports[-1]["step"] == 7
    assert planned["evaluations"] == [r["epoch"] for r in reports] == evaluations
    assert reports[-1]["lr"] == 0.0  # the schedule decays to zero where the fit ends


def test_the_hook_runs_once_per_step_with_the_steps_accumulated_gradient():
    """13 batches of 4 in groups of 3: each step's gradient is the sum of its batches' over accum, the last
    step of an epoch holding the one batch left; gradients are cleared after each step."""
    model, data = toy()
    config = {"batch_size": 4, "grad_accum": 3, "epochs": 1, "warmup_ratio": 0.0}
    schedule = Schedule.of(config, EXAMPLES)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    batches, seen = [], []

    def loss(model: nn.Module, batch) -> torch.Tensor:
        batches.append(batch["x"])
        return squared(model, batch)

    def before_step() -> None:
        w = model.weight.detach().item()
        expected = sum((2 * w * x.pow(2)).mean() for x in batches) / schedule.accum
        seen.append((len(batches), model.weight.grad.item(), expected.item()))
        batches.clear()

    for step in train_steps(schedule, data, model, loss, optimizer, schedule.lr_schedule(optimizer), 1e9,
                            Hooks(before_step)):
        assert model.weight.grad is None and len(step.losses) == seen[-1][0]
    assert [n for n, _, _ in seen] == [3, 3, 3, 3, 1] and schedule.total_steps == 5
    assert all(grad == pytest.approx(expected, rel=1e-6) for _, grad, expected in seen)
