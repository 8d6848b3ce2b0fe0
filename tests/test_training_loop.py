"""Tests of training/loop.py and training/cli.py train: loss falls per stage, exact resume, checkpoints."""

import csv
import glob
import os
import shutil
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from training import diffusion
from training.cli import train_command
from training.config import apply_overrides, from_dict, preset
from training.data import apply_select, columns_for, read_shards, shard_paths
from training.loop import (BadRowsError, latest_checkpoint, latest_good_checkpoint, load_checkpoint,
                           model_from_config, train)
from training.synthetic import write_synthetic_shards
from numerics import float64_one_thread

torch.set_num_threads(1)  # robust on a shared 2-core machine (no spinning OMP threads)
# A very small model: the tests check behaviour, not quality.
MICRO = ["resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2", "attention_levels=1",
         "num_heads=2", "log_every_steps=1000"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_out")
    write_synthetic_shards(str(out), num_clips=8, num_frames=10, size_px=16, caption_dim=8)
    return str(out)


def config(stage, *extra):
    return apply_overrides(preset(stage, "tiny"), MICRO + list(extra))


def fixed_eval_loss(model, cfg, table) -> float:
    """Loss on fixed samples, noise levels and noise, so runs are compared on the same terms."""
    from training.data import ShardDataset

    device = next(model.parameters()).device  # the model's: CUDA where the run trained there
    ds = ShardDataset(table, cfg, 8)
    batch = [ds[(10_000, i)] for i in range(len(ds))]
    x = torch.stack([b["x"] for b in batch]).to(device)
    cond = {"caption": torch.stack([b["caption"] for b in batch]).to(device),
            "fps_id": torch.stack([b["fps_id"] for b in batch]).to(device),
            "motion_bucket_id": torch.stack([b["motion_bucket_id"] for b in batch]).to(device)}
    g = torch.Generator().manual_seed(123)  # noise drawn on the CPU: the same on every device
    losses = []
    with torch.no_grad():
        for sigma in (0.1, 0.3, 1.0, 3.0):
            noise = torch.randn(x.shape, generator=g).to(device)
            losses.append(diffusion.edm_loss(model, x, torch.full((len(x),), sigma, device=device), noise,
                                             cfg.sigma_data, **cond).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("stage,steps", [("image", 30), ("video", 20), ("hq", 20)])
def test_loss_falls_in_each_stage(out_dir, tmp_path, stage, steps):
    # Each stage's own config (frames, temporal layers, noise schedule, hq predicate) from a
    # fresh model; the chaining of stages is tested in test_stage_chain_starts_from_previous_weights.
    cfg = config(stage, f"total_steps={steps}", "checkpoint_every_steps=1000", "init_from=none",
                 "lr=5e-3", "warmup_steps=5")  # a high rate: a tiny model, a few dozen steps
    table = read_shards(shard_paths(out_dir), columns_for(cfg))
    selected = apply_select(table, cfg.select)
    if stage == "hq":
        assert 0 < selected.num_rows < table.num_rows
    torch.manual_seed(cfg.seed)
    fresh = model_from_config(replace(cfg, caption_dim=8), 3)
    result = train(cfg, shard_paths(out_dir), str(tmp_path))
    before = fixed_eval_loss(fresh, cfg, selected)
    after = fixed_eval_loss(result.model, cfg, selected)
    assert after < 0.8 * before, (before, after)
    assert os.path.exists(tmp_path / "loss.png")


def test_stage_chain_starts_from_previous_weights(out_dir, tmp_path):
    # The video stage starts as the image stage's EMA model (temporal layers at zero): its
    # first-step loss on the same data equals the image model's loss frame by frame. On the CPU:
    # the comparison is at float32 rounding (CUDA convolutions may run in TF32).
    image_cfg = config("image", "total_steps=6", "device=cpu")
    image = train(image_cfg, shard_paths(out_dir), str(tmp_path / "image"))
    video_cfg = config("video", "total_steps=3", "lr=0.0", "device=cpu")  # lr 0: the weights stay the starting ones
    video = train(video_cfg, shard_paths(out_dir), str(tmp_path / "video"), init_checkpoint=image.last_checkpoint)
    x = torch.randn(2, 3, 4, 16, 16)
    c_noise = torch.tensor([0.1, -0.3])
    cap = torch.randn(2, 8)
    per_frame = torch.stack([image.ema(x[:, :, t], c_noise, cap) for t in range(4)], dim=2)
    torch.testing.assert_close(video.model(x, c_noise, cap), per_frame, atol=1e-5, rtol=1e-4)


def test_resumed_run_reproduces_the_uninterrupted_losses(out_dir, tmp_path):
    # 8 rows in 2 pieces, windows of one piece, batch 2: step 6 starts mid-way through the second
    # epoch's second window, so the resumed stream seeks across epochs and windows. On the CPU, whose
    # kernels are deterministic (CUDA's convolution backward by default is not), so losses are equal bit for bit.
    cfg = config("video", "device=cpu", "total_steps=8", "checkpoint_every_steps=3", "warmup_steps=3", "batch_size=2",
                 "shuffle_buffer_rows=2")
    paths = shard_paths(out_dir)
    full = train(cfg, paths, str(tmp_path / "full"))

    # Killed after step 7: only the step-6 checkpoint survives; the same call again resumes there,
    # here with two data-loader workers (the batches do not depend on them).
    partial = train(cfg, paths, str(tmp_path / "resumed"), stop_after_step=7)
    assert sorted(partial.losses) == list(range(7))
    assert os.path.basename(latest_checkpoint(str(tmp_path / "resumed"))) == "checkpoint-0000006.pt"
    resumed = train(replace(cfg, data_workers=2), paths, str(tmp_path / "resumed"))
    assert resumed.resumed_from_step == 6
    assert [resumed.losses[s] for s in range(6, 8)] == [full.losses[s] for s in range(6, 8)]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # metrics.csv holds every step exactly once (the lost step 6 was rewritten).
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(8))


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(out_dir, tmp_path):
    cfg = config("image", "device=cpu", "total_steps=6", "checkpoint_every_steps=3", "batch_size=2")  # exact: CPU
    full = train(cfg, shard_paths(out_dir), str(tmp_path))
    last = latest_checkpoint(str(tmp_path))
    assert os.path.basename(last) == "checkpoint-0000006.pt" and not glob.glob(str(tmp_path / "*.tmp"))
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    assert latest_good_checkpoint(str(tmp_path))[0].endswith("checkpoint-0000003.pt")
    again = train(cfg, shard_paths(out_dir), str(tmp_path))
    assert again.resumed_from_step == 3
    assert [again.losses[s] for s in range(3, 6)] == [full.losses[s] for s in range(3, 6)]
    assert load_checkpoint(latest_checkpoint(str(tmp_path)))["step"] == 6  # rewritten, readable


def test_bad_rows_are_skipped_and_counted_up_to_the_cap(tmp_path):
    out = tmp_path / "out"
    write_synthetic_shards(str(out), num_clips=8, num_frames=10, size_px=16, caption_dim=8, corrupt_every=4)
    cfg = config("video", "total_steps=4", "batch_size=4", "max_bad_row_fraction=0.1")
    result = train(cfg, shard_paths(str(out)), str(tmp_path / "ok"))
    assert result.bad_rows == 4  # 2 bad rows of 8, 16 rows read: two epochs
    with open(tmp_path / "ok" / "metrics.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["bad_rows"]) == 4
    assert all(0 < v < 10 for v in result.losses.values())
    # 25% bad rows against a 1% cap: the run stops with a message naming the setting and a row.
    with pytest.raises(BadRowsError, match="max_bad_row_fraction=0.01.*clip"):
        train(replace(cfg, max_bad_row_fraction=0.01, total_steps=200), shard_paths(str(out)),
              str(tmp_path / "capped"))


def test_latent_mode_trains_on_the_cached_latents(out_dir, tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(tmp_path / "vae")
    cfg = config("video", "total_steps=2", "batch_size=2", "sigma_data=1.0",
                 f"latent_autoencoder={tmp_path / 'vae'}", f"latent_cache_dir={tmp_path / 'cache'}")
    result = train(cfg, shard_paths(out_dir), str(tmp_path / "run"))
    assert load_checkpoint(result.last_checkpoint)["in_channels"] == 4
    (folder,) = (tmp_path / "cache").iterdir()
    assert len(list(folder.iterdir())) == 2  # one latent file per shard row group


def test_checkpoint_holds_state_dicts_config_step_and_rng(out_dir, tmp_path):
    cfg = config("image", "total_steps=2")
    train(cfg, shard_paths(out_dir), str(tmp_path))
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path)))  # weights_only: no pickled modules
    assert ckpt["step"] == 2
    assert set(ckpt) >= {"model", "ema", "optimizer", "config", "rng", "in_channels"}
    assert from_dict(ckpt["config"]).caption_dim == 8  # resolved from the shards
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    model_from_config(from_dict(ckpt["config"]), 3).load_state_dict(ckpt["ema"])


