"""Beyond one machine, on the loopback: `ray job submit` to a local Ray head, experiments on an
S3-compatible server (moto), trials of 2 data-parallel workers (gloo), the Optuna journal, and the
checks that refuse a layout or a path that cannot work."""

from __future__ import annotations

import csv
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from llmm_tune.tune.experiment import read_record
from tests.helpers.search_fixtures import ENV, ROOT, run_module, start_module, subset_glue, tiny_bert, tiny_space

# its module-scoped runs serve several tests: the whole module runs on one xdist worker
pytestmark = pytest.mark.xdist_group("test_cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, process=None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process is not None:
            assert process.poll() is None, (process.stdout.read() if process.stdout else "")[-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def command_lines(pid: int) -> list[tuple[psutil.Process, str]]:
    """The live descendants of `pid` with their command lines (zombies and the already gone left out)."""
    lines = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            lines.append((child, " ".join(child.cmdline())))
        except psutil.Error:
            continue
    return lines


@pytest.fixture(scope="module")
def assets(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("cluster")
    return {"root": root, "model": tiny_bert(root / "model"), "data": subset_glue(data_dir, root / "data")}


def exported(results: Path) -> list[dict]:
    with open(results / "cola" / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with its job server and a token of its own (Ray 2.59+ asks local clusters for
    one), stopped (its process group) after the tests of this module."""
    port, dashboard, agent = free_port(), free_port(), free_port()  # any other Ray on this machine has the defaults
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2",
         "--num-gpus", "0", "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def job_server_up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", dashboard)) == 0

    def accepts_jobs() -> bool:  # the job server answers before the node's job agent is up ("No available agent")
        return subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                               f"http://127.0.0.1:{dashboard}", "--", "true"], env=env, capture_output=True,
                              timeout=120).returncode == 0

    try:
        wait_until(job_server_up, 120, "the Ray head's job server", head)
        wait_until(accepts_jobs, 180, "the Ray head's job agent", head)
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "env": env}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)  # a throwaway head: no need to wait the half minute of its orderly stop
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_a_search_on_an_existing_cluster(assets, ray_head, tmp_path):
    space = tiny_space(tmp_path, assets["model"], "job_cola")
    storage, results = tmp_path / "shared" / "runs", tmp_path / "shared" / "results"
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}
    job = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["address"],
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "llmm_tune.search", str(space), "--address", "auto", "--profile", "cpu",
         "--storage", str(storage), "--results", str(results), "--data-dir", str(assets["data"]), "--name", "job",
         "--cpus-per-trial", "1"],
        env=ray_head["env"], capture_output=True, text=True, timeout=900)
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]
    rows = exported(results)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    best = yaml.safe_load((results / "cola" / "best.yaml").read_text())
    assert best["experiment"] == "job" and best["held_out"]["split"] == "dev"
    assert (storage / "job" / "llmm_experiment.json").is_file()
    # inside a job the working directory is Ray's temporary copy: a relative path is refused, naming the fix
    relative = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["address"],
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "llmm_tune.search", str(space), "--profile", "cpu", "--data-dir", str(assets["data"])],
        env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert relative.returncode != 0
    assert "--storage ray_results is relative, but inside a Ray job the working directory is a temporary copy" \
        in relative.stdout + relative.stderr


def test_a_layout_the_cluster_cannot_hold_is_refused_before_any_trial(assets, ray_head, tmp_path):
    space = tiny_space(tmp_path, assets["model"], "too_wide")
    run = run_module("llmm_tune.search", str(space), "--profile", "cpu", "--address", ray_head["gcs"],
                     "--data-dir", str(assets["data"]), "--storage", str(tmp_path / "runs"),
                     "--workers-per-trial", "3", "--cpus-per-trial", "1", env=ray_head["env"])
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr[-2000:]
    assert "--workers-per-trial 3 of 1 CPU + 0 GPU each needs more than" in run.stderr


def test_a_layout_this_machine_cannot_hold_is_refused_before_ray_starts(data_dir):
    run = run_module("llmm_tune.search", "glue_cola", "--workers-per-trial", "4", "--cpus-per-trial",
                     str(os.cpu_count()), "--data-dir", str(data_dir))
    assert run.returncode == 2 and "needs more than the" in run.stderr and "of this machine" in run.stderr


@pytest.fixture
def s3(tmp_path):
    """moto's S3 server on the loopback with an empty bucket; the environment pyarrow and boto3 read."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        def bucket_made() -> bool:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(
                    Bucket="llmm")
                return True
            except Exception:
                return False

        wait_until(bucket_made, 60, "the S3 server", server)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_search_on_s3_survives_a_kill_resumes_and_exports_leaving_nothing_on_local_disk(assets, s3, tmp_path,
                                                                                       monkeypatch):
    import pyarrow.fs as pafs

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    space = tiny_space(tmp_path, assets["model"], "s3_cola", epochs=4)
    work = tmp_path / "work"
    work.mkdir()
    args = [str(space), "--profile", "cpu", "--data-dir", str(assets["data"]), "--storage", "s3://llmm/runs",
            "--results", str(tmp_path / "results"), "--name", "on-s3", "--num-samples", "2", "--cpus-per-trial", "2"]
    env = {**ENV, **s3}
    fs, _ = pafs.FileSystem.from_uri("s3://llmm/runs")

    def checkpoints_on_s3() -> int:  # trials upload checkpoints as they report; Tune syncs its own files later
        infos = fs.get_file_info(pafs.FileSelector("llmm/runs/on-s3", recursive=True, allow_not_found=True))
        return sum(info.base_name.startswith("checkpoint_") for info in infos)

    no_bucket = subprocess.run([sys.executable, "-m", "llmm_tune.search", *args[:5], "--storage", "s3://nobucket/x"],
                               cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert no_bucket.returncode == 2 and no_bucket.stderr.strip().count("\n") == 0, no_bucket.stderr[-2000:]
    assert "--storage s3://nobucket/x is not writable" in no_bucket.stderr and "credentials" in no_bucket.stderr
    process = subprocess.Popen([sys.executable, "-u", "-m", "llmm_tune.search", *args], cwd=work, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: checkpoints_on_s3() >= 1, 300, "a first checkpoint on S3", process)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "llmm_tune.search", *args, "--resume"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "done: val mcc" in resumed.stdout  # work was left at the kill, and the resumed search did it
    rows = exported(tmp_path / "results")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    again = subprocess.run([sys.executable, "-m", "llmm_tune.export", "s3://llmm/runs/on-s3", "--results",
                            str(tmp_path / "again")], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert exported(tmp_path / "again") == rows  # the export reads the experiment from its URI alike
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector("llmm/runs/on-s3", recursive=True))}
    assert {"llmm_experiment.json", "llmm_search.log"} <= names
    assert any(name.startswith("loftq-") for name in names) and any(name.startswith("checkpoint_") for name in names)
    local = [p for p in [*work.rglob("*"), *(Path.home() / "ray_results").glob("on-s3*")] if "on-s3" in str(p)]
    assert local == [] and not any(work.iterdir())  # nothing of the experiment on this disk


# copies of the model (DistributedDataParallel) on packed uniform codes; shards of it (FSDP) on bitsandbytes' NF4
LAYOUTS = {"copies": ("uniform", []), "fsdp": ("normal_float", ["--fsdp"])}


@pytest.fixture(scope="module")
def two_worker_run(assets, tmp_path_factory):
    """The search of one two-worker trial of a layout (run once per module, when a test first asks): its space, its
    reports and its export. In the sharded layout one worker is killed at the first report: Ray Train restarts the
    workers from the run's latest checkpoint, scattered over the shards again (the unsharded load is test_faults')."""
    runs: dict[str, dict] = {}

    def run(layout: str) -> dict:
        if layout not in runs:
            out = tmp_path_factory.mktemp(f"two-workers-{layout}")
            quant_method, flags = LAYOUTS[layout]
            point = {"quant_method": quant_method, "bits": 4, "rank": 4, "lr": 5e-3, "scale": 100, "K": 0}
            model = tiny_bert(out / "model", dropout=0.0)
            space = tiny_space(out, model, "two_workers", warm_start=[point], epochs=3, evals_per_epoch=2,
                               searched={"K": {"choice": [0]}, "rank": {"choice": [4]},
                                         "quant_method": {"choice": [quant_method]}})
            process = start_module("llmm_tune.search", str(space), "--profile", "cpu", "--data-dir",
                                   str(assets["data"]), "--storage", str(out / "runs"), "--results",
                                   str(out / "results"), "--name", "dp", "--num-samples", "1", "--workers-per-trial",
                                   "2", "--cpus-per-trial", "1", *flags)
            experiment = out / "runs" / "dp"
            if layout == "fsdp":
                kill_a_worker_at_the_first_report(process, experiment)
            output, _ = process.communicate(timeout=900)
            assert process.returncode == 0, output[-3000:]
            reports = reported(experiment)
            # the trial's settings: the space's fixed ones and what Ray's config holds, the searched ones
            config = {**read_record(str(experiment)).spec().fixed, **reports[-1]["config"]}
            runs[layout] = {"results": out / "results", "reports": reports, "config": config}
        return runs[layout]

    return run


def reported(experiment: Path) -> list[dict]:
    files = list(experiment.glob("trial_*/result.json"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def kill_a_worker_at_the_first_report(process: subprocess.Popen, experiment: Path) -> None:
    wait_until(lambda: len(reported(experiment)) >= 1, 600, "a first report", process)  # of 6: 3 epochs x 2
    workers = [p for p, line in command_lines(process.pid) if "RayTrainWorker" in line]
    assert len(workers) == 2, " | ".join(line[:40] for _, line in command_lines(process.pid))
    workers[1].send_signal(signal.SIGKILL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_trial_of_two_workers_trains_on_two_shards_and_matches_one_worker(assets, two_worker_run, layout):
    """Without randomness (K = 0: no adapter noise; no dropout), 2 workers with one batch each per step do
    the arithmetic of 1 worker accumulating 2 batches per step, so the validation loss agrees to float
    rounding (stated tolerance: 1e-4), also where a worker was killed and the run resumed from its checkpoint
    (fsdp). With FSDP each worker stores about half of the model."""
    import torch

    from llmm_tune.train.sharding import stored_bytes
    from llmm_tune.tune.context import TrialContext
    from trainables.glue import build_model, prepare, train

    run = two_worker_run(layout)
    results = run["reports"]
    last = results[-1]
    assert len(set(last["shard_digests"])) == 2  # each worker its own batches
    cola = TrialContext.of("glue", "cola")
    share = [stored / stored_bytes(build_model(run["config"], cola, "cpu"))
             for stored in last["stored_bytes_by_worker"]]
    assert len(share) == 2, share  # one figure a worker
    assert all(0.4 < s < 0.6 for s in share) if layout == "fsdp" else share == [1.0, 1.0], share
    config = {**run["config"], "grad_accum": 2}
    data = prepare(config, cola, str(assets["data"]))
    assert sum(last["shard_examples_by_worker"]) == len(data.train)  # together, all of train (256 = 16 batches of 16)
    torch.set_num_threads(1)
    single = []
    train(config, cola, data, lambda metrics, directory: single.append(metrics))
    steps = [r["step"] for r in results]
    if layout == "fsdp":  # resumed from its checkpoint: a restart from scratch would report the first step again
        assert steps.count(steps[0]) == 1, steps
    assert steps == [r["step"] for r in single]
    assert last["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-4)
    assert exported(run["results"])[0]["val_mcc"] != ""  # the export found the Train run's checkpoint


def test_the_shipped_cluster_files_hold_together_and_run_searches_this_parser_accepts():
    from llmm_tune.cli import parse_search_args as parse_args

    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "llmm_tune.search"]
    args = parse_args(command[3:])
    assert args.address == "auto" and args.storage.startswith("s3://") and Path(args.results).is_absolute()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip") and runtime_env["pip"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    containers = [c for w in workers for c in w["template"]["spec"]["containers"]]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in containers]
    assert gpus and all(count >= 1 for count in gpus), gpus
    launcher = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert sum(t.get("max_workers", 0) for t in launcher["available_node_types"].values()) <= launcher["max_workers"]
