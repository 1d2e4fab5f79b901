"""GORP's continual family: the memory projection, the basis growth, the basis in use in the next task (across a
restore too), full-rank updates kept to the end, the metrics, and resuming at a task boundary."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

import trainables.continual as continual
from llmm_tune.errors import UsageError
from llmm_tune.train.fit import Schedule, train_steps
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.spaces import SPACES_DIR, load_spec
from tests.helpers.search_fixtures import tiny_causal_lm
from trainables.gorp import Basis, GradientSummary, average_accuracy, backward_transfer

# its module-scoped runs serve several tests: the whole module runs on one xdist worker
pytestmark = pytest.mark.xdist_group("test_continual")


def orthonormal(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)))[0]


def test_the_projection_removes_the_component_along_the_basis_and_nothing_more():
    basis = Basis(20)
    basis.U = orthonormal(20, 3)
    X = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    projected = basis.remove(X)
    assert torch.allclose(basis.U.T @ projected, torch.zeros(3, 5), atol=1e-5)  # nothing left along U
    assert torch.allclose(projected, (torch.eye(20) - basis.U @ basis.U.T) @ X, atol=1e-5)  # what the dense
    # projector gives: only the component in span(U) went
    outside = X - basis.U @ (basis.U.T @ X)
    assert torch.allclose(basis.remove(outside), outside, atol=1e-5)  # a matrix orthogonal to U is kept whole
    assert torch.equal(Basis(20).remove(X), X)  # an empty basis removes nothing


def summary_of(columns: torch.Tensor) -> GradientSummary:
    summary = GradientSummary(columns.shape[0])
    summary.add(columns)
    return summary


@pytest.mark.parametrize("threshold, expected", [(0.5, 1), (0.8, 2), (0.9, 3), (0.99, 4)])
def test_the_basis_grows_by_the_fewest_directions_that_reach_the_threshold(threshold, expected):
    directions = orthonormal(12, 4)
    energies = torch.tensor([16.0, 9.0, 4.0, 1.0])  # shares 0.53, 0.83, 0.97, 1.0 cumulated
    basis = Basis(12)
    assert basis.grow(summary_of(directions * energies.sqrt()), threshold) == expected
    assert torch.allclose(basis.U.T @ basis.U, torch.eye(expected), atol=1e-5)
    assert torch.allclose(basis.U @ (basis.U.T @ directions[:, :expected]), directions[:, :expected], atol=1e-4)


def test_a_later_task_adds_only_what_the_basis_does_not_capture():
    directions = orthonormal(12, 4)
    basis = Basis(12)
    basis.grow(summary_of(directions[:, :1] * 4.0), 0.9)
    assert basis.grow(summary_of(directions[:, :1] * 4.0), 0.9) == 0  # already captured in full
    # 16 of 17 energy units lie in the basis already (0.94 >= 0.9): nothing to add; at 0.99 the new direction
    assert basis.grow(summary_of(torch.cat([directions[:, :1] * 4.0, directions[:, 1:2]], dim=1)), 0.9) == 0
    assert basis.grow(summary_of(torch.cat([directions[:, :1] * 4.0, directions[:, 1:2]], dim=1)), 0.99) == 1
    assert torch.allclose(basis.U.T @ basis.U, torch.eye(2), atol=1e-5)
    assert abs(float(basis.U[:, 1] @ directions[:, 1])) == pytest.approx(1.0, abs=1e-4)


def test_a_new_order_is_a_space_listing_its_tasks_and_the_order_setting_picks_from_that_list(tmp_path):
    """A sequence is its space's dataset: list (no table of orders in the code): a space of its own lists a new
    order, and `order` picks and orders tasks of that list alone."""
    path = tmp_path / "my_order.yaml"
    path.write_text("extends: cl_local\ntask: my_order\n"
                    "dataset: [{name: SST-2, group: SC}, {name: COPA, group: COPA}]\n")
    spec = load_spec(str(path), "paper", "llmm")
    listed = continual.trial_order(spec.fixed, spec.context())
    assert [(t.name, t.group) for t in listed] == [("SST-2", "SC"), ("COPA", "COPA")]
    assert [t.name for t in continual.trial_order({"order": ["COPA"]}, spec.context())] == ["COPA"]
    with pytest.raises(UsageError, match="MNLI not in the dataset: list of my_order"):
        continual.trial_order({"order": ["MNLI", "COPA"]}, spec.context())


def test_aa_and_bwt_of_a_hand_made_accuracy_matrix():
    matrix = [[0.9], [0.7, 0.8], [0.6, 0.5, 0.9]]
    assert average_accuracy(matrix) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert backward_transfer(matrix) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert backward_transfer([[0.4, 0.1]]) == 0.0  # one task: nothing to forget
    assert backward_transfer([[0.5, 0.2], [0.7, 0.9]]) == pytest.approx(0.2)  # positive: learnt more of task 1


CL_LOCAL = TrialContext.of("continual", "cl_local")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two-task sequences on a tiny Llama: with the memory projection uninterrupted, the same resumed after
    task 1 (a fresh model restored from the checkpoint), and without the projection."""
    root = tmp_path_factory.mktemp("continual")
    spec = load_spec("cl_local", "cpu", "llmm")
    config = {**spec.fixed, **spec.warm_start[0], "model": str(tiny_causal_lm(root / "llama")),
              "order": ["COPA", "SST-2"], "max_train_examples": 24,
              "validation_size": 8, "test_examples": 8, "batch_size": 4, "rank": 4, "galore_rank": 4,
              "galore_lr": 1e-3, "update_proj_gap": 2}
    data = continual.prepare(config, CL_LOCAL, str(data_dir))

    def run(name: str, resume=None, **changes) -> list[dict]:
        kept = []

        def report(metrics: dict, directory: str) -> None:
            target = shutil.copytree(directory, root / f"{name}-{len(kept)}")
            kept.append({"metrics": metrics, "state": load_file(str(target / continual.STATE_FILE)), "dir": target})

        continual.train({**config, **changes}, CL_LOCAL, data, report, resume=resume)
        return kept

    uninterrupted = run("gorp")
    return {"config": config, "data": data, "gorp": uninterrupted,
            "resumed": run("resumed", resume=str(uninterrupted[0]["dir"])), "sequential": run("seq", projection=False)}


