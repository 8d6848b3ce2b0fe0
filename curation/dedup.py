"""Near-duplicate removal over a whole run: embeddings, groups, and which clip of a group is kept.

Re-uploads are everywhere in web video: the same footage re-encoded, resized, cropped a little
or started a second later. This module finds such clips across every committed unit and keeps
one of each group; `curation.finalize.apply_rules` applies the decisions with the filter rules
(at the end of `curate run`, in `curate refilter` and in `curate dedup`), so they are written
to scores/ and shards/ by the same crash-safe pass.

Embeddings (one unit vector per clip):
- `image_embedding`: the aesthetics stage's CLIP vector (mean over the keyframes), read from
  clips/ (or the unit's shards when clips/ is not stored);
- `perceptual` (no weights): per keyframe, the 8x8 lowest 2-D DCT coefficients of a 32x32 grey
  thumbnail (DC left out; layout, robust to re-encoding and resizing), the Cr/Cb planes at 4x4
  (where the colours are) and a 12 hue x 4 saturation histogram (colour content, blind to
  crops and motion), each part normalised; the clip's vector is the normalised mean over its
  first/middle/last keyframes. The mean, not the concatenation: a clip of a re-upload started
  later has other first and middle keyframes (the last one, at the same cut, is the same), and
  the mean changes less than the concatenation. Computed once per unit and cached in
  dedup/perceptual/<unit>.parquet (float16).
- `auto`: image_embedding when the run has any, else perceptual. Clips without a vector (a
  failed aesthetics stage, no keyframes) are never grouped.

Groups (`near_duplicate_pairs`, scaling to 1M clips): spherical k-means on a sample gives
about n / bucket_size centroids; every clip goes to its nearest centroid and also to its
second nearest when that is within `margin` of the first (pairs near a bucket boundary are
then still compared); a bucket larger than 4 x bucket_size is split again by k-means; within
each bucket all pairs are compared by cosine, block by block. Two such bucketings (k-means
from other seeds) are unioned, so a pair split by one's boundaries is usually found by the
other (bench/dedup_bench.py measures how often). Pairs with cosine >= 1 - eps join connected
components (union-find). Memory: the n x d float16 vectors plus a block of 2048 x 8192 cosines.
Runs of n <= 4 x bucket_size are compared exhaustively.

Decisions (`choose`): within a component, clips are taken in priority order (passing the
other rules first, then `keep_by` columns, highest first, missing last, then clip_id); a clip
within 1 - eps of a clip already kept is a duplicate of the most similar one, else it is kept.
So every duplicate has cosine >= 1 - eps with the clip it names (chains A~B~C do not reject C
when C is not itself close to A), a clip that failed other rules is never kept over a
duplicate that passed, and decisions change with the rules without recomputing the groups.
A duplicate gets the reject reason "duplicate_of:<clip_id>" (after its rules' reasons); its
cosine and group go to dedup/duplicates.parquet, counts and settings to dedup/dedup.json.
The groups are cached in dedup/groups.parquet, keyed by the embedding, eps, bucket size and
the committed units, so a refilter with new rules reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.writer import OutputStore, write_json, write_parquet_atomic

log = logging.getLogger(__name__)

PERCEPTUAL_VERSION = "dct8-crcb4-hs12x4-v1"
# Defaults of eps per embedding: perceptual measured on generated re-uploads (README), CLIP's
# the usual near-duplicate cut for normalised CLIP image vectors.
DEFAULT_EPS = {"perceptual": 0.2, "image_embedding": 0.05}
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


# ---- reading embeddings, unit by unit ----------------------------------------------------------

def _payload_source(store: OutputStore, unit_id: str, entry: dict[str, Any]) -> list[Path]:
    clips = store.clips_dir / (entry.get("clips_file") or f"{unit_id}.parquet")
    if clips.exists():
        return [clips]
    return [store.shards_dir / n for n in entry.get("shard_files", []) if (store.shards_dir / n).exists()]


def _read_column(paths: list[Path], column: str):
    """(clip_id, value) per row of `paths`, one row group at a time."""
    for path in paths:
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["clip_id", column])
            yield from zip(t.column("clip_id").to_pylist(), t.column(column).to_pylist())


def _perceptual_unit(store: OutputStore, unit_id: str, entry: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """A unit's perceptual vectors, from its cache file when that matches the committed unit."""
    cache = store.root / "dedup" / "perceptual" / f"{unit_id}.parquet"
    stamp = f"{PERCEPTUAL_VERSION}:{entry.get('committed_at')}"
    if cache.exists():
        t = pq.read_table(cache)
        if (t.schema.metadata or {}).get(b"stamp") == stamp.encode():
            vecs = np.frombuffer(b"".join(t.column("vector").to_pylist()), np.float16)
            return t.column("clip_id").to_pylist(), vecs.reshape(t.num_rows, -1)
    ids, vecs = [], []
    for cid, frames in _read_column(_payload_source(store, unit_id, entry), "keyframes"):
        v = perceptual_embedding(frames)
        if v is not None:
            ids.append(cid)
            vecs.append(v.astype(np.float16))
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"clip_id": pa.array(ids, pa.string()),
                      "vector": pa.array([v.tobytes() for v in vecs], pa.binary())})
    write_parquet_atomic(cache, table.replace_schema_metadata({"stamp": stamp}))
    return ids, np.stack(vecs) if vecs else np.zeros((0, 143), np.float16)


