"""Near-duplicate removal over a whole run: candidates by vector, duplicates by their time course.

Re-uploads are everywhere in web video: the same footage re-encoded, resized, cropped a little
or started a second later. A re-upload is the same footage over the same time, not the same
scene: two 10 s chunks of one static camera share their layout and colours, but not the people
walking through. So this module decides in two steps, across every committed unit, and keeps
one clip of each group; `curation.finalize.apply_rules` applies the decisions with the filter
rules (at the end of `curate run`, in `curate refilter` and in `curate dedup`), so they are
written to scores/ and shards/ by the same crash-safe pass.

1. Candidates (one unit vector per clip; pairs at cosine >= 1 - eps):
- `image_embedding`: the aesthetics stage's CLIP vector (mean over the keyframes), read from
  clips/ (or the shards when clips/ is not stored);
- `perceptual` (no weights): per keyframe, the 8x8 lowest 2-D DCT coefficients of a 32x32 grey
  thumbnail (DC left out; layout, robust to re-encoding and resizing), the Cr/Cb planes at 4x4
  (where the colours are) and a 12 hue x 4 saturation histogram (colour content, blind to
  crops and motion), each part normalised; the clip's vector is the normalised mean over its
  first/middle/last keyframes. Computed once per data file and cached in
  dedup/perceptual/<data file>.parquet (float16; a data file's name is never reused).
- `auto`: image_embedding when the run has any, else perceptual. Clips without a vector (a
  failed aesthetics stage, no keyframes) are never grouped.
eps is loose (0.3 perceptual, 0.1 CLIP): it only has to let every copy through.

2. Duplicates: a candidate pair is a duplicate pair when the clips' temporal signatures (4 grey
8x8 thumbnails a second, the split stage's `temporal_signature` column; stages/signature.py)
match at >= min_match (0.85) at some time shift of at most max_shift_s (2 s): the same picture
and the same changes at the same times. Chunks of one static camera do not match (other
passers-by), a copy of chunk k matches chunk k, and two clips of one source match only when the
footage repeats (a loop, a replay). Outputs written before the column existed get signatures
decoded from the clips' video, cached in dedup/temporal/<data file>.parquet.

Candidates (`candidate_pairs`, scaling to 1M clips): spherical k-means on a sample gives
about n / bucket_size centroids; every clip goes to its nearest centroid and also to its
second nearest when that is within `margin` of the first (pairs near a bucket boundary are
then still compared); a bucket larger than 4 x bucket_size is split again by k-means; within
each bucket all pairs are compared by cosine, block by block. Two such bucketings (k-means
from other seeds) are unioned, so a pair split by one's boundaries is usually found by the
other (bench/dedup_bench.py measures how often). Memory: the n x d float16 vectors plus a block
of 2048 x 8192 cosines, the candidate pairs and the signatures of the clips in them. Runs of
n <= 4 x bucket_size are compared exhaustively. Groups are the connected components of the
duplicate pairs (union-find).

Decisions (`choose`): within a group, clips are taken in priority order (passing the other
rules first, then `keep_by` columns, highest first, missing last, then clip_id); a clip that
matches a clip already kept is a duplicate of the best-matching one, else it is kept. So every
duplicate matches the clip it names (chains A~B~C do not reject C when C does not itself match
A), a clip that failed other rules is never kept over a duplicate that passed, and decisions
change with the rules without recomputing the groups. A duplicate gets the reject reason
"duplicate_of:<clip_id>" (after its rules' reasons); its match score, shift and group go to
dedup/duplicates.parquet, counts and settings to dedup/dedup.json. The groups and matching
pairs are cached in dedup/groups.parquet and dedup/pairs.parquet, keyed by the embedding, the
settings and the committed units (not the files that hold them: a compaction keeps them), so a
refilter with new rules reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, outdir
from curation.ledger import Ledger
from curation.writer import OutputStore, write_json, write_parquet_atomic
from stages import signature

log = logging.getLogger(__name__)

PERCEPTUAL_VERSION = "dct8-crcb4-hs12x4-v1"
# Defaults of eps per embedding: perceptual measured on generated re-uploads (README), CLIP's
# the usual near-duplicate cut for normalised CLIP image vectors.
DEFAULT_EPS = {"perceptual": 0.3, "image_embedding": 0.1}
DEFAULT_MIN_MATCH = 0.85  # bench/dedup_bench.py --signatures: midway between the hardest negative and the weakest copy
DEFAULT_MAX_SHIFT_S = 2.0
# Candidates a clip gets per bucket, its most similar ones: bounds the temporal checks at about
# n x 2 x CANDIDATES_PER_CLIP however alike the vectors of a corpus are (a thousand chunks of
# static cameras); a group larger than that is still joined through its members' pairs.
CANDIDATES_PER_CLIP = 16
VERIFY_BLOCK = 4096  # candidate pairs per verification task
PARALLEL_MIN_PAIRS = 20_000  # more than this: verified over a process per CPU
REASON_PREFIX = "duplicate_of:"
MAX_DEPTH = 3
BLOCK_ROWS = 2048
BLOCK_COLS = 8192


# ---- the perceptual embedding ------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    return v / (float(np.linalg.norm(v)) + 1e-6)


def keyframe_features(jpeg: bytes) -> np.ndarray | None:
    """Luma DCT layout, Cr/Cb at 4x4 and a hue/saturation histogram of one JPEG; None if unreadable."""
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) if jpeg else None
    if bgr is None:
        return None
    ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb).astype(np.float32)
    luma = cv2.dct(cv2.resize(ycc[..., 0], (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()[1:]
    chroma = np.concatenate([cv2.resize(ycc[..., c] - 128.0, (4, 4), interpolation=cv2.INTER_AREA).ravel()
                             for c in (1, 2)])
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [12, 4], [0, 180, 0, 256]).ravel()
    hist = np.sqrt(hist / max(float(hist.sum()), 1.0))
    # Weights chosen on generated re-uploads: layout first, colour as a tie-breaker.
    return np.concatenate([_unit(luma), 0.25 * _unit(chroma), 0.5 * _unit(hist - hist.mean())])


def perceptual_embedding(keyframes: list[bytes] | None) -> np.ndarray | None:
    """The clip's unit vector (float32, 143 dims) from its keyframes; None when none decodes."""
    feats = [f for f in (keyframe_features(b) for b in keyframes or []) if f is not None]
    if not feats:
        return None
    return _unit(np.mean(feats, axis=0)).astype(np.float32)


