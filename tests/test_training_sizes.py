"""The GPU size presets (base, large: latent space at SVD's stage-II shape), non-square frames,
and the clear errors around them (issue 24, item 1)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from training.config import LATENT_SIZES, apply_overrides, preset
from training.loop import DoesNotFitError, model_from_config, train
from training.synthetic import write_synthetic_shards

MICRO = ["model_channels=8", "context_dim=16", "channel_mult=1,2", "attention_levels=1", "num_heads=2",
         "log_every_steps=1000", "device=cpu", "total_steps=2", "batch_size=2", "warmup_steps=1"]


def parameters(cfg) -> int:
    with torch.device("meta"):
        model = model_from_config(replace(cfg, caption_dim=1024), 4)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, low, high", [("base", 300e6, 500e6), ("large", 1.4e9, 1.7e9)])
def test_gpu_presets_have_their_sizes_at_svds_latent_shape(size, low, high):
    video, image = preset("video", size), preset("image", size)
    assert low <= parameters(video) <= high  # the sizes the README and issue 24 name
    assert parameters(image) < parameters(video)  # no temporal layers in the image stage
    # 14 frames of 256x384 pixels: latents of 32x48 through a factor-8 autoencoder, which the
    # U-Net's levels divide; the image stage trains on the same frame size.
    assert (video.num_frames, video.resolution_px, video.frame_width) == (14, 256, 384)
    assert (image.resolution_px, image.frame_width) == (256, 384)
    down = 8 * 2 ** (len(video.channel_mult) - 1)
    assert video.resolution_px % down == 0 and video.frame_width % down == 0
    # Attention heads of 64-128 channels at every attention level (flash kernels take them).
    for level in video.attention_levels:
        head = video.model_channels * video.channel_mult[level] // video.num_heads
        assert 64 <= head <= 128 and head % 8 == 0
    with torch.device("meta"):
        model = model_from_config(replace(video, caption_dim=1024), 4)
        out = model(torch.empty(1, 4, 14, 32, 48), torch.empty(1), caption=torch.empty(1, 1024))
    assert out.shape == (1, 4, 14, 32, 48)


def test_gpu_presets_ask_for_the_autoencoder(tmp_path, capsys):
    from training.cli import train_command

    write_synthetic_shards(str(tmp_path), num_clips=2, num_frames=4, size_px=16, caption_dim=8)
    for size in LATENT_SIZES:
        with pytest.raises(SystemExit) as exc:
            train_command([str(tmp_path), "--stage", "image", "--preset-size", size])
        assert exc.value.code == 2
        assert "latent_autoencoder=PATH" in capsys.readouterr().err


def test_non_square_frames_train_at_their_shape(tmp_path):
    from training.data import shard_paths

    write_synthetic_shards(str(tmp_path), num_clips=4, num_frames=10, size_px=24, caption_dim=8)
    cfg = apply_overrides(preset("video", "tiny"), MICRO + ["resolution_px=16", "width_px=24", "num_frames=2"])
    seen = []

    def record(module, args):
        if type(module).__name__ == "VideoUNet":
            seen.append(tuple(args[0].shape))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = train(cfg, shard_paths(str(tmp_path)), str(tmp_path / "run"))
    finally:
        hook.remove()
    assert seen and all(s[-3:] == (2, 16, 24) for s in seen), seen
    assert np.isfinite(list(result.losses.values())).all()
    with pytest.raises(ValueError, match="divisible"):
        apply_overrides(preset("image", "tiny"), ["width_px=25"])


def test_out_of_device_memory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """A step that runs out of device memory says what to change (and exits 2), not a traceback."""
    from training import loop
    from training.cli import train_command

    write_synthetic_shards(str(tmp_path), num_clips=4, num_frames=4, size_px=16, caption_dim=8)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "_optimizer_step", out_of_memory)
    rc = train_command([str(tmp_path), "--stage", "image", "--preset-size", "tiny",
                        *[a for m in MICRO + ["resolution_px=16"] for a in ("--set", m)]])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "activation_checkpointing=true" in err and "sharding=fsdp" in err
    assert issubclass(DoesNotFitError, ValueError)