def _clip_unit(store: OutputStore, unit_id: str, entry: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    ids, vecs = [], []
    for cid, v in _read_column(_payload_source(store, unit_id, entry), "image_embedding"):
        if v:
            ids.append(cid)
            vecs.append(_unit(np.asarray(v, np.float32)).astype(np.float16))
    return ids, np.stack(vecs) if vecs else np.zeros((0, 0), np.float16)


def has_image_embeddings(store: OutputStore, ledger: dict[str, dict[str, Any]]) -> bool:
    """True when some clip of the run has an image_embedding (the aesthetics stage ran)."""
    for unit_id, entry in ledger.items():
        for path in _payload_source(store, unit_id, entry):
            col = pq.read_table(path, columns=["image_embedding"]).column("image_embedding")
            if col.null_count < len(col):
                return True
    return False


def resolve_embedding(kind: str, store: OutputStore, ledger: dict[str, dict[str, Any]]) -> str:
    if kind != "auto":
        return kind
    return "image_embedding" if has_image_embeddings(store, ledger) else "perceptual"


def collect_embeddings(store: OutputStore, ledger: dict[str, dict[str, Any]],
                       kind: str) -> tuple[list[str], np.ndarray]:
    """(clip_ids, (n, d) float16 unit vectors) of every committed clip that has one."""
    read = _perceptual_unit if kind == "perceptual" else _clip_unit
    ids: list[str] = []
    parts: list[np.ndarray] = []
    started = last = time.monotonic()
    for k, (unit_id, entry) in enumerate(ledger.items()):
        unit_ids, vecs = read(store, unit_id, entry)
        ids += unit_ids
        if len(unit_ids):
            parts.append(vecs)
        if time.monotonic() - last > 10 or k + 1 == len(ledger):
            last = time.monotonic()
            log.info("dedup: %s vectors of %d/%d units (%d clips), %.0fs", kind, k + 1, len(ledger),
                     len(ids), last - started)
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"dedup: {kind} vectors of different sizes {sorted(dims)} in one run")
    return ids, np.concatenate(parts) if parts else np.zeros((0, 1), np.float16)


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


def _pairs_in(x: np.ndarray, members: np.ndarray, threshold: float, uf: UnionFind) -> int:
    """Union every pair of `members` with cosine >= threshold; returns the pairs compared."""
    members = np.unique(members)
    vecs = x[members].astype(np.float32)
    for s in range(0, members.size, BLOCK_ROWS):
        for t in range(s, members.size, BLOCK_COLS):  # this block against itself and the rest
            c = vecs[s:s + BLOCK_ROWS] @ vecs[t:t + BLOCK_COLS].T  # at most 2048 x 8192 cosines
            rows, cols = np.nonzero(c >= threshold)
            later = t + cols > s + rows
            uf.union_many(members[s + rows[later]], members[t + cols[later]])
    return members.size * (members.size - 1) // 2