def test_a_resumed_sequence_matches_an_uninterrupted_one(runs):
    (first, last), (resumed,) = runs["gorp"], runs["resumed"]
    assert resumed["metrics"]["task"] == 2 and first["metrics"]["task"] == 1
    assert {k: v for k, v in resumed["metrics"].items() if k != "seconds"} == \
        {k: v for k, v in last["metrics"].items() if k != "seconds"}
    assert last["state"] and resumed["state"].keys() == last["state"].keys()
    assert all(torch.equal(resumed["state"][k], last["state"][k]) for k in last["state"])


def gate_names(state: dict) -> list[str]:
    return sorted(k.split(".", 1)[1] for k in state if k.startswith("basis_out."))


def test_the_basis_of_task_1_is_in_use_while_task_2_trains_after_a_restore(runs):
    """The public release never loads it; here the run restored after task 1 keeps task 2's full-rank update
    and its new adapter factor A off task 1's bases, and the run without projection does not."""
    after_first = runs["gorp"][0]["state"]
    rank = runs["config"]["rank"]

    def task_2_overlap(state: dict) -> tuple[float, float]:
        full = max(float((after_first[f"basis_out.{n}"].T @ (state[f"after.1.{n}"] - state[f"after.0.{n}"])).norm()
                         / (state[f"after.1.{n}"] - state[f"after.0.{n}"]).norm()) for n in gate_names(state))
        layers = sorted(k[len("pairs."):-len(".A")] for k in state if k.startswith("pairs.") and k.endswith(".A"))
        adapter = max(float((state[f"pairs.{n}.A"][rank:] @ after_first[f"basis_in.{n}"]).norm()
                            / state[f"pairs.{n}.A"][rank:].norm()) for n in layers)
        return full, adapter

    assert gate_names(after_first) and all(after_first[f"basis_out.{n}"].shape[1] > 0 for n in gate_names(after_first))
    full, adapter = task_2_overlap(runs["resumed"][0]["state"])
    assert full < 1e-4 and adapter < 1e-4
    full, adapter = task_2_overlap(runs["sequential"][1]["state"])
    assert full > 1e-2 and adapter > 1e-2


def test_full_rank_updates_of_task_1_survive_to_the_end_of_the_sequence(runs):
    """The public release reloads the pristine base for each task, so only the last task's update is left:
    here the restored run's final weights still hold task 1's update along task 1's directions."""
    pristine = continual.Sequence(runs["config"], CL_LOCAL, "cpu").pristine
    after_first, final = runs["gorp"][0]["state"], runs["resumed"][0]["state"]
    assert gate_names(final)
    for name in gate_names(final):
        U = after_first[f"basis_out.{name}"]
        task_1 = U.T @ (after_first[f"after.0.{name}"] - pristine[name])
        assert task_1.norm() > 1e-4
        assert torch.allclose(U.T @ (final[f"after.1.{name}"] - pristine[name]), task_1, atol=1e-5)


