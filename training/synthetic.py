"""Tiny synthetic shards with known content, in the shards schema, for tests, the bench and smoke runs.

Clip i shows a coloured square moving `speed_px_per_frame` pixels per frame to the right over
a flat background; its caption_embedding is a fixed random vector tied to the square's colour,
so a model conditioned on the caption can learn which colour to draw. aesthetic_score and
motion_score step through a range so a stricter predicate keeps a known subset.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.schema import (SHARDS_SCHEMA, clip_id_for, conform, fps_id_for, motion_bucket_id_for,
                             source_id_for)

from training.data import encode_mp4

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40]], dtype=np.uint8)


def moving_square_clip(colour: np.ndarray, num_frames: int, size_px: int, speed_px_per_frame: int,
                       square_px: int | None = None) -> np.ndarray:
    """uint8 (T, H, W, 3): a square of `colour` moving right on a grey background, wrapping around."""
    side = square_px or size_px // 3
    frames = np.full((num_frames, size_px, size_px, 3), 100, dtype=np.uint8)
    top = (size_px - side) // 2
    for t in range(num_frames):
        left = (t * speed_px_per_frame) % size_px
        cols = (left + np.arange(side)) % size_px
        frames[t, top:top + side][:, cols] = colour
    return frames


def synthetic_shard_table(num_clips: int = 8, num_frames: int = 12, size_px: int = 32,
                          fps: float = 24.0, caption_dim: int = 16, seed: int = 0,
                          null_caption_every: int = 0, corrupt_every: int = 0) -> pa.Table:
    """A shards table of `num_clips` kept clips (conformed to SHARDS_SCHEMA).

    With corrupt_every=k, every k-th clip (i % k == k - 1) has a truncated, undecodable video
    and JPEG keyframes (a bad row the trainer must skip).
    """
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    colour_embeddings = rng.standard_normal((len(COLOURS), caption_dim)).astype(np.float32)
    rows: dict[str, list] = {f.name: [] for f in SHARDS_SCHEMA}
    for i in range(num_clips):
        c = i % len(COLOURS)
        speed = 1 + i % 3
        frames = moving_square_clip(COLOURS[c], num_frames, size_px, speed)
        source_path = f"/synthetic/clip{i:03d}.mp4"
        source_id = source_id_for(source_path)
        motion_score = 100.0 * speed * fps / size_px  # % of the short side per second
        keyframes = []
        for k in (0, num_frames // 2, num_frames - 1):
            buf = BytesIO()
            Image.fromarray(frames[k]).save(buf, format="JPEG", quality=95)
            keyframes.append(buf.getvalue())
        null_caption = null_caption_every and i % null_caption_every == null_caption_every - 1
        values = {
            "clip_id": clip_id_for(source_id, 0, num_frames), "source_id": source_id,
            "source_path": source_path, "start_frame": 0, "end_frame": num_frames, "start_s": 0.0,
            "duration_s": num_frames / fps, "fps": fps, "width": size_px, "height": size_px,
            "motion_score": motion_score, "text_area_ratio": 0.0,
            "aesthetic_score": 4.0 + 2.0 * i / max(1, num_clips - 1), "clip_similarity": 0.3,
            "keep": True, "reject_reasons": [], "video": encode_mp4(frames, fps),
            "keyframes": keyframes, "caption": f"a {['red', 'green', 'blue', 'yellow'][c]} square",
            "caption_source": "synthetic",
            "image_embedding": None,
            "caption_embedding": None if null_caption else colour_embeddings[c].tolist(),
            "fps_id": fps_id_for(fps), "motion_bucket_id": motion_bucket_id_for(motion_score),
        }
        if corrupt_every and i % corrupt_every == corrupt_every - 1:
            values["video"] = values["video"][:40]
            values["keyframes"] = [k[:40] for k in keyframes]
        for name in rows:
            rows[name].append(values.get(name))
    table = pa.Table.from_pydict({f.name: pa.array(rows[f.name], type=f.type) for f in SHARDS_SCHEMA})
    return conform(table, SHARDS_SCHEMA)


def write_synthetic_shards(out_dir: str, num_shards: int = 2, row_group_rows: int | None = None,
                           **kwargs) -> list[str]:
    """Write OUT_DIR/shards/ as the curation writer would, one committed unit per shard file
    (ledger entry and a complete run.json), so readers find them the way they find real ones;
    returns the paths. row_group_rows: rows per parquet row group (None: one per file)."""
    table = synthetic_shard_table(**kwargs)
    per = -(-table.num_rows // num_shards)
    parts = [table.slice(k * per, per) for k in range(num_shards)]
    return write_units(out_dir, [p for p in parts if p.num_rows], row_group_rows)


def write_units(out_dir: str, parts: "list[pa.Table] | Iterator[pa.Table]", row_group_rows: int | None = None,
                first_unit: int = 0) -> list[str]:
    """Each shards table of `parts` as one committed unit (shard file + ledger entry); run.json complete."""
    from curation.writer import OutputStore, write_json

    store = OutputStore(out_dir)
    for folder in (store.shards_dir, store.ledger_dir):
        folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(parts, start=first_unit):
        unit_id = f"usynthetic{k:05d}"
        path = store.shards_dir / f"{unit_id}-0000.parquet"
        pq.write_table(part, path, row_group_size=row_group_rows, use_dictionary=["clip_id", "caption"])
        write_json(store.ledger_dir / f"{unit_id}.json", {
            "unit_id": unit_id, "source_ids": sorted(set(part.column("source_id").to_pylist())),
            "rows": part.num_rows, "clips": part.num_rows, "kept": part.num_rows,
            "scores_file": None, "clips_file": None, "shard_files": [path.name]})
        paths.append(str(path))
    write_json(store.run_json, {"status": "complete", "synthetic": True})
    return paths


def synthetic_corpus(num_clips: int, clips_per_unit: int, distinct_clips: int = 64, **kwargs) -> Iterator[pa.Table]:
    """Shards tables of a large corpus, one per unit, without holding it: `distinct_clips` clips are
    encoded once and repeated under distinct clip ids and scores (for benchmarks of the reader)."""
    base = synthetic_shard_table(num_clips=distinct_clips, **kwargs)
    for start in range(0, num_clips, clips_per_unit):
        n = min(clips_per_unit, num_clips - start)
        idx = pa.array((np.arange(start, start + n) % distinct_clips).astype(np.int64))
        part = base.take(idx)
        ids = [clip_id_for(f"corpus{i}", 0, 1) for i in range(start, start + n)]
        aesthetic = 4.0 + 2.0 * ((np.arange(start, start + n) * 7919) % 1000) / 999
        part = part.set_column(part.schema.get_field_index("clip_id"), "clip_id", pa.array(ids, pa.string()))
        part = part.set_column(part.schema.get_field_index("aesthetic_score"), "aesthetic_score",
                               pa.array(aesthetic, pa.float64()))
        yield conform(part, SHARDS_SCHEMA)
