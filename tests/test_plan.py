"""Capacity planning: the ASHA simulation against cases worked by hand, and the plan's probe and
recorded figures end to end on the tiny model."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from datasets import Dataset

from llmm_tune import plan
from llmm_tune.plan import planned_gpus
from llmm_tune.train.fit import Batches, Schedule
from llmm_tune.tune.probe import TUNE_OVERHEAD_S, simulate, typical_rows
from tests.helpers.search_fixtures import run_module, subset_glue, tiny_bert, tiny_space


def space(samples: int, grace: float, rf: float = 2) -> SimpleNamespace:
    return SimpleNamespace(num_samples=samples, early_stopping={"grace_period": grace, "reduction_factor": rf})


def test_without_a_rung_before_the_end_every_trial_runs_whole_one_slot_after_another():
    result = simulate(space(5, grace=4), trial_s=100, budget=4, concurrent=1, evals=[1, 2, 3, 4])
    assert result["mean_fraction"] == 1.0
    assert result["makespan_s"] == pytest.approx(5 * (100 + TUNE_OVERHEAD_S))


def test_asha_stops_trials_at_its_rungs_and_concurrency_shortens_the_search():
    one = simulate(space(16, grace=1), trial_s=100, budget=4, concurrent=1, evals=[0.5 * k for k in range(1, 9)])
    # rungs at 1 and 2 epochs, reduction 2: a trial runs 1/4, 1/2 or all of its budget
    assert 0.25 < one["mean_fraction"] < 0.75
    four = simulate(space(16, grace=1), trial_s=100, budget=4, concurrent=4, evals=[0.5 * k for k in range(1, 9)])
    assert four["makespan_s"] < one["makespan_s"] / 2


@dataclass(frozen=True)
class TokenisedSplits:
    train: Dataset
    train_lengths: list[int]


def widths(data: TokenisedSplits, config: dict) -> list[int]:
    """The padded widths of the fit's batches of the first epoch, in the order it draws them."""
    batches = Batches(data.train, data.train_lengths, None, "cpu", 0).of_epoch(0, Schedule.of(config,
                                                                                              len(data.train)))
    return [max(data.train_lengths[i] for i in batch) for batch in batches]


def test_the_probe_trains_on_rows_of_an_epochs_mean_padded_width_not_its_widest_batches_that_come_first():
    lengths = [n for n in range(5, 41) for _ in range(8)]  # 288 rows, 5 to 40 tokens
    data = TokenisedSplits(Dataset.from_dict({"input_ids": [[1] * n for n in lengths]}), lengths)
    config = {"seed": 0, "batch_size": 4, "grad_accum": 1, "epochs": 1, "warmup_ratio": 0.0}
    epoch = widths(data, config)
    mean = statistics.fmean(epoch)
    assert statistics.fmean(epoch[2:6]) > mean + 5  # the steps the probe would time on all rows: the widest
    probed = typical_rows(data, config, steps=2)
    assert probed.train_lengths == [len(ids) for ids in probed.train["input_ids"]]
    assert len(probed.train_lengths) == (3 + 2) * 4 and all(abs(n - mean) <= 1.5 for n in probed.train_lengths)
    assert len(typical_rows(data, {**config, "grad_accum": 2}, steps=2).train_lengths) == (3 + 2) * 4 * 2
    assert typical_rows(SimpleNamespace(train=data.train), config, steps=2).train is data.train  # no lengths: whole


def test_without_gpu_options_the_plan_is_for_this_machines_gpus_and_their_memory(monkeypatch):
    monkeypatch.setattr(plan, "machine", lambda: {"CPU": 16.0, "GPU": 1.0})
    h200 = SimpleNamespace(total_memory=143771 * 2**20)  # as nvidia-smi reported a lent H200's, in MiB
    monkeypatch.setattr(plan.torch.cuda, "get_device_properties", lambda index: h200)
    assert planned_gpus(SimpleNamespace(gpus=None, gpu_memory=None)) == (1.0, 140.4)
    assert planned_gpus(SimpleNamespace(gpus=None, gpu_memory=80.0)) == (1.0, 80.0)
    assert planned_gpus(SimpleNamespace(gpus=4.0, gpu_memory=None)) == (4.0, None)  # another machine: as given
    monkeypatch.setattr(plan, "machine", lambda: {"CPU": 2.0, "GPU": 0.0})
    assert planned_gpus(SimpleNamespace(gpus=None, gpu_memory=None)) == (0.0, None)


