"""Tests of training/sample.py and `curate sample`: determinism, guidance, outputs, prompts, latent mode."""


import av
import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import sample_command
from training.config import apply_overrides, preset
from training.data import shard_paths
from training.loop import train
from training.sample import embed_prompt, generate, latent_decoder, load_for_sampling, to_uint8_frames, write_outputs
from training.synthetic import write_synthetic_shards

torch.set_num_threads(1)
MICRO = ["resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2", "attention_levels=1",
         "num_heads=2", "total_steps=3", "init_from=none"]


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_out")
    write_synthetic_shards(str(out), num_clips=4, num_frames=8, size_px=16, caption_dim=8)
    cfg = apply_overrides(preset("video", "tiny"), MICRO + ["lr=1e-2"])
    result = train(cfg, shard_paths(str(out)), str(out / "train" / "video"))
    return result.last_checkpoint


def test_sampler_is_deterministic_for_a_seed(video_checkpoint):
    model, cfg, in_ch = load_for_sampling(video_checkpoint)
    cap = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    a = generate(model, cfg, in_ch, cap, num_frames=3, num_steps=4, seed=7)
    b = generate(model, cfg, in_ch, cap, num_frames=3, num_steps=4, seed=7)
    c = generate(model, cfg, in_ch, cap, num_frames=3, num_steps=4, seed=8)
    assert a.shape == (1, 3, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Guidance changes the result; guidance 1 is the conditional model alone.
    g1 = generate(model, cfg, in_ch, cap, num_frames=3, num_steps=4, seed=7, guidance_scale=1.0)
    assert not torch.equal(a, g1)


def test_outputs_are_an_mp4_and_a_gif_with_the_frames(tmp_path):
    video = torch.linspace(-1, 1, 3 * 5 * 16 * 16).reshape(3, 5, 16, 16)
    frames = to_uint8_frames(video)
    mp4, gif = write_outputs(frames, str(tmp_path / "clip.mp4"), fps=8)
    with av.open(mp4) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 5 and decoded[0].shape == (16, 16, 3)
    assert np.abs(decoded[2].astype(float) - frames[2]).mean() < 8
    im = Image.open(gif)
    assert im.n_frames == 5


def test_prompt_needs_an_encoder_or_an_embedding(video_checkpoint, tmp_path, capsys):
    _, cfg, _ = load_for_sampling(video_checkpoint)
    with pytest.raises(ValueError, match="--prompt-embedding"):
        embed_prompt("a red square", cfg)
    assert embed_prompt("", cfg) is None  # unconditional
    np.save(tmp_path / "bad.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="expects 8"):
        embed_prompt("x", cfg, str(tmp_path / "bad.npy"))
    with pytest.raises(SystemExit):
        sample_command([video_checkpoint, "--prompt", "a red square", "--out", str(tmp_path / "x.mp4")])
    assert "--prompt-embedding" in capsys.readouterr().err


def test_sample_command_writes_files_from_an_embedding(video_checkpoint, tmp_path):
    np.save(tmp_path / "emb.npy", np.ones(8, dtype=np.float32))
    stage_dir = str(__import__("pathlib").Path(video_checkpoint).parent)  # a folder: its latest checkpoint
    rc = sample_command([stage_dir, "--prompt", "a red square", "--prompt-embedding",
                         str(tmp_path / "emb.npy"), "--frames", "4", "--steps", "3", "--out", str(tmp_path / "s.mp4")])
    assert rc == 0
    with av.open(str(tmp_path / "s.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    assert Image.open(tmp_path / "s.gif").n_frames == 4


def test_latent_mode_trains_and_samples_through_a_saved_tiny_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32).save_pretrained(tmp_path / "vae")
    write_synthetic_shards(str(tmp_path), num_clips=3, num_frames=6, size_px=32, caption_dim=8)
    cfg = apply_overrides(preset("video", "tiny"), MICRO + ["resolution_px=32", "num_frames=3",
                                                             f"latent_autoencoder={tmp_path / 'vae'}",
                                                             "sigma_data=1.0", "batch_size=2"])
    result = train(cfg, shard_paths(str(tmp_path)), str(tmp_path / "run"))
    assert list((tmp_path / "latent_cache").glob("latents-*/*.parquet"))  # computed once, cached as shards
    assert all(np.isfinite(v) for v in result.losses.values())
    model, cfg2, in_ch = load_for_sampling(result.last_checkpoint)
    assert in_ch == 4
    out = generate(model, cfg2, in_ch, None, num_frames=3, num_steps=2, decode=latent_decoder(cfg2))
    assert out.shape == (1, 3, 3, 32, 32)  # decoded back to pixels