# ---- reading embeddings, file by file -----------------------------------------------------------

def payload_files(ledger: Ledger) -> list[Any]:
    """Where every clip's payload is: clips/ (run.store_all_clips), else the kept clips' shards."""
    from curation.finalize import payload_source

    return ledger.files(payload_source(ledger))


def _read_column(paths: list[Any], column: str):
    """(clip_id, value) per row of `paths`, one row group at a time."""
    for table in columns.scan(paths, ["clip_id", column]):
        yield from zip(table.column("clip_id").to_pylist(), table.column(column).to_pylist())


def _cache(store: OutputStore, kind: str, path: Any) -> Any:
    """dedup/<kind>/<data file stem>.parquet: a data file's name is never reused for other
    rows (names are unique per attempt and per compaction), so it keys the cache."""
    return store.root / "dedup" / kind / f"{path.stem}.parquet"


def _perceptual_file(store: OutputStore, path: Any) -> tuple[list[str], np.ndarray]:
    """A data file's perceptual vectors, from its cache file when there is one."""
    cache = _cache(store, "perceptual", path)
    stamp = f"{PERCEPTUAL_VERSION}:{path.name}"
    if cache.exists():
        t = outdir.read_table(cache)
        if (t.schema.metadata or {}).get(b"stamp") == stamp.encode():
            vecs = np.frombuffer(b"".join(t.column("vector").to_pylist()), np.float16)
            return t.column("clip_id").to_pylist(), vecs.reshape(t.num_rows, -1)
    ids, vecs = [], []
    for cid, frames in _read_column([path], "keyframes"):
        v = perceptual_embedding(frames)
        if v is not None:
            ids.append(cid)
            vecs.append(v.astype(np.float16))
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"clip_id": pa.array(ids, pa.string()),
                      "vector": pa.array([v.tobytes() for v in vecs], pa.binary())})
    write_parquet_atomic(cache, table.replace_schema_metadata({"stamp": stamp}))
    return ids, np.stack(vecs) if vecs else np.zeros((0, 143), np.float16)


