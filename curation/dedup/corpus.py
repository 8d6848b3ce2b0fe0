"""The run's clips as rows of the search (groups.Corpus): their vectors read file by file into the
temporary folder, and the temporal signatures of the rows that need one, with the per-data-file
caches of both (dedup/perceptual/, dedup/temporal/)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, outdir
from curation.dedup.budget import Budget, Progress
from curation.dedup.copies import KEY, row_keys
from curation.dedup.perceptual import PERCEPTUAL_VERSION, perceptual_embedding
from curation.dedup.spill import BytesFile, RowFile
from curation.ledger import Ledger
from curation.writer import OutputStore, write_parquet_atomic
from stages import signature


# ---- reading vectors, file by file, into the temporary folder -----------------------------------

def payload_files(ledger: Ledger) -> list[Any]:
    """Where every clip's payload is: clips/ (run.store_all_clips), else the kept clips' shards."""
    from curation.finalize import payload_source

    return ledger.files(payload_source(ledger))


def _cache(store: OutputStore, kind: str, path: Any) -> Any:
    """dedup/<kind>/<data file stem>.parquet: a data file's name is never reused for other
    rows (names are unique per attempt and per compaction), so it keys the cache."""
    return store.root / "dedup" / kind / f"{path.stem}.parquet"


def _perceptual_file(store: OutputStore, path: Any) -> tuple[pa.Array, np.ndarray]:
    """A data file's perceptual vectors (clip ids, (m, 143) float16), from its cache file when
    there is one."""
    cache = _cache(store, "perceptual", path)
    stamp = f"{PERCEPTUAL_VERSION}:{path.name}"
    if cache.exists():
        t = outdir.read_table(cache)
        if (t.schema.metadata or {}).get(b"stamp") == stamp.encode():
            vecs = np.frombuffer(b"".join(t.column("vector").to_pylist()), np.float16)
            return t.column("clip_id").combine_chunks(), vecs.reshape(t.num_rows, -1)
    ids, vecs = [], []
    for table in columns.scan([path], ["clip_id", "keyframes"]):
        for cid, frames in zip(table.column("clip_id").to_pylist(), table.column("keyframes").to_pylist()):
            v = perceptual_embedding(frames)
            if v is not None:
                ids.append(cid)
                vecs.append(v.astype(np.float16))
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"clip_id": pa.array(ids, pa.string()),
                      "vector": pa.array([v.tobytes() for v in vecs], pa.binary())})
    write_parquet_atomic(cache, table.replace_schema_metadata({"stamp": stamp}))
    return table.column("clip_id").combine_chunks(), np.stack(vecs) if vecs else np.zeros((0, 143), np.float16)


@dataclass
class Batch:
    """Clips of one row group of a data file that have a vector."""

    positions: np.ndarray  # their rows in the data file
    ids: pa.Array
    vectors: np.ndarray  # (m, d) float16 unit vectors
    signatures: list[bytes | None]  # None: the file has no signature for the clip


def file_batches(store: OutputStore, path: Any, kind: str) -> Iterator[Batch]:
    """A data file's clips that have a vector, a row group at a time, with their signatures
    (for the class key of exact copies)."""
    perceptual = _perceptual_file(store, path) if kind == "perceptual" else None
    first = 0
    wanted = ["clip_id", signature.COLUMN] + ([] if perceptual is not None else ["image_embedding"])
    for table in columns.scan([path], wanted):
        m = table.num_rows
        if perceptual is not None:  # the cache's rows: the file's clips that have a vector
            at = pc.index_in(table.column("clip_id"), value_set=perceptual[0])
            has = at.is_valid().to_numpy(zero_copy_only=False)
            vecs = perceptual[1][pc.fill_null(at, 0).to_numpy(zero_copy_only=False)[has]]
        else:
            col = table.column("image_embedding").combine_chunks()
            has = pc.and_(col.is_valid(), pc.greater(pc.fill_null(pc.list_value_length(col), 0), 0))
            has = has.to_numpy(zero_copy_only=False).astype(bool)
            if has.any():
                col = col.filter(pa.array(has))
                flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
                vecs = flat.reshape(len(col), -1)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-6
                vecs = vecs.astype(np.float16)
            else:
                vecs = np.zeros((0, 0), np.float16)
        if has.any():
            keep = pa.array(has)
            yield Batch(np.flatnonzero(has) + first, table.column("clip_id").filter(keep).combine_chunks(), vecs,
                        table.column(signature.COLUMN).filter(keep).to_pylist())
        first += m


def has_image_embeddings(files: list[Any]) -> bool:
    """True when some clip of the run has an image_embedding (the aesthetics stage ran)."""
    for table in columns.scan(files, ["image_embedding"]):
        col = table.column("image_embedding")
        if col.null_count < len(col):
            return True
    return False


def resolve_embedding(kind: str, files: list[Any]) -> str:
    if kind != "auto":
        return kind
    return "image_embedding" if has_image_embeddings(files) else "perceptual"


@dataclass
class Collected:
    """The run's clips with a vector, as rows in the temporary folder (groups.Corpus),
    and where each row is: [(data file, first row, end row)] and the row within its file."""

    vectors: RowFile
    keys: RowFile
    ids: BytesFile
    file_rows: RowFile
    spans: list[tuple[Any, int, int]]


def collect(store: OutputStore, files: list[Any], kind: str, work: Path, budget: Budget) -> Collected:
    """Every committed clip that has a vector, file by file, a row group at a time."""
    keys = RowFile(work / "keys", KEY, 0, budget)
    ids = BytesFile(work, "clip_ids", 0, budget)
    file_rows = RowFile(work / "file_rows", np.int64, 0, budget)
    vectors: RowFile | None = None
    spans: list[tuple[Any, int, int]] = []
    progress = Progress(f"{kind} vectors")
    n = 0
    for k, path in enumerate(files):
        start = n
        for batch in file_batches(store, path, kind):
            if vectors is None:
                vectors = RowFile(work / "vectors", np.dtype((np.float16, (batch.vectors.shape[1],))), 0, budget)
            elif batch.vectors.shape[1] != vectors.dtype.shape[0]:
                raise ValueError(f"dedup: {kind} vectors of different sizes {sorted({vectors.dtype.shape[0], batch.vectors.shape[1]})} "
                                 "in one run")
            vectors.append(batch.vectors)
            keys.append(row_keys(batch.vectors, batch.signatures, n))
            ids.append_binary(batch.ids)
            file_rows.append(batch.positions)
            n += len(batch.positions)
        spans.append((path, start, n))
        progress("%d/%d files, %d clips", k + 1, len(files), n, force=k + 1 == len(files))
    if vectors is None:
        vectors = RowFile(work / "vectors", np.dtype((np.float16, (1,))), 0, budget)
    return Collected(vectors, keys, ids, file_rows, spans)


def remove_stale_caches(store: OutputStore, files: list[Any]) -> None:
    """Cache files of data files the ledger no longer lists (compacted or replaced)."""
    stems = {p.stem for p in files}
    for kind in ("perceptual", "temporal"):
        folder = store.root / "dedup" / kind
        if folder.exists():
            for cache in folder.iterdir():
                if cache.stem not in stems:
                    cache.unlink(missing_ok=True)


# ---- temporal signatures of the rows that need one ----------------------------------------------

def _decoded_signatures(store: OutputStore, path: Any, wanted: set[str]) -> dict[str, bytes]:
    """{clip_id: temporal signature} of the `wanted` clips of a data file written before the
    `temporal_signature` column (or without one for a clip): decoded from the clip's video and
    cached in dedup/temporal/<file>.parquet."""
    cache = _cache(store, "temporal", path)
    stamp = f"{signature.SIGNATURE_VERSION}:{path.name}".encode()
    cached: dict[str, bytes | None] = {}
    if cache.exists():
        t = outdir.read_table(cache)
        if (t.schema.metadata or {}).get(b"stamp") == stamp:
            cached = dict(zip(t.column("clip_id").to_pylist(), t.column(signature.COLUMN).to_pylist()))
    todo = wanted - cached.keys()
    if todo:
        for table in columns.scan([path], ["clip_id", "video"]):
            for cid, video in zip(table.column("clip_id").to_pylist(), table.column("video").to_pylist()):
                if cid in todo:
                    cached[cid] = signature.from_video(video) if video else None
        table = pa.table({"clip_id": pa.array(list(cached), pa.string()),
                          signature.COLUMN: pa.array(list(cached.values()), pa.binary())})
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(cache, table.replace_schema_metadata({"stamp": stamp}))
    return {cid: cached[cid] for cid in wanted if cached.get(cid)}


def signature_fetch(store: OutputStore, collected: Collected):
    """groups.Corpus.fetch: the signatures of ascending rows, read file by file and a row
    group at a time from the `temporal_signature` column (decoded from the video where a clip
    has none)."""

    def fetch(chunks: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, list[bytes | None]]]:
        pending = np.zeros(0, np.int64)
        chunks = iter(chunks)
        exhausted = False
        for path, start, end in collected.spans:
            while not exhausted and (pending.size == 0 or pending[-1] < end):
                nxt = next(chunks, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending = np.concatenate([pending, nxt])
            mine = pending[(pending >= start) & (pending < end)]
            pending = pending[pending >= end]
            if mine.size:
                yield from _file_signatures(store, path, mine, collected.file_rows.take(mine), collected)

    return fetch


def _file_signatures(store: OutputStore, path: Any, rows: np.ndarray, positions: np.ndarray,
                     collected: Collected) -> Iterator[tuple[np.ndarray, list[bytes | None]]]:
    has_column = signature.COLUMN in outdir.read_schema(path).names
    missing: list[int] = []
    if has_column:
        first = 0
        for table in columns.scan([path], [signature.COLUMN]):
            m = table.num_rows
            lo, hi = np.searchsorted(positions, [first, first + m])
            if hi > lo:
                values = table.column(signature.COLUMN).take(pa.array(positions[lo:hi] - first)).to_pylist()
                missing += [int(r) for r, v in zip(rows[lo:hi], values) if not v]
                yield rows[lo:hi], values
            first += m
    else:
        missing = rows.tolist()
    if missing:  # outputs written before the column: decoded from the video (cached)
        miss = np.array(missing, np.int64)
        ids = collected.ids.take_binary(miss).cast(pa.string()).to_pylist()
        found = _decoded_signatures(store, path, set(ids))
        yield miss, [found.get(cid) for cid in ids]


def clip_ids(collected: Collected):
    def ids(rows: np.ndarray) -> pa.Array:
        return collected.ids.take_binary(np.asarray(rows, np.int64)).cast(pa.string())

    return ids
