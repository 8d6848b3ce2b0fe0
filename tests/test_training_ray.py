"""Test of training/ray_train.py: two Ray Train workers (DDP, gloo on CPU) read their own shards, train
in lock step, and match one process on the same global batch."""

import os

import pytest
import torch

from training.config import apply_overrides, from_dict, preset
from training.loop import latest_checkpoint, load_checkpoint, model_from_config, train
from training.synthetic import write_synthetic_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 1024 ** 2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_two_ddp_workers_train_and_agree_on_parameters(ray_local, tmp_path):
    from training.ray_train import parameter_digest, train_distributed

    paths = write_synthetic_shards(str(tmp_path), num_shards=4, num_clips=8, num_frames=6, size_px=16,
                                   caption_dim=8)
    # Gloo on the CPU (the test is about the CPU path: a GPU machine would otherwise pick NCCL and CUDA).
    cfg = apply_overrides(preset("image", "tiny"), ["device=cpu", "model_channels=8", "context_dim=16", "num_heads=2",
                                                    "total_steps=2", "batch_size=4", "warmup_steps=1",
                                                    "shuffle_buffer_rows=2"])
    run_dir = str(tmp_path / "train" / "image")
    report = train_distributed(cfg, paths, run_dir, num_workers=2, use_gpu=False)

    # No table went through the object store: each worker read its own pieces (4 files, 2 each per epoch).
    reads = [set(map(tuple, r)) for r in report["pieces_read"]]
    assert reads[0] and reads[1] and not reads[0] & reads[1]
    # One process drawing the same global batch (2 data streams) computes the same losses.
    single = train(apply_overrides(cfg, ["data_streams=2"]), paths, str(tmp_path / "single"))
    for step, loss in enumerate(report["losses"]):
        assert abs(loss - single.losses[step]) < 1e-4 * loss

    digests = report["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP replicas identical after the steps
    assert len(report["losses"]) == 2 and all(0 < v < 10 for v in report["losses"])
    # Rank 0's checkpoint holds those weights, and they moved away from the initial ones.
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    trained = model_from_config(from_dict(ckpt["config"]), 3)
    trained.load_state_dict(ckpt["model"])
    assert parameter_digest(trained) == digests[0]
    torch.manual_seed(cfg.seed)
    initial = model_from_config(from_dict(ckpt["config"]), 3)
    assert parameter_digest(initial) != digests[0]
    assert ckpt["step"] == 2