def _clip_file(store: OutputStore, path: Any) -> tuple[list[str], np.ndarray]:
    """A data file's image embeddings as float16 unit vectors, read as Arrow buffers."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for table in columns.scan([path], ["clip_id", "image_embedding"]):
        col = table.column("image_embedding").combine_chunks()
        has = pc.and_(col.is_valid(), pc.greater(pc.fill_null(pc.list_value_length(col), 0), 0))
        if not pc.any(has).as_py():
            continue
        col = col.filter(has)
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
        vecs = flat.reshape(len(col), -1)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-6
        parts.append(vecs.astype(np.float16))
        ids += table.column("clip_id").filter(has).to_pylist()
    return ids, np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)


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


def collect_embeddings(store: OutputStore, files: list[Any],
                       kind: str) -> tuple[list[str], np.ndarray, list[tuple[Any, int, int]]]:
    """(clip_ids, (n, d) float16 unit vectors, [(data file, first row, end row)]) of every
    committed clip that has a vector."""
    read = _perceptual_file if kind == "perceptual" else _clip_file
    ids: list[str] = []
    parts: list[np.ndarray] = []
    spans: list[tuple[Any, int, int]] = []
    started = last = time.monotonic()
    for k, path in enumerate(files):
        file_ids, vecs = read(store, path)
        spans.append((path, len(ids), len(ids) + len(file_ids)))
        ids += file_ids
        if len(file_ids):
            parts.append(vecs)
        if time.monotonic() - last > 10 or k + 1 == len(files):
            last = time.monotonic()
            log.info("dedup: %s vectors of %d/%d files (%d clips), %.0fs", kind, k + 1, len(files),
                     len(ids), last - started)
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"dedup: {kind} vectors of different sizes {sorted(dims)} in one run")
    return ids, np.concatenate(parts) if parts else np.zeros((0, 1), np.float16), spans


def remove_stale_caches(store: OutputStore, files: list[Any]) -> None:
    """Cache files of data files the ledger no longer lists (compacted or replaced)."""
    stems = {p.stem for p in files}
    for kind in ("perceptual", "temporal"):
        folder = store.root / "dedup" / kind
        if folder.exists():
            for cache in folder.iterdir():
                if cache.stem not in stems:
                    cache.unlink(missing_ok=True)


# ---- temporal signatures: the verification of candidate pairs ----------------------------------

def _signatures_file(store: OutputStore, path: Any, wanted: set[str]) -> dict[str, bytes]:
    """{clip_id: temporal signature} of the `wanted` clips of a data file: the split stage's
    `temporal_signature` column, else (outputs written before it) computed from the clip's
    video and cached in dedup/temporal/<file>.parquet."""
    found = {}
    if signature.COLUMN in outdir.read_schema(path).names:
        found = {cid: sig for cid, sig in _read_column([path], signature.COLUMN) if sig and cid in wanted}
    missing = wanted - found.keys()
    if not missing:
        return found
    cache = _cache(store, "temporal", path)
    stamp = f"{signature.SIGNATURE_VERSION}:{path.name}".encode()
    cached: dict[str, bytes | None] = {}
    if cache.exists():
        t = outdir.read_table(cache)
        if (t.schema.metadata or {}).get(b"stamp") == stamp:
            cached = dict(zip(t.column("clip_id").to_pylist(), t.column(signature.COLUMN).to_pylist()))
    todo = missing - cached.keys()
    if todo:
        for cid, video in _read_column([path], "video"):
            if cid in todo:
                cached[cid] = signature.from_video(video) if video else None
        table = pa.table({"clip_id": pa.array(list(cached), pa.string()),
                          signature.COLUMN: pa.array(list(cached.values()), pa.binary())})
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(cache, table.replace_schema_metadata({"stamp": stamp}))
    found.update({cid: cached[cid] for cid in missing if cached.get(cid)})
    return found


def collect_signatures(store: OutputStore, ids: list[str], spans: list[tuple[Any, int, int]],
                       rows: np.ndarray) -> dict[int, bytes]:
    """{row: temporal signature} of the given rows of `ids` (row spans per data file as
    collect_embeddings gives them), read file by file; rows without one are left out."""
    out: dict[int, bytes] = {}
    rows = np.unique(rows)  # sorted
    for path, start, end in spans:
        mine = rows[(rows >= start) & (rows < end)]
        if mine.size == 0:
            continue
        wanted = {ids[i]: int(i) for i in mine}
        for cid, sig in _signatures_file(store, path, set(wanted)).items():
            out[wanted[cid]] = sig
    return out


def _match_block(pairs: list[tuple[int, int]], sigs: dict[int, bytes], min_match: float,
                 max_shift_s: float) -> list[tuple[int, int, float, float]]:
    out = []
    for i, j in pairs:
        score, shift = signature.match(sigs[i], sigs[j], max_shift_s)
        if score >= min_match:
            out.append((i, j, score, shift))
    return out


def verify_pairs(a: np.ndarray, b: np.ndarray, sigs: dict[int, bytes], min_match: float,
                 max_shift_s: float, workers: int | None = None) -> list[tuple[int, int, float, float]]:
    """[(a, b, match score, shift s)] of the candidate pairs whose signatures match at
    min_match or better (stages/signature.py), in blocks of VERIFY_BLOCK pairs: in this
    process, or over `workers` processes (default: every CPU) when there are more than
    PARALLEL_MIN_PAIRS. Pairs without both signatures are dropped."""
    pairs = [(i, j) for i, j in zip(a.tolist(), b.tolist()) if i in sigs and j in sigs]
    blocks = [pairs[k:k + VERIFY_BLOCK] for k in range(0, len(pairs), VERIFY_BLOCK)]
    workers = workers or os.cpu_count() or 1
    started = last = time.monotonic()
    kept: list[tuple[int, int, float, float]] = []

    def progress(done: int) -> None:
        nonlocal last
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("dedup: verified %d/%d candidate pairs in time (%d match), %.0fs",
                     min(done * VERIFY_BLOCK, len(pairs)), len(pairs), len(kept), last - started)

    if len(pairs) <= PARALLEL_MIN_PAIRS or workers < 2:
        for k, block in enumerate(blocks):
            kept += _match_block(block, sigs, min_match, max_shift_s)
            progress(k + 1)
    else:  # spawned processes: the driver may hold Ray's threads, which fork does not copy safely
        done = 0
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(blocks)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_match_block, block, {i: sigs[i] for p in block for i in p}, min_match,
                                       max_shift_s) for block in blocks]
                for future in futures:
                    kept += future.result()
                    done += 1
                    progress(done)
        except BrokenProcessPool as exc:  # e.g. a __main__ that cannot be re-imported: go on here
            log.warning("dedup: verification processes failed (%s); verifying the rest in this process", exc)
            for k, block in enumerate(blocks[done:], start=done):
                kept += _match_block(block, sigs, min_match, max_shift_s)
                progress(k + 1)
    log.info("dedup: %d of %d candidate pairs match in time (score >= %.3g, shift <= %gs), %.1fs",
             len(kept), len(pairs), min_match, max_shift_s, time.monotonic() - started)
    return kept


# ---- grouping: buckets, then pairs within buckets ----------------------------------------------

def spherical_kmeans(x: np.ndarray, k: int, iters: int = 8, sample: int = 100_000,
                     seed: int = 0) -> np.ndarray:
    """(k, d) unit centroids of the rows of x (unit vectors) by cosine, fitted on a sample."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    pick = rng.choice(n, size=min(n, max(sample, 4 * k)), replace=False) if n > sample else np.arange(n)
    pts = x[pick].astype(np.float32)
    centroids = pts[rng.choice(pts.shape[0], size=k, replace=False)].copy()
    for _ in range(iters):
        labels = _nearest(pts, centroids)[0][:, 0]
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros_like(centroids)
        full = counts > 0  # sums per cluster over the points sorted by cluster (np.add.at is slow)
        sums[full] = np.add.reduceat(pts[order], starts[full], axis=0)
        empty = counts == 0  # re-seed empty clusters with random points
        sums[empty] = pts[rng.choice(pts.shape[0], size=int(empty.sum()))]
        centroids = sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)
    return centroids


