"""clip_similarity stage on a tiny CLIP checkpoint the tests save and load like real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import model_fixtures as mf
from stages.aesthetics import AestheticsStage
from stages.clip_similarity import ClipSimilarityStage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_similarity_models")
    config, checkpoint = mf.write_open_clip_checkpoint(root, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG, seed=3)
    stage = ClipSimilarityStage(model=mf.TINY_CLIP, pretrained=str(checkpoint), model_config=str(config),
                                device="cpu", torch_threads=1)
    stage.setup()
    return {"root": root, "config": str(config), "checkpoint": str(checkpoint), "stage": stage}


def test_similarity_is_the_cosine_of_caption_and_keyframe_embeddings(tiny):
    looks = [mf.keyframes(seed) for seed in (1, 2)]
    captions = ["a red car on a road", "a dog on the beach"]
    out = tiny["stage"](mf.clip_batch(looks, caption=captions))
    # The image embeddings computed by another stage (aesthetics) from the same checkpoint.
    aesthetics = AestheticsStage(model=mf.TINY_CLIP, pretrained=tiny["checkpoint"], model_config=tiny["config"],
                                 head_path=str(mf.write_linear_head(tiny["root"] / "h.pth")), device="cpu")
    image = aesthetics(mf.clip_batch(looks))["image_embedding"]
    for i in range(2):
        text = np.asarray(out["caption_embedding"][i])
        assert np.linalg.norm(text) == pytest.approx(1.0, abs=1e-5)
        assert out["clip_similarity"][i] == pytest.approx(float(text @ np.asarray(image[i])), abs=1e-5)
    assert out["clip_similarity_error"] == [None, None]
    assert not np.allclose(out["caption_embedding"][0], out["caption_embedding"][1])


def test_mean_over_keyframes_and_batched_equals_alone(tiny):
    stage = tiny["stage"]
    frames = [mf.keyframes(seed)[0] for seed in (4, 5, 6)]
    caption = "a slow pan over hills"
    singles = stage(mf.clip_batch([[f] * 3 for f in frames], caption=[caption] * 3))["clip_similarity"]
    (mixed,) = stage(mf.clip_batch([frames], caption=[caption]))["clip_similarity"]
    assert mixed == pytest.approx(float(np.mean(singles)), abs=1e-5)
    assert len(set(np.round(singles, 6))) == 3


def test_rejected_uncaptioned_and_error_rows(tiny):
    looks = [mf.keyframes(seed) for seed in (1, 2, 3)]
    batch = mf.clip_batch(looks + [None], keep=[False, True, True, False],
                          caption=[None, None, "a caption", None], caption_error=[None, "HTTP 500", None, None])
    out = tiny["stage"](batch)
    rejected, failed_caption, fine, source_error = range(4)
    assert math.isnan(out["clip_similarity"][rejected]) and out["clip_similarity_error"][rejected] is None
    assert out["caption_embedding"][rejected] is None
    assert math.isnan(out["clip_similarity"][failed_caption])
    assert "no caption" in out["clip_similarity_error"][failed_caption]
    assert math.isfinite(out["clip_similarity"][fine])
    assert out["clip_similarity_error"][source_error] is None


def test_weights_name_the_key(tiny, tmp_path):
    assert all(r.available for r in tiny["stage"].weights())
    missing = ClipSimilarityStage(model=mf.TINY_CLIP, pretrained=str(tmp_path / "x.safetensors"),
                                  model_config=str(tmp_path / "cfg.json")).weights("sim")
    assert [(r.key, r.available) for r in missing] == [("sim.model_config", False), ("sim.pretrained", False)]
    with pytest.raises(FileNotFoundError, match="clip_similarity.pretrained"):
        ClipSimilarityStage(model="ViT-B-32", pretrained=str(tmp_path / "x.pt"), device="cpu").setup()


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="reduction"):
        ClipSimilarityStage(reduction="sum")
    with pytest.raises(ValueError, match="model"):
        ClipSimilarityStage(model="hf-hub:laion/CLIP-ViT-B-32")
    with pytest.raises(ValueError, match="pretrained"):
        ClipSimilarityStage(pretrained="")
