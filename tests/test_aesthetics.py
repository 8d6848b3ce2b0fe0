"""aesthetics stage on tiny CLIP checkpoints and heads the tests save and load like real weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import model_fixtures as mf
from stages import instrument
from stages.aesthetics import AestheticsStage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetics_models")
    config, checkpoint = mf.write_open_clip_checkpoint(root, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG)
    return {"root": root, "config": str(config), "checkpoint": str(checkpoint),
            "linear": str(mf.write_linear_head(root / "linear.pth")),
            "mlp": str(mf.write_mlp_head(root / "mlp.pth"))}


def stage(tiny, head: str, **kw) -> AestheticsStage:
    s = AestheticsStage(model=mf.TINY_CLIP, pretrained=tiny["checkpoint"], model_config=tiny["config"],
                        head_path=head, device="cpu", torch_threads=1, **kw)
    s.setup()
    return s


def test_linear_head_is_applied_to_normalised_embeddings(tiny):
    # Build a head whose weight is clip A's own embedding: A then scores exactly 1 + bias
    # (cosine with itself) and every other look scores less.
    looks = [mf.keyframes(seed) for seed in (1, 2, 3)]
    probe = stage(tiny, tiny["linear"])(mf.clip_batch(looks))
    emb_a = np.asarray(probe["image_embedding"][0], np.float32)
    assert np.linalg.norm(emb_a) == pytest.approx(1.0, abs=1e-5)
    head = torch.nn.Linear(mf.EMBED_DIM, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(emb_a)[None])
        head.bias.fill_(5.0)
    torch.save(head.state_dict(), tiny["root"] / "aimed.pth")
    out = stage(tiny, str(tiny["root"] / "aimed.pth"))(mf.clip_batch(looks))
    a, b, c = out["aesthetic_score"]
    assert a == pytest.approx(6.0, abs=1e-4)
    assert b < a and c < a
    assert out["aesthetics_error"] == [None, None, None]


def test_score_is_the_mean_over_keyframes(tiny):
    s = stage(tiny, tiny["linear"])
    frames = [mf.keyframes(seed)[0] for seed in (4, 5, 6)]
    singles = s(mf.clip_batch([[f] * 3 for f in frames]))["aesthetic_score"]
    (mixed,) = s(mf.clip_batch([frames]))["aesthetic_score"]
    assert mixed == pytest.approx(float(np.mean(singles)), abs=1e-5)


def test_mlp_head_and_batched_equals_one_by_one(tiny):
    s = stage(tiny, tiny["mlp"])
    looks = [mf.keyframes(seed) for seed in (7, 8, 9, 10)]
    batched = s(mf.clip_batch(looks))
    one_by_one = [s(mf.clip_batch([k])) for k in looks]
    for i, single in enumerate(one_by_one):
        assert batched["aesthetic_score"][i] == pytest.approx(single["aesthetic_score"][0], abs=1e-5)
        assert np.allclose(batched["image_embedding"][i], single["image_embedding"][0], atol=1e-5)
    assert len(set(round(v, 6) for v in batched["aesthetic_score"])) == 4  # the looks differ
    assert len(batched["image_embedding"][0]) == mf.EMBED_DIM


def test_failures_are_per_clip_and_error_rows_are_not_failures(tiny):
    s = stage(tiny, tiny["linear"])
    out = s(mf.clip_batch([mf.keyframes(1), [b"not a jpeg"] * 3, None, mf.keyframes(2)]))
    good, bad, source_error, good2 = range(4)
    assert math.isfinite(out["aesthetic_score"][good]) and math.isfinite(out["aesthetic_score"][good2])
    assert math.isnan(out["aesthetic_score"][bad]) and "undecodable" in out["aesthetics_error"][bad]
    assert math.isnan(out["aesthetic_score"][source_error])
    assert out["aesthetics_error"][source_error] is None and out["image_embedding"][source_error] is None


def test_only_kept_skips_rejected_clips(tiny):
    s = stage(tiny, tiny["linear"], only_kept=True)
    out = s(mf.clip_batch([mf.keyframes(1), mf.keyframes(2)], keep=[False, True]))
    assert math.isnan(out["aesthetic_score"][0]) and out["image_embedding"][0] is None
    assert math.isfinite(out["aesthetic_score"][1])


def test_head_for_another_clip_width_is_refused(tiny):
    wrong = mf.write_linear_head(tiny["root"] / "wide.pth", dim=mf.EMBED_DIM * 2)
    with pytest.raises(ValueError, match="head_path"):
        stage(tiny, str(wrong))


def test_model_loads_once_per_setup(tiny):
    before = instrument.counts("model_load")["aesthetics"]
    s = stage(tiny, tiny["linear"])
    for seed in (1, 2, 3):
        s(mf.clip_batch([mf.keyframes(seed)]))
    assert instrument.counts("model_load")["aesthetics"] == before + 1


def test_weights_report_missing_files_with_their_keys(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_MODEL_CACHE", str(tmp_path / "cache"))
    present = AestheticsStage(model=mf.TINY_CLIP, pretrained=tiny["checkpoint"], model_config=tiny["config"],
                              head_path=tiny["linear"]).weights()
    assert [r.available for r in present] == [True, True, True]
    missing = AestheticsStage(model=mf.TINY_CLIP, pretrained=str(tmp_path / "nope.pt"),
                              model_config=tiny["config"], head_path=str(tmp_path / "head.pth")).weights()
    by_key = {r.key: r for r in missing}
    assert not by_key["aesthetics.pretrained"].available
    assert by_key["aesthetics.pretrained"].location.endswith("nope.pt")
    assert not by_key["aesthetics.head_path"].available
    # Default head: looked for in the model cache, under the published file name.
    default = {r.key: r for r in AestheticsStage(model="ViT-B-32", pretrained="openai").weights("aes")}
    assert default["aes.head_path"].location == str(tmp_path / "cache" / "aesthetic" / "sa_0_4_vit_b_32_linear.pth")
    assert not default["aes.head_path"].available


def test_missing_weights_fail_setup_naming_the_key(tiny, tmp_path):
    s = AestheticsStage(model=mf.TINY_CLIP, pretrained=tiny["checkpoint"], model_config=tiny["config"],
                        head_path=str(tmp_path / "absent.pth"), device="cpu")
    with pytest.raises(FileNotFoundError, match="aesthetics.head_path"):
        s.setup()


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="head_path"):
        AestheticsStage(model="RN50", pretrained="openai")
    with pytest.raises(ValueError, match="head_path: the default head"):
        AestheticsStage(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # head trained on OpenAI embeddings
    with pytest.raises(ValueError, match="pretrained"):
        AestheticsStage(pretrained=None)
    with pytest.raises(ValueError, match="device"):
        AestheticsStage(device="tpu")
    with pytest.raises(ValueError, match="torch_threads"):
        AestheticsStage(torch_threads=0)
