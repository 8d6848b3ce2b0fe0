"""Tests of training/config.py: typed overrides, unknown keys, presets as diffs, round trip."""

import pytest

from training.config import HQ, IMAGE, VIDEO, apply_overrides, from_dict, preset, to_dict


def test_overrides_are_parsed_with_the_defaults_type():
    cfg = apply_overrides(preset("video", "tiny"), ["lr=0.01", "total_steps=7", "channel_mult=1,2,2",
                                                    'select={"motion_score": {"min": 1.5}}', "device=cpu"])
    assert cfg.lr == 0.01 and cfg.total_steps == 7 and cfg.channel_mult == (1, 2, 2)
    assert cfg.select == {"motion_score": {"min": 1.5}} and cfg.device == "cpu"


def test_unknown_key_and_wrong_type_fail_naming_the_key():
    with pytest.raises(ValueError, match="'learning_rate'"):
        apply_overrides(IMAGE, ["learning_rate=1"])
    with pytest.raises(ValueError, match="total_steps"):
        apply_overrides(IMAGE, ["total_steps=1.5"])
    with pytest.raises(ValueError, match="num_frames must be 1"):
        apply_overrides(IMAGE, ["num_frames=4"])
    with pytest.raises(ValueError, match="select"):
        apply_overrides(HQ, ['select={"motion_score": {"above": 1}}'])


def test_presets_differ_only_where_the_stage_does():
    def diff(a, b):
        return {k for k, v in to_dict(a).items() if to_dict(b)[k] != v}

    assert diff(IMAGE, VIDEO) == {"stage", "num_frames", "batch_size", "lr", "p_mean", "p_std"}
    assert diff(VIDEO, HQ) == {"stage", "lr", "total_steps", "warmup_steps", "select"}
    # A size preset keeps the model identical across stages (later stages load earlier weights).
    model_keys = ["model_channels", "channel_mult", "attention_levels", "context_dim", "resolution_px"]
    tiny = [to_dict(preset(s, "tiny")) for s in ("image", "video", "hq")]
    assert all(t[k] == tiny[0][k] for t in tiny for k in model_keys)


def test_resolved_config_round_trips():
    cfg = apply_overrides(preset("hq", "tiny"), ["caption_dim=16", "seed=3"])
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="removed_key"):
        from_dict({**to_dict(cfg), "removed_key": 1})
