"""Near-duplicate removal over a whole run: candidates by vector, duplicates by their time course.

Re-uploads are everywhere in web video: the same footage re-encoded, resized, cropped a little
or started a second later, and the very same file posted again and again. A re-upload is the
same footage over the same time, not the same scene: two 10 s chunks of one static camera share
their layout and colours, but not the people walking through. So this module decides in two
steps, across every committed unit, and keeps one clip of each group;
`curation.finalize.apply_rules` applies the decisions with the filter rules (at the end of
`curate run`, in `curate refilter` and in `curate dedup`), so they are written to scores/ and
shards/ by the same crash-safe pass.

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

How, at 10^7 clips and in memory bounded by `memory_mb` (curation/dedup_index.py): the vectors,
clip ids and signatures go to files in a temporary folder, read a block or a set of rows at a
time; exact copies (the same float16 vector and the same signature: one file posted again) are
one class, of which one clip is searched and verified, so a corpus of a hundred copies of every
clip costs what its distinct clips cost; the candidates come from the leaves of a tree of
k-means buckets (spherical k-means fitted on a sample; a clip also joins its second-nearest
bucket when that centroid is within `margin` of its nearest; a bucket over 4 x bucket_size is
split again; two trees from other seeds are unioned), each clip taking its CANDIDATES_PER_CLIP
most similar partners of a bucket; pairs are verified in blocks over a process per CPU; groups
are the connected components of the matching pairs. bench/dedup_bench.py measures recall,
time and memory.

Decisions (`choose`): within a group, clips are taken in priority order (passing the other
rules first, then `keep_by` columns, highest first, missing last, then clip_id); a clip that
matches a clip already kept is a duplicate of the best-matching one, else it is kept. So every
duplicate matches the clip it names (chains A~B~C do not reject C when C does not itself match
A), a clip that failed other rules is never kept over a duplicate that passed, and decisions
change with the rules without recomputing the groups. A duplicate gets the reject reason
"duplicate_of:<clip_id>" (after its rules' reasons); its match score, shift and group go to
dedup/duplicates.parquet (in the order of scores/), counts and settings to dedup/dedup.json.
The groups cache (dedup/groups.parquet: every grouped clip, its group and its class of copies;
pairs.parquet: the matching pairs of distinct clips; classes.parquet: each grouped class's
self-match and signature; groups.json, written last: the key) is keyed by the embedding, the
settings and the committed units (not the files that hold them: a compaction keeps them), so a
refilter with new rules reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import columns, dedup_index, outdir
from curation.dedup_index import (
    KEY,
    Budget,
    BytesFile,
    Corpus,
    Matching,
    Prioritised,
    Progress,
    RowFile,
    Search,
    Workdir,
    Writers,
    choose_group,
    find_groups,
    row_keys,
)
from curation.ledger import Ledger
from curation.writer import OutputError, OutputStore, write_json, write_parquet_atomic
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
REASON_PREFIX = "duplicate_of:"
DEFAULT_MEMORY_MB = dedup_index.DEFAULT_MEMORY_MB
# Temporary files per clip besides its vector: key, id, row, labels, flags (dedup_index); with
# the vector, what the disk check before a pass asks for.
SPILL_BYTES_PER_CLIP = 160


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
    """The run's clips with a vector, as rows in the temporary folder (dedup_index's Corpus),
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
    """dedup_index's Corpus.fetch: the signatures of ascending rows, read file by file and a row
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


# ---- grouping in memory (small inputs, the benches and tests of the search) -------------------

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


def _search_in_memory(x: np.ndarray, eps: float, bucket_size: int, margin: float, rounds: int, seed: int,
                      top_k: int | None, sink) -> None:
    """dedup_index.candidate_search over the rows of x (an array in memory), every row searched."""
    with Workdir() as work:
        budget = Budget()
        vectors = RowFile(work / "vectors", np.dtype((np.float16, (x.shape[1],))), 0, budget)
        vectors.append(x.astype(np.float16))
        rows = RowFile(work / "rows", np.int64, 0, budget)
        rows.append(np.arange(x.shape[0]))
        dedup_index.candidate_search(vectors, rows, Search(eps, bucket_size, margin, rounds, seed, top_k), work,
                                     budget, sink)


def near_duplicate_components(x: np.ndarray, eps: float, bucket_size: int = 1000, margin: float = 0.1,
                              rounds: int = 2, seed: int = 0) -> np.ndarray:
    """A component label per row of x (unit vectors): rows joined by cosine >= 1 - eps pairs
    found in shared buckets. Returns int64 labels (the smallest row index of the component);
    singletons label themselves."""
    n = x.shape[0]
    uf = UnionFind(n)
    _search_in_memory(x, eps, bucket_size, margin, rounds, seed, None, uf.union_many)
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
    _search_in_memory(x, eps, bucket_size, margin, rounds, seed, top_k,
                      lambda a, b: keys.append(a.astype(np.int64) * n + b.astype(np.int64)))
    k = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return k // n, k % n


# ---- which clip of a group is kept (in memory: the rule) --------------------------------------

@dataclass
class Groups:
    """Clips in near-duplicate groups and their matching pairs, in memory: the rule of `choose`
    on small inputs (the run's groups are in the groups cache, dedup_index.choose_duplicates)."""

    embedding: str
    eps: float  # candidates: vector cosine >= 1 - eps
    min_match: float  # duplicates: temporal match score >= min_match
    clips_embedded: int
    ids: list[str]
    group: np.ndarray  # (m,) component label
    pairs: dict[tuple[int, int], tuple[float, float]]  # (i, j), i < j rows of ids: (score, shift s)
    without_signature: int = 0
    # Per row of ids, for the pairs `choose` needs that were not candidates: matched when
    # needed, kept apart from the verified `pairs` in `matched_later`.
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


def choose(groups: Groups, priority: dict[str, tuple]) -> dict[str, tuple[str, float]]:
    """{duplicate clip_id: (kept clip_id, match score)} (see the module docstring).

    `priority[clip_id]` sorts ascending, best first (clips absent from it go last).
    """
    out: dict[str, tuple[str, float]] = {}
    order = np.argsort(groups.group, kind="stable")
    bounds = np.flatnonzero(np.diff(groups.group[order])) + 1
    worst = (math.inf,)
    for members in np.split(order, bounds):
        members = sorted(members.tolist(), key=lambda i: (priority.get(groups.ids[i], worst), groups.ids[i]))
        for i, k, score in choose_group(members, lambda i: i, groups.score, groups.min_match):
            out[groups.ids[i]] = (groups.ids[k], score)
    return out


def priority_of(row_keep: bool, values: list[float], clip_id: str) -> tuple:
    """Sort key of one clip: passing the rules first, then each keep_by value highest first
    (missing last), then clip_id."""
    return (0 if row_keep else 1, *[math.inf if v is None or math.isnan(v) else -v for v in values], clip_id)


# ---- the run's groups, cached ------------------------------------------------------------------

def _groups_key(opts: tuple, ledger: Ledger) -> str:
    key = json.dumps([PERCEPTUAL_VERSION, signature.SIGNATURE_VERSION, dedup_index.ENGINE_VERSION, *opts,
                      ledger.fingerprint()], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def settings(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The dedup section's values with their defaults filled in (for the resolved embedding)."""
    return {"embedding": kind, "eps": float(opts.get("eps") or DEFAULT_EPS[kind]),
            "min_match": float(opts.get("min_match") or DEFAULT_MIN_MATCH),
            "max_shift_s": float(opts["max_shift_s"] if opts.get("max_shift_s") is not None
                                 else DEFAULT_MAX_SHIFT_S),
            "bucket_size": int(opts.get("bucket_size", 1000)),
            "memory_mb": float(opts.get("memory_mb") or DEFAULT_MEMORY_MB)}


class GroupsCache:
    """dedup/groups.parquet, pairs.parquet and classes.parquet (dedup_index.find_groups' tables)
    and groups.json, written last: their key and counts."""

    NAMES = ("groups", "pairs", "classes")

    def __init__(self, store: OutputStore):
        self.folder = store.root / "dedup"
        self.record = self.folder / "groups.json"

    def path(self, name: str) -> Any:
        return self.folder / f"{name}.parquet"

    def read(self, key: str) -> dict[str, Any] | None:
        """groups.json's content when it holds `key` and every table is there."""
        if not self.record.exists():
            return None
        meta = json.loads(self.record.read_text())
        if meta.get("key") != key or not all(self.path(n).exists() for n in self.NAMES):
            return None
        return meta

    @contextlib.contextmanager
    def writers(self) -> Iterator[Writers]:
        """Writers of the three tables (staged; each in place when the block ends without error)."""
        self.record.unlink(missing_ok=True)  # the tables change: the key goes first
        self.folder.mkdir(parents=True, exist_ok=True)
        schemas = {"groups": dedup_index.GROUPS_SCHEMA, "pairs": dedup_index.PAIRS_SCHEMA,
                   "classes": dedup_index.CLASSES_SCHEMA}
        with contextlib.ExitStack() as stack:
            files = {n: pq.ParquetWriter(stack.enter_context(outdir.staged_file(self.path(n))), schemas[n],
                                         compression="zstd") for n in self.NAMES}
            try:
                yield Writers(*(files[n].write_table for n in self.NAMES))
            finally:
                for f in files.values():
                    f.close()

    def tables(self, name: str, columns_: list[str] | None = None) -> Iterator[pa.Table]:
        """A table's row groups, in order."""
        f = outdir.parquet_file(self.path(name))
        for g in range(f.num_row_groups):
            yield f.read_row_group(g, columns=columns_)


def run_groups(store: OutputStore, ledger: Ledger, opts: dict[str, Any]) -> tuple[GroupsCache, dict[str, Any]]:
    """The run's near-duplicate groups under `opts` (the config's dedup section): the groups
    cache and its record, reused when computed for the same settings and units, else computed
    by dedup_index.find_groups over the clips' vectors and signatures."""
    files = payload_files(ledger)
    s = settings(resolve_embedding(opts.get("embedding", "auto"), files), opts)
    key = _groups_key((s["embedding"], s["eps"], s["bucket_size"], s["min_match"], s["max_shift_s"]), ledger)
    cache = GroupsCache(store)
    meta = cache.read(key)
    if meta is not None:
        log.info("dedup: groups of %s (eps %g, match %g) reused from %s", s["embedding"], s["eps"],
                 s["min_match"], cache.folder)
        return cache, meta
    budget = Budget(s["memory_mb"])
    dims = 512 if s["embedding"] == "image_embedding" else 143
    need = int(ledger.totals().get("clips", 0)) * (2 * dims + SPILL_BYTES_PER_CLIP)
    with Workdir(need_bytes=need) as work:
        collected = collect(store, files, s["embedding"], work, budget)
        corpus = Corpus(collected.vectors, collected.keys, signature_fetch(store, collected), clip_ids(collected))
        with cache.writers() as out:
            stats = find_groups(corpus, Search(s["eps"], s["bucket_size"], top_k=CANDIDATES_PER_CLIP),
                                Matching(s["min_match"], s["max_shift_s"]), work, budget, out)
    meta = {"key": key, "embedding": s["embedding"], "eps": s["eps"], "min_match": s["min_match"],
            "max_shift_s": s["max_shift_s"], "rows": stats.clips_embedded,
            **{k: getattr(stats, k) for k in ("clips_embedded", "distinct", "copy_classes", "candidate_pairs",
                                               "verified", "edges", "without_signature", "clips_in_groups",
                                               "groups", "grouped_classes", "id_bytes", "signature_bytes")},
            "seconds": {k: round(v, 3) for k, v in stats.seconds.items()}}
    write_json(cache.record, meta)
    return cache, meta


# ---- the decisions ------------------------------------------------------------------------------

def prioritised(cache: GroupsCache, score_files: list[Any], effective: list[dict],
                keep_by: list[str]) -> Iterator[Prioritised]:
    """The groups table with each clip's keep under the rules `effective` and its keep_by values,
    read alongside scores/: the grouped clips come in the order of scores/ (the payload's order,
    which finalize's pass checks), so each scores row group holds the next ones."""
    from stages.rules import evaluate_rows

    ruled = sorted({c for rules in effective for c in rules})
    wanted = sorted(set(["clip_id", "split_error", "start_frame"] + ruled + keep_by))
    pending = _Ahead(cache.tables("groups"))
    for table in columns.scan(score_files, wanted):
        window = pending.peek(table.num_rows)
        if window is None:
            break
        at = pc.index_in(window.column("clip_id"), value_set=table.column("clip_id"))
        found = at.is_valid().to_numpy(zero_copy_only=False)
        count = int(np.argmin(found)) if not found.all() else found.size
        if found[count:].any() or not _ascending(at.slice(0, count)):
            raise OutputError("dedup: the grouped clips are not in the order of scores/ (or a grouped clip is not "
                              "in scores/): the output is damaged, or the groups cache is stale; remove "
                              "OUT_DIR/dedup/groups.json and run again")
        if not count:
            continue
        sub = table.take(at.slice(0, count))
        keep, _ = evaluate_rows(~columns.is_clip(sub), {c: columns.floats(sub, c) for c in ruled}, effective)
        values = np.stack([columns.floats(sub, c) for c in keep_by], axis=1) if keep_by else np.zeros((count, 0))
        yield Prioritised(window.slice(0, count), np.asarray(keep, bool), values)
        pending.advance(count)
    if pending.peek(1) is not None:
        raise OutputError("dedup: grouped clips missing from scores/; remove OUT_DIR/dedup/groups.json and run again")


def _ascending(positions: pa.Array) -> bool:
    p = positions.to_numpy(zero_copy_only=False)
    return bool((np.diff(p) > 0).all())


class _Ahead:
    """Rows of a stream of tables, looked at ahead (`peek(n)`: the next n or fewer) and consumed."""

    def __init__(self, tables: Iterator[pa.Table]):
        self.tables = tables
        self.held: pa.Table | None = None

    def peek(self, n: int) -> pa.Table | None:
        while self.held is None or self.held.num_rows < n:
            nxt = next(self.tables, None)
            if nxt is None:
                break
            self.held = nxt if self.held is None else pa.concat_tables([self.held, nxt]).combine_chunks()
        if self.held is None or self.held.num_rows == 0:
            return None
        return self.held.slice(0, n)

    def advance(self, n: int) -> None:
        self.held = self.held.slice(n)


class Decisions(Mapping):
    """{duplicate clip_id: (kept clip_id, match score)} in dedup/duplicates.parquet, which is in
    the order of scores/. `lookup(clip_ids)` takes scores' clip ids in that order (as the rules
    pass streams them) and reads the file alongside: memory of a row group. The Mapping methods
    read the whole file into a dict (small outputs)."""

    def __init__(self, path: Any, count: int):
        self.path, self.count = path, count
        self._ahead: _Ahead | None = None
        self._dict: dict[str, tuple[str, float]] | None = None

    def __len__(self) -> int:
        return self.count

    def lookup(self, clip_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str | None]]:
        """(duplicate or not, the kept clip's id) per clip id; ids come in the order of scores/."""
        if self._ahead is None:
            f = outdir.parquet_file(self.path)
            self._ahead = _Ahead(f.read_row_group(g, columns=["clip_id", "duplicate_of"])
                                 for g in range(f.num_row_groups))
        hit = np.zeros(len(clip_ids), bool)
        kept: list[str | None] = [None] * len(clip_ids)
        window = self._ahead.peek(len(clip_ids))
        if window is None:
            return hit, kept
        at = pc.index_in(window.column("clip_id"), value_set=clip_ids)
        found = at.is_valid().to_numpy(zero_copy_only=False)
        count = int(np.argmin(found)) if not found.all() else found.size
        if found[count:].any() or not _ascending(at.slice(0, count)):
            raise OutputError("dedup: the duplicates are not in the order of scores/; the output is damaged")
        positions = at.slice(0, count).to_numpy(zero_copy_only=False)
        hit[positions] = True
        for p, k in zip(positions.tolist(), window.column("duplicate_of").slice(0, count).to_pylist()):
            kept[p] = k
        self._ahead.advance(count)
        return hit, kept

    def unmatched(self) -> int:
        """Duplicates `lookup` has not met (0 after a whole pass over scores/); consumes them."""
        if self._ahead is None:
            return self.count
        left = 0
        while (t := self._ahead.peek(65_536)) is not None:
            left += t.num_rows
            self._ahead.advance(t.num_rows)
        return left

    def _all(self) -> dict[str, tuple[str, float]]:
        if self._dict is None:
            t = outdir.read_table(self.path, columns=["clip_id", "duplicate_of", "similarity"])
            self._dict = {c: (k, s) for c, k, s in zip(*(t.column(n).to_pylist() for n in t.column_names))}
        return self._dict

    def __getitem__(self, clip_id: str) -> tuple[str, float]:
        return self._all()[clip_id]

    def __iter__(self):
        return iter(self._all())


def record(store: OutputStore, meta: dict[str, Any], chosen: dict[str, int], opts: dict[str, Any]) -> dict[str, Any]:
    """dedup/dedup.json: settings and counts of the pass; returned."""
    s = settings(meta["embedding"], opts)
    summary = {
        "embedding": meta["embedding"], "eps": meta["eps"], "min_cosine": 1.0 - meta["eps"],
        "min_match": meta["min_match"], "max_shift_s": meta["max_shift_s"],
        "keep_by": list(opts.get("keep_by") or []), "bucket_size": s["bucket_size"], "memory_mb": s["memory_mb"],
        "clips_embedded": meta["clips_embedded"], "distinct_clips": meta["distinct"],
        "classes_of_copies": meta["copy_classes"], "clips_in_groups": meta["clips_in_groups"],
        "candidate_pairs": meta["candidate_pairs"], "candidate_pairs_matched": meta["edges"],
        "without_signature": meta["without_signature"], "groups": meta["groups"], "duplicates": chosen["duplicates"],
    }
    write_json(store.root / "dedup" / "dedup.json", summary)
    return summary


def decide(store: OutputStore, ledger: Ledger, opts: dict[str, Any] | None, effective: list[dict],
           score_files: list[Any]) -> tuple[Decisions | dict, dict[str, Any] | None]:
    """(the duplicates: {duplicate clip_id: (kept clip_id, match score)} as a `Decisions`,
    dedup.json's content) under `opts` (the config's dedup section) and the rules `effective`
    (absolute min/max per filter step): a grouped clip's priority is its keep under those rules,
    then its keep_by values. With no dedup section, an earlier pass's record is cleared and
    there are no decisions."""
    if opts is None:
        for name in ("dedup.json", "duplicates.parquet"):
            (store.root / "dedup" / name).unlink(missing_ok=True)
        return {}, None
    progress = Progress("decisions")
    cache, meta = run_groups(store, ledger, opts)
    s = settings(meta["embedding"], opts)
    keep_by = list(opts.get("keep_by") or [])
    budget = Budget(s["memory_mb"])
    path = store.root / "dedup" / "duplicates.parquet"
    schema = pa.schema([("clip_id", pa.string()), ("duplicate_of", pa.string()), ("similarity", pa.float64()),
                        ("shift_s", pa.float64()), ("group", pa.int64())])
    with Workdir() as work, outdir.staged_file(path) as local:
        with pq.ParquetWriter(local, schema, compression="zstd") as writer:
            chosen = dedup_index.choose_duplicates(
                prioritised(cache, score_files, effective, keep_by), cache.tables("classes"), cache.tables("pairs"),
                meta, len(keep_by), Matching(meta["min_match"], meta["max_shift_s"]), work, budget,
                writer.write_table)
    summary = record(store, meta, chosen, opts)
    remove_stale_caches(store, payload_files(ledger))
    progress("%d duplicates in %d groups (%s candidates at cosine >= %.3g, matching in time at >= %.3g) among "
             "%d clips (%d distinct)", summary["duplicates"], summary["groups"], meta["embedding"], 1 - meta["eps"],
             meta["min_match"], meta["clips_embedded"], meta["distinct"], force=True)
    return Decisions(path, chosen["duplicates"]), summary
