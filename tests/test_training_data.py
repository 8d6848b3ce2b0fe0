"""Tests of training/data.py on synthetic shards written with the shards schema (training/synthetic.py)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from curation.schema import DEFAULT_MOTION_BUCKET_ID, SHARDS_SCHEMA, fps_id_for
from training.config import apply_overrides, preset
from training.data import (ShardDataset, adjusted_fps_id, apply_select, caption_dim_of, columns_for,
                           decode_video, frame_indices, read_shards, row_sample, select_mask, shard_paths)
from training.synthetic import COLOURS, moving_square_clip, write_synthetic_shards

torch.set_num_threads(1)  # robust on a shared 2-core machine (no spinning OMP threads)
SPEED_OF_CLIP = lambda i: 1 + i % 3  # noqa: E731  (as training/synthetic.py builds them)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards_out")
    write_synthetic_shards(str(out), num_clips=6, num_frames=12, size_px=32, caption_dim=8, null_caption_every=3)
    return str(out)


def table_for(out_dir, cfg):
    return read_shards(shard_paths(out_dir), columns_for(cfg))


def test_shards_follow_the_schema(out_dir):
    for path in shard_paths(out_dir):
        assert pq.read_schema(path).equals(SHARDS_SCHEMA, check_metadata=False)


def test_decode_returns_the_encoded_frames(out_dir):
    table = table_for(out_dir, preset("video"))
    frames = decode_video(table.column("video")[0].as_py())
    expected = moving_square_clip(COLOURS[0], 12, 32, SPEED_OF_CLIP(0))
    assert frames.shape == expected.shape
    assert np.abs(frames.astype(float) - expected).mean() < 6  # H.264 at crf 18 is close to lossless


def test_frame_indices_follow_the_stride_and_fall_back_for_short_clips():
    rng = np.random.default_rng(0)
    idx, used = frame_indices(20, 4, 3, rng)
    assert used == 3 and np.all(np.diff(idx) == 3) and idx[-1] < 20
    idx, used = frame_indices(7, 4, 3, rng)  # 3 * 3 + 1 = 10 > 7: the largest stride that fits is 2
    assert used == 2 and np.all(np.diff(idx) == 2)
    idx, used = frame_indices(2, 4, 3, rng)  # shorter than 4 frames: the last frame repeats
    assert list(idx) == [0, 1, 1, 1]


def test_fps_id_is_adjusted_for_the_stride():
    assert adjusted_fps_id(24.0, 23, 2) == fps_id_for(12.0) == 11
    assert adjusted_fps_id(None, 23, 3) == fps_id_for(8.0)
    assert adjusted_fps_id(None, None, 2) == 6


def test_video_samples_show_the_square_moving_by_speed_times_stride(out_dir):
    cfg = apply_overrides(preset("video"), ["resolution_px=32", "num_frames=4", "frame_stride=2",
                                            "channel_mult=1,2"])
    table = table_for(out_dir, cfg)
    ds = ShardDataset(table, cfg, caption_dim_of(table))
    for i in range(3):
        sample = ds[(0, i)]
        x = sample["x"]  # (3, T, 32, 32)
        assert x.shape == (3, 4, 32, 32)
        # Column of the square's left edge: coloured pixels differ from the grey background.
        colour = torch.tensor(COLOURS[i % 4] / 127.5 - 1.0, dtype=torch.float32)
        mask = (x.permute(1, 2, 3, 0) - colour).abs().max(-1).values < 0.15  # (T, H, W)
        lefts = [int(torch.nonzero(m.any(0))[0]) for m in mask]
        assert np.all(np.diff(lefts) == SPEED_OF_CLIP(i) * 2)
        assert int(sample["fps_id"]) == fps_id_for(24.0 / 2)


def test_image_stage_gives_single_frames_and_null_captions_are_flagged(out_dir):
    cfg = apply_overrides(preset("image"), ["resolution_px=16", "channel_mult=1,2"])
    table = table_for(out_dir, cfg)
    assert caption_dim_of(table) == 8
    ds = ShardDataset(table, cfg, 8)
    samples = [ds[(3, i)] for i in range(6)]
    assert all(s["x"].shape == (3, 16, 16) for s in samples)
    assert [bool(s["caption_valid"]) for s in samples] == [True, True, False, True, True, False]
    assert all(int(s["motion_bucket_id"]) != DEFAULT_MOTION_BUCKET_ID for s in samples)
    # Same (step, row) -> same sample: the randomness is keyed, not global.
    assert torch.equal(ds[(3, 0)]["x"], samples[0]["x"])


def test_hq_predicate_keeps_exactly_the_rows_in_range(out_dir):
    table = table_for(out_dir, preset("hq"))
    aesthetic = np.array(table.column("aesthetic_score").to_pylist())
    motion = np.array(table.column("motion_score").to_pylist())
    select = {"aesthetic_score": {"min": 5.0}, "motion_score": {"max": 200.0}}
    expected = (aesthetic >= 5.0) & (motion <= 200.0)
    assert 0 < expected.sum() < len(expected)
    assert list(select_mask(table, select)) == list(expected)
    assert apply_select(table, select).num_rows == expected.sum()
    with pytest.raises(ValueError, match="keeps 0 of 6"):
        apply_select(table, {"aesthetic_score": {"min": 100.0}})


def test_predicate_on_a_null_column_fails_those_rows(out_dir):
    table = read_shards(shard_paths(out_dir), columns_for(preset("image")) + ["clip_similarity", "image_embedding"])
    table = table.set_column(table.schema.get_field_index("clip_similarity"), "clip_similarity",
                             __import__("pyarrow").array([None, 0.3, 0.3, None, 0.3, 0.3], type="float64"))
    assert list(select_mask(table, {"clip_similarity": {"min": 0.0}})) == [False, True, True, False, True, True]


def test_unknown_predicate_column_is_an_error():
    with pytest.raises(ValueError, match="no_such_column"):
        apply_overrides(preset("hq"), ['select={"no_such_column": {"min": 1}}'])


def test_an_undecodable_row_raises_and_a_wrong_caption_size_too(out_dir):
    cfg = apply_overrides(preset("video"), ["resolution_px=16", "num_frames=3", "channel_mult=1,2"])
    row = table_for(out_dir, cfg).slice(0, 1).to_pylist()[0]
    rng = np.random.default_rng(0)
    assert row_sample(row, cfg, 8, rng)["x"].shape == (3, 3, 16, 16)
    with pytest.raises(Exception):
        row_sample({**row, "video": row["video"][:40]}, cfg, 8, rng)
    with pytest.raises(ValueError, match="caption_embedding has 8 values"):
        row_sample(row, cfg, 16, rng)


def test_frame_cache_does_not_change_samples(out_dir):
    cfg = apply_overrides(preset("video"), ["resolution_px=16", "num_frames=3", "channel_mult=1,2"])
    table = table_for(out_dir, cfg)
    cached = ShardDataset(table, cfg, 8)
    uncached = ShardDataset(table, apply_overrides(cfg, ["frame_cache_mb=0"]), 8)
    for step in (0, 1):
        for i in range(len(cached)):
            assert torch.equal(cached[(step, i)]["x"], uncached[(step, i)]["x"])
    assert len(cached.cache.items) == len(cached) and not uncached.cache.items


def test_partial_decode_stops_early(out_dir):
    from training.data import video_frame_count

    video = table_for(out_dir, preset("video")).column("video")[1].as_py()
    assert video_frame_count(video) == 12
    full = decode_video(video)
    assert np.array_equal(decode_video(video, stop_after=5), full[:5])