def near_duplicate_components(x: np.ndarray, eps: float, bucket_size: int = 1000, margin: float = 0.1,
                              rounds: int = 2, seed: int = 0) -> np.ndarray:
    """A component label per row of x (unit vectors): rows joined by cosine >= 1 - eps pairs.

    `rounds` independent bucketings (k-means from other seeds) are unioned: a pair split by
    one round's boundaries is found by another. Returns int64 labels (the smallest row index
    of the component); singletons label themselves.
    """
    n = x.shape[0]
    uf = UnionFind(n)
    threshold = 1.0 - eps
    exhaustive = n <= 4 * bucket_size
    todo = [(np.arange(n), 0, seed + 101 * r) for r in range(1 if exhaustive else rounds)]
    compared = done = 0
    started = last = time.monotonic()
    while todo:
        members, depth, s = todo.pop()
        if members.size <= 4 * bucket_size or depth >= MAX_DEPTH:
            compared += _pairs_in(x, members, threshold, uf)
            done += members.size
        else:
            todo += [(b, depth + 1, s + 1) for b in buckets(x, members, bucket_size, margin, s)]
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("dedup: grouping, %d clip slots in finished buckets of %d clips, %.0fs",
                     done, n, last - started)
    labels = uf.roots(np.arange(n)).astype(np.int64)
    log.info("dedup: %d clips, %d pairs compared, %d in groups, %.1fs", n, compared,
             int((np.bincount(labels, minlength=n)[labels] > 1).sum()), time.monotonic() - started)
    return labels


# ---- groups of a run, cached -------------------------------------------------------------------

@dataclass
class Groups:
    """The clips in near-duplicate components of two or more clips."""

    embedding: str
    eps: float
    clips_embedded: int
    ids: list[str]
    group: np.ndarray  # (m,) component label
    vectors: np.ndarray  # (m, d) float16 unit vectors


def _groups_key(kind: str, eps: float, bucket_size: int, ledger: dict[str, dict[str, Any]]) -> str:
    units = [(u, e.get("committed_at"), e.get("clips_file")) for u, e in sorted(ledger.items())]
    key = json.dumps([PERCEPTUAL_VERSION, kind, eps, bucket_size, units], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def run_groups(store: OutputStore, ledger: dict[str, dict[str, Any]], opts: dict[str, Any]) -> Groups:
    """The run's near-duplicate groups under `opts` (the config's dedup section), from
    dedup/groups.parquet when it was computed for the same settings and committed units."""
    kind = resolve_embedding(opts.get("embedding", "auto"), store, ledger)
    eps = float(opts.get("eps") or DEFAULT_EPS[kind])
    bucket_size = int(opts.get("bucket_size", 1000))
    key = _groups_key(kind, eps, bucket_size, ledger)
    cache = store.root / "dedup" / "groups.parquet"
    if cache.exists():
        t = pq.read_table(cache)
        meta = t.schema.metadata or {}
        if meta.get(b"key") == key.encode():
            vecs = np.frombuffer(b"".join(t.column("vector").to_pylist()), np.float16).reshape(t.num_rows, -1)
            log.info("dedup: groups of %s (eps %g) reused from %s", kind, eps, cache)
            return Groups(kind, eps, int(meta[b"clips_embedded"]), t.column("clip_id").to_pylist(),
                          t.column("group").to_numpy(), vecs)
    ids, x = collect_embeddings(store, ledger, kind)
    labels = near_duplicate_components(x, eps, bucket_size) if len(ids) else np.zeros(0, np.int64)
    grouped = np.flatnonzero(np.bincount(labels, minlength=len(ids))[labels] > 1) if len(ids) else labels
    groups = Groups(kind, eps, len(ids), [ids[i] for i in grouped], labels[grouped], x[grouped])
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"clip_id": pa.array(groups.ids, pa.string()), "group": pa.array(groups.group, pa.int64()),
                      "vector": pa.array([v.tobytes() for v in groups.vectors], pa.binary())})
    write_parquet_atomic(cache, table.replace_schema_metadata(
        {"key": key, "embedding": kind, "eps": str(eps), "clips_embedded": str(len(ids))}))
    return groups