def _nearest(x: np.ndarray, centroids: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of the `top` nearest centroids of each row, best first; in blocks."""
    top = min(top, centroids.shape[0])
    idx = np.zeros((x.shape[0], top), np.int64)
    sim = np.zeros((x.shape[0], top), np.float32)
    for s in range(0, x.shape[0], 8192):
        c = x[s:s + 8192].astype(np.float32) @ centroids.T
        if top == 1:
            idx[s:s + 8192, 0] = best = np.argmax(c, axis=1)
            sim[s:s + 8192, 0] = c[np.arange(c.shape[0]), best]
            continue
        part = np.argpartition(-c, top - 1, axis=1)[:, :top] if top < c.shape[1] else np.argsort(-c, axis=1)
        vals = np.take_along_axis(c, part, axis=1)
        order = np.argsort(-vals, axis=1)
        idx[s:s + 8192] = np.take_along_axis(part, order, axis=1)
        sim[s:s + 8192] = np.take_along_axis(vals, order, axis=1)
    return idx, sim


def buckets(x: np.ndarray, members: np.ndarray, bucket_size: int, margin: float,
            seed: int) -> list[np.ndarray]:
    """Split `members` (row indices of x) into k-means buckets; a member also joins its second
    nearest bucket when that centroid is within `margin` of its nearest one."""
    k = max(2, math.ceil(members.size / bucket_size))
    centroids = spherical_kmeans(x[members], k, seed=seed)
    idx, sim = _nearest(x[members], centroids, top=2)
    second = (sim[:, 0] - sim[:, 1] <= margin) & (idx[:, 1] != idx[:, 0])
    label = np.concatenate([idx[:, 0], idx[second, 1]])
    who = np.concatenate([members, members[second]])
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(k + 1))
    return [who[order[bounds[b]:bounds[b + 1]]] for b in range(k) if bounds[b + 1] > bounds[b]]


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, idx: np.ndarray) -> np.ndarray:
        """find() of many nodes at once (pointer jumping), compressing their paths."""
        r = self.parent[idx]
        while True:
            nxt = self.parent[r]
            if np.array_equal(nxt, r):
                break
            r = nxt
        self.parent[idx] = r
        return r

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        """union() of every pair (a[k], b[k]), vectorised: hook the larger root under the smaller
        until every pair shares a root (several pairs hooking one root: one wins, the rest retry)."""
        while a.size:
            ra, rb = self.roots(a), self.roots(b)
            apart = ra != rb
            a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
            self.parent[np.maximum(ra, rb)] = np.minimum(ra, rb)


def _pairs_in(x: np.ndarray, members: np.ndarray, threshold: float, sink, top_k: int | None = None) -> int:
    """sink(a, b) with every pair of `members` at cosine >= threshold (a < b), or with top_k
    set, only each member's top_k most similar partners at or above it (a pair comes once or
    twice); returns the pairs compared."""
    members = np.unique(members)
    vecs = x[members].astype(np.float32)
    for s in range(0, members.size, BLOCK_ROWS):
        if top_k is None:
            for t in range(s, members.size, BLOCK_COLS):  # this block against itself and the rest
                c = vecs[s:s + BLOCK_ROWS] @ vecs[t:t + BLOCK_COLS].T  # at most 2048 x 8192 cosines
                rows, cols = np.nonzero(c >= threshold)
                later = t + cols > s + rows
                sink(members[s + rows[later]], members[t + cols[later]])
            continue
        m = min(BLOCK_ROWS, members.size - s)
        best = np.full((m, top_k), -np.inf, np.float32)  # each row's best partners so far
        best_at = np.zeros((m, top_k), np.int64)
        for t in range(0, members.size, BLOCK_COLS):  # every column block: partners either side
            c = vecs[s:s + m] @ vecs[t:t + BLOCK_COLS].T
            own = np.arange(m) + s - t
            inside = (own >= 0) & (own < c.shape[1])
            c[np.flatnonzero(inside), own[inside]] = -np.inf  # not its own partner
            both = np.concatenate([best, c], axis=1)
            at = np.concatenate([best_at, np.broadcast_to(np.arange(t, t + c.shape[1]), c.shape)], axis=1)
            keep = np.argpartition(-both, top_k - 1, axis=1)[:, :top_k] if both.shape[1] > top_k else \
                np.arange(both.shape[1])[None].repeat(m, 0)
            best, best_at = np.take_along_axis(both, keep, 1), np.take_along_axis(at, keep, 1)
        rows, k = np.nonzero(best >= threshold)
        a, b = members[s + rows], members[best_at[rows, k]]
        sink(np.minimum(a, b), np.maximum(a, b))
    return members.size * (members.size - 1) // 2


def _bucketed_pairs(x: np.ndarray, eps: float, bucket_size: int, margin: float, rounds: int, seed: int,
                    sink, top_k: int | None = None) -> None:
    """Hand every pair of rows of x (unit vectors) at cosine >= 1 - eps that shares a bucket to
    sink(a, b): `rounds` independent bucketings (k-means from other seeds), so a pair split by
    one round's boundaries is found by another; a pair may come more than once."""
    n = x.shape[0]
    threshold = 1.0 - eps
    exhaustive = n <= 4 * bucket_size
    todo = [(np.arange(n), 0, seed + 101 * r) for r in range(1 if exhaustive else rounds)]
    compared = done = 0
    started = last = time.monotonic()
    while todo:
        members, depth, s = todo.pop()
        if members.size <= 4 * bucket_size or depth >= MAX_DEPTH:
            compared += _pairs_in(x, members, threshold, sink, top_k)
            done += members.size
        else:
            todo += [(b, depth + 1, s + 1) for b in buckets(x, members, bucket_size, margin, s)]
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("dedup: grouping, %d clip slots in finished buckets of %d clips, %.0fs",
                     done, n, last - started)
    log.info("dedup: %d clips, %d pairs compared by cosine, %.1fs", n, compared, time.monotonic() - started)


