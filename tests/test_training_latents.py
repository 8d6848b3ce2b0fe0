"""Tests of training/latents.py: the latent cache as parquet files per row group, built once, split by rank."""

import os

import pytest
import torch
from torch.utils.data import DataLoader

from training.config import apply_overrides, preset
from training.data import load_autoencoder, shard_paths
from training.latents import build_latents, latent_dir_for
from training.stream import StreamDataset, plan_data
from training.synthetic import write_synthetic_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(path)
    return str(path)


def test_latents_are_built_once_split_by_rank_and_streamed(vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="latent_autoencoder"):
        load_autoencoder(str(tmp_path / "missing"))
    write_synthetic_shards(str(tmp_path), num_shards=2, row_group_rows=2, num_clips=8, num_frames=8, size_px=16,
                           caption_dim=8, corrupt_every=8)
    cfg = apply_overrides(preset("video"), ["resolution_px=16", "num_frames=3", "channel_mult=1,2",
                                            "batch_size=4", "total_steps=3", f"latent_autoencoder={vae_dir}"])
    plan = plan_data(shard_paths(str(tmp_path)), cfg, num_streams=1)
    cache = str(tmp_path / "cache")
    folder = latent_dir_for(cfg, cache)
    # Two ranks (no process group here, called one after the other) each encode half the row groups.
    build_latents(plan, cfg, cache, rank=0, world_size=2)
    assert len(os.listdir(folder)) == 2
    latent_plan = build_latents(plan, cfg, cache, rank=1, world_size=2)
    assert len(os.listdir(folder)) == 4 == len(plan.pieces)
    # Built once: a second build reads nothing new and needs no autoencoder.
    mtimes = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}
    assert build_latents(plan, cfg, cache, vae="unused") == latent_plan
    assert mtimes == {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}

    ds = StreamDataset(latent_plan, cfg, (4, 3, 8, 8))
    got = list(DataLoader(ds, batch_size=None))
    assert got[0]["x"].shape == (4, 4, 3, 8, 8)  # (B, C, T, h, w): 16 px / 2
    # Rows come from the latent files, not decoded pixels: the corrupt clip is a bad row (null latent).
    weights = torch.cat([b["weight"] for b in got])
    bad = [m for b in got for m in b["bad_rows"]]
    assert (weights == 0).sum() == len(bad) >= 1 and all("latent" in m for m in bad)
    # The same rows in pixel mode (another plan, same order) have pixels in [-1, 1]: the latents differ.
    pixel = list(DataLoader(StreamDataset(plan, cfg, (3, 3, 16, 16)), batch_size=None))
    assert pixel[0]["x"].shape == (4, 3, 3, 16, 16)
    assert torch.equal(torch.cat([b["weight"] for b in pixel]), weights)
