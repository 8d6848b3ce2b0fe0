"""An arm's (or an eval set's) clips written as shard files in the trainer's schema."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation import outdir, schema
from curation.writer import OutputStore
from training.study.corpus import Corpus
from training.study.spec import StudyError

PAYLOAD_COLUMNS = [f.name for f in schema.PAYLOAD_FIELDS]


# ---- data files -------------------------------------------------------------------------

def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha1(",".join(ids).encode()).hexdigest()[:10]


def write_clip_files(corpus: Corpus, wanted: dict[str, list[str]]) -> None:
    """Write each file of `wanted` ({path: clip ids}) as a shard file of those clips.

    Rows are the scores rows joined with the payload of clips/, with fps_id and
    motion_bucket_id derived as the writer derives them, in the shards schema. One pass over
    clips/ (a file at a time); an existing file (its name holds its clip ids' hash) is kept.
    """
    from curation.writer import add_derived_columns, tmp_name

    todo = {p: ids for p, ids in wanted.items() if not os.path.exists(p)}
    if not todo:
        return
    need: dict[str, list[str]] = {}
    for path, ids in todo.items():
        if not ids:
            raise StudyError(f"{path}: an arm without clips")
        for cid in ids:
            need.setdefault(cid, []).append(path)
    scores = corpus.clips
    row_of = {cid: i for i, cid in enumerate(scores.column("clip_id").to_pylist())}
    writers: dict[str, tuple[pq.ParquetWriter, Path]] = {}
    got: dict[str, int] = {p: 0 for p in todo}
    try:
        for path in todo:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_name(Path(path))
            writers[path] = (pq.ParquetWriter(tmp, schema.SHARDS_SCHEMA, compression="zstd",
                                              write_statistics=schema.statistics_columns(schema.SHARDS_SCHEMA)), tmp)
        store = OutputStore(corpus.out_dir)
        for clips_file in store.committed_files("clips"):
            if not clips_file.exists():
                continue
            payload = outdir.read_table(clips_file, columns=["clip_id"] + PAYLOAD_COLUMNS)
            pids = payload.column("clip_id").to_pylist()
            for path in todo:
                take = [k for k, cid in enumerate(pids) if path in need.get(cid, ())]
                if not take:
                    continue
                part = payload.take(pa.array(take, pa.int64()))
                rows = scores.take(pa.array([row_of[cid] for cid in part.column("clip_id").to_pylist()], pa.int64()))
                rows = rows.drop_columns([c for c in ("fps_id", "motion_bucket_id") if c in rows.column_names])
                for name in PAYLOAD_COLUMNS:
                    rows = rows.append_column(name, part.column(name))
                rows = schema.conform(add_derived_columns(rows), schema.SHARDS_SCHEMA)
                writers[path][0].write_table(rows, row_group_size=64)
                got[path] += rows.num_rows
        for path, (writer, tmp) in writers.items():
            writer.close()
            if got[path] != len(todo[path]):
                raise StudyError(f"{path}: found {got[path]} of its {len(todo[path])} clips in clips/")
            os.replace(tmp, path)
        writers = {}
    finally:
        for writer, tmp in writers.values():
            writer.close()
            Path(tmp).unlink(missing_ok=True)