def near_duplicate_components(x: np.ndarray, eps: float, bucket_size: int = 1000, margin: float = 0.1,
                              rounds: int = 2, seed: int = 0) -> np.ndarray:
    """A component label per row of x (unit vectors): rows joined by cosine >= 1 - eps pairs
    found in shared buckets (`_bucketed_pairs`). Returns int64 labels (the smallest row index
    of the component); singletons label themselves."""
    n = x.shape[0]
    uf = UnionFind(n)
    _bucketed_pairs(x, eps, bucket_size, margin, rounds, seed, uf.union_many)
    labels = uf.roots(np.arange(n)).astype(np.int64)
    log.info("dedup: %d clips, %d in groups", n, int((np.bincount(labels, minlength=n)[labels] > 1).sum()))
    return labels


def candidate_pairs(x: np.ndarray, eps: float, bucket_size: int = 1000, margin: float = 0.1,
                    rounds: int = 2, seed: int = 0,
                    top_k: int | None = CANDIDATES_PER_CLIP) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (a, b), a < b, of rows of x at cosine >= 1 - eps sharing a bucket,
    at most each row's `top_k` most similar partners per bucket (None: all of them)."""
    n = max(1, x.shape[0])
    keys: list[np.ndarray] = []
    _bucketed_pairs(x, eps, bucket_size, margin, rounds, seed,
                    lambda a, b: keys.append(a.astype(np.int64) * n + b.astype(np.int64)), top_k)
    k = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return k // n, k % n


