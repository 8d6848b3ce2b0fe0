"""Data-parallel training of one stage with Ray Train (TorchTrainer, DDP).

The trainer's one use of Ray Train; training/study/'s `--runner ray` uses plain Ray tasks instead.

Only the shard file paths travel to the workers (no table goes through the object store): each
worker plans the stream from the files' metadata and reads only its own data streams' row groups
(training/stream.py), exactly as training/loop.py does under any other DDP launcher. The shard
files must therefore be readable by every worker (OUT_DIR on a shared file system on a
multi-node cluster). Process groups use gloo on CPU and NCCL on GPU. Rank 0 writes checkpoints
and metrics into run_dir, which must be on storage the head node can read too.

After the stage, every rank reports a digest of its parameters (they must all be equal: DDP keeps
replicas in lock step) and the (epoch, piece) pairs it read (no pair read by two ranks); the tests
check both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from curation import outdir
from training.config import TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha1 of every parameter's bytes, in state-dict order."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        full = getattr(t, "full_tensor", None)  # a sharded parameter: gathered (every rank calls this)
        h.update((full() if full is not None else t).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train on this rank's part of the shards, report losses and digests."""
    import curation  # noqa: F401  (torchvision shim in this worker process, before anything imports it)
    from training.loop import train

    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    if torch.cuda.is_available():
        torch.cuda.set_device(get_device())  # this worker's GPU for DDP / NCCL
    cfg = from_dict(config["cfg"])
    result = train(cfg, list(config["shard_paths"]), config["run_dir"], config["init_checkpoint"],
                   stop_after_step=config.get("stop_after_step"))

    # Digest of this rank's in-memory weights and the pieces it read, gathered to every rank.
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (parameter_digest(result.model), sorted(set(result.pieces_read))))
    report = {"losses": [result.losses[k] for k in sorted(result.losses)],
              "param_digests": [g[0] for g in gathered], "pieces_read": [g[1] for g in gathered],
              "data_wait_s": result.data_wait_s, "step_s": result.step_s, "bad_rows": result.bad_rows,
              "last_checkpoint": result.last_checkpoint or ""}
    # Ray Train keeps the metrics of reports that carry a checkpoint: rank 0 attaches a small one.
    if dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(report)


def train_distributed(cfg: TrainConfig, shard_paths: list[str], run_dir: str, num_workers: int,
                      init_checkpoint: str | None = None, use_gpu: bool | None = None,
                      cpus_per_worker: int = 1, stop_after_step: int | None = None) -> dict[str, Any]:
    """Train one stage on `num_workers` Ray Train workers; returns rank 0's final report.

    Starts a local Ray instance when none is running (`ray.init()` honours RAY_ADDRESS).
    """
    if not ray.is_initialized():
        ray.init()
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    run_dir = os.path.abspath(run_dir)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": to_dict(cfg), "shard_paths": [outdir.absolute(p) for p in shard_paths],
                           "run_dir": run_dir,
                           "init_checkpoint": init_checkpoint and os.path.abspath(init_checkpoint),
                           "threads_per_worker": cpus_per_worker, "stop_after_step": stop_after_step},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{cfg.stage}", storage_path=os.path.join(run_dir, "ray")),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, "report.json")) as f:
            report = json.load(f)
    log.info("ray train %s stage finished: %s", cfg.stage, {k: v for k, v in report.items() if k != "losses"})
    return report