def test_the_plan_probes_a_trial_and_replans_from_its_recorded_figures(tmp_path, data_dir):
    model, data = tiny_bert(tmp_path / "model"), subset_glue(data_dir, tmp_path / "data")
    path = tiny_space(tmp_path, model, "plan_cola")
    figures = tmp_path / "figures.json"
    probed = run_module("llmm_tune.plan", str(path), "--data-dir", str(data), "--probe-steps", "4",
                        "--save-figures", str(figures))
    assert probed.returncode == 0, probed.stderr[-3000:]
    recorded = json.loads(figures.read_text())
    assert recorded["step_s"] > 0 and recorded["build_cold_s"] > 0 and recorded["build_warm_s"] > 0  # measured
    assert recorded["train_examples"] == 256 and recorded["peak_memory_gib"] > 0.1
    assert "measured here" in probed.stdout and "wall time of the search:" in probed.stdout
    quiet = probed.stdout + probed.stderr
    assert "LOAD REPORT" not in quiet and "Map:" not in quiet  # as quiet as a search
    memory = round(2.5 * recorded["peak_memory_gib"], 3)  # room for 2 trials per GPU
    gpus = run_module("llmm_tune.plan", str(path), "--figures", str(figures), "--gpus", "4", "--gpu-memory",
                      str(memory), "--num-samples", "16")
    assert gpus.returncode == 0, gpus.stderr[-3000:]
    assert f"2 trial(s) fit in a {memory:g} GiB GPU" in gpus.stdout and f"recorded in {figures}" in gpus.stdout
    assert "16 trials, 8 at once" in gpus.stdout  # packed by memory on 4 GPUs
    missing = run_module("llmm_tune.plan", str(path), "--figures", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "write one with --save-figures FILE" in missing.stderr


def test_plan_takes_searchs_model_data_and_budget_options_as_search_defines_them():
    from llmm_tune.search import build_parser as search_parser

    def actions(parser) -> dict:
        return {a.dest: (a.option_strings, a.type, a.help) for a in parser._actions}

    planned, searched = actions(plan.build_parser()), actions(search_parser())
    shared = ("model", "data", "test_data", "format", "columns", "chat_template", "budget")
    assert {name: planned[name] for name in shared} == {name: searched[name] for name in shared}
    args = plan.build_parser().parse_args(["sft", "--data", "qa.csv", "--columns", "prompt=q,completion=a",
                                           "--model", "smollm2", "--budget", "20m"])
    assert (args.data, args.model, args.budget) == ("qa.csv", "smollm2", "20m")


def test_plan_with_a_budget_prints_the_search_that_search_would_size(tmp_path):
    path = tiny_space(tmp_path, tmp_path / "no-model", "timed", family="tests.doubles.timed_family", epochs=4)
    planned = run_module("llmm_tune.plan", str(path), "--budget", "3m", "--cpus-per-trial", "1",
                         env={"LLMM_CACHE_DIR": str(tmp_path / "cache")})
    assert planned.returncode == 0, planned.stderr[-3000:]
    (sized,) = [line for line in planned.stdout.splitlines() if line.startswith("budget 3.0 min: ")]
    trials = int(sized.split(": ", 1)[1].split(" trials")[0])
    assert f"plan for cola (cpu profile, llmm): {trials} trials" in planned.stdout
    wall = float(planned.stdout.split("wall time of the search: ")[1].split(" min")[0])
    assert 0 < wall <= 3.0
