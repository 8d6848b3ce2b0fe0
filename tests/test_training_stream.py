"""Tests of training/stream.py: pieces from metadata, a deterministic order per (seed, epoch),
per-rank reading, bounded windows, seeking for exact resume, loader workers, bad rows."""

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from training.config import apply_overrides, preset
from training.data import apply_select, columns_for, read_shards, shard_paths
from training.stream import RowStream, StreamDataset, epoch_pieces, plan_data, split_pieces
from training.synthetic import write_synthetic_shards

torch.set_num_threads(1)
MICRO = ["resolution_px=16", "channel_mult=1,2"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    # 3 files of 8 clips, row groups of 3 rows: pieces of 3, 3 and 2 rows per file (9 pieces).
    out = tmp_path_factory.mktemp("stream_out")
    write_synthetic_shards(str(out), num_shards=3, row_group_rows=3, num_clips=24, num_frames=8,
                           size_px=16, caption_dim=8)
    return str(out)


def cfg_for(stage="video", *extra):
    return apply_overrides(preset(stage, "tiny"), MICRO + ["num_frames=2" if stage != "image" else "seed=0",
                                                           *extra])


def keys_of(stream: RowStream, n: int) -> list:
    return [k for k, _ in stream.take(n, load=False)]


def test_pieces_are_the_row_groups_and_select_counts_match_the_table(out_dir):
    paths = shard_paths(out_dir)
    plan = plan_data(paths, cfg_for(), num_streams=1)
    assert len(plan.pieces) == sum(pq.ParquetFile(p).metadata.num_row_groups for p in paths) == 9
    assert plan.num_rows == 24 and plan.caption_dim == 8
    hq = cfg_for("hq", 'select={"aesthetic_score": {"min": 5.0}}')
    table = read_shards(paths, columns_for(hq))
    assert plan_data(paths, hq, 1).num_rows == apply_select(table, hq.select).num_rows < 24
    with pytest.raises(ValueError, match="keeps 0 of 24.*aesthetic_score"):
        plan_data(paths, cfg_for("hq", 'select={"aesthetic_score": {"min": 100.0}}'), 1)


def test_split_pieces_gives_every_stream_a_piece(out_dir):
    plan = plan_data(shard_paths(out_dir), cfg_for(), num_streams=1)
    split = split_pieces(list(plan.pieces[:2]), 5)
    assert len(split) == 5 and sum(p.num_rows for p in split) == 6
    with pytest.raises(ValueError, match="data streams"):
        split_pieces(list(plan.pieces[:1]), 4)


def test_each_epoch_visits_every_row_once_across_streams_in_a_seeded_order(out_dir):
    paths = shard_paths(out_dir)
    plan = plan_data(paths, cfg_for("video", "shuffle_buffer_rows=4"), num_streams=3)
    seen = []
    for j in range(3):
        rows = sum(plan.pieces[p].num_rows for p in epoch_pieces(plan, 0, j))
        seen += keys_of(RowStream(plan, j, 0, None), rows)
    assert Counter(seen) == Counter((p, r) for p, piece in enumerate(plan.pieces) for r in range(piece.num_rows))
    # Deterministic in (seed, epoch); another epoch or seed is another order.
    again = keys_of(RowStream(plan, 0, 0, None), 30)
    assert again == keys_of(RowStream(plan, 0, 0, None), 30)
    other_seed = plan_data(paths, cfg_for("video", "shuffle_buffer_rows=4", "seed=7"), num_streams=3)
    assert keys_of(RowStream(other_seed, 0, 0, None), 30) != again
    assert list(epoch_pieces(plan, 0, 0)) != list(epoch_pieces(plan, 1, 0)) or \
        list(epoch_pieces(plan, 1, 0)) != list(epoch_pieces(plan, 2, 0))


def test_a_stream_started_at_a_position_continues_the_stream_from_zero(out_dir):
    plan = plan_data(shard_paths(out_dir), cfg_for("video", "shuffle_buffer_rows=5"), num_streams=2)
    whole = keys_of(RowStream(plan, 1, 0, None), 70)  # several epochs of stream 1 (about 12 rows each)
    for position in (0, 5, 13, 31, 64):
        assert keys_of(RowStream(plan, 1, position, None), 70 - position) == whole[position:]


def test_a_window_holds_at_most_the_buffer_plus_one_row_group(out_dir):
    cfg = cfg_for("video", "shuffle_buffer_rows=4", "batch_size=2")
    plan = plan_data(shard_paths(out_dir), cfg, num_streams=1)
    ds = StreamDataset(plan, cfg, (3, 2, 16, 16))
    stream = RowStream(plan, 0, 0, ds.read_window)
    sizes = set()
    for _ in range(40):
        for key, row in stream.take(1, load=True):
            assert row["clip_id"]  # a real row of the shards
            sizes.add(stream.table.num_rows)
    assert max(sizes) <= 4 + 3 - 1 and min(sizes) >= 2


def batches(cfg, plan, rank=0, world=1, start=0, workers=0):
    ds = StreamDataset(plan, cfg, (3, cfg.num_frames, 16, 16), rank, world, start)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def test_batches_do_not_depend_on_loader_workers_start_step_or_ranks(out_dir):
    cfg = cfg_for("video", "batch_size=4", "total_steps=7", "shuffle_buffer_rows=4", "frame_cache_mb=0")
    plan = plan_data(shard_paths(out_dir), cfg, num_streams=2)
    single = batches(cfg, plan)
    assert len(single) == 7 and single[0]["x"].shape == (4, 3, 2, 16, 16)
    assert single[0]["stream"].tolist() == [0, 0, 1, 1]
    with_workers = batches(cfg, plan, workers=2)
    resumed = batches(cfg, plan, start=4)
    ranks = [batches(cfg, plan, rank=r, world=2) for r in (0, 1)]
    for step, b in enumerate(single):
        assert torch.equal(with_workers[step]["x"], b["x"])
        if step >= 4:
            assert torch.equal(resumed[step - 4]["x"], b["x"])
        # Rank r holds stream r: the global batch is the ranks' halves, stream-major.
        assert torch.equal(torch.cat([ranks[0][step]["x"], ranks[1][step]["x"]]), b["x"])
    # Each rank read only its own streams' pieces: no (epoch, piece) was read by both.
    read = [{tuple(r) for b in ranks[k] for r in b["reads"].tolist()} for k in (0, 1)]
    assert read[0] and read[1] and not read[0] & read[1]
    for k in (0, 1):
        assert all(p in epoch_pieces(plan, e, k) for e, p in read[k])


def test_a_bad_row_gets_weight_zero_and_a_message(tmp_path):
    write_synthetic_shards(str(tmp_path), num_shards=1, num_clips=4, num_frames=8, size_px=16, caption_dim=8,
                           corrupt_every=4)
    cfg = cfg_for("video", "batch_size=4", "total_steps=1", "shuffle_buffer_rows=4")
    plan = plan_data(shard_paths(str(tmp_path)), cfg, num_streams=1)
    (batch,) = batches(cfg, plan)
    assert sorted(batch["weight"].tolist()) == [0.0, 1.0, 1.0, 1.0]
    assert len(batch["bad_rows"]) == 1 and "clip" in batch["bad_rows"][0]
    bad = int(torch.nonzero(batch["weight"] == 0)[0])
    assert not batch["x"][bad].any() and batch["x"].abs().sum() > 0
