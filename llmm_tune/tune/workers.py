"""A trial as a data-parallel Ray Train run: `--workers-per-trial N` launches a TorchTrainer from the
Tune trainable (Ray 2.60 runs Train V2, where passing a trainer to the Tuner is deprecated). Every
worker runs the family's own `train` through the runner; `fit` wraps the model in DistributedDataParallel and
gives each worker its shard of the batches. Metrics reach Tune (ASHA, the searcher) through Ray's
TuneReportCallback, with every worker's shard merged in; checkpoints stay with the Train run (rank 0's,
under `<experiment>/train/<trial>`): the one that stands for the trial (its best, or its last for a task that
selects the last) is kept, and a restarted trial resumes from the latest."""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from llmm_tune.errors import FAILURE_KEY, failure_reason
from llmm_tune.tune import storage
from llmm_tune.tune.context import TrialContext
from llmm_tune.tune.runner import prepare_process, release_memory, run_recipe

TRAIN_RUNS = "train"  # <experiment>/train/<trial id>/: the Ray Train run of each multi-worker trial


class ShardsToTune(TuneReportCallback):
    """Rank 0's metrics to Tune, plus which examples every worker trained on (`shard_digests`, and how
    many: `shard_examples_by_worker`) and what it stores of the model (`stored_bytes_by_worker`)."""

    MERGED = {"shard_digest": "shard_digests", "shard_examples": "shard_examples_by_worker",
              "stored_bytes": "stored_bytes_by_worker"}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        merged = {**metrics[0]}
        for key, name in self.MERGED.items():
            if key in merged:
                merged[name] = [m[key] for m in metrics]
        super().after_report(run_context, [merged, *metrics[1:]], checkpoint)


def worker_loop(args: dict) -> None:
    """What each Train worker runs: the trial's recipe, from the run's latest checkpoint if there is one."""
    import ray.train
    import torch

    prepare_process()
    torch.set_num_threads(max(1, int(args["cpus"])))
    rank = ray.train.get_context().get_world_rank()

    def send(metrics: dict, directory: str, stands: bool) -> None:  # every worker reports; rank 0's checkpoint
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)

    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            run_recipe(args["context"], args["config"], args["data"], send)
        else:
            with checkpoint.as_directory() as directory:
                run_recipe(args["context"], args["config"], args["data"], send, resume=directory)
    except Exception as error:  # divergence and out of memory end the trial with their reason, on every worker
        reason = failure_reason(error)
        if reason is None:
            raise
        ray.train.report({FAILURE_KEY: reason})
    finally:
        release_memory()


def run_workers(config: dict, context: TrialContext, data, experiment: str, layout: dict, trial_id: str) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = layout["gpus_per_trial"]
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config, "context": context, "data": data, "cpus": layout["cpus_per_trial"]},
        scaling_config=ScalingConfig(num_workers=layout["workers_per_trial"], use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": layout["cpus_per_trial"], "GPU": gpus}),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RunConfig(
            name=trial_id, storage_path=storage.join(experiment, TRAIN_RUNS), callbacks=[ShardsToTune()],
            checkpoint_config=CheckpointConfig(num_to_keep=1, **context.checkpoint_ranking()),
            # a lost worker restarts the group from the latest checkpoint; Tune's own retries come after
            failure_config=FailureConfig(max_failures=2)),
    )
    trainer.fit()
