"""A real search end to end on CPU (2 trials, tiny BERT, a CoLA subset), its export and reproduction;
the honest validation split; the profile and search-space resolution."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import torch
import yaml

from llmm_tune.train.pretrained import load_tokenizer
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import git_commit, package_versions
from llmm_tune.tune.spaces import load_spec
from tests.helpers.search_fixtures import run_module, subset_glue, tiny_bert, tiny_space
from trainables import glue
from trainables.glue_data import TASKS, load_splits

# its module-scoped runs serve several tests: the whole module runs on one xdist worker
pytestmark = pytest.mark.xdist_group("test_search")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, data_dir):
    """One finished 2-trial search with its export."""
    root = tmp_path_factory.mktemp("search")
    space = tiny_space(root, tiny_bert(root / "model"))
    data = subset_glue(data_dir, root / "data")
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--data-dir", str(data),
                     "--storage", str(root / "runs"), "--results", str(root / "results"), "--name", "tiny",
                     "--cpus-per-trial", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "space": space, "data": data, "experiment": root / "runs" / "tiny",
            "out": root / "results" / "cola", "stdout": run.stdout, "stderr": run.stderr}


def trials(searched) -> list[dict]:
    with open(searched["out"] / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_search_runs_both_trials_and_exports_every_artifact(searched):
    rows = trials(searched)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert all(r["val_mcc"] != "" and int(r["evaluations"]) >= 1 for r in rows)
    for name in ("table.md", "table.tex", "best.yaml", "history.png", "reliability.png"):
        assert (searched["out"] / name).stat().st_size > 0, name
    assert "trials: 0 running, 2 done, 0 failed of 2" in searched["stdout"]


CONSOLE = [r"experiment \S+ \| cola llmm cpu \| 2 trials", r"logs: \S+llmm_search.log and each trial's folder; resume "
           r"with: python -m llmm_tune.search \S+ --resume --name tiny", r"\[\d+m\d\ds\] trials: ",
           r"trial \w+ done: val mcc -?\d\.\d{4} \(best of \d+ evaluations", r"exported 2 trials of 1 experiment",
           r"export: scoring the held-out split \(dev\), rows: \d/\d in \d+m\d\ds$",
           r"searcher: random search, every trial to its end after the space's warm starts \(the default at 2 trials"]


def test_the_console_shows_choices_status_ended_trials_and_the_table_only(searched):
    lines = searched["stdout"].splitlines()
    table = lines.index(next(line for line in lines if line.startswith("exported ")))
    for line in lines[:table + 1]:
        assert any(re.match(pattern, line) for pattern in CONSOLE), line
    assert lines[table + 1].split()[:4] == ["method", "quant_method", "bits", "rank"] and len(lines) == table + 4
    assert sum(line.startswith("trial ") for line in lines) == 2
    assert searched["stderr"] == ""


def test_the_same_search_again_starts_a_new_experiment(searched):
    storage = searched["root"] / "again"
    shutil.copytree(searched["experiment"], storage / "tiny_cola-llmm-cpu")  # as if this search had run before
    run = run_module("llmm_tune.search", str(searched["space"]), "--profile", "cpu", "--data-dir",
                     str(searched["data"]), "--storage", str(storage), "--num-samples", "1", "--no-export",
                     "--cpus-per-trial", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"--resume --name (\S+)", run.stdout).group(1) == "tiny_cola-llmm-cpu-2"
    assert sorted(p.name for p in storage.iterdir()) == ["tiny_cola-llmm-cpu", "tiny_cola-llmm-cpu-2"]
    assert sorted(p.name for p in (storage / "tiny_cola-llmm-cpu").iterdir()) == \
        sorted(p.name for p in searched["experiment"].iterdir())  # the earlier experiment left as it was


def test_warm_start_point_is_the_first_trial(searched):
    first = min(trials(searched), key=lambda r: int(r["number"]))
    published = yaml.safe_load(searched["space"].read_text())["warm_start"][0]
    def plain(value):
        return value if isinstance(value, str) and not value.replace(".", "").isdigit() else float(value)

    assert {k: plain(first[k]) for k in published} == {k: plain(v) for k, v in published.items()}


def test_export_records_everything_needed_to_reproduce(searched):
    best = yaml.safe_load((searched["out"] / "best.yaml").read_text())
    rows = trials(searched)
    top_value = max(float(r["val_mcc"]) for r in rows)
    top = next(r for r in rows if r["trial"] == best["trial"])
    assert float(top["val_mcc"]) == top_value == pytest.approx(best["validation"]["value"])
    assert best["held_out"]["split"] == "dev" and set(best["held_out"]["scores"]) == {
        "mcc", "loss", "ece", "brier", "nll", "temperature", "ece_ts", "brier_ts", "nll_ts", "reliability"}
    assert -1 <= best["held_out"]["scores"]["mcc"] <= 1 and best["held_out"]["scores"]["loss"] > 0
    assert best["config"]["seed"] == 0 and best["config"]["lr"] == pytest.approx(float(top["lr"]))
    assert best["versions"]["torch"] and best["git_commit"] and "llmm_tune.search" in best["search_command"]
    assert best["reproduce"].startswith("python -m llmm_tune.reproduce") and best["threads"] == 1  # --cpus-per-trial
    table = (searched["out"] / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("|"))
    for column in ("quant_method", "bits", "rank", "task", "lr", "scale", "K", "val mcc", "dev mcc", "seed"):
        assert f" {column} " in header, column
    tex = (searched["out"] / "table.tex").read_text()
    assert tex.count("% reproduce: python -m llmm_tune.reproduce") == table.count("llmm_tune.reproduce")
    meta = json.loads((searched["experiment"] / "llmm_experiment.json").read_text())
    assert meta["resources"]["cpus_per_trial"] == 1 and meta["data_dir"] == str(searched["data"])


def test_reproduce_same_seed_gives_the_recorded_validation_score(searched):
    best = searched["out"] / "best.yaml"
    run = run_module("llmm_tune.reproduce", str(best), "--seeds", "0")  # with the trial's threads, from the record
    assert run.returncode == 0, run.stderr[-3000:]
    report = yaml.safe_load(best.with_name("best.reproduced.yaml").read_text())
    recorded = yaml.safe_load(best.read_text())
    assert report["runs"][0]["val_mcc"] == pytest.approx(recorded["validation"]["value"], abs=1e-6)
    assert report["runs"][0]["dev_mcc"] == pytest.approx(recorded["held_out"]["scores"]["mcc"], abs=1e-6)
    # the report carries what made it, as the record does
    assert report["versions"] == package_versions() and report["git_commit"] == git_commit()
    assert report["reproduce"] == f"python -m llmm_tune.reproduce {best} --seeds 0 --threads 1"


def test_a_record_moved_to_another_folder_reproduces_with_llmm_data_dir(searched, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(searched["out"] / "best.yaml", moved / "best.yaml")
    data_copy = shutil.copytree(searched["data"], tmp_path / "data-here")
    run = run_module("llmm_tune.reproduce", "best.yaml", "--seeds", "0", "--threads", "1", cwd=moved,
                     env={"LLMM_DATA_DIR": str(data_copy)})
    assert run.returncode == 0, run.stderr[-3000:]
    report = yaml.safe_load((moved / "best.reproduced.yaml").read_text())
    recorded = yaml.safe_load((moved / "best.yaml").read_text())
    assert report["data"] == "$LLMM_DATA_DIR"  # the variable, not this machine's folder
    assert report["config"] == "best.yaml" and str(tmp_path) not in (moved / "best.reproduced.yaml").read_text()
    assert report["runs"][0]["val_mcc"] == pytest.approx(recorded["validation"]["value"], abs=1e-6)
    missing = run_module("llmm_tune.reproduce", "best.yaml", "--seeds", "0", "--data-dir", str(tmp_path / "gone"),
                         cwd=moved)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "--data-dir" in missing.stderr


def test_existing_experiment_is_not_overwritten(searched):
    run = run_module("llmm_tune.search", str(searched["space"]), "--profile", "cpu", "--data-dir",
                     str(searched["data"]), "--storage", str(searched["root"] / "runs"), "--name", "tiny")
    assert run.returncode == 2 and "already exists" in run.stderr and "--resume" in run.stderr


@pytest.mark.parametrize("task", ["cola", "stsb"])
def test_validation_split_never_overlaps_dev_and_is_seeded(data_dir, task):
    """The validation split `prepare` carves from train holds no dev example (compared as token ids, after
    tokenisation as training sees them): the same split for a seed, another for another seed."""
    def prepared(seed: int) -> glue.GlueData:
        config = {"model": "minilm", "on_bad_row": "error", "validation_size": 0.1, "seed": seed,
                  "max_train_examples": None, "max_length": 128}
        return glue.prepare(config, TrialContext.of("glue", task), str(data_dir))

    def examples(split) -> list[tuple[int, ...]]:
        return [tuple(ids) for ids in split["input_ids"]]

    train, dev = load_splits(TASKS[task].details, str(data_dir))
    in_dev = set(examples(glue.tokenize(dev, load_tokenizer("minilm"), 128)))
    data = prepared(3)
    assert set(examples(data.train)) & in_dev  # the data does repeat dev examples in train
    assert not set(examples(data.validation)) & in_dev
    assert len(data.train) + len(data.validation) == len(train)
    assert len(data.validation) == round(0.1 * len(train))
    assert examples(prepared(3).validation) == examples(data.validation)
    assert examples(prepared(4).validation) != examples(data.validation)


def test_baselines_share_the_space_and_fix_what_they_do_not_use():
    llmm = load_spec("glue_cola", "cpu", "llmm")
    qlora = load_spec("glue_cola", "cpu", "qlora")
    lora = load_spec("glue_cola", "cpu", "lora")
    assert {"lr", "rank", "scale", "K"} <= set(llmm.space)
    assert set(qlora.space) == set(llmm.space) - {"scale", "K", "bits", "quant_method"}
    assert (qlora.fixed["K"], qlora.fixed["init"], qlora.fixed["bits"]) == (0, "zero", 4)
    assert lora.fixed["bits"] is None and lora.num_samples == llmm.num_samples


@pytest.mark.parametrize("task, metric", [("glue_cola", "mcc"), ("glue_stsb", "pearson")])
def test_profiles_pick_their_warm_start_and_asha_watches_the_validation_metric(task, metric):
    raw = yaml.safe_load(load_spec(task, "cpu", "llmm").path.read_text())
    for profile, points in (("cpu", raw["profiles"]["cpu"]["warm_start"]), ("paper", raw["warm_start"])):
        spec = load_spec(task, profile, "llmm")
        assert spec.warm_start == [{k: p[k] for k in spec.space} for p in points], profile
        assert (spec.early_stopping["metric"], spec.early_stopping["mode"]) == (f"val_{metric}", "max")


def test_every_sampler_is_a_searcher_option():
    from optuna.samplers import QMCSampler, RandomSampler, TPESampler

    from llmm_tune.cli import parse_search_args as parse_args
    from llmm_tune.tune.searcher import make_searcher

    spec = load_spec("glue_cola", "cpu", "llmm")
    for name, kind in (("random", RandomSampler), ("tpe", TPESampler), ("qmc", QMCSampler)):
        searcher = make_searcher(spec.distributions(), "best_val_mcc", "max", [], 4, 0, sampler_name=name)
        assert isinstance(searcher._sampler, kind)
    args = parse_args(["glue_cola", "--sampler", "random", "--no-early-stopping"])
    assert args.sampler == "random" and args.no_early_stopping


@pytest.mark.parametrize(("options", "sampler", "early_stopping"), [
    ([], "random", False), (["--num-samples", "23"], "random", False), (["--num-samples", "24"], "qmc", True),
    (["--sampler", "tpe"], "tpe", True), (["--num-samples", "48", "--no-early-stopping"], "qmc", False)])
def test_the_default_strategy_follows_the_trial_count_and_the_record_keeps_it(options, sampler, early_stopping,
                                                                               tmp_path, capsys):
    """Random search with every trial to its end below 24 trials, QMC with ASHA from 24 (the replays'); a sampler or
    --no-early-stopping given is kept."""
    from llmm_tune.search import new_experiment, parse_search_args

    argv = ["glue_cola", "--profile", "cpu", *options]
    spec, _, record = new_experiment(parse_search_args(argv), argv, str(tmp_path))
    assert (record.sampler, record.early_stopping, spec.stops_early()) == (sampler, early_stopping, early_stopping)
    assert "searcher: " in capsys.readouterr().out


def test_export_adapter_takes_the_trials_checkpoint_or_trains_it_again_when_the_experiment_is_gone(searched,
                                                                                                    tmp_path):
    from safetensors.torch import load_file

    best = str(searched["out"] / "best.yaml")
    single_thread = {"OMP_NUM_THREADS": "1"}  # as the trial ran (one CPU), so retraining repeats it exactly
    kept = run_module("llmm_tune.export_adapter", best, "--out", str(tmp_path / "kept"), "--storage",
                      str(searched["root"] / "runs"), env=single_thread)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "adapter of trial" in kept.stdout and "PeftModel.from_pretrained" in kept.stdout
    again = run_module("llmm_tune.export_adapter", best, "--out", str(tmp_path / "again"), "--storage",
                       str(tmp_path / "empty"), "--data-dir", str(searched["data"]), env=single_thread)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training it again with seed 0" in again.stdout
    for part in ("adapter/adapter_model.safetensors", "base/model.safetensors"):
        expected, retrained = load_file(tmp_path / "kept" / part), load_file(tmp_path / "again" / part)
        assert expected.keys() == retrained.keys() and len(expected) > 0
        for name, tensor in expected.items():
            assert torch.allclose(retrained[name], tensor, atol=1e-6), (part, name)
    record = json.loads((tmp_path / "kept" / "export.json").read_text())
    assert record["bits"] == yaml.safe_load(open(best))["config"]["bits"]
