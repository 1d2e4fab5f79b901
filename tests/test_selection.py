"""Which report stands for a trial is the task's (`Task.selects`) on every path, multi-worker trials included:
a task judged by its last report keeps its last checkpoint, never its best one."""

from __future__ import annotations

import json

from safetensors import safe_open

from llmm_tune.train.checkpoint import STATE_FILE
from tests.helpers.search_fixtures import run_module, subset_glue, tiny_bert, tiny_space


def test_a_two_worker_trial_of_a_task_judged_by_its_last_report_keeps_and_exports_its_last_checkpoint(tmp_path,
                                                                                                       data_dir):
    from llmm_tune.results.collect import collect

    point = {"quant_method": "uniform", "bits": 4, "rank": 4, "lr": 5e-3, "scale": 100, "K": 0}
    space = tiny_space(tmp_path, tiny_bert(tmp_path / "model"), "last_report", warm_start=[point],
                       family="tests.doubles.last_report_family", epochs=3, evals_per_epoch=1)
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--data-dir",
                     str(subset_glue(data_dir, tmp_path / "data")), "--storage", str(tmp_path / "runs"),
                     "--name", "last", "--num-samples", "1", "--workers-per-trial", "2", "--cpus-per-trial", "1",
                     "--no-export")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result_file,) = (tmp_path / "runs" / "last").glob("trial_*/result.json")
    steps = [json.loads(line)["step"] for line in result_file.read_text().splitlines()]
    assert len(steps) == 3 and steps == sorted(steps)  # three reports, MCC 1/step: the first is the best
    found = collect(str(tmp_path / "runs" / "last"))
    trials, checkpoints = found.trials, found.checkpoints
    assert trials["val_mcc"].tolist() == [1.0 / steps[-1]]  # the trial's value is its last report's
    with checkpoints[trials["trial"].iloc[0]].as_directory() as directory:
        with safe_open(f"{directory}/{STATE_FILE}", framework="pt") as f:
            assert json.loads(f.metadata()["progress"])["step"] == steps[-1]
