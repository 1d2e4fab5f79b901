"""`llmm_tune.compare`: the paired interval on hand-made numbers, and a compare of two methods over seeds end to
end on a tiny model, continued with another seed without redoing what was done."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pandas as pd
import pytest

from llmm_tune.compare import best_trial, paired_interval, write_tables
from tests.search_fixtures import run_module, subset_glue, tiny_bert, tiny_space


def test_the_paired_interval_of_hand_made_scores():
    mean, low, high = paired_interval([0.5, 0.7, 0.9], [0.4, 0.5, 0.6])  # differences 0.1, 0.2, 0.3
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half), abs=1e-6)
    assert paired_interval([0.3, 0.5], [0.3, 0.5]) == (0.0, 0.0, 0.0)  # identical per seed: no difference
    # the same mean difference with unpaired noise: the pairing, not the means, sets the width
    assert paired_interval([0.9, 0.1, 0.5], [0.7, 0.0, 0.1])[2] - paired_interval([0.9, 0.1, 0.5], [0.7, 0.0, 0.1])[
        1] > high - low
    single = paired_interval([0.5], [0.4])
    assert single[0] == pytest.approx(0.1) and math.isnan(single[1]) and math.isnan(single[2])


def test_the_table_of_hand_made_runs_gives_each_methods_mean_spread_difference_and_other_metrics(tmp_path):
    dev = {"llmm": ([0.70, 0.74, 0.72], [0.80, 0.84, 0.82]), "lora": ([0.71, 0.73, 0.78], [0.81, 0.85, 0.83])}
    meta = {"family": "glue", "task": "mrpc", "metric": "accuracy", "mode": "max"}
    chosen = {m: (meta, pd.Series({"trial": f"t-{m}", "val_accuracy": 0.75, "lr": 1e-3, "rank": 8, "bits": 4, "K": 1}),
                  100.0) for m in dev}
    runs = {f"{m}/{s}": {"method": m, "seed": s, "trial": f"t-{m}", "config": {}, "seconds": 10.0 + s,
                         "val_accuracy": 0.75, "dev_accuracy": accuracy[s], "dev_f1": f1[s],
                         "dev_untuned_accuracy": 0.5}
            for m, (accuracy, f1) in dev.items() for s in range(3)}
    args = argparse.Namespace(methods=["llmm", "lora"], seeds=[0, 1, 2])
    write_tables(args, chosen, runs, tmp_path, ["glue_mrpc"], "glue_mrpc")
    table = (tmp_path / "table.md").read_text()
    assert "accuracy: higher is better" in table and "dev f1 mean" in table and "untuned" not in table
    lora = [line for line in table.splitlines() if line.startswith("| lora")][0]
    difference, low, high = paired_interval(dev["lora"][0], dev["llmm"][0])
    cells = [cell.strip() for cell in lora.strip("|").split("|")]
    assert cells[3:7] == [f"{statistics.fmean(dev['lora'][0]):.4f}", f"{statistics.stdev(dev['lora'][0]):.4f}",
                          f"{statistics.fmean(dev['lora'][1]):.4f}", f"{difference:.4f}"]  # mean, std, F1, difference
    assert cells[7] == f"[{low:.4f}, {high:.4f}]" and cells[9] == "33"  # retraining seconds: 10 + 11 + 12
    assert len(pd.read_csv(tmp_path / "scores.csv")) == 6 and (tmp_path / "seeds.png").stat().st_size > 0


def test_a_compare_of_two_methods_over_seeds_continues_without_redoing_finished_work(tmp_path):
    space = tiny_space(tmp_path, tiny_bert(tmp_path / "model"), epochs=1)
    common = [str(space), "--methods", "llmm", "lora", "--profile", "cpu", "--storage", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results"), "--data-dir", str(subset_glue(tmp_path / "data")),
              "--cpus-per-trial", "1", "--num-samples", "1"]
    first = run_module("llmm_tune.compare", *common, "--seeds", "0", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Map:" not in first.stderr and "LOAD REPORT" not in first.stdout + first.stderr  # no bars, no reports
    out = tmp_path / "results" / "compare" / "cola"
    runs = json.loads((out / "runs.json").read_text())
    assert sorted(runs) == ["llmm/0", "lora/0"]
    lora_search = runs["lora/0"]["config"]
    assert lora_search["K"] == 0 and lora_search["bits"] is None and runs["llmm/0"]["config"]["K"] >= 1
    # retrained with the threads of a search trial (--cpus-per-trial 1), seed 0 repeats the search's seed-0 trial
    experiment = tmp_path / "runs" / "tiny_cola-llmm-cpu-compare"
    _, searched, _ = best_trial(str(experiment))
    (report,) = [json.loads(line) for f in experiment.glob("trial_*/result.json") for line in f.read_text().splitlines()
                 if json.loads(line)["trial_id"] == searched["trial"]]  # its one evaluation (1 epoch)
    assert runs["llmm/0"]["threads"] == 1 and runs["llmm/0"]["trial"] == searched["trial"]
    assert runs["llmm/0"]["val_loss"] == pytest.approx(report["val_loss"], abs=1e-6)
    assert runs["llmm/0"]["val_mcc"] == pytest.approx(report["val_mcc"], abs=1e-6)

    again = run_module("llmm_tune.compare", *common, "--seeds", "0", "1", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "llmm: search tiny_cola-llmm-cpu-compare finished before, reused" in again.stdout
    assert "seed 0" not in again.stdout and again.stdout.count("with seed 1") == 2
    continued = json.loads((out / "runs.json").read_text())
    assert {k: continued[k] for k in runs} == runs and sorted(continued) == ["llmm/0", "llmm/1", "lora/0", "lora/1"]

    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 4 and set(scores["method"]) == {"llmm", "lora"}
    table = (out / "table.md").read_text()
    assert "difference to llmm" in table and "search trial-s" in table and "paired t-test" in table
    lora = scores[scores["method"] == "lora"].sort_values("seed")["dev_mcc"].tolist()
    llmm = scores[scores["method"] == "llmm"].sort_values("seed")["dev_mcc"].tolist()
    assert f"{paired_interval(lora, llmm)[0]:.4f}" in table
    assert (out / "seeds.png").stat().st_size > 0 and (out / "table.tex").is_file()


def test_a_failing_retraining_lets_the_other_seeds_finish_and_ends_the_compare_with_one_line(tmp_path):
    space = tiny_space(tmp_path, tiny_bert(tmp_path / "model"), family="tests.seed_one_fails_family", epochs=1)
    failed = run_module("llmm_tune.compare", str(space), "--methods", "llmm", "--seeds", "0", "1", "2", "--profile",
                        "cpu", "--storage", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                        "--data-dir", str(subset_glue(tmp_path / "data")), "--cpus-per-trial", "1",
                        "--num-samples", "1", timeout=900)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "llmm: seed 1 failed" in failed.stderr and "injected bug: seed 1 cannot be scored" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: retraining llmm/1 failed")
    out = tmp_path / "results" / "compare" / "cola"
    assert sorted(json.loads((out / "runs.json").read_text())) == ["llmm/0", "llmm/2"]  # seed 2 ran after seed 1
    assert not (out / "table.md").exists()  # no table from a partial set of seeds
