"""Faults injected into real searches on CPU (tiny BERT, a CoLA subset): divergence, out of memory,
a killed trial, a killed driver, a lost node. Each search must complete and lose no trial."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import torch

from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.experiment import read_record
from llmm_tune.tune.searcher import JOURNAL, FailureAwareOptunaSearch
from tests.helpers.search_fixtures import ENV, ROOT, run_module, start_module, subset_glue, tiny_bert, tiny_space
from trainables.glue import prepare, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "model": tiny_bert(root / "model"), "data": subset_glue(data_dir, root / "data")}


def search_args(assets: dict, space: Path, name: str, *extra: str) -> list[str]:
    root = assets["root"]
    return [str(space), "--profile", "cpu", "--data-dir", str(assets["data"]), "--storage", str(root / "runs"),
            "--results", str(root / "results" / name), "--name", name, *extra]


def exported_trials(assets: dict, name: str) -> list[dict]:
    with open(assets["root"] / "results" / name / "cola" / "trials.csv") as f:
        return list(csv.DictReader(f))


def study(assets: dict, name: str):
    """The Optuna study as the searcher last saved it (a resumed run leaves one state file per session)."""
    searcher = FailureAwareOptunaSearch()
    searcher.restore_from_dir(str(assets["root"] / "runs" / name))
    return searcher.study


# Tune snapshots the experiment, and uploads the trials' results with it, every 10 s or more (its own period); these
# tests act at moments the storage shows (a result written, a checkpoint named), so Tune snapshots at every step here
SNAPSHOT_EVERY_STEP = {"TUNE_GLOBAL_CHECKPOINT_S": "0"}


def start_search(*args: str) -> subprocess.Popen:
    return start_module("llmm_tune.search", *args, env=SNAPSHOT_EVERY_STEP)


def wait_for(predicate, process, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out waiting for the search"
        time.sleep(0.2)


def checkpoints(experiment: Path) -> list[str]:
    return glob.glob(str(experiment / "*" / "checkpoint_*"))


def finish(process, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def test_divergence_and_out_of_memory_end_their_trials_and_the_searcher_avoids_them(assets):
    point = {"quant_method": "uniform", "bits": 4, "lr": 5e-3, "K": 1}
    space = tiny_space(assets["root"], assets["model"], "failing", init="zero",
                       searched={"rank": {"choice": [4, 10_000_000_000]},  # 1.3 TB adapters: a real OOM
                                 "scale": {"loguniform": [1e-30, 1000]}},
                       warm_start=[{**point, "rank": 10_000_000_000, "scale": 100},
                                   {**point, "rank": 4, "scale": 1e-30},  # noise std 1e15: NaN loss
                                   {**point, "rank": 4, "scale": 100}])
    run = run_module("llmm_tune.search", *search_args(assets, space, "failing", "--num-samples", "4",
                                                      "--cpus-per-trial", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["trial"]: r for r in exported_trials(assets, "failing")}
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"TERMINATED"}
    failures = sorted(r["failure"] for r in rows.values() if r["failure"])
    assert failures[0].startswith("diverged: training loss nan") and "lower lr or raise scale" in failures[0]
    assert failures[1].startswith("out of memory: ") and "can't allocate memory" in failures[1]
    assert sum(r["val_mcc"] != "" for r in rows.values()) == 4 - len(failures)  # the others trained
    trials = study(assets, "failing").trials
    infeasible = [t for t in trials if t.constraints.get("failure", 0) > 0]
    assert sorted(t.user_attrs["failure"][:8] for t in infeasible) == sorted(f[:8] for f in failures)
    assert {t.params["rank"] for t in infeasible if "memory" in t.user_attrs["failure"]} == {10_000_000_000}
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert "failed of 4" in run.stdout and f"{len(failures)} failed" in run.stdout


def test_killed_trial_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(assets):
    space = tiny_space(assets["root"], assets["model"], epochs=24)
    process = start_search(*search_args(assets, space, "killed-trial", "--num-samples", "1", "--cpus-per-trial", "1",
                                        "--no-export"))
    experiment = assets["root"] / "runs" / "killed-trial"
    wait_for(lambda: len(checkpoints(experiment)) >= 1 and len(result_lines(experiment)) >= 3, process)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "ImplicitFunc" in " ".join(p.cmdline())]
    assert workers, "no trial process found"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    finish(process)
    results = result_lines(experiment)
    assert results[-1]["training_iteration"] == 24
    assert any(r["iterations_since_restore"] < r["training_iteration"] for r in results)  # resumed, not restarted
    config = {**read_record(str(experiment)).spec().fixed, **results[-1]["config"]}  # Ray's holds what was searched
    torch.set_num_threads(1)  # as the trial ran (--cpus-per-trial 1)
    cola = TrialContext.of("glue", "cola")
    data = prepare(config, cola, str(assets["data"]))
    uninterrupted = []
    train(config, cola, data, lambda metrics, directory: uninterrupted.append(metrics))
    # resuming restores adapter, optimizer, schedule, RNG and data position: same result to float noise
    assert results[-1]["val_loss"] == pytest.approx(uninterrupted[-1]["val_loss"], abs=1e-5)
    assert results[-1]["best_val_mcc"] == pytest.approx(max(r["val_mcc"] for r in uninterrupted), abs=1e-6)


def result_lines(experiment: Path) -> list[dict]:
    files = glob.glob(str(experiment / "*" / "result.json"))
    return [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]


def test_killed_search_resumes_without_rerunning_or_losing_trials(assets):
    space = tiny_space(assets["root"], assets["model"], "resumed", epochs=4)
    args = search_args(assets, space, "resumed", "--num-samples", "3", "--cpus-per-trial", "2")
    process = start_search(*args)
    experiment = assets["root"] / "runs" / "resumed"
    wait_for(lambda: len({r["trial_id"] for r in result_lines(experiment)}) >= 2, process)  # one finished
    os.killpg(process.pid, signal.SIGKILL)  # the driver and every Ray process it started
    process.wait()
    before = {r["trial_id"]: r for r in result_lines(experiment) if r.get("done") or r["training_iteration"] == 4}
    assert before, "no trial had finished before the kill"
    killed_at = time.time()
    finish(start_search(*search_args(assets, space, "resumed", "--resume")))
    results = result_lines(experiment)
    for trial_id, last in before.items():  # finished trials were not run again
        assert [r["training_iteration"] for r in results if r["trial_id"] == trial_id][-1] == last["training_iteration"]
        assert all(r["timestamp"] < killed_at for r in results if r["trial_id"] == trial_id)
    rows = exported_trials(assets, "resumed")
    assert len(rows) == 3 == len({r["trial"] for r in rows}) and {r["status"] for r in rows} == {"TERMINATED"}
    trials = study(assets, "resumed").trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)  # history kept, no repeats
    assert trials[0].params["scale"] == pytest.approx(100)  # the warm start, from before the kill
    # what optuna-dashboard reads: the journal in the experiment folder, one study that the resumed run kept on
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(experiment / JOURNAL)))
    (summary,) = optuna.get_all_study_summaries(journal)
    watched = optuna.load_study(study_name=summary.study_name, storage=journal).trials
    assert summary.study_name == "resumed" and [t.params for t in watched] == [t.params for t in trials]
    assert all(t.state.name == "COMPLETE" for t in watched)


def test_a_trial_whose_checkpoint_is_gone_at_resume_starts_again_and_the_search_completes(assets):
    # what a search started before driver.DeleteSupersededCheckpoints could leave when killed between Tune's deleting a
    # trial's previous checkpoint and its saving the state that names it (tune/trainable.py): here by deleting it
    space = tiny_space(assets["root"], assets["model"], "gone", epochs=6)
    args = search_args(assets, space, "gone", "--num-samples", "1", "--cpus-per-trial", "2")
    process = start_search(*args)
    experiment = assets["root"] / "runs" / "gone"

    def state_names_a_checkpoint() -> bool:
        """A whole state whose trial's checkpoint manager (pickled, hex-encoded) holds a checkpoint: its last result
        names one before the manager does (Tune may save its state between the two), and Tune copies its state into
        the experiment folder in place, so a kill during the copy would leave a cut file (neither is this test's)."""
        return any(b"checkpoint_0".hex() in text and parses(text)
                   for text in (Path(f).read_text() for f in glob.glob(str(experiment / "experiment_state*"))))

    wait_for(state_names_a_checkpoint, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    gone = checkpoints(experiment)
    assert gone, "the state named a checkpoint that is not on disk"
    for folder in gone:
        shutil.rmtree(folder)
    early = run_module("llmm_tune.export", str(experiment), "--results", str(assets["root"] / "results" / "early"))
    assert early.returncode == 2 and "is gone, so it has no held-out score" in early.stderr, early.stderr[-2000:]
    output = finish(start_search(*search_args(assets, space, "gone", "--resume")))
    (trial,) = {Path(f).parent.name.removeprefix("trial_") for f in gone}
    assert f"trial {trial}: its checkpoint" in output and "trained again from the start" in output
    last = result_lines(experiment)[-1]
    assert last["training_iteration"] == last["iterations_since_restore"] == 6  # trained again from the start
    (row,) = exported_trials(assets, "gone")
    assert row["status"] == "TERMINATED" and row["val_mcc"] != "", output[-2000:]


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_lost_worker_node_reschedules_its_trials(assets):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        space = tiny_space(assets["root"], assets["model"], "lost-node", epochs=12)
        process = start_search(*search_args(
            assets, space, "lost-node", "--num-samples", "3", "--cpus-per-trial", "1", "--max-concurrent", "2",
            "--address", cluster.address))
        experiment = assets["root"] / "runs" / "lost-node"
        wait_for(lambda: len({r["trial_id"] for r in result_lines(experiment) if r["training_iteration"] >= 2}) >= 2,
                 process)  # both nodes busy, each trial checkpointed
        cluster.remove_node(worker)
        output = finish(process)
    finally:
        cluster.shutdown()
    rows = exported_trials(assets, "lost-node")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"TERMINATED"}, output[-2000:]
    assert all(int(r["evaluations"]) >= 1 and r["val_mcc"] != "" for r in rows)
    results = result_lines(assets["root"] / "runs" / "lost-node")
    moved = [r for r in results if r["iterations_since_restore"] < r["training_iteration"]]
    assert moved, "no trial was resumed after the node was removed"
    pids = [(r["pid"], p["pid"]) for r in moved for p in results  # (after the move, before it) of a trial
            if p["trial_id"] == r["trial_id"] and p["iterations_since_restore"] == p["training_iteration"]]
    assert pids and all(after != before for after, before in pids), pids


def test_a_crash_that_repeats_after_a_restore_ends_the_trial_without_more_retries(assets):
    space = tiny_space(assets["root"], assets["model"], "crashing", family="tests.doubles.crashing_family", epochs=4)
    run = run_module("llmm_tune.search", *search_args(assets, space, "crashing", "--num-samples", "1",
                                                      "--cpus-per-trial", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = exported_trials(assets, "crashing")
    # attempt 1 reported evaluation 1 and crashed; the restore reported evaluation 2, crashed the same way and
    # reported that as its failure (the third result)
    assert row["status"] == "TERMINATED" and int(row["evaluations"]) == 3 and row["val_mcc"] != ""
    assert row["failure"].startswith("crashed again after a restore with the same error, not retried: "
                                     "RuntimeError: injected bug: index 7 is out of bounds at ")
    assert "crashing_family.py:" in row["failure"]
    log = Path(row["failure"].rsplit("log: ", 1)[1])
    assert "Traceback" in log.read_text() and "report_then_crash" in log.read_text()
    errors = glob.glob(str(assets["root"] / "runs" / "crashing" / "*" / "error.txt"))
    assert len(errors) == 1 and Path(errors[0]).read_text().count("Failure #") == 1  # one retry, not two
    ended = [line for line in run.stdout.splitlines() if line.startswith("trial ") and " failed: " in line]
    assert len(ended) == 1 and "log: " in ended[0]


def interrupt(process: subprocess.Popen, experiment: Path, sent: signal.Signals, running: bool) -> str:
    """Send `sent` to the search once its trials have reported again (`running`), or once Ray is up and Tune about
    to start (the search has said where its logs are); its whole output."""
    seen = []
    if running:
        reported = len(result_lines(experiment))
        wait_for(lambda: len(result_lines(experiment)) > reported, process)
    else:
        while not seen or not seen[-1].startswith("logs: "):
            seen.append(process.stdout.readline())
            assert seen[-1], "".join(seen)[-3000:]
    process.send_signal(sent)
    return "".join(seen) + process.communicate(timeout=120)[0]


def test_ctrl_c_or_sigterm_saves_the_search_exports_nothing_and_says_how_to_continue(assets):
    """SIGINT is what Ctrl+C sends the driver; SIGTERM what Kubernetes, Slurm and `ray job stop` send on
    preemption, which Ray's C++ signal handler in the driver would answer with a stack dump and a dead search;
    it may come before the trials start or while they run. One search takes all three, each resumed from what the
    one before saved, and then ends."""
    name = "interrupted"
    space = tiny_space(assets["root"], assets["model"], name, epochs=8)
    args = search_args(assets, space, name, "--num-samples", "2", "--cpus-per-trial", "1")
    experiment = assets["root"] / "runs" / name
    for sent, running in ((signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)):
        process = start_search(*(args if not experiment.exists() else search_args(assets, space, name, "--resume")))
        output = interrupt(process, experiment, sent, running)
        assert process.returncode == 128 + sent, output[-3000:]
        assert "SIGTERM received" not in output and "Stack trace" not in output, output[-3000:]
        lines = output.strip().splitlines()
        assert [line for line in lines if "continue with: " in line] == lines[-1:], output[-3000:]
        assert re.fullmatch(r"search interrupted with [01] of 2 trials ended; nothing exported; continue with: python "
                            rf"-m llmm_tune\.search .* --resume --name {name} --storage .*", lines[-1]), lines[-1]
        assert not (assets["root"] / "results" / name / "cola").exists()
    finish(start_search(*search_args(assets, space, name, "--resume")))
    rows = exported_trials(assets, name)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}


SIGTERM_OUTSIDE_TUNES_RUN = """
import importlib, signal, sys
from llmm_tune.tune import termination
tune = importlib.import_module("ray.tune.tune")
termination.stop_on_sigterm()
if sys.argv[1] == "before":
    signal.raise_signal(signal.SIGTERM)
    stop = tune._setup_signal_catching()  # what Tune's run calls before its loop
    print(stop.is_set(), stop.is_set(), termination.interrupted_code())  # the loop's checks before and after step 1
else:
    tune._setup_signal_catching()  # Tune's run set up, ran and returned: the search exports
    signal.raise_signal(signal.SIGTERM)
    print("not stopped")
"""


def test_sigterm_before_tunes_run_stops_it_after_its_first_step_and_after_it_ends_the_process():
    """Before Tune's run, the run stops after its first step, which makes the trials (a state saved without them
    would not resume); after it, the export ends at once with one line."""
    before, after = (subprocess.run([sys.executable, "-c", SIGTERM_OUTSIDE_TUNES_RUN, when], cwd=ROOT, env=ENV,
                                    capture_output=True, text=True, timeout=300) for when in ("before", "after"))
    assert before.returncode == 0 and before.stdout.split() == ["False", "True", "143"], before.stderr[-3000:]
    assert after.returncode == 143 and "not stopped" not in after.stdout, after.stderr[-3000:]
    assert after.stderr.strip().splitlines()[-1].startswith("search terminated (SIGTERM) after its trials ended")


def test_a_trial_whose_clean_up_outlasts_tunes_default_wait_does_not_fail_the_next_trial_on_its_actor(assets):
    space = tiny_space(assets["root"], assets["model"], "slow-cleanup", family="tests.doubles.slow_cleanup_family",
                       epochs=1)
    run = run_module("llmm_tune.search", *search_args(assets, space, "slow-cleanup", "--num-samples", "2",
                                                      "--cpus-per-trial", "2", "--max-concurrent", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = exported_trials(assets, "slow-cleanup")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    assert all(r["failure"] == "" and r["val_mcc"] != "" for r in rows), rows
    processes = {r["pid"] for r in result_lines(assets["root"] / "runs" / "slow-cleanup")}
    assert len(processes) == 1  # Tune reused the first trial's actor for the second, while it was cleaning up


def test_a_state_file_cut_by_a_kill_is_put_back_from_rays_staged_copy_for_export_and_resume(assets):
    space = tiny_space(assets["root"], assets["model"], "cut", epochs=3)
    process = start_search(*search_args(assets, space, "cut", "--num-samples", "1", "--cpus-per-trial", "2"))
    experiment = assets["root"] / "runs" / "cut"
    wait_for(lambda: result_lines(experiment), process)  # a trial reported, and the state that holds it was copied
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (state,) = experiment.glob("experiment_state-*.json")
    state.write_bytes(state.read_bytes()[:200])  # what a kill during Tune's in-place copy of its state leaves
    early = run_module("llmm_tune.export", str(experiment), "--results", str(assets["root"] / "results" / "cut-early"))
    assert early.returncode == 0 and "was cut by a kill while Tune copied it; put back" in early.stdout, early.stderr
    assert json.loads(state.read_text())["trial_data"]  # whole again: the driver's staged copy
    output = finish(start_search(*search_args(assets, space, "cut", "--resume")))
    (row,) = exported_trials(assets, "cut")
    assert row["status"] == "TERMINATED" and row["val_mcc"] != "", output[-2000:]


def test_a_cut_state_without_a_staged_copy_is_one_clear_error_and_a_whole_one_is_left_alone(tmp_path, monkeypatch):
    from llmm_tune.errors import UsageError
    from llmm_tune.tune.storage import mend_cut_state

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))  # a machine without the driver's session folders
    experiment = tmp_path / "runs" / "elsewhere"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    mend_cut_state(str(experiment))
    assert json.loads((experiment / "experiment_state-2026-01-01_00-00-00.json").read_text()) == {"trial_data": []}
    (experiment / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_data": [["{\\"a')  # the newest
    with pytest.raises(UsageError, match=r"experiment_state-2026-01-02_00-00-00.json was cut by a kill while Tune "
                                         r"copied it, and no whole copy is left"):
        mend_cut_state(str(experiment))