def test_train_command_runs_all_stages_in_order(out_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(out_dir, out, copy_function=os.link)  # shards, ledger and run.json
    assert train_command([str(out), "--stage", "video", "--preset-size", "tiny"]) == 2
    assert "--stage image" in capsys.readouterr().err  # the video stage needs the image checkpoint
    sets = [a for s in MICRO for a in ("--set", s)]
    rc = train_command([str(out), "--stage", "all", "--preset-size", "tiny", *sets, "--set", "total_steps=2",
                        "--set", "hq.select={\"aesthetic_score\": {\"min\": 5.5}}"])
    assert rc == 0
    for stage in ("image", "video", "hq"):
        ckpt = load_checkpoint(latest_checkpoint(str(out / "train" / stage)))
        assert ckpt["step"] == 2 and from_dict(ckpt["config"]).stage == stage
    assert from_dict(ckpt["config"]).select == {"aesthetic_score": {"min": 5.5}}
    assert "hq: 2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_command([str(out), "--stage", "image", "--set", "no_such_key=1"])


DDP_CFG = ["device=cpu", "total_steps=5", "checkpoint_every_steps=2", "batch_size=4", "data_streams=2",
           "shuffle_buffer_rows=2", "warmup_steps=2"]


# The DDP comparison's tolerances, from float64 rounding. A gradient element is a sum of a few
# thousand products; summed in another order it moves by at most ~1e3 * 1.1e-16 of the sum of
# their magnitudes (< 1 here), so by < 1e-13. AdamW's update moves by at most lr / eps times a
# gradient error (its slope in g is below 1 / eps, eps = 1e-8): 5e-4 / 1e-8 * 1e-13 = 5e-9 a step,
# < 3e-8 over 5 steps. Losses and gradient norms are sums of positive terms: relative 1e-13.
# The faults the test is there to catch move these by orders of magnitude more: a rank reading the
# other's rows changes the loss by ~10%, a loss scaled by the world size doubles the gradient norm.
DDP_TOLERANCE = {"weight_abs": 1e-7, "loss_rel": 1e-10, "grad_norm_rel": 1e-10}


def _ddp_rank(rank: int, world: int, init_file: str, paths: list, root: str) -> None:
    """One gloo rank: an uninterrupted run, then a run killed after step 3 and resumed.

    The row groups read for training (those with the video column) are counted at the Parquet reader.
    """
    import curation  # noqa: F401
    import torch.distributed as dist

    reads, parquet_file = [], pq.ParquetFile

    class CountingParquetFile(parquet_file):
        def __init__(self, source, *args, **kw):
            super().__init__(source, *args, **kw)
            self.counted_source = str(source)

        def read_row_group(self, i, columns=None, **kw):
            if columns is not None and "video" in columns:
                reads.append((self.counted_source, i))
            return super().read_row_group(i, columns=columns, **kw)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with float64_one_thread():
            cfg = config("video", *DDP_CFG)
            pq.ParquetFile = CountingParquetFile
            try:
                full = train(cfg, paths, os.path.join(root, "full"))
            finally:
                pq.ParquetFile = parquet_file
            train(cfg, paths, os.path.join(root, "resumed"), stop_after_step=3)
            resumed = train(cfg, paths, os.path.join(root, "resumed"))
        torch.save({"full": full.losses, "resumed": resumed.losses, "resumed_from": resumed.resumed_from_step,
                    "model": full.model.state_dict(), "parquet_reads": reads},
                   os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_match_one_process_on_the_same_global_batch_and_resume_exactly(out_dir, tmp_path):
    # Both sides run in float64 on one thread each (see DDP_TOLERANCE). What is left between them
    # is the order of the gradient sums (per rank, then all-reduced, against one sum over the batch).
    import torch.multiprocessing as mp

    paths = shard_paths(out_dir)
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), paths, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    with float64_one_thread():
        single = train(config("video", *DDP_CFG), paths, str(tmp_path / "single"))

    # Same global batch (2 streams: rank r holds stream r): the same per-step loss as one process.
    for step in range(5):
        assert ranks[0]["full"][step] == ranks[1]["full"][step]  # the all-reduced loss
        assert ranks[0]["full"][step] == pytest.approx(single.losses[step], rel=DDP_TOLERANCE["loss_rel"])
    # The gradient is the global batch mean's (AdamW alone would hide a wrong scale): same norms.
    norms = []
    for run in ("full", "single"):
        with open(tmp_path / run / "metrics.csv") as f:
            norms.append([float(r["grad_norm"]) for r in csv.DictReader(f)])
    assert norms[0] == pytest.approx(norms[1], rel=DDP_TOLERANCE["grad_norm_rel"])
    # Same weights after 5 AdamW steps.
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][k], v, atol=DDP_TOLERANCE["weight_abs"], rtol=0)
    # Each rank read its own row groups only (counted at the Parquet reader), and together all of them.
    groups = [{(os.path.basename(p), g) for p, g in ranks[r]["parquet_reads"]} for r in (0, 1)]
    assert groups[0] and groups[1] and not groups[0] & groups[1]
    every = {(os.path.basename(p), g) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)}
    assert groups[0] | groups[1] == every
    # Killed after step 3, resumed from the step-2 checkpoint: the uninterrupted losses, exactly.
    assert ranks[0]["resumed_from"] == 2
    assert [ranks[0]["resumed"][s] for s in range(2, 5)] == [ranks[0]["full"][s] for s in range(2, 5)]
