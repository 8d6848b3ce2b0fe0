"""Data-parallel training of one stage with Ray Train (TorchTrainer, DDP): the only module here importing ray.

Ray Data reads the shard columns the stage needs (from any path the cluster can read); the
blocks go to the object store once and every worker builds the same table from them, so the
per-step batches split by rank exactly as in training/loop.py (rank r takes rows r::world of
the global batch). Process groups use gloo on CPU and NCCL on GPU. Rank 0 writes checkpoints
and metrics into run_dir, which must therefore be on storage the head node can read (a shared
file system on a multi-node cluster).

After the stage, every rank reports a digest of its parameters; they must all be equal (DDP
keeps replicas in lock step), and the tests check it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from training.config import TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha1 of every parameter's bytes, in state-dict order."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: rebuild the table, train, report losses and a parameter digest."""
    import curation  # noqa: F401  (torchvision shim in this worker process, before anything imports it)
    from training.loop import train

    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    if torch.cuda.is_available():
        torch.cuda.set_device(get_device())  # this worker's GPU for DDP / NCCL
    cfg = from_dict(config["cfg"])
    table = pa.concat_tables(ray.get(list(config["table_refs"])))
    result = train(cfg, table, config["run_dir"], config["init_checkpoint"],
                   stop_after_step=config.get("stop_after_step"))

    # Digest of this rank's in-memory weights, gathered to every rank (DDP keeps them equal).
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameter_digest(result.model))
    report = {"losses": [result.losses[k] for k in sorted(result.losses)],
              "param_digests": digests, "data_wait_s": result.data_wait_s, "step_s": result.step_s,
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
                      cpus_per_worker: int = 1, columns: list[str] | None = None,
                      stop_after_step: int | None = None) -> dict[str, Any]:
    """Train one stage on `num_workers` Ray Train workers; returns rank 0's final report.

    Starts a local Ray instance when none is running (`ray.init()` honours RAY_ADDRESS).
    """
    from training.data import columns_for

    if not ray.is_initialized():
        ray.init()
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    ds = ray.data.read_parquet([os.path.abspath(p) for p in shard_paths]).select_columns(columns or columns_for(cfg))
    table_refs = ds.to_arrow_refs()
    run_dir = os.path.abspath(run_dir)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": to_dict(cfg), "table_refs": table_refs, "run_dir": run_dir,
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