# ---- groups of a run, cached -------------------------------------------------------------------

@dataclass
class Groups:
    """The clips in near-duplicate components of two or more clips, and their matching pairs."""

    embedding: str
    eps: float  # candidates: vector cosine >= 1 - eps
    min_match: float  # duplicates: temporal match score >= min_match
    clips_embedded: int
    ids: list[str]
    group: np.ndarray  # (m,) component label
    pairs: dict[tuple[int, int], tuple[float, float]]  # (i, j), i < j rows of ids: (score, shift s)
    without_signature: int = 0  # candidate clips that had no temporal signature (never grouped)
    # Per row of ids, for the pairs `choose` needs that were not candidates (a clip's
    # CANDIDATES_PER_CLIP limit in a group of many copies): matched when needed, kept apart
    # from the verified `pairs` in `matched_later`.
    signatures: list[bytes | None] | None = None
    max_shift_s: float = DEFAULT_MAX_SHIFT_S
    matched_later: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)

    def score(self, i: int, k: int) -> tuple[float, float] | None:
        """(score, shift) of rows i and k: the verified pair, else matched now (None: no signatures)."""
        key = (min(i, k), max(i, k))
        if key in self.pairs:
            return self.pairs[key]
        if key not in self.matched_later:
            sigs = self.signatures
            if not sigs or not sigs[key[0]] or not sigs[key[1]]:
                return None
            self.matched_later[key] = signature.match(sigs[key[0]], sigs[key[1]], self.max_shift_s)
        return self.matched_later[key]


