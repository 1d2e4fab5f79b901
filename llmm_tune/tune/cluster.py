"""Where a search runs: this machine (a private Ray instance) or an existing Ray cluster (`--address`, or
`ray job submit`), and how many trials of which shape it holds. Every check here runs before a trial
starts: a trial whose workers never fit would wait forever."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from llmm_tune.errors import UsageError
from llmm_tune.train.data import DATA_DIR_ENV
from llmm_tune.tune import storage

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint it runs
MAX_TRIALS_PER_GPU = 4  # trials sharing a GPU share its compute: past a few, packing adds waiting, not throughput


def in_ray_job() -> bool:
    return JOB_ENV in os.environ


@dataclass
class Layout:
    """The shape of one trial and how many run at once. A trial is `workers` processes, each with
    `cpus` CPUs and `gpus` GPUs (more than one worker: a Ray Train run, data parallel)."""

    cpus: float
    gpus: float
    workers: int
    concurrent: int

    def to_record(self) -> dict:
        return {"cpus_per_trial": self.cpus, "gpus_per_trial": self.gpus, "workers_per_trial": self.workers,
                "max_concurrent": self.concurrent}

    @classmethod
    def from_record(cls, record: dict) -> Layout:
        return cls(record["cpus_per_trial"], record["gpus_per_trial"], record.get("workers_per_trial", 1),
                   record["max_concurrent"])


@dataclass(frozen=True)
class LayoutRequest:
    """What the command line asked of a trial's shape; None: what fits."""

    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    workers_per_trial: int = 1
    max_concurrent: int | None = None


def check_job_paths(storage_location: str, results: str | None, data_dir: str | None) -> None:
    """Inside a Ray job the working directory is Ray's temporary copy of the checkout: a relative path
    would put results where nobody finds them again, so it is refused."""
    if not in_ray_job():
        return
    for flag, value in (("--storage", storage_location), ("--results", results), ("--data-dir", data_dir),
                        (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV))):
        if value and not storage.is_uri(value) and not os.path.isabs(os.path.expanduser(value)):
            raise UsageError(f"{flag} {value} is relative, but inside a Ray job the working directory is a temporary "
                             "copy of your checkout; pass an absolute path every node sees (for --storage also an "
                             "s3:// or gs:// URI)")


def address(option: str | None) -> str | None:
    """The cluster to join: --address, or the job's own cluster inside `ray job submit`."""
    return option or ("auto" if in_ray_job() else None)


def start_ray(cluster: str | None) -> dict[str, float]:
    """Join a cluster, or start a private local instance bound to the loopback, without a dashboard.
    Workers' output stays in their trials' log files. Returns the resources of the instance."""
    import ray

    if cluster:
        ray.init(address=cluster, logging_level="ERROR", log_to_driver=False)
    else:
        # Ray's memory monitor kills a trial's actor with an OutOfMemoryError that Tune's actor manager does
        # not expect (ray 2.60: "Caught unexpected exception"), and the whole search dies with it. Without
        # the monitor, the kernel's OOM killer ends the trial's process, which Tune retries from its checkpoint.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        # "local": a new instance even where `ray start` left a head (or its stale address file) behind,
        # which a bare ray.init() would join.
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    return ray.cluster_resources()


def machine() -> dict[str, float]:
    """This machine's resources, as a private Ray instance would see them."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def plan_layout(asked: LayoutRequest, resources: dict[str, float], where: str) -> Layout:
    """The trial layout asked for, with defaults that fit `resources` (`where`: "this machine" or "the
    cluster")."""
    cpus_here, gpus_here = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    gpus = asked.gpus_per_trial if asked.gpus_per_trial is not None else (1.0 if gpus_here else 0.0)
    # Without GPUs, several narrow trials beat one wide one on these small models (MiniLM on 2 cores:
    # two 1-thread trials do 6.6 steps/s together, one 2-thread trial 5.0).
    cpus = asked.cpus_per_trial or float(max(1, int(cpus_here) // 4) if gpus == 0 else min(4, cpus_here))
    workers = asked.workers_per_trial
    if gpus > gpus_here:
        raise UsageError(f"--gpus-per-trial {gpus:g} exceeds the {gpus_here:g} GPU(s) of {where}; lower it"
                         + (" or pass --address of a cluster with more" if where == "this machine" else ""))
    if cpus > cpus_here:
        raise UsageError(f"--cpus-per-trial {cpus:g} exceeds the {cpus_here:g} CPUs of {where}; lower it")
    by_cpus = cpus_here // cpus if math.isfinite(cpus_here) else math.inf  # inf: a plan whose GPUs bind
    fit = min(by_cpus, gpus_here // gpus if gpus else math.inf) // workers
    if fit < 1:
        raise UsageError(f"--workers-per-trial {workers} of {cpus:g} CPU + {gpus:g} GPU each needs more than the "
                         f"{cpus_here:g} CPU + {gpus_here:g} GPU of {where}; lower it or the resources per worker")
    return Layout(cpus, gpus, workers, asked.max_concurrent or max(1, int(fit)))


def trials_per_gpu(peak_gib: float, gpu_gib: float) -> int:
    """How many trials of a probed peak memory one GPU of `gpu_gib` holds (fractional packing)."""
    per_gpu = int(gpu_gib // peak_gib)
    if per_gpu < 1:
        raise UsageError(f"a trial peaks at {peak_gib:.1f} GiB, more than the GPU's {gpu_gib:g} GiB; use "
                         "--workers-per-trial with --fsdp, a smaller model (--model) or larger GPUs")
    return per_gpu


def check_layout(layout: Layout) -> None:
    """Refuse a trial the cluster cannot hold: a worker larger than every node, or more workers than
    the nodes have room for together (its trials would wait forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def room(node: dict) -> float:  # workers of this shape the node holds
        by_cpu = node.get("CPU", 0) // layout.cpus if layout.cpus else math.inf
        by_gpu = node.get("GPU", 0) // layout.gpus if layout.gpus else math.inf
        return min(by_cpu, by_gpu)

    largest = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
    if not any(room(n) >= 1 for n in nodes):
        raise UsageError(f"a worker of {layout.cpus:g} CPU + {layout.gpus:g} GPU fits no node of the cluster (the "
                         f"largest has {largest[0]:g} CPU + {largest[1]:g} GPU); lower --cpus-per-trial or "
                         "--gpus-per-trial")
    total = sum(min(room(n), layout.workers) for n in nodes)
    if total < layout.workers:
        raise UsageError(f"--workers-per-trial {layout.workers} of {layout.cpus:g} CPU + {layout.gpus:g} GPU each "
                         f"needs more than the cluster holds ({int(total)} such workers); lower it or the "
                         "resources per worker")


def describe(layout: Layout) -> str:
    shape = f"{layout.cpus:g} CPU + {layout.gpus:g} GPU"
    if layout.workers > 1:
        return f"{layout.concurrent} at once, {layout.workers} workers of {shape} each"
    return f"{layout.concurrent} at once, {shape} each"