# ---- which clip of a group is kept --------------------------------------------------------------

def choose(groups: Groups, priority: dict[str, tuple]) -> dict[str, tuple[str, float]]:
    """{duplicate clip_id: (kept clip_id, cosine)} (see the module docstring).

    `priority[clip_id]` sorts ascending, best first (clips absent from it go last).
    """
    threshold = 1.0 - groups.eps
    out: dict[str, tuple[str, float]] = {}
    order = np.argsort(groups.group, kind="stable")
    bounds = np.flatnonzero(np.diff(groups.group[order])) + 1
    worst = (math.inf,)
    for members in np.split(order, bounds):
        members = sorted(members, key=lambda i: (priority.get(groups.ids[i], worst), groups.ids[i]))
        leaders: list[int] = []
        for i in members:
            if leaders:
                sims = groups.vectors[leaders].astype(np.float32) @ groups.vectors[i].astype(np.float32)
                best = int(np.argmax(sims))
                if sims[best] >= threshold:
                    out[groups.ids[i]] = (groups.ids[leaders[best]], float(sims[best]))
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
    dups = sorted(decisions)
    table = pa.table({
        "clip_id": pa.array(dups, pa.string()),
        "duplicate_of": pa.array([decisions[c][0] for c in dups], pa.string()),
        "similarity": pa.array([decisions[c][1] for c in dups], pa.float64()),
        "group": pa.array([group_of[c] for c in dups], pa.int64()),
    })
    write_parquet_atomic(store.root / "dedup" / "duplicates.parquet", table)
    summary = {
        "embedding": groups.embedding, "eps": groups.eps, "min_cosine": 1.0 - groups.eps,
        "keep_by": list(opts.get("keep_by") or []), "bucket_size": int(opts.get("bucket_size", 1000)),
        "clips_embedded": groups.clips_embedded, "clips_in_groups": len(groups.ids),
        "groups": int(np.unique(groups.group).size), "duplicates": len(dups),
    }
    write_json(store.root / "dedup" / "dedup.json", summary)
    return summary


def apply_to_plans(store: OutputStore, ledger: dict[str, dict[str, Any]], opts: dict[str, Any] | None,
                   tables: dict[str, pa.Table], plans: dict[str, tuple[list[bool], list[list[str]]]]
                   ) -> dict[str, Any] | None:
    """Reject the duplicates in `plans` ({unit: (keep, reasons)} under the rules, changed in
    place) and record them; with no dedup section, clear an earlier pass's record. Returns
    dedup.json's content (None without dedup)."""
    if opts is None:
        for name in ("dedup.json", "duplicates.parquet"):
            (store.root / "dedup" / name).unlink(missing_ok=True)
        return None
    started = time.monotonic()
    groups = run_groups(store, ledger, opts)
    grouped = set(groups.ids)
    keep_by = list(opts.get("keep_by") or [])
    priority: dict[str, tuple] = {}
    for unit_id, table in tables.items():
        ids = table.column("clip_id").to_pylist()
        rows = [i for i, cid in enumerate(ids) if cid in grouped]
        if not rows:
            continue
        sub = table.take(pa.array(rows, pa.int64()))
        values = [sub.column(c).to_pylist() if c in sub.column_names else [None] * len(rows) for c in keep_by]
        for k, i in enumerate(rows):
            priority[ids[i]] = priority_of(plans[unit_id][0][i], [float(v[k]) if v[k] is not None else None
                                                                 for v in values], ids[i])
    decisions = choose(groups, priority)
    for unit_id, table in tables.items():
        keep, reasons = plans[unit_id]
        for i, cid in enumerate(table.column("clip_id").to_pylist()):
            if cid in decisions:
                keep[i] = False
                reasons[i] = reasons[i] + [REASON_PREFIX + decisions[cid][0]]
    summary = record(store, groups, decisions, opts)
    log.info("dedup: %d duplicates in %d groups (%s, cosine >= %.3g) among %d clips, %.1fs",
             summary["duplicates"], summary["groups"], groups.embedding, 1 - groups.eps,
             groups.clips_embedded, time.monotonic() - started)
    return summary