def _groups_key(opts: tuple, ledger: Ledger) -> str:
    key = json.dumps([PERCEPTUAL_VERSION, signature.SIGNATURE_VERSION, *opts, ledger.fingerprint()], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def settings(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The dedup section's values with their defaults filled in (for the resolved embedding)."""
    return {"embedding": kind, "eps": float(opts.get("eps") or DEFAULT_EPS[kind]),
            "min_match": float(opts.get("min_match") or DEFAULT_MIN_MATCH),
            "max_shift_s": float(opts["max_shift_s"] if opts.get("max_shift_s") is not None
                                 else DEFAULT_MAX_SHIFT_S),
            "bucket_size": int(opts.get("bucket_size", 1000))}


def _read_groups(cache: Path, pairs_file: Path, key: str, s: dict[str, Any]) -> Groups | None:
    if not (cache.exists() and pairs_file.exists()):
        return None
    t, p = outdir.read_table(cache), outdir.read_table(pairs_file)
    meta = t.schema.metadata or {}
    if meta.get(b"key") != key.encode() or (p.schema.metadata or {}).get(b"key") != key.encode():
        return None
    ids = t.column("clip_id").to_pylist()
    row = {c: i for i, c in enumerate(ids)}
    pairs = {(row[x], row[y]): (sc, sh) for x, y, sc, sh in zip(*(p.column(c).to_pylist() for c in
                                                                 ("clip_a", "clip_b", "score", "shift_s")))}
    log.info("dedup: groups of %s (eps %g, match %g) reused from %s", s["embedding"], s["eps"],
             s["min_match"], cache)
    return Groups(s["embedding"], s["eps"], s["min_match"], int(meta[b"clips_embedded"]), ids,
                  t.column("group").to_numpy(), pairs, int(meta.get(b"without_signature", b"0")),
                  t.column(signature.COLUMN).to_pylist(), s["max_shift_s"])


def run_groups(store: OutputStore, ledger: Ledger, opts: dict[str, Any]) -> Groups:
    """The run's near-duplicate groups under `opts` (the config's dedup section), from
    dedup/groups.parquet and pairs.parquet when computed for the same settings and units.

    Candidates are the pairs of clips whose vectors are within eps (bucketed, as in
    near_duplicate_components); a candidate is a duplicate pair when the clips' temporal
    signatures match (stages/signature.py); groups are the components of those pairs."""
    files = payload_files(ledger)
    s = settings(resolve_embedding(opts.get("embedding", "auto"), files), opts)
    key = _groups_key((s["embedding"], s["eps"], s["bucket_size"], s["min_match"], s["max_shift_s"]), ledger)
    cache, pairs_file = store.root / "dedup" / "groups.parquet", store.root / "dedup" / "pairs.parquet"
    cached = _read_groups(cache, pairs_file, key, s)
    if cached is not None:
        return cached
    ids, x, spans = collect_embeddings(store, files, s["embedding"])
    a, b = candidate_pairs(x, s["eps"], s["bucket_size"]) if len(ids) else (np.zeros(0, np.int64),) * 2
    candidates = np.unique(np.concatenate([a, b]))
    sigs = collect_signatures(store, ids, spans, candidates)
    without = len(candidates) - len(sigs)
    if without:
        log.warning("dedup: %d candidate clips have no temporal signature (no decodable video); "
                    "they are never marked duplicates", without)
    matched = verify_pairs(a, b, sigs, s["min_match"], s["max_shift_s"])
    uf = UnionFind(len(ids))
    for i, j, _, _ in matched:
        uf.union(i, j)
    labels = uf.roots(np.arange(len(ids))).astype(np.int64)
    grouped = np.flatnonzero(np.bincount(labels, minlength=len(ids))[labels] > 1) if len(ids) else labels
    local = {int(r): k for k, r in enumerate(grouped)}
    groups = Groups(s["embedding"], s["eps"], s["min_match"], len(ids), [ids[i] for i in grouped],
                    labels[grouped], {(local[i], local[j]): (sc, sh) for i, j, sc, sh in matched}, without,
                    [sigs.get(int(i)) for i in grouped], s["max_shift_s"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "clips_embedded": str(len(ids)), "without_signature": str(without)}
    pairs_table = pa.table({"clip_a": pa.array([ids[i] for i, *_ in matched], pa.string()),
                            "clip_b": pa.array([ids[j] for _, j, *_ in matched], pa.string()),
                            "score": pa.array([m[2] for m in matched], pa.float64()),
                            "shift_s": pa.array([m[3] for m in matched], pa.float64())})
    write_parquet_atomic(pairs_file, pairs_table.replace_schema_metadata(meta))
    table = pa.table({"clip_id": pa.array(groups.ids, pa.string()), "group": pa.array(groups.group, pa.int64()),
                      signature.COLUMN: pa.array(groups.signatures, pa.binary())})
    write_parquet_atomic(cache, table.replace_schema_metadata({**meta, "embedding": s["embedding"]}))
    return groups


# ---- which clip of a group is kept --------------------------------------------------------------

def choose(groups: Groups, priority: dict[str, tuple]) -> dict[str, tuple[str, float]]:
    """{duplicate clip_id: (kept clip_id, match score)} (see the module docstring).

    `priority[clip_id]` sorts ascending, best first (clips absent from it go last).
    """
    out: dict[str, tuple[str, float]] = {}
    order = np.argsort(groups.group, kind="stable")
    bounds = np.flatnonzero(np.diff(groups.group[order])) + 1
    worst = (math.inf,)
    for members in np.split(order, bounds):
        members = sorted(members, key=lambda i: (priority.get(groups.ids[i], worst), groups.ids[i]))
        leaders: list[int] = []
        for i in members:
            found = [(m[0], k) for k in leaders if (m := groups.score(i, k)) is not None]
            if found:
                score, k = max(found, key=lambda f: (f[0], -f[1]))
                if score >= groups.min_match:
                    out[groups.ids[i]] = (groups.ids[k], float(score))
                    continue
            leaders.append(i)
    return out


def priority_of(row_keep: bool, values: list[float], clip_id: str) -> tuple:
    """Sort key of one clip: passing the rules first, then each keep_by value highest first
    (missing last), then clip_id."""
    return (0 if row_keep else 1, *[math.inf if v is None or math.isnan(v) else -v for v in values], clip_id)


def record(store: OutputStore, groups: Groups, decisions: dict[str, tuple[str, float]],
           opts: dict[str, Any]) -> dict[str, Any]:
    """Write dedup/duplicates.parquet (one row per duplicate) and dedup/dedup.json; return the latter."""
    group_of = dict(zip(groups.ids, groups.group.tolist()))
    row = {c: i for i, c in enumerate(groups.ids)}
    dups = sorted(decisions)

    def shift(dup: str) -> float:  # the kept clip's time against the duplicate's, in seconds
        i, k = row[dup], row[decisions[dup][0]]
        value = groups.score(i, k)[1]
        return value if k > i else -value

    table = pa.table({
        "clip_id": pa.array(dups, pa.string()),
        "duplicate_of": pa.array([decisions[c][0] for c in dups], pa.string()),
        "similarity": pa.array([decisions[c][1] for c in dups], pa.float64()),
        "shift_s": pa.array([shift(c) for c in dups], pa.float64()),
        "group": pa.array([group_of[c] for c in dups], pa.int64()),
    })
    write_parquet_atomic(store.root / "dedup" / "duplicates.parquet", table)
    s = settings(groups.embedding, opts)
    summary = {
        "embedding": groups.embedding, "eps": groups.eps, "min_cosine": 1.0 - groups.eps,
        "min_match": groups.min_match, "max_shift_s": s["max_shift_s"],
        "keep_by": list(opts.get("keep_by") or []), "bucket_size": s["bucket_size"],
        "clips_embedded": groups.clips_embedded, "clips_in_groups": len(groups.ids),
        "candidate_pairs_matched": len(groups.pairs), "without_signature": groups.without_signature,
        "groups": int(np.unique(groups.group).size), "duplicates": len(dups),
    }
    write_json(store.root / "dedup" / "dedup.json", summary)
    return summary


def decide(store: OutputStore, ledger: Ledger, opts: dict[str, Any] | None, effective: list[dict],
           score_files: list[Any]) -> tuple[dict[str, tuple[str, float]], dict[str, Any] | None]:
    """({duplicate clip_id: (kept clip_id, match score)}, dedup.json's content) under `opts`
    (the config's dedup section) and the rules `effective` (absolute min/max per filter step):
    a grouped clip's priority is its keep under those rules, then its keep_by values. With no
    dedup section, an earlier pass's record is cleared and there are no decisions."""
    if opts is None:
        for name in ("dedup.json", "duplicates.parquet"):
            (store.root / "dedup" / name).unlink(missing_ok=True)
        return {}, None
    from stages.rules import evaluate_rows

    started = time.monotonic()
    groups = run_groups(store, ledger, opts)
    grouped = pa.array(groups.ids, pa.string())
    keep_by = list(opts.get("keep_by") or [])
    ruled = sorted({c for rules in effective for c in rules})
    priority: dict[str, tuple] = {}
    wanted = sorted(set(["clip_id", "split_error", "start_frame"] + ruled + keep_by))
    for table in columns.scan(score_files, wanted) if len(grouped) else ():
        hit = pc.is_in(table.column("clip_id"), value_set=grouped)
        if not pc.any(hit).as_py():
            continue
        sub = table.filter(hit)
        keep, _ = evaluate_rows(~columns.is_clip(sub), {c: columns.floats(sub, c) for c in ruled}, effective)
        values = [columns.floats(sub, c) for c in keep_by]
        for k, cid in enumerate(sub.column("clip_id").to_pylist()):
            priority[cid] = priority_of(keep[k], [None if math.isnan(v[k]) else float(v[k]) for v in values], cid)
    decisions = choose(groups, priority)
    summary = record(store, groups, decisions, opts)
    remove_stale_caches(store, payload_files(ledger))
    log.info("dedup: %d duplicates in %d groups (%s candidates at cosine >= %.3g, matching in time "
             "at >= %.3g) among %d clips, %.1fs", summary["duplicates"], summary["groups"], groups.embedding,
             1 - groups.eps, groups.min_match, groups.clips_embedded, time.monotonic() - started)
    return decisions, summary
