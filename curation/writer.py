"""OUT_DIR layout and the atomic, ledgered commit of one work unit.

    OUT_DIR/scores/<unit>.parquet        every row of the unit (clips and source-error rows)
    OUT_DIR/shards/<unit>-<k>.parquet    kept clips with video, keyframes, micro-conditioning
    OUT_DIR/clips/<unit>.parquet         payload (video, keyframes, captions, embeddings) of
                                         every clip, kept or not, so `curate refilter` can
                                         rewrite shards under new rules without decoding
    OUT_DIR/ledger/<unit>.json           written last: the unit is committed iff this exists
    OUT_DIR/run.json, OUT_DIR/logs/

Every file is written under a temporary name and renamed, so a reader never sees a partial
file. A crash between the data files and the ledger entry leaves files of an uncommitted
unit; `OutputStore.prepare()` deletes those before a resumed run redoes the unit under the
same deterministic names, so every clip ends up exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema

log = logging.getLogger(__name__)

STAGE_SECONDS_PREFIX = "seconds_"  # per-row busy time columns added by the runners


class OutputError(RuntimeError):
    """OUT_DIR cannot be used as asked (for example it holds a run with another config)."""


def write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_atomic(path: Path, table: pa.Table, row_group_size: int | None = None) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_derived_columns(table: pa.Table) -> pa.Table:
    """keep/reject_reasons when no filter ran, and the SVD micro-conditioning columns."""
    n = table.num_rows
    if "keep" not in table.column_names:
        is_clip = [s is None for s in table.column("split_error").to_pylist()] if n else []
        table = table.append_column("keep", pa.array(is_clip, pa.bool_()))
        table = table.append_column("reject_reasons", pa.array(
            [[] if ok else ["split_error"] for ok in is_clip], pa.list_(pa.string())))
    fps = table.column("fps").to_pylist() if "fps" in table.column_names else [None] * n
    motion = table.column("motion_score").to_pylist() if "motion_score" in table.column_names else [None] * n
    table = table.append_column("fps_id", pa.array([schema.fps_id_for(v) for v in fps], pa.int32()))
    return table.append_column("motion_bucket_id", pa.array(
        [schema.motion_bucket_id_for(v) for v in motion], pa.int32()))


def split_by_size(table: pa.Table, target_bytes: float) -> list[pa.Table]:
    """Consecutive slices of `table` of about target_bytes of payload each."""
    if table.num_rows == 0:
        return []
    parts, start, size = [], 0, 0
    sizes = [len(v or b"") for v in table.column("video").to_pylist()]
    for i, s in enumerate(sizes):
        size += s
        if size >= target_bytes:
            parts.append(table.slice(start, i + 1 - start))
            start, size = i + 1, 0
    if start < table.num_rows:
        parts.append(table.slice(start))
    return parts


class OutputStore:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.scores_dir = self.root / "scores"
        self.shards_dir = self.root / "shards"
        self.ledger_dir = self.root / "ledger"
        self.clips_dir = self.root / "clips"
        self.logs_dir = self.root / "logs"
        self.run_json = self.root / "run.json"

    # ---- set-up -----------------------------------------------------------------------
    def prepare(self, fingerprint: str, overwrite: bool) -> None:
        """Make the folders; refuse to mix configs; delete leftovers of uncommitted units."""
        if overwrite:
            # Reports and trained models describe the old shards: they go too.
            for d in (self.scores_dir, self.shards_dir, self.clips_dir, self.ledger_dir,
                      self.root / "report", self.root / "train"):
                shutil.rmtree(d, ignore_errors=True)
            self.run_json.unlink(missing_ok=True)
        elif self.run_json.exists():
            previous = self.read_run().get("config_fingerprint")
            if previous and previous != fingerprint:
                raise OutputError(
                    f"{self.root} holds a run made with a different pipeline config "
                    f"(fingerprint {previous}, now {fingerprint}); pass --overwrite to start "
                    "fresh, choose another --output, or use `curate refilter` for new thresholds")
        for d in (self.scores_dir, self.shards_dir, self.clips_dir, self.ledger_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.remove_uncommitted()

    def remove_uncommitted(self) -> None:
        committed = set(self.committed())
        for folder in (self.scores_dir, self.shards_dir, self.clips_dir, self.ledger_dir):
            for path in folder.iterdir():
                unit = path.name.split(".")[0].split("-")[0]
                if path.name.startswith(".tmp-") or unit not in committed:
                    log.info("removing leftover of an uncommitted unit: %s", path)
                    path.unlink()

    # ---- ledger -----------------------------------------------------------------------
    def committed(self) -> dict[str, dict[str, Any]]:
        entries = {}
        if self.ledger_dir.is_dir():
            for path in sorted(self.ledger_dir.glob("u*.json")):
                entries[path.stem] = json.loads(path.read_text())
        return entries

    def committed_source_ids(self) -> set[str]:
        return {sid for entry in self.committed().values() for sid in entry["source_ids"]}

    def read_run(self) -> dict[str, Any]:
        return json.loads(self.run_json.read_text()) if self.run_json.exists() else {}

    # ---- commit -----------------------------------------------------------------------
    def commit(self, unit_id: str, source_ids: list[str], table: pa.Table,
               shard_target_mb: float, store_all_clips: bool = True) -> dict[str, Any]:
        """Write the unit's scores and shards, then its ledger entry (the commit point)."""
        table = add_derived_columns(table)
        if table.num_rows:
            order = pc.sort_indices(table, sort_keys=[("source_path", "ascending"),
                                                      ("start_frame", "ascending")])
            table = table.take(order)
        scores = schema.conform(table, schema.SCORES_SCHEMA)
        scores_file = self.scores_dir / f"{unit_id}.parquet"
        write_parquet_atomic(scores_file, scores)

        clips_file = None
        if store_all_clips:
            is_clip = pc.is_valid(table.column("start_frame"))
            clips_file = self.clips_dir / f"{unit_id}.parquet"
            write_parquet_atomic(clips_file, schema.conform(table.filter(is_clip), schema.CLIPS_SCHEMA),
                                 row_group_size=64)
        kept = table.filter(pc.fill_null(table.column("keep"), False))
        shard_files = self.write_shards(unit_id, kept, shard_target_mb)

        stage_seconds = {
            name[len(STAGE_SECONDS_PREFIX):]: float(pc.sum(table.column(name)).as_py() or 0.0)
            for name in table.column_names if name.startswith(STAGE_SECONDS_PREFIX)
        }
        split_errors = table.column("split_error").to_pylist()
        starts = table.column("start_frame").to_pylist()
        entry = {
            "unit_id": unit_id,
            "source_ids": source_ids,
            "rows": table.num_rows,
            "clips": sum(1 for s in starts if s is not None),
            "kept": kept.num_rows,
            "source_errors": sum(1 for e in split_errors if e is not None),
            "errors": {col[:-len("_error")]: int(table.num_rows - table.column(col).null_count)
                       for col in schema.ERROR_COLUMNS if col in table.column_names},
            "stage_seconds": stage_seconds,
            "scores_file": scores_file.name,
            "clips_file": clips_file.name if clips_file else None,
            "shard_files": shard_files,
            "committed_at": time.time(),
        }
        write_json(self.ledger_dir / f"{unit_id}.json", entry)
        return entry

    def write_shards(self, unit_id: str, kept: pa.Table, shard_target_mb: float) -> list[str]:
        """Write a unit's kept rows (with payload) as shard files; returns their names."""
        names = []
        for k, part in enumerate(split_by_size(kept, shard_target_mb * 1024 * 1024)):
            path = self.shards_dir / f"{unit_id}-{k:04d}.parquet"
            # Small row groups: rows carry whole videos, and readers stream row groups.
            write_parquet_atomic(path, schema.conform(part, schema.SHARDS_SCHEMA), row_group_size=64)
            names.append(path.name)
        return names

    # ---- reading ----------------------------------------------------------------------
    def read_scores(self) -> pa.Table:
        """All committed scores rows (uncommitted leftovers are ignored)."""
        files = [self.scores_dir / e["scores_file"] for e in self.committed().values()]
        tables = [pq.read_table(f) for f in files if f.exists()]
        if not tables:
            return schema.SCORES_SCHEMA.empty_table()
        return pa.concat_tables(tables)
