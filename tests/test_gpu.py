"""The GPU paths (marked `gpu`): skipped where torch sees no CUDA device.

On a machine with one, they run the trainer through all three stages and the sampler on CUDA,
and the model stages (ocr, aesthetics, clip_similarity) on CUDA against their own CPU answers
on the same inputs. Run them alone with `pytest -m gpu`.
"""

from __future__ import annotations

import contextlib

import av
import numpy as np
import pytest
import torch

import model_fixtures as mf

GPU = "cuda"  # the device under test; every comparison is against "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]

MICRO = ["resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2", "attention_levels=1",
         "num_heads=2", "log_every_steps=1000"]


@contextlib.contextmanager
def full_float32():
    """CUDA matmuls and convolutions in float32, not TF32, so that a GPU answer can be held to the
    CPU's within float32 rounding (sums in another order: ~1e-6 relative on these small networks)."""
    if GPU != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_train_all_stages_and_sample_on_the_gpu(tmp_path):
    from training.cli import sample_command, train_command
    from training.config import from_dict
    from training.loop import latest_checkpoint, load_checkpoint
    from training.sample import generate, load_for_sampling
    from training.synthetic import write_synthetic_shards

    out = tmp_path / "out"
    write_synthetic_shards(str(out), num_clips=8, num_frames=10, size_px=16, caption_dim=8)
    if GPU == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sets = [a for s in MICRO + ["total_steps=3", f"device={GPU}"] for a in ("--set", s)]
    rc = train_command([str(out), "--stage", "all", "--preset-size", "tiny", *sets,
                        "--set", 'hq.select={"aesthetic_score": {"min": 5.5}}'])
    assert rc == 0
    for stage in ("image", "video", "hq"):
        ckpt = load_checkpoint(latest_checkpoint(str(out / "train" / stage)))
        assert ckpt["step"] == 3 and from_dict(ckpt["config"]).device == GPU
        assert all(np.isfinite(v.float().numpy()).all() for v in ckpt["ema"].values())
    if GPU == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # the networks and batches were on the GPU

    # `curate sample` on the GPU writes the frames asked for.
    mp4 = tmp_path / "sample.mp4"
    assert sample_command([str(out / "train" / "hq"), "--prompt", "", "--frames", "4", "--steps", "4",
                           "--device", GPU, "--out", str(mp4)]) == 0
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    # The same seed and caption give the CPU's sample (the noise is drawn on the CPU), guidance included.
    caption = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    samples = {}
    with full_float32():
        for device in ("cpu", GPU):
            model, cfg, in_ch = load_for_sampling(latest_checkpoint(str(out / "train" / "hq")), device)
            assert next(model.parameters()).device.type == device
            samples[device] = generate(model, cfg, in_ch, caption, num_frames=4, num_steps=4, seed=3)
    # Samples lie in [-1, 1]; float32 rounding over 7 network calls stays far below 1e-3, while a
    # caption or micro-conditioning lost on the way to the device changes the sample by O(0.1).
    torch.testing.assert_close(samples[GPU], samples["cpu"], atol=1e-3, rtol=0)


def test_ocr_on_the_gpu_gives_the_cpu_ratios():
    from stages.ocr import OcrStage

    size, working_px = (320, 180), 180
    clips = [mf.keyframes(41, size, "BIG TEXT OVERLAY", 0.3), mf.keyframes(43, size, "a small subtitle line", 0.15),
             mf.keyframes(44, size, "NEWS 24", 0.2), mf.keyframes(42, size)]
    ratios, stages = {}, {}
    for device in ("cpu", GPU):
        stages[device] = OcrStage(device=device, torch_threads=1, working_short_side_px=working_px)
        stages[device].setup()
        out = stages[device](mf.clip_batch(clips))
        assert out["ocr_error"] == [None] * len(clips)
        ratios[device] = out["text_area_ratio"]
    assert stages[GPU].device_used == GPU
    # A detector score that lands on the other side of a threshold moves one box edge by one cell
    # of CRAFT's half-resolution map: 2 px at the working size, at most 2 / working_px of the frame.
    assert ratios[GPU] == pytest.approx(ratios["cpu"], abs=2 / working_px)
    assert ratios["cpu"][0] > 0.05 and ratios["cpu"][3] < 0.005  # the cases measure text, and no text


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_clip")
    config, checkpoint = mf.write_open_clip_checkpoint(root, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG, seed=5)
    return {"config": str(config), "checkpoint": str(checkpoint), "head": str(mf.write_linear_head(root / "h.pth"))}


def test_aesthetics_and_clip_similarity_on_the_gpu_give_the_cpu_scores(tiny_clip):
    from stages.aesthetics import AestheticsStage
    from stages.clip_similarity import ClipSimilarityStage

    looks = [mf.keyframes(seed) for seed in (1, 2, 3)]
    captions = ["a red car on a road", "a dog on the beach", "snow on a mountain"]
    out = {}
    with full_float32():
        for device in ("cpu", GPU):
            aes = AestheticsStage(model=mf.TINY_CLIP, pretrained=tiny_clip["checkpoint"],
                                  model_config=tiny_clip["config"], head_path=tiny_clip["head"], device=device,
                                  torch_threads=1)
            sim = ClipSimilarityStage(model=mf.TINY_CLIP, pretrained=tiny_clip["checkpoint"],
                                      model_config=tiny_clip["config"], device=device, torch_threads=1)
            aes.setup()
            sim.setup()
            assert aes.device_used == sim.device_used == device
            out[device] = {**aes(mf.clip_batch(looks)), **sim(mf.clip_batch(looks, caption=captions))}
    for column in ("aesthetics_error", "clip_similarity_error"):
        assert out[GPU][column] == out["cpu"][column] == [None] * 3
    # Unit-norm embeddings and scores of a few hundred float32 products: rounding ~1e-6.
    for column in ("aesthetic_score", "clip_similarity"):
        assert out[GPU][column] == pytest.approx(out["cpu"][column], abs=1e-4), column
    for column in ("image_embedding", "caption_embedding"):
        np.testing.assert_allclose(np.asarray(out[GPU][column]), np.asarray(out["cpu"][column]), atol=1e-4)
