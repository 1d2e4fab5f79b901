"""`llmm_tune.compare`: the paired interval on hand-made numbers, and a compare of two methods over seeds end to
end on a tiny model, continued with another seed without redoing what was done."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pandas as pd
import pytest

from llmm_tune.compare import paired_interval, retrainings, write_tables
from llmm_tune.errors import UsageError
from llmm_tune.method.config import BASELINES
from llmm_tune.results.collect import best_trial, collect
from llmm_tune.tune.experiment import ExperimentRecord
from tests.helpers.search_fixtures import run_module, subset_glue, tiny_bert, tiny_space


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


def hand_made(family: str, task: str, metric: str, mode: str, split_scores: dict[str, dict[str, list[float]]],
              bits: dict[str, int | None]) -> tuple[dict, dict]:
    """`chosen` and `runs` as compare builds them, for methods whose seed s scored split_scores[m][name][s]."""
    meta = ExperimentRecord(name=f"{task}-search", family=family, task=task, space=task, space_yaml="", profile="cpu",
                            method="llmm", metric=metric, mode=mode, seed=0, model="minilm", num_samples=3,
                            overrides={}, options={}, command="", git_commit="c0ffee", versions={"torch": "2.13.0"},
                            started="")
    chosen = {m: (meta, pd.Series({"trial": f"t-{m}", f"val_{metric}": 0.75, "lr": 1.23e-4, "rank": 8,
                                   "bits": bits[m], "K": 1 if bits[m] else 0, "scale": 400.0 if bits[m] else None,
                                   "quant_method": "normal_float" if bits[m] else None}), 100.0)
              for m in split_scores}
    runs = {f"{m}/{s}": {"method": m, "seed": s, "trial": f"t-{m}", "config": {}, "seconds": 10.0 + s,
                         "git_commit": f"run-commit-{s}", **{name: v[s] for name, v in scores.items()}}
            for m, scores in split_scores.items() for s in range(3)}
    return chosen, runs


def table_row(table: str, method: str) -> dict[str, str]:
    """A method's row of the Markdown table, its cells by their column's header."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    names = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|:- ") and len(set(names)) == len(names), lines[:2]  # the header, then its rule
    (line,) = [line for line in lines[2:] if line.startswith(f"| {method} ")]
    return dict(zip(names, [cell.strip() for cell in line.strip("|").split("|")], strict=True))


def test_the_table_of_hand_made_runs_gives_each_methods_mean_spread_difference_and_other_metrics(tmp_path):
    dev = {"llmm": {"dev_accuracy": [0.70, 0.74, 0.72], "dev_f1": [0.80, 0.84, 0.82], "dev_untuned_accuracy": [.5] * 3},
           "lora": {"dev_accuracy": [0.71, 0.73, 0.78], "dev_f1": [0.81, 0.85, 0.83], "dev_untuned_accuracy": [.5] * 3}}
    chosen, runs = hand_made("glue", "mrpc", "accuracy", "max", dev, {"llmm": 4, "lora": None})
    args = argparse.Namespace(methods=["llmm", "lora"], seeds=[0, 1, 2])
    write_tables(args, chosen, runs, tmp_path, ["glue_mrpc"], "glue_mrpc")
    table = (tmp_path / "table.md").read_text()
    assert "accuracy: higher is better" in table and "dev f1 mean" in table and "untuned" not in table
    accuracy = dev["lora"]["dev_accuracy"]
    difference, low, high = paired_interval(accuracy, dev["llmm"]["dev_accuracy"])
    lora = {"dev accuracy mean": f"{statistics.fmean(accuracy):.4f}",
            "dev accuracy std": f"{statistics.stdev(accuracy):.4f}",
            "dev f1 mean": f"{statistics.fmean(dev['lora']['dev_f1']):.4f}", "difference to llmm": f"{difference:+.4f}",
            "95% interval": f"[{low:+.4f}, {high:+.4f}]", "search trial-s": "100",
            "retrain s": "33",  # retraining seconds 10 + 11 + 12
            "quant_method": "-", "bits": "-", "rank": "8", "K": "0", "lr": "1.2e-04", "scale": "-"}  # no quantiser
    llmm = {"difference to llmm": "-", "95% interval": "-", "quant_method": "normal_float", "bits": "4"}
    for method, expected in (("lora", lora), ("llmm", llmm)):
        row = table_row(table, method)
        assert {name: row[name] for name in expected} == expected, row
    # the commits the searches and each retraining were made at, not the checkout writing the table
    assert "commit c0ffee, run-commit-0, run-commit-1, run-commit-2 |" in table and "torch=2.13.0" in table
    assert len(pd.read_csv(tmp_path / "scores.csv")) == 6 and (tmp_path / "seeds.png").stat().st_size > 0


