"""OUT_DIR layout and the ledgered commit of one work unit. OUT_DIR is a local folder or an
object-store prefix (s3://, gs://, az://); curation/outdir.py gives both one API.

    OUT_DIR/scores/<unit>-<attempt>.parquet      every row of the unit (clips and source-error rows)
    OUT_DIR/shards/<unit>-<attempt>-<k>.parquet  kept clips with video, keyframes, micro-conditioning
    OUT_DIR/clips/<unit>-<attempt>.parquet       payload (video, keyframes, captions, embeddings) of
                                                 every clip, kept or not, so `curate refilter` can
                                                 rewrite shards under new rules without decoding
    OUT_DIR/ledger/<unit>.json      written last: the unit is committed iff this exists; it names
                                    the unit's files
    OUT_DIR/inflight/<unit>.json    while a unit runs on a worker: the source it is on, since
                                    when and its time limit (curation/unit.py)
    OUT_DIR/run.json, OUT_DIR/logs/

`<attempt>` is a random token per attempt at the unit. The worker that processed a unit writes
its data files (`write_unit`); the driver writes the ledger entry (`write_ledger`) once the
worker has returned, so only small records travel.

Every file appears whole or not at all (a temporary name and a rename on a local disk, one PUT
on a store, which has no rename). Readers read only the files the ledger lists, so files of an
attempt that never committed, or of a second attempt at a unit another attempt committed (a
worker thought dead that went on writing), are never read; `OutputStore.prepare()` deletes
every data file no ledger entry lists before a resumed run redoes the uncommitted units, so
every clip ends up exactly once. Older outputs, whose files have no attempt token, read the
same way: the ledger names them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir, schema
from curation.ledger import UNITS_SCHEMA, Ledger, iter_units
from stages import redaction
from curation.outdir import (  # noqa: F401 - the writers' names, used across the package
    tmp_name,
    write_json,
)
from curation.outdir import write_bytes_atomic as write_atomic_bytes  # noqa: F401
from curation.outdir import write_table as write_parquet_atomic

log = logging.getLogger(__name__)

STAGE_SECONDS_PREFIX = "seconds_"  # per-row busy time columns added by the runners


class OutputError(RuntimeError):
    """OUT_DIR cannot be used as asked (for example it holds a run with another config)."""


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
    """OUT_DIR, a local folder or an object-store prefix (curation/outdir.py): the ledgered
    commit of units, and the reading of what the ledger lists."""

    def __init__(self, out_dir: str | Path | outdir.StorePath):
        self.root = outdir.out_path(out_dir)
        self.remote = isinstance(self.root, outdir.StorePath)
        self.scores_dir = self.root / "scores"
        self.shards_dir = self.root / "shards"
        self.ledger_dir = self.root / "ledger"
        self.clips_dir = self.root / "clips"
        self.inflight_dir = self.root / "inflight"
        self.logs_dir = self.root / "logs"
        self.run_json = self.root / "run.json"

    # ---- set-up -----------------------------------------------------------------------
    def prepare(self, fingerprint: str, overwrite: bool) -> "Ledger":
        """Make the folders; refuse to mix configs; delete leftovers of uncommitted units.
        Returns the committed state it read for that sweep, for the run's planning."""
        if overwrite:
            # Reports, trained models and studies describe the old shards: they go too.
            for d in (self.scores_dir, self.shards_dir, self.clips_dir, self.ledger_dir,
                      self.root / "report", self.root / "train", self.root / "study", self.root / "dedup"):
                outdir.rmtree(d)
            self.run_json.unlink(missing_ok=True)
        elif self.run_json.exists():
            previous = self.read_run().get("config_fingerprint")
            if previous and previous != fingerprint:
                raise OutputError(
                    f"{self.root} holds a run made with a different pipeline config "
                    f"(fingerprint {previous}, now {fingerprint}); pass --overwrite to start "
                    "fresh, choose another --output, or use `curate refilter` for new thresholds")
        for d in (self.scores_dir, self.shards_dir, self.clips_dir, self.ledger_dir, self.logs_dir,
                  self.inflight_dir):
            d.mkdir(parents=True, exist_ok=True)
        ledger = self.ledger()
        self.remove_uncommitted(ledger)
        for marker in self.inflight_dir.iterdir():
            marker.unlink(missing_ok=True)
        return ledger

    def remove_uncommitted(self, ledger: "Ledger | None" = None) -> int:
        """Delete every data file the ledger does not list (files of units that never
        committed, of attempts whose unit another attempt committed, of compactions that did
        not finish, files a compaction replaced) and, in ledger/, older checkpoints and folded
        entries; the files of a compaction running now are left alone. Returns how many.
        `ledger`: the committed state, if the caller has just read it."""
        from curation.compact import LOCK, in_progress_prefixes

        listed = (ledger or self.ledger()).listed()
        busy = in_progress_prefixes(self)
        removed = 0
        for kind in ("scores", "clips", "shards", "ledger"):
            for path in (self.root / kind).iterdir():
                name = path.name
                if name in listed[kind] or name == LOCK or (busy and name.startswith(busy)):
                    continue
                if kind != "ledger" or not name.endswith(".json") or not name.startswith("u"):
                    log.info("removing a file the ledger does not list (an uncommitted attempt or a "
                             "replaced file): %s", path)
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- ledger -----------------------------------------------------------------------
    def ledger(self) -> "Ledger":
        """The committed state, read now (curation/ledger.py)."""
        return Ledger(self)

    def committed(self) -> dict[str, dict[str, Any]]:
        """{unit_id: its row of the units' table (curation/ledger.py UNITS_SCHEMA) or its newer
        entry} of every committed unit, by unit id: for tests and small outputs (one dict a
        unit); readers at scale use `ledger()`."""
        rows = {r["unit_id"]: r for r in iter_units(self.ledger(), UNITS_SCHEMA.names)}
        return dict(sorted(rows.items()))

    def not_ready_reason(self) -> str | None:
        """Why the committed data is not a finished whole (None when it is): for readers that
        must not train on a partial corpus or on tables a refilter left half rewritten."""
        if not self.run_json.exists() or not (self.remote or self.ledger_dir.is_dir()):
            return f"{self.root} is not a curation output (no ledger/ or run.json); run `curate run` first"
        run = self.read_run()
        if run.get("status") != "complete":
            return (f"the run in {self.root} has not finished (status {run.get('status')!r}): "
                    "rerun the same `curate run` command to finish it")
        refilters = run.get("refilters") or []
        if refilters and not refilters[-1].get("finished"):
            overrides = " ".join(f"--set {o}" for o in refilters[-1].get("overrides", []))
            return (f"a `curate refilter {self.root} {overrides}` did not finish: run it again to "
                    "finish it (or `curate run` with the new rules)")
        return None

    def committed_files(self, kind: str) -> list[Any]:
        """The files of one kind ("scores", "shards", "clips") the ledger lists, in its order."""
        return self.ledger().files(kind)

    def read_run(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return {}

    # ---- commit -----------------------------------------------------------------------
    def commit(self, unit_id: str, source_ids: list[str], table: pa.Table,
               shard_target_mb: float, store_all_clips: bool = True) -> dict[str, Any]:
        """Write the unit's scores and shards, then its ledger entry (the commit point)."""
        entry = self.write_unit(unit_id, source_ids, table, shard_target_mb, store_all_clips)
        self.write_ledger(entry)
        return entry

    def write_ledger(self, entry: dict[str, Any]) -> None:
        """The commit point of a unit whose data files are written; clears its in-flight marker."""
        entry = {**entry, "committed_at": time.time()}
        write_json(self.ledger_dir / f"{entry['unit_id']}.json", entry)
        (self.inflight_dir / f"{entry['unit_id']}.json").unlink(missing_ok=True)

    def write_unit(self, unit_id: str, source_ids: list[str], table: pa.Table,
                   shard_target_mb: float, store_all_clips: bool = True) -> dict[str, Any]:
        """Write the unit's data files (scores, clips, shards); returns its ledger entry."""
        table = redaction.redact_errors(add_derived_columns(table))  # error texts may quote anything
        if table.num_rows:
            order = pc.sort_indices(table, sort_keys=[("source_path", "ascending"),
                                                      ("start_frame", "ascending")])
            table = table.take(order)
        scores = schema.conform(table, schema.SCORES_SCHEMA)
        # Names unique to this attempt: an object store cannot rename, and an attempt thought
        # dead may still be writing; the ledger entry names the files of the attempt it commits.
        attempt = uuid.uuid4().hex[:8]
        scores_file = self.scores_dir / f"{unit_id}-{attempt}.parquet"
        write_parquet_atomic(scores_file, scores)

        clips_file = None
        if store_all_clips:
            is_clip = pc.is_valid(table.column("start_frame"))
            clips_file = self.clips_dir / f"{unit_id}-{attempt}.parquet"
            write_parquet_atomic(clips_file, schema.conform(table.filter(is_clip), schema.CLIPS_SCHEMA),
                                 row_group_size=64)
        kept = table.filter(pc.fill_null(table.column("keep"), False))
        shard_files = self.write_shards(unit_id, kept, shard_target_mb, version=attempt)

        stage_seconds = {
            name[len(STAGE_SECONDS_PREFIX):]: float(pc.sum(table.column(name)).as_py() or 0.0)
            for name in table.column_names if name.startswith(STAGE_SECONDS_PREFIX)
        }
        split_errors = table.column("split_error").to_pylist()
        starts = table.column("start_frame").to_pylist()
        paths = table.column("source_path").to_pylist()
        entry = {
            "unit_id": unit_id,
            "source_ids": source_ids,
            "first_source": min(paths) if paths else None,  # where the unit goes in source order
            "rows": table.num_rows,
            "clips": sum(1 for s in starts if s is not None),
            "kept": kept.num_rows,
            "source_errors": sum(1 for e in split_errors if e is not None),
            "source_outcomes": dict(Counter(
                s for s in (table.column("source_status").to_pylist()
                            if "source_status" in table.column_names else []) if s is not None)),
            "errors": {col[:-len("_error")]: int(table.num_rows - table.column(col).null_count)
                       for col in schema.ERROR_COLUMNS if col in table.column_names},
            "stage_seconds": stage_seconds,
            "scores_file": scores_file.name,
            "clips_file": clips_file.name if clips_file else None,
            "shard_files": shard_files,
        }
        return entry

    def write_shards(self, unit_id: str, kept: pa.Table, shard_target_mb: float,
                     version: str | None = None) -> list[str]:
        """Write a unit's kept rows (with payload) as shard files; returns their names.

        `version` (the attempt's token; refilter's kept-set hash) gives the files names of their
        own, so the files the ledger lists now are never overwritten: readers see the old set
        until the ledger entry switches.
        """
        names = []
        prefix = f"{unit_id}-{version}" if version else unit_id
        for k, part in enumerate(split_by_size(kept, shard_target_mb * 1024 * 1024)):
            path = self.shards_dir / f"{prefix}-{k:04d}.parquet"
            # Small row groups: rows carry whole videos, and readers stream row groups.
            write_parquet_atomic(path, schema.conform(part, schema.SHARDS_SCHEMA), row_group_size=64)
            names.append(path.name)
        return names

    # ---- reading ----------------------------------------------------------------------
    def read_scores(self) -> pa.Table:
        """All committed scores rows (uncommitted leftovers are ignored)."""
        tables = [outdir.read_table(f) for f in self.committed_files("scores") if f.exists()]
        if not tables:
            return schema.SCORES_SCHEMA.empty_table()
        return pa.concat_tables(tables)
