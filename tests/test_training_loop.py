"""Tests of training/loop.py and training/cli.py train: loss falls per stage, exact resume, checkpoints."""

import csv
import os
import shutil
from dataclasses import replace

import pytest
import torch

from training import diffusion
from training.cli import train_command
from training.config import apply_overrides, from_dict, preset
from training.data import apply_select, columns_for, read_shards, shard_paths
from training.loop import latest_checkpoint, load_checkpoint, model_from_config, train
from training.synthetic import write_synthetic_shards

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

    ds = ShardDataset(table, cfg, 8)
    batch = [ds[(10_000, i)] for i in range(len(ds))]
    x = torch.stack([b["x"] for b in batch])
    cap = torch.stack([b["caption"] for b in batch])
    g = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for sigma in (0.1, 0.3, 1.0, 3.0):
            noise = torch.randn(x.shape, generator=g)
            losses.append(diffusion.edm_loss(model, x, torch.full((len(x),), sigma), noise, cfg.sigma_data,
                                             caption=cap, fps_id=torch.stack([b["fps_id"] for b in batch]),
                                             motion_bucket_id=torch.stack([b["motion_bucket_id"] for b in batch])
                                             ).mean().item())
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
    result = train(cfg, table, str(tmp_path))
    before = fixed_eval_loss(fresh, cfg, selected)
    after = fixed_eval_loss(result.model, cfg, selected)
    assert after < 0.8 * before, (before, after)
    assert os.path.exists(tmp_path / "loss.png")


def test_stage_chain_starts_from_previous_weights(out_dir, tmp_path):
    # The video stage starts as the image stage's EMA model (temporal layers at zero): its
    # first-step loss on the same data equals the image model's loss frame by frame.
    image_cfg = config("image", "total_steps=6")
    table = read_shards(shard_paths(out_dir), columns_for(image_cfg))
    image = train(image_cfg, table, str(tmp_path / "image"))
    video_cfg = config("video", "total_steps=3", "lr=0.0")  # lr 0: the weights stay the starting ones
    video = train(video_cfg, table, str(tmp_path / "video"), init_checkpoint=image.last_checkpoint)
    x = torch.randn(2, 3, 4, 16, 16)
    c_noise = torch.tensor([0.1, -0.3])
    cap = torch.randn(2, 8)
    per_frame = torch.stack([image.ema(x[:, :, t], c_noise, cap) for t in range(4)], dim=2)
    torch.testing.assert_close(video.model(x, c_noise, cap), per_frame, atol=1e-5, rtol=1e-4)


def test_resumed_run_reproduces_the_uninterrupted_losses(out_dir, tmp_path):
    cfg = config("video", "total_steps=8", "checkpoint_every_steps=4", "warmup_steps=3", "batch_size=2")
    table = read_shards(shard_paths(out_dir), columns_for(cfg))
    full = train(cfg, table, str(tmp_path / "full"))

    # Killed after step 6: only the step-4 checkpoint survives; the same call again resumes there.
    partial = train(cfg, table, str(tmp_path / "resumed"), stop_after_step=6)
    assert sorted(partial.losses) == list(range(6))
    assert os.path.basename(latest_checkpoint(str(tmp_path / "resumed"))) == "checkpoint-0000004.pt"
    resumed = train(cfg, table, str(tmp_path / "resumed"))
    assert resumed.resumed_from_step == 4
    assert [resumed.losses[s] for s in range(4, 8)] == [full.losses[s] for s in range(4, 8)]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # metrics.csv holds every step exactly once (the lost steps 4-5 were rewritten).
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(8))


def test_checkpoint_holds_state_dicts_config_step_and_rng(out_dir, tmp_path):
    cfg = config("image", "total_steps=2")
    train(cfg, read_shards(shard_paths(out_dir), columns_for(cfg)), str(tmp_path))
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
