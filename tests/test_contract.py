"""The family contract, over every search space shipped in `search_spaces/`: it resolves for every profile
and method, its family prepares a tiny slice of the real data, trains a few steps and reports its
metric, resumes from a checkpoint to the same state, and scores the held-out split."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmm_tune.errors import UsageError
from llmm_tune.tune.spaces import METHOD_CHOICES, PROFILES, SPACES_DIR, load_spec
from tests.search_fixtures import SHARED_DATA, tiny_bert, tiny_causal_lm
from trainables.continual_data import order_of

SPACES = sorted(SPACES_DIR.glob("*.yaml"))
# What makes a trial tiny, per setting; a family takes the ones it has.
TINY = {"max_train_examples": 16, "validation_size": 8, "test_examples": 4, "batch_size": 4, "epochs": 1,
        "evals_per_epoch": 2, "grad_accum": 1, "max_steps": None, "loftq_iters": 1, "rank": 4, "max_length": 32,
        "max_source_length": 48, "max_target_length": 32, "max_new_tokens": 4, "eval_tokens": 1024}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    llama = tiny_causal_lm(root / "llama")
    return {"glue": tiny_bert(root / "bert"), "causal_lm": llama, "continual": llama}


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_search_space_resolves_trains_resumes_and_scores(path, tiny_models, tmp_path):
    for profile in PROFILES:
        for method in METHOD_CHOICES:
            load_spec(path.stem, profile, method)
    spec = load_spec(path.stem, "cpu", "llmm")
    recipe = spec.recipe
    try:
        source = recipe.check_data(spec.task, SHARED_DATA)
    except UsageError as error:
        pytest.skip(f"no complete offline data for {spec.task}: {error}")
    point = spec.warm_start[0] if spec.warm_start else {
        name: d.choices[0] if hasattr(d, "choices") else type(d.low)((d.low + d.high) / 2)
        for name, d in spec.distributions().items()}
    config = {**spec.fixed, **point, "task": spec.task, "metric": spec.metric, "mode": spec.mode,
              "model": str(tiny_models[spec.family]),
              **{k: v for k, v in TINY.items() if k in recipe.SETTINGS}}
    if "order" in recipe.SETTINGS:  # a task sequence: its first two tasks, one report after each
        config["order"] = list(order_of(config))[:2]
    data = recipe.prepare(config, source)
    time_attr, _ = recipe.clock(config)

    def run(resume=None) -> tuple[list[dict], list]:
        reports, kept = [], []

        def report(metrics: dict, directory: str) -> None:
            reports.append(metrics)
            kept.append(shutil.copytree(directory, tmp_path / f"{'resumed' if resume else 'run'}-{len(kept)}"))

        torch.manual_seed(7)
        recipe.train(config, data, report, resume=resume)
        return reports, kept

    reports, checkpoints = run()
    assert len(reports) == 2
    for report in reports:
        assert math.isfinite(report[f"val_{spec.metric}"]) and time_attr in report
    resumed, resumed_checkpoints = run(resume=str(checkpoints[0]))
    assert len(resumed) == 1 and resumed[0][f"val_{spec.metric}"] == reports[1][f"val_{spec.metric}"]
    for file in checkpoints[-1].glob("*.safetensors"):
        final, again = load_file(str(file)), load_file(str(resumed_checkpoints[-1] / file.name))
        assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    scores = recipe.score(config, str(checkpoints[-1]), source)
    numbers = {k: v for k, v in scores.items() if not isinstance(v, dict)}
    # any of the task's metrics may select, and compare reads the held-out value of the one that did
    assert set(recipe.TASKS[spec.task].metrics) <= set(numbers), scores
    assert numbers and all(isinstance(v, float) and (math.isfinite(v) or k.endswith("accuracy"))
                           for k, v in numbers.items()), scores
    if len(numbers) < len(scores):  # the rest is described by the family for the table
        assert recipe.held_out_details(scores)
