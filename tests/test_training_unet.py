"""Tests of training/unet.py: shapes, image mode, temporal path, extension from an image model."""

import pytest
import torch

from training.unet import VideoUNet, extend_to_video, is_temporal_key

torch.set_num_threads(1)  # robust on a shared 2-core machine (no spinning OMP threads)
KW = dict(in_channels=3, model_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
          caption_dim=6, context_tokens=2, context_dim=16)


def perturbed(model: torch.nn.Module, seed: int, only=None) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised outputs included), so outputs are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only(name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(b=2, t=3, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, t, hw, hw, generator=g), torch.tensor([-0.5, 0.7])[:b],
            torch.randn(b, 6, generator=g))


def test_image_and_video_shapes():
    torch.manual_seed(0)
    image = VideoUNet(**KW, temporal=False)
    video = VideoUNet(**KW, temporal=True)
    x, c_noise, cap = inputs()
    assert image(x[:, :, 0], c_noise, cap).shape == (2, 3, 8, 8)
    assert video(x, c_noise, cap).shape == (2, 3, 3, 8, 8)
    assert video(x[:, :, 0], c_noise, cap).shape == (2, 3, 8, 8)


def test_extended_video_model_equals_image_model_frame_by_frame():
    torch.manual_seed(0)
    image = perturbed(VideoUNet(**KW, temporal=False), 1)
    video = extend_to_video(image.state_dict(), VideoUNet(**KW, temporal=True))
    x, c_noise, cap = inputs()
    out = video(x, c_noise, cap, fps_id=torch.tensor([5, 23]), motion_bucket_id=torch.tensor([10, 200]))
    per_frame = torch.stack([image(x[:, :, t], c_noise, cap) for t in range(3)], dim=2)
    assert out.abs().mean() > 1e-2  # a real output, not the zero-initialised one
    torch.testing.assert_close(out, per_frame, atol=1e-5, rtol=1e-4)


def test_temporal_layers_mix_frames_only_in_video_mode():
    torch.manual_seed(0)
    video = perturbed(VideoUNet(**KW, temporal=True), 2)
    x, c_noise, cap = inputs()
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change frame 0 only
    out, out2 = video(x, c_noise, cap), video(x2, c_noise, cap)
    assert (out2[:, :, 1] - out[:, :, 1]).abs().max() > 1e-3  # temporal layers carry it to frame 1
    # Image mode bypasses the temporal path: frame 1 alone is unaffected by frame 0.
    torch.testing.assert_close(video(x[:, :, 1], c_noise, cap), video(x2[:, :, 1], c_noise, cap))


def test_micro_conditioning_acts_only_through_the_video_path():
    torch.manual_seed(0)
    video = perturbed(VideoUNet(**KW, temporal=True), 3)
    x, c_noise, cap = inputs()
    a = video(x, c_noise, cap, fps_id=torch.tensor([3, 3]), motion_bucket_id=torch.tensor([0, 0]))
    b = video(x, c_noise, cap, fps_id=torch.tensor([3, 3]), motion_bucket_id=torch.tensor([255, 255]))
    assert (a - b).abs().max() > 1e-4


def test_null_caption_and_invalid_rows_use_the_learned_null_embedding():
    torch.manual_seed(0)
    model = perturbed(VideoUNet(**KW, temporal=False), 4)
    x, c_noise, cap = inputs()
    img = x[:, :, 0]
    valid = torch.tensor([True, False])
    mixed = model(img, c_noise, cap, caption_valid=valid)
    torch.testing.assert_close(mixed[1], model(img, c_noise, None)[1])
    torch.testing.assert_close(mixed[0], model(img, c_noise, cap)[0])
    assert (model(img, c_noise, cap)[1] - mixed[1]).abs().max() > 1e-4  # the caption matters
    with pytest.raises(ValueError, match="dimension 5"):
        model(img, c_noise, torch.zeros(2, 5))


def test_extension_rejects_a_mismatched_image_checkpoint():
    image = VideoUNet(**{**KW, "model_channels": 16}, temporal=False)
    with pytest.raises((ValueError, RuntimeError)):
        extend_to_video(image.state_dict(), VideoUNet(**KW, temporal=True))
    video_keys = set(VideoUNet(**KW, temporal=True).state_dict())
    image_keys = set(VideoUNet(**KW, temporal=False).state_dict())
    assert image_keys < video_keys
    assert all(is_temporal_key(k) for k in video_keys - image_keys)


def test_checkpoints_with_scalar_mix_logits_still_load():
    """Checkpoints written when the temporal mix logits were 0-d tensors load into the 1-element
    vectors they are now (sharding takes no 0-d parameters)."""
    from training.unet import VideoUNet

    torch.manual_seed(0)
    model = VideoUNet(caption_dim=8, temporal=True)
    old = {k: (v.reshape(()) + 0.25 if k.endswith("mix_logit") else v) for k, v in model.state_dict().items()}
    assert any(k.endswith("mix_logit") for k in old)
    fresh = VideoUNet(caption_dim=8, temporal=True)
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v.reshape(old[k].shape), old[k]), k