def test_the_export_scores_every_intermediate_model_once_on_test(runs, data_dir):
    config, last = runs["config"], runs["gorp"][1]
    scores = continual.score(config, CL_LOCAL, str(last["dir"]), str(data_dir))
    found = scores["accuracy_matrix"]
    assert found["tasks"] == ["COPA", "SST-2"] and [len(r) for r in found["after_each_task"]] == [1, 2]
    assert scores["aa"] == pytest.approx(sum(found["after_each_task"][-1]) / 2)
    assert scores["bwt"] == pytest.approx(found["after_each_task"][1][0] - found["after_each_task"][0][0])
    assert scores["tasks_trained"] == 2.0 and len(found["untuned"]) == 2
    markdown = continual.held_out_details(scores)
    assert "| 1. COPA |" in markdown and "| (untuned) |" in markdown


def test_a_continual_search_judges_each_sequence_by_its_end_and_exports_aa_bwt_and_the_matrix(tmp_path, data_dir):
    import pandas as pd
    import yaml

    from tests.helpers.search_fixtures import run_module

    space = yaml.safe_load((SPACES_DIR / "cl_local.yaml").read_text())
    space["profiles"]["cpu"] = {
        "fixed": {"model": str(tiny_causal_lm(tmp_path / "llama")), "order": ["COPA", "SST-2"],
                  "max_train_examples": 16, "validation_size": 8, "test_examples": 8, "batch_size": 4, "rank": 4,
                  "galore_rank": 4},
        "space": {"update_proj_gap": {"choice": [2, 4]}}, "num_samples": 2}
    (tmp_path / "cl_tiny.yaml").write_text(yaml.safe_dump(space))
    done = run_module("llmm_tune.search", str(tmp_path / "cl_tiny.yaml"), "--profile", "cpu", "--data-dir",
                      str(data_dir), "--storage", str(tmp_path / "runs"), "--results", str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results" / "cl_local"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    for _, trial in trials.iterrows():  # a trial's value is its last report, not its best
        progress = pd.read_csv(tmp_path / "runs" / "cl_tiny-llmm-cpu" / f"trial_{trial['trial']}" / "progress.csv")
        assert trial["val_aa"] == pytest.approx(progress["val_aa"].iloc[-1])
    table = (out / "table.md").read_text()
    assert "test aa" in table and "test bwt" in table and "| 1. COPA |" in table and "| 2. SST-2 |" in table
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert len(best["held_out"]["scores"]["accuracy_matrix"]["after_each_task"]) == best["held_out"]["scores"][
        "tasks_trained"]


def test_the_model_after_a_task_is_the_model_its_checkpoint_restores(runs, tmp_path):
    """What validation scores after a task is what the export re-creates: the finished pair counts once."""
    sequence = continual.Sequence(runs["config"], CL_LOCAL, "cpu")
    sequence.start_task(projection=True)
    with torch.no_grad():
        for layer in sequence.layers.values():
            layer.B_mean.normal_()  # as if trained
    sequence.end_task()
    sequence.model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    trained = sequence.model(input_ids=ids).logits
    sequence.save(str(tmp_path), ("COPA",))
    restored = continual.Sequence(runs["config"], CL_LOCAL, "cpu")
    restored.load(str(tmp_path))
    restored.model.eval()
    assert not torch.allclose(trained, continual.Sequence(runs["config"], CL_LOCAL, "cpu").model(input_ids=ids).logits)
    assert torch.allclose(trained, restored.model(input_ids=ids).logits, atol=1e-5)


def test_each_task_trains_in_the_shared_step_loop_with_gorp_between_backward_and_step(runs, monkeypatch):
    """Each task runs `llmm_tune.train.fit.train_steps`, whose hook (GORP's projections and full-rank step)
    comes once per optimizer step of the task's Schedule (4 batches accumulated, then the epoch's last 2) with
    every trained weight's accumulated gradient present."""
    calls: list[bool] = []

    def spy(schedule, data, model, loss, optimizer, scheduler, max_grad_norm, hooks, start=0):
        trained = [p for p in model.parameters() if p.requires_grad and p.numel()]

        def before_step() -> None:
            calls.append(bool(trained) and all(p.grad is not None for p in trained))
            hooks.before_step()

        yield from train_steps(schedule, data, model, loss, optimizer, scheduler, max_grad_norm,
                               dataclasses.replace(hooks, before_step=before_step), start)

    monkeypatch.setattr(continual, "train_steps", spy)
    config, reports = {**runs["config"], "grad_accum": 4}, []
    continual.train(config, CL_LOCAL, runs["data"], lambda metrics, directory: reports.append(metrics))
    steps = [Schedule.of(config, len(task.train)).total_steps for task in runs["data"].tasks]
    assert steps == [2, 2] and calls == [True] * 4 and len(reports) == 2