def test_a_lower_is_better_metric_is_labelled_and_a_family_that_does_not_score_it_is_named(tmp_path):
    test = {m: {"test_nll": nll, "test_exact_match_flexible": [0.03, 0.02, 0.04], "test_untuned_nll": [1.4] * 3}
            for m, nll in (("llmm", [0.98, 0.97, 0.99]), ("qlora", [0.95, 0.96, 0.95]))}
    chosen, runs = hand_made("causal_lm", "gsm8k", "nll", "min", test, {"llmm": 4, "qlora": 4})
    args = argparse.Namespace(methods=["llmm", "qlora"], seeds=[0, 1, 2])
    write_tables(args, chosen, runs, tmp_path, ["gsm8k"], "gsm8k")
    table = (tmp_path / "table.md").read_text()
    assert "nll: lower is better" in table and "test exact_match_flexible mean" in table
    assert table_row(table, "qlora")["difference to llmm"] == f"{-0.0267:+.4f}"  # below llmm: the better one's < 0
    for run in runs.values():
        del run["test_nll"]
    with pytest.raises(UsageError, match="causal_lm family's score\\(\\) returns no nll"):
        write_tables(args, chosen, runs, tmp_path, ["gsm8k"], "gsm8k")


def test_a_compare_of_two_methods_over_seeds_continues_without_redoing_finished_work(tmp_path, data_dir):
    space = tiny_space(tmp_path, tiny_bert(tmp_path / "model"), epochs=1)
    common = [str(space), "--methods", "llmm", "lora", "--profile", "cpu", "--storage", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results"), "--data-dir", str(subset_glue(data_dir, tmp_path / "data")),
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
    searched = best_trial(collect(str(experiment)))
    (report,) = [json.loads(line) for f in experiment.glob("trial_*/result.json") for line in f.read_text().splitlines()
                 if json.loads(line)["trial_id"] == searched["trial"]]  # its one evaluation (1 epoch)
    assert runs["llmm/0"]["threads"] == 1 and runs["llmm/0"]["trial"] == searched["trial"]
    assert runs["llmm/0"]["val_loss"] == pytest.approx(report["val_loss"], abs=1e-6)
    assert runs["llmm/0"]["val_mcc"] == pytest.approx(report["val_mcc"], abs=1e-6)

    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 2 and set(scores["method"]) == {"llmm", "lora"}
    table = (out / "table.md").read_text()
    assert "difference to llmm" in table and "search trial-s" in table and "paired t-test" in table
    lora, llmm = (scores[scores["method"] == m]["dev_mcc"].tolist() for m in ("lora", "llmm"))
    assert f"{paired_interval(lora, llmm)[0]:+.4f}" in table
    assert (out / "seeds.png").stat().st_size > 0 and (out / "table.tex").is_file()

    # continued with another seed, paired: llmm's search reused, its run of seed 0 kept, lora's search not needed
    tables = {name: (out / name).read_text() for name in ("table.md", "scores.csv")}
    paired = run_module("llmm_tune.compare", *common, "--seeds", "0", "1", "--paired-only", "--draws", "3",
                        timeout=900)
    assert paired.returncode == 0, paired.stderr[-3000:]
    assert "llmm: search tiny_cola-llmm-cpu-compare finished before, reused" in paired.stdout
    started = [line.split(":")[0] for line in paired.stdout.splitlines() if ": training trial" in line]
    assert sorted(started) == ["llmm", "llmm draws 3", "llmm draws 3", "lora@llmm", "lora@llmm"]  # the runs done
    # before are kept
    assert "lora: search" not in paired.stdout and tables == {n: (out / n).read_text() for n in tables}  # llmm's only
    both = json.loads((out / "runs.json").read_text())
    assert {k: both[k] for k in runs} == runs
    assert sorted(both) == ["llmm draws 3/0", "llmm draws 3/1", "llmm/0", "llmm/1", "lora/0", "lora@llmm/0",
                            "lora@llmm/1"]
    assert both["lora@llmm/0"]["config"] == {**both["llmm/0"]["config"], **BASELINES["lora"]}
    assert both["llmm draws 3/1"]["config"] == {**both["llmm/1"]["config"], "draws": 3}
    paired_md = (out / "paired.md").read_text()
    row = table_row(paired_md.split("## Calibration")[0], "lora")
    differences = [both[f"lora@llmm/{s}"]["dev_mcc"] - both[f"llmm/{s}"]["dev_mcc"] for s in (0, 1)]
    assert row["difference to llmm"] == f"{statistics.fmean(differences):+.4f}" and "bits 4 -> -" in row["changed"]
    assert "--paired-only" in (out / "paired.md").read_text().rsplit("Command: ", 1)[1]  # how to make it again
    assert table_row(paired_md.split("## Calibration")[0], "llmm draws 3")["changed"] == "draws 0 -> 3"
    calibration = table_row(paired_md.split("## Calibration on dev")[1], "lora")
    ece = [both[f"lora@llmm/{s}"]["dev_ece"] - both[f"llmm/{s}"]["dev_ece"] for s in (0, 1)]
    assert calibration["ECE - llmm [95%]"].startswith(f"{statistics.fmean(ece):+.4f} [")
    assert calibration["NLL (T)"] == f"{statistics.fmean(both[f'lora@llmm/{s}']['dev_nll_ts'] for s in (0, 1)):.4f}"
    every_run = pd.read_csv(out / "paired.csv", keep_default_na=False)  # the reference's own runs beside the paired
    assert sorted(zip(every_run["method"], every_run["paired_with"], every_run["seed"])) == [
        ("llmm", "", 0), ("llmm", "", 1), ("llmm draws 3", "llmm", 0), ("llmm draws 3", "llmm", 1),
        ("lora", "llmm", 0), ("lora", "llmm", 1)]

    more = run_module("llmm_tune.compare", *common[:-1], "2", "--seeds", "0", "1", timeout=900)
    assert more.returncode == 2 and "llmm: searching" not in more.stdout
    assert more.stderr.strip().splitlines() == [
        "error: search tiny_cola-llmm-cpu-compare was started with other settings: num_samples 1 (now 2); pass the "
        "options it was started with to continue it, or another --storage and --results to compare afresh"]
    assert json.loads((out / "runs.json").read_text()) == both


def test_a_failing_retraining_lets_the_other_seeds_finish_and_ends_the_compare_with_one_line(tmp_path, data_dir):
    space = tiny_space(tmp_path, tiny_bert(tmp_path / "model"), family="tests.doubles.seed_one_fails_family", epochs=1)
    failed = run_module("llmm_tune.compare", str(space), "--methods", "llmm", "--seeds", "0", "1", "2", "--profile",
                        "cpu", "--storage", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                        "--data-dir", str(subset_glue(data_dir, tmp_path / "data")), "--cpus-per-trial", "1",
                        "--num-samples", "1", timeout=900)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "llmm: seed 1 failed" in failed.stderr and "injected bug: seed 1 cannot be scored" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: retraining llmm/1 failed")
    out = tmp_path / "results" / "compare" / "cola"
    assert sorted(json.loads((out / "runs.json").read_text())) == ["llmm/0", "llmm/2"]  # seed 2 ran after seed 1
    assert not (out / "table.md").exists()  # no table from a partial set of seeds


def test_paired_runs_put_every_other_method_at_the_references_configuration_with_only_its_own_settings_changed():
    chosen, _ = hand_made("glue", "cola", "mcc", "max", {m: {} for m in ("llmm", "loftq", "qlora", "lora")},
                          {"llmm": 4, "loftq": 8, "qlora": 4, "lora": None})
    reference = {"rank": 8, "K": 1, "bits": 4, "scale": 400.0, "quant_method": "normal_float", "lr": 1.23e-4}
    jobs = {job.key: job for job in retrainings(chosen, list(chosen), [0, 1], paired=True)}
    assert sorted(jobs) == sorted([*(f"{m}/{s}" for m in chosen for s in (0, 1)),
                                   *(f"{m}@llmm/{s}" for m in ("loftq", "qlora", "lora") for s in (0, 1))])
    for method in ("loftq", "qlora", "lora"):
        job = jobs[f"{method}@llmm/1"]
        assert job.trial == "t-llmm" and job.seed == 1 and job.method == method
        assert job.config == {**{k: v for k, v in reference.items() if k in job.config}, **BASELINES[method]}
    assert jobs["loftq@llmm/0"].config["bits"] == 4 and jobs["loftq/0"].config["bits"] == 8  # its own: its own best
    assert not any("@" in key for key in (job.key for job in retrainings(chosen, list(chosen), [0], paired=False)))
    alone = retrainings({"llmm": chosen["llmm"]}, ["llmm", "loftq"], [0, 1], paired=True)  # --paired-only
    assert sorted(job.key for job in alone) == ["llmm/0", "llmm/1", "loftq@llmm/0", "loftq@llmm/1"]
    assert {job.trial for job in alone} == {"t-llmm"}
    draws = {job.key: job for job in retrainings({"llmm": chosen["llmm"]}, ["llmm"], [0], paired=True, draws=(8,))}
    assert sorted(draws) == ["llmm draws 8/0", "llmm/0"]
    assert draws["llmm draws 8/0"].config == {**draws["llmm/0"].config, "draws": 8}
    assert draws["llmm draws 8/0"].method == "llmm" and draws["llmm draws 8/0"].trial == "t-llmm"


def test_paired_md_names_each_changed_setting_with_a_searched_float_kept_short():
    from llmm_tune.compare import changed_settings

    searched = {"K": 2, "scale": 1346.942713, "bits": 8.0, "quant_method": "uniform", "init": None}
    assert changed_settings("loftq", searched) == "K 2 -> 0, scale 1347 -> -"
    assert changed_settings("qlora", searched) == ("K 2 -> 0, scale 1347 -> -, init - -> zero, bits 8 -> 4, "
                                                   "quant_method uniform -> normal_float")


def test_paired_needs_llmm_first(tmp_path):
    from llmm_tune import compare

    with pytest.raises(UsageError, match="--paired retrains the other methods at llmm's configuration"):
        compare.run(["glue_cola", "--methods", "loftq", "llmm", "--paired", "--storage", str(tmp_path)])
