"""The data contract: column names and Arrow types of scores/ and shards/ (DESIGN.md section 3).

This module is the single source of the contract in code. Everything that writes or reads
the output tables (writer, report, refilter, trainer) takes column names and types from here.

Units live in column names or in the docstring below:
- start_s, duration_s: seconds; fps: frames per second of the source (and of the clip).
- width, height: pixels of the encoded clip (short side = split.short_side_px).
- motion_score: mean optical-flow magnitude as a percentage of the frame's short side moved
  per second (see stages/motion.py); independent of working size and sample rate.
- text_area_ratio: fraction of the frame area covered by detected text, 0..1.

SVD micro-conditioning (the shards' fps_id and motion_bucket_id) is derived here from the
same fps and motion_score the filter read:
- fps_id = clamp(round(fps) - 1, 0, 255), as SVD conditions on "fps - 1" of the training clip.
  The trainer adjusts it when it subsamples frames with a stride.
- motion_bucket_id = clamp(round(motion_score * 255 / MOTION_SCORE_AT_BUCKET_255), 0, 255):
  linear in motion_score, so bucket 255 is a shot moving by 40% of its short side per
  second and SVD's default bucket 127 is about 20 %/s. Null when motion_score is missing.
"""

from __future__ import annotations

import math

import pyarrow as pa

# The ids are minted on the stages' floor (split names each clip); they are part of this
# contract all the same, so they are re-exported here.
from stages.base import clip_id_for, source_id_for  # noqa: F401

# ---- micro-conditioning -----------------------------------------------------------------

MOTION_SCORE_AT_BUCKET_255 = 40.0  # motion_score (% of short side per second) mapped to bucket 255
DEFAULT_MOTION_BUCKET_ID = 127  # SVD's default conditioning value (used by the trainer for nulls)


def fps_id_for(fps: float | None) -> int | None:
    if fps is None or not math.isfinite(fps) or fps <= 0:
        return None
    return int(min(255, max(0, round(fps) - 1)))


def motion_bucket_id_for(motion_score: float | None) -> int | None:
    if motion_score is None or not math.isfinite(motion_score):
        return None
    return int(min(255, max(0, round(motion_score * 255.0 / MOTION_SCORE_AT_BUCKET_255))))


# ---- columns ----------------------------------------------------------------------------

# Columns every clip row has from the split stage on (and that scores/ always holds).
IDENTITY_FIELDS: list[pa.Field] = [
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("start_frame", pa.int64()),
    pa.field("end_frame", pa.int64()),  # exclusive
    pa.field("start_s", pa.float64()),
    pa.field("duration_s", pa.float64()),
    pa.field("fps", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("dark_frames_trimmed", pa.int32()),  # fade frames cut from the clip's ends (black/white, the ramp)
    pa.field("dissolve_frames_trimmed", pa.int32()),  # a dissolve's blended frames cut from the clip's ends
]

SCORE_COLUMNS = ["motion_score", "text_area_ratio", "aesthetic_score", "clip_similarity"]
# A stage that can fail per clip records the reason in "<stage>_error" (null when it worked).
ERROR_COLUMNS = ["split_error", "motion_error", "ocr_error", "aesthetics_error",
                 "caption_error", "clip_similarity_error"]

# Rows that are not clips say why in split_error and name the kind of failure here (null on
# clip rows). Every source ends as clips or at least one such row (DESIGN.md section 2):
SOURCE_STATUSES = {
    "unreadable": "could not be opened or decoded (no frame): zero-byte, not a video, no video stream",
    "decode_error": "decoding stopped part-way; the clips finished before the break are kept",
    "no_clips": "decoded, but no shot is at least split.min_duration_s long",
    "worker_died": "its worker process died on every attempt (crash, out of memory, lost node)",
    "timed_out": "its processing ran past the per-source time limit on every attempt",
}
STATUS_FIELD = pa.field("source_status", pa.string())

FILTER_FIELDS: list[pa.Field] = [
    pa.field("keep", pa.bool_()),
    pa.field("reject_reasons", pa.list_(pa.string())),
]

# Payload columns: carried between stages, written to shards/ for kept clips only.
PAYLOAD_FIELDS: list[pa.Field] = [
    pa.field("video", pa.binary()),  # H.264 mp4 bytes
    pa.field("keyframes", pa.list_(pa.binary())),  # JPEG bytes: first, middle, last
    pa.field("caption", pa.string()),
    pa.field("caption_source", pa.string()),
    pa.field("image_embedding", pa.list_(pa.float32())),
    pa.field("caption_embedding", pa.list_(pa.float32())),
    # 8x8 grey thumbnails (uint8) at 4 per second of the clip, for near-duplicate decisions
    # (stages/signature.py; 64 bytes a sample)
    pa.field("temporal_signature", pa.binary()),
]
MICRO_CONDITIONING_FIELDS: list[pa.Field] = [
    pa.field("fps_id", pa.int32()),
    pa.field("motion_bucket_id", pa.int32()),
]

# Internal columns: only between stages, never written.
INTERNAL_FIELDS: list[pa.Field] = [
    pa.field("unit_id", pa.string()),
    pa.field("sample_frames", pa.list_(pa.binary())),  # JPEG frames at sample_fps for motion
    pa.field("sample_fps", pa.float64()),
    # (and "seconds_<step>", float: busy time per step per row, added in curation/unit.py; the
    # writer sums them into the ledger entry's "stage_seconds": curation/writer.py)
]

SCORES_SCHEMA = pa.schema(
    IDENTITY_FIELDS
    + [pa.field(name, pa.float64()) for name in SCORE_COLUMNS]
    + [pa.field(name, pa.string()) for name in ERROR_COLUMNS]
    + [STATUS_FIELD]
    + FILTER_FIELDS
)
SHARDS_SCHEMA = pa.schema(list(SCORES_SCHEMA) + PAYLOAD_FIELDS + MICRO_CONDITIONING_FIELDS)
# Numeric scores columns: what a filter rule or dedup.keep_by may name (stages/rules.py).
NUMERIC_COLUMNS = sorted(
    f.name for f in SCORES_SCHEMA
    if str(f.type) in ("double", "float", "int32", "int64") and f.name not in ("start_frame", "end_frame")
)
# OUT/clips/: the payload of every clip, kept or not (what refilter needs to rebuild shards).
CLIPS_SCHEMA = pa.schema([IDENTITY_FIELDS[0]] + PAYLOAD_FIELDS)

# Every column a row can carry between stages, with its type.
ALL_FIELDS: dict[str, pa.Field] = {
    f.name: f for f in list(SHARDS_SCHEMA) + INTERNAL_FIELDS
}


def statistics_columns(schema: pa.Schema) -> list[str]:
    """The columns whose min/max a Parquet file should keep: the scalar ones (filters and
    readers can skip row groups by them), not the payload (a binary column's statistics are
    kilobytes of its values per row group, in the footer every reader parses and the writer
    holds until the file is closed)."""
    return [f.name for f in schema if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                                           or pa.types.is_list(f.type))]


def arrow_type(name: str) -> pa.DataType | None:
    field = ALL_FIELDS.get(name)
    return field.type if field is not None else None


def batch_to_table(batch: dict[str, list]) -> pa.Table:
    """A dict-of-lists batch as an Arrow table with the contract's types.

    Columns the contract does not know are inferred (stages may add private columns).
    """
    arrays, names = [], []
    for name, values in batch.items():
        arrays.append(pa.array(values, type=arrow_type(name)))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and order `schema`'s columns from `table`, adding missing ones as nulls."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)
