"""Near-duplicate groups of a corpus larger than memory: the out-of-core engine of curation/dedup.py.

dedup.py says what is decided (candidates by vector cosine, duplicates by temporal signature,
groups as the connected components of matching pairs, the clip kept of a group by priority);
this module computes it for 10^7 clips and more in memory bounded by `memory_mb` (the
dedup.memory_mb setting) whatever the number of clips n, and in time linear in n however many
exact copies the corpus holds.

Rows. A clip is a row: its place among the clips that have a vector, in the order of the payload
files (the order of scores/). Everything kept per row lives in files of a temporary folder:
`RowFile` (fixed-width records, read and written a block or a set of rows at a time through a
mapping opened for that access only, so its pages leave the process after it) and `BytesFile`
(values of any length: clip ids, signatures). Work that needs rows together (the copies of a
clip, the members of a group) sorts records in partitions (`Parts`) of a quarter of memory_mb.

1. Exact copies (`exact_classes`). A clip whose float16 vector and temporal signature are byte
   for byte another's (the same file posted again: normal on the web, a hundred copies of a clip
   are common) is in that clip's class, found by a 128-bit key of both (`row_keys`). Only a
   class's first row, its representative, takes part in steps 2 and 3. The members of a class
   all match one another at the class's own score (its signature against itself, matched once)
   and match a member of another class at the score of the two classes' signatures, so every
   decision is the one the clips would get one by one, at the cost of the distinct clips.
2. Candidates (`candidate_search`). Buckets are the leaves of a tree: a cell of more than
   4 x bucket_size representatives is split by spherical k-means, fitted on
   KMEANS_POINTS_PER_CENTROID sampled rows per centroid, into at most FANOUT cells (a row also
   joins its second-nearest cell when that centroid is within `margin` of its nearest), the
   assignment streamed over the cell's rows into one file per child. In a leaf every row gets
   its top_k most similar partners at cosine >= 1 - eps (ties: the smaller row), in blocks of
   BLOCK_ROWS x BLOCK_COLS cosines. `rounds` trees from other seeds are unioned. A row costs
   FANOUT dot products per level (one level at 10^5 clips, two at 10^7) and a leaf's worth of
   cosines, so time per row barely grows with n.
3. Verification (`verify`). Candidate pairs are spilled and made unique per partition; those
   whose signatures match at >= min_match become edges. Signatures come from the caller's
   streamed fetch of the rows that need one (candidates, representatives of classes of two or
   more clips) into a spill read per block of pairs; blocks are matched over a process per CPU
   when there are many, a few blocks in flight.
4. Components (`components`): labels over the rows in edges, hooked along the edges and
   flattened by pointer jumping, a round per pass over the edges (about log n rounds): no
   union-find in memory. A class is in a group when its representative has an edge or its
   copies match one another.

`find_groups` runs 1-4 and writes dedup.py's groups cache (groups, pairs and classes tables, in
row order); `choose_duplicates` takes it with each grouped clip's priority, streamed in row order,
and writes the duplicates in row order, group by group in partitions (`choose_group`: the rule of
dedup.choose, in time linear in a group's clips when its copies form few classes).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages import signature

log = logging.getLogger("curation.dedup")

ENGINE_VERSION = "ooc-v1"  # part of dedup.py's cache key: the groups cache's format and the search's rule
PROGRESS_EVERY_S = 10.0
FAULT_AROUND_BYTES = 68 * 1024
GATHER_BYTES = 1 << 16  # values gathered from a read span at a time (their index: 8 bytes a byte)  # mapped per page fault of a file mapping: 64 kB around it, and its page
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 16
# Tree of buckets: a split costs each row FANOUT dot products; 64 keeps that a small share of a
# leaf's ~1000-4000 cosines and gives one level up to ~2.5 x 10^5 distinct clips (at
# bucket_size 1000), two up to ~1.6 x 10^7.
FANOUT = 64
MAX_DEPTH = 3  # a cell that k-means cannot split (thousands of nearly identical clips) is a leaf here
# k-means is fitted on this many sampled rows per centroid (plenty for cells of a few thousand
# rows each, and it keeps the fit a small cost next to the assignment of every row).
KMEANS_POINTS_PER_CENTROID = 64
KMEANS_ITERS = 8
# Cosine blocks of a leaf: rows x columns, with their int64 keys for the top-k choice about 80
# MB at once. Fixed (not from memory_mb): matrix products of other shapes may round differently,
# and the groups must not depend on the memory setting.
BLOCK_ROWS = 1024
BLOCK_COLS = 4096
LEAF_BLOCK = 2048  # rows and columns of a leaf's cosine blocks (16 MB of float32)
TRIANGLE_MAX = 16_384  # leaves up to this size compute each cosine once (leaf_pairs)
ASSIGN_ROWS = 4096  # rows assigned to centroids per product (fixed for the same reason)
# Candidate pairs per verification task: ~0.7 s of matching (a task's start-up is a few ms),
# with the signatures of its pairs (up to ~5 MB) in flight twice per worker.
VERIFY_BLOCK = 1024
ROW_OUT_BYTES = 256  # a row of an output table while built (its clip id a Python string)
PARALLEL_MIN_PAIRS = 20_000  # more than this: verified over a process per CPU


# ---- progress and memory ----------------------------------------------------------------------

class Progress:
    """Logs a long phase's progress at most every PROGRESS_EVERY_S (and when told to)."""

    def __init__(self, what: str):
        self.what = what
        self.started = self.last = time.monotonic()

    def __call__(self, fmt: str, *args: Any, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("dedup: %s: " + fmt + ", %.0fs", self.what, *args, now - self.started)

    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class Budget:
    """What memory_mb allows at once: a partition read back with what sorting it takes (a
    quarter: callers size partitions at four times their records' bytes), buffered partition
    writes (an eighth, shared by the few partitioned spills open at once: a thirty-second each),
    the pages of one mapped read or write (an eighth) and a streamed block (a sixteenth)."""

    memory_mb: float = DEFAULT_MEMORY_MB  # tests take fractions of a MB, to have many partitions

    @property
    def part_bytes(self) -> int:
        return max(1, int(self.memory_mb * 2**20 / 4))

    @property
    def buffer_bytes(self) -> int:
        return max(1, int(self.memory_mb * 2**20 / 32))

    def parts(self, total_bytes: float) -> int:
        """Partitions for records of about `total_bytes` in all."""
        return max(1, math.ceil(total_bytes / self.part_bytes))

    def block_rows(self, bytes_per_row: int) -> int:
        """Rows per streamed block when each costs `bytes_per_row` while processed (a sixteenth)."""
        return max(256, int(self.memory_mb * 2**20 / 16 / max(1, bytes_per_row)))

    def map_rows(self, itemsize: int) -> int:
        """Rows per mapping: a row read through a mapping brings the pages around it too (Linux
        maps up to fault_around_bytes, 64 kB, per fault: 7,600 scattered rows of a 2M-row file
        held 546 MB while mapped)."""
        return max(16, int(self.memory_mb * 2**20 / 8 / (FAULT_AROUND_BYTES + itemsize)))


# ---- per-row files -----------------------------------------------------------------------------

class RowFile:
    """Fixed-width records, one per row, in a file: appended in order or created with n zeroed
    records; read by blocks (plain reads) or by sets of rows (a mapping per `budget.map_rows`
    rows, closed after: its pages do not stay in the process)."""

    def __init__(self, path: Path, dtype: Any, n: int = 0, budget: Budget = Budget()):
        self.path, self.dtype, self.n, self.budget = Path(path), np.dtype(dtype), int(n), budget
        with open(self.path, "wb") as f:
            f.truncate(self.n * self.dtype.itemsize)  # a sparse file of zeros

    @classmethod
    def existing(cls, path: Path, dtype: Any, budget: Budget = Budget()) -> RowFile:
        self = cls.__new__(cls)
        self.path, self.dtype, self.budget = Path(path), np.dtype(dtype), budget
        self.n = self.path.stat().st_size // self.dtype.itemsize
        return self

    def __len__(self) -> int:
        return self.n

    def _empty(self, m: int) -> np.ndarray:
        return np.empty(m, self.dtype)

    def _records(self, values: np.ndarray) -> np.ndarray:
        """values as contiguous records (a dtype with a shape, like vectors, takes (m, d) arrays)."""
        if self.dtype.shape:
            return np.ascontiguousarray(values, self.dtype.base).reshape((-1,) + self.dtype.shape)
        return np.ascontiguousarray(values, self.dtype)

    def append(self, records: np.ndarray) -> None:
        records = self._records(records)
        with open(self.path, "ab") as f:
            f.write(records.tobytes())
        self.n += len(records)

    def read(self, start: int, stop: int) -> np.ndarray:
        count = max(0, min(stop, self.n) - start)
        with open(self.path, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            out = np.fromfile(f, self.dtype, count)
        return out

    def write(self, start: int, records: np.ndarray) -> None:
        """Overwrite rows start..start + len(records)."""
        records = self._records(records)
        with open(self.path, "r+b") as f:
            f.seek(start * self.dtype.itemsize)
            f.write(records.tobytes())

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, records) of consecutive blocks: of `rows`, else of as many as the budget's
        block_rows allows when each row costs 64 bytes or twice its size while processed."""
        rows = rows or self.budget.block_rows(max(64, 2 * self.dtype.itemsize))
        for start in range(0, self.n, rows):
            yield start, self.read(start, start + rows)

    def _chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in `rows`, sorted rows) per mapping, in row order."""
        order = np.argsort(rows, kind="stable")
        step = self.budget.map_rows(self.dtype.itemsize)
        for s in range(0, order.size, step):
            at = order[s:s + step]
            yield at, rows[at]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The records of `rows` (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64)
        out = self._empty(rows.size)
        if rows.size == 0:
            return out
        for at, sorted_rows in self._chunks(rows):
            mapped = np.memmap(self.path, self.dtype, "r", shape=(self.n,))
            out[at] = mapped[sorted_rows]
            del mapped  # unmapped: its pages leave the process
        return out

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write `values` at `rows` (distinct rows)."""
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return
        values = np.asarray(values, self.dtype.base if self.dtype.shape else self.dtype)
        if values.shape[:1] != rows.shape:
            values = np.broadcast_to(values, rows.shape + self.dtype.shape)
        for at, sorted_rows in self._chunks(rows):
            mapped = np.memmap(self.path, self.dtype, "r+", shape=(self.n,))
            mapped[sorted_rows] = values[at]
            mapped.flush()
            del mapped


class BytesFile:
    """Values of any length per row (None: no value): the bytes in one file, appended in row
    order, and each row's (offset, length + 1) in a RowFile of n rows (0: no value)."""

    INDEX = np.dtype([("off", "<i8"), ("len", "<i8")])

    def __init__(self, folder: Path, name: str, n: int, budget: Budget = Budget()):
        self.data = Path(folder) / f"{name}.bytes"
        self.data.write_bytes(b"")
        self.index = RowFile(Path(folder) / f"{name}.index", self.INDEX, n, budget)
        self.size = 0

    def _store(self, values: list[bytes | None]) -> np.ndarray:
        """Append the values' bytes; their index records."""
        lengths = np.array([-1 if v is None else len(v) for v in values], np.int64)
        index = np.empty(len(values), self.INDEX)
        index["off"] = self.size + np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
        index["len"] = lengths + 1
        blob = b"".join(v for v in values if v)
        with open(self.data, "ab") as f:
            f.write(blob)
        self.size += len(blob)
        return index

    def put(self, rows: np.ndarray, values: list[bytes | None]) -> None:
        """Store the values of `rows` (each once; rows of a file of n rows)."""
        self.index.put(rows, self._store(values))

    def append(self, values: list[bytes | None]) -> None:
        """The values of the next rows (a file grown row by row)."""
        self.index.append(self._store(values))

    def append_binary(self, values: pa.Array | pa.ChunkedArray) -> None:
        """append() of an Arrow string or binary array, from its buffers."""
        offsets, data, valid = _binary_buffers(values)
        index = np.empty(len(valid), self.INDEX)
        index["off"] = self.size + offsets[:-1]
        index["len"] = np.where(valid, np.diff(offsets) + 1, 0)
        with open(self.data, "ab") as f:
            f.write(data)
        self.size += len(data)
        self.index.append(index)

    def has(self, rows: np.ndarray) -> np.ndarray:
        return self.index.take(rows)["len"] > 1

    def take_binary(self, rows: np.ndarray) -> pa.Array:
        """The values of `rows` (any order) as an Arrow binary array (nulls: no value), without a
        Python object per value: one read of the span they are in when that is dense (rows
        stored near one another), else a read per value."""
        index = self.index.take(np.asarray(rows, np.int64))
        valid = index["len"] > 0
        lens = np.maximum(index["len"] - 1, 0)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        total = int(offsets[-1])
        if total:
            lo, hi = int(index["off"][valid].min()), int((index["off"] + lens)[valid].max())
            if hi - lo <= 4 * total + (1 << 20):
                with open(self.data, "rb") as f:
                    f.seek(lo)
                    span = np.fromfile(f, np.uint8, hi - lo)
                buffer = pa.allocate_buffer(total)  # Arrow's memory: the array keeps it, no copy
                data = np.frombuffer(buffer, np.uint8)
                src = index["off"] - lo
                i = 0
                while i < len(index):  # gathered about GATHER_BYTES at a time (an int64 index a byte)
                    j = min(len(index), max(i + 1, int(np.searchsorted(offsets, offsets[i] + GATHER_BYTES, "right")) - 1))
                    rel = offsets[i:j] - offsets[i]
                    at = np.repeat(src[i:j] - rel, lens[i:j]) + np.arange(offsets[j] - offsets[i])
                    data[offsets[i]:offsets[j]] = span[at]
                    i = j
            else:
                values = self.take(np.asarray(rows, np.int64))
                buffer = pa.py_buffer(b"".join(v for v in values if v))
        else:
            buffer = pa.py_buffer(b"")
        kind = pa.binary() if total < 2**31 else pa.large_binary()
        width = np.int32 if kind == pa.binary() else np.int64
        mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
        return pa.Array.from_buffers(kind, len(index), [mask, pa.py_buffer(offsets.astype(width).tobytes()),
                                                        buffer])

    def take(self, rows: np.ndarray) -> list[bytes | None]:
        """The values of `rows` (any order); reads each value's bytes from the file."""
        index = self.index.take(np.asarray(rows, np.int64))
        out: list[bytes | None] = [None] * len(index)
        order = np.argsort(index["off"], kind="stable")
        with open(self.data, "rb") as f:
            for k in order:
                length = int(index["len"][k]) - 1
                if length >= 0:
                    f.seek(int(index["off"][k]))
                    out[k] = f.read(length)
        return out


class Parts:
    """Records of one numpy dtype spread over `count` partition files by a partition number per
    record, kept in the order added within a partition; writes buffered up to the budget's
    buffer_bytes over all partitions; each partition read back whole."""

    def __init__(self, folder: Path, name: str, dtype: Any, count: int, budget: Budget = Budget()):
        self.dtype, self.count, self.budget = np.dtype(dtype), int(count), budget
        self.files = [Path(folder) / f"{name}-{p:05d}.part" for p in range(self.count)]
        for f in self.files:
            f.write_bytes(b"")
        self.pending: list[list[np.ndarray]] = [[] for _ in range(self.count)]
        self.buffered = 0
        self.sizes = np.zeros(self.count, np.int64)

    def add(self, records: np.ndarray, part: np.ndarray | int) -> None:
        if not len(records):
            return
        if self.count == 1 or np.isscalar(part):
            p = 0 if self.count == 1 else int(part)
            self.pending[p].append(np.array(records, self.dtype))
            self.sizes[p] += len(records)
        else:
            part = np.asarray(part, np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(self.count + 1))
            for p in np.flatnonzero(np.diff(bounds)):
                self.pending[p].append(np.array(records[order[bounds[p]:bounds[p + 1]]], self.dtype))
                self.sizes[p] += bounds[p + 1] - bounds[p]
        self.buffered += records.nbytes
        if self.buffered >= self.budget.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for p, pending in enumerate(self.pending):
            if pending:
                with open(self.files[p], "ab") as f:
                    for block in pending:
                        f.write(block.tobytes())
                pending.clear()
        self.buffered = 0

    def read(self, p: int) -> np.ndarray:
        self.flush()
        return np.fromfile(self.files[p], self.dtype)

    def row_file(self, p: int) -> RowFile:
        """Partition p as a RowFile (read in blocks or by rows)."""
        self.flush()
        return RowFile.existing(self.files[p], self.dtype, self.budget)

    def remove(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


def mix_part(values: np.ndarray, count: int) -> np.ndarray:
    """A partition number per integer value, spread evenly (Fibonacci hashing)."""
    if count == 1:
        return np.zeros(len(values), np.int64)
    h = np.asarray(values).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(32)) % np.uint64(count)).astype(np.int64)


# ---- 1. exact copies ---------------------------------------------------------------------------

KEY = np.dtype([("k0", "<u8"), ("k1", "<u8")])
_LANES = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))


def vector_digests(vecs: np.ndarray) -> np.ndarray:
    """A 128-bit hash (KEY records) of each row's bytes, vectorised over 64-bit words
    (multiply-xorshift in two lanes of other constants): equal rows, equal digests."""
    raw = np.ascontiguousarray(vecs).view(np.uint8).reshape(len(vecs), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(vecs), pad), np.uint8)], axis=1)
    words = raw.view("<u8")
    out = np.empty(len(vecs), KEY)
    with np.errstate(over="ignore"):
        for name, mult in zip(("k0", "k1"), _LANES):
            h = np.full(len(vecs), np.uint64(words.shape[1]) * mult, np.uint64)
            for j in range(words.shape[1]):
                h = (h ^ words[:, j]) * mult
                h ^= h >> np.uint64(29)
            out[name] = h
    return out


def row_keys(vecs: np.ndarray, signatures: list[bytes | None], first_row: int) -> np.ndarray:
    """The class key of each row: its vector's digest mixed with its signature's (blake2b); a
    row without a signature gets a key of its own (never a copy: it cannot be matched)."""
    keys = vector_digests(vecs)
    for i, sig in enumerate(signatures):
        if sig:
            d = np.frombuffer(hashlib.blake2b(sig, digest_size=16).digest(), "<u8")
            keys["k0"][i] ^= d[0]
            keys["k1"][i] ^= d[1]
        else:  # unique: the row number, in a part of the key space no digest mix is kept in
            keys["k0"][i] = np.uint64(first_row + i)
            keys["k1"][i] = np.uint64(0)
    return keys


@dataclass
class Classes:
    rep: RowFile  # int64 per row: its class's representative (its first row)
    copies: RowFile  # int64 per row: at a representative, its class's size; 0 elsewhere
    last: RowFile  # int64 per row: at a representative, its class's last row
    representatives: RowFile  # int64: the representatives, ascending
    multi: int  # classes of two or more rows


def exact_classes(keys: RowFile, work: Path, budget: Budget) -> Classes:
    """Classes of rows with equal keys (`row_keys`), sorted one partition of the key space at a time."""
    n = len(keys)
    rec = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("row", "<i8")])
    parts = Parts(work, "keys", rec, budget.parts(n * rec.itemsize * 4), budget)
    progress = Progress("exact copies")
    for start, block in keys.blocks():
        r = np.empty(len(block), rec)
        r["k0"], r["k1"], r["row"] = block["k0"], block["k1"], np.arange(start, start + len(block))
        parts.add(r, mix_part(block["k0"], parts.count))
        progress("keyed %d/%d rows", start + len(block), n)
    rep = RowFile(work / "rep.i8", np.int64, n, budget)
    copies = RowFile(work / "copies.i8", np.int64, n, budget)
    last = RowFile(work / "last.i8", np.int64, n, budget)
    multi = 0
    for p in range(parts.count):
        r = parts.read(p)
        if not len(r):
            continue
        r = r[np.lexsort((r["row"], r["k1"], r["k0"]))]
        new = np.ones(len(r), bool)
        new[1:] = (r["k0"][1:] != r["k0"][:-1]) | (r["k1"][1:] != r["k1"][:-1])
        starts = np.flatnonzero(new)
        first = r["row"][starts]
        rep.put(r["row"], first[np.cumsum(new) - 1])
        ends = np.append(starts[1:], len(r))
        sizes = ends - starts
        copies.put(first, sizes)
        last.put(first, r["row"][ends - 1])
        multi += int((sizes > 1).sum())
        progress("classes of %d/%d partitions", p + 1, parts.count)
    parts.remove()
    reps = RowFile(work / "representatives.i8", np.int64, 0, budget)
    for start, block in rep.blocks():
        reps.append(np.flatnonzero(block == np.arange(start, start + len(block))) + start)
    progress("%d rows, %d distinct, %d classes of copies", n, len(reps), multi, force=True)
    return Classes(rep, copies, last, reps, multi)


# ---- 2. candidates: a tree of k-means buckets --------------------------------------------------

def spherical_kmeans(x: np.ndarray, k: int, iters: int = KMEANS_ITERS, sample: int = 100_000,
                     seed: int = 0) -> np.ndarray:
    """(k, d) unit centroids of the rows of x (unit vectors) by cosine, fitted on a sample."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    pick = rng.choice(n, size=min(n, max(sample, 4 * k)), replace=False) if n > sample else np.arange(n)
    pts = x[pick].astype(np.float32)
    centroids = pts[rng.choice(pts.shape[0], size=k, replace=False)].copy()
    for _ in range(iters):
        labels = nearest(pts, centroids)[0][:, 0]
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


def nearest(x: np.ndarray, centroids: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of the `top` nearest centroids of each row, best first; in blocks."""
    top = min(top, centroids.shape[0])
    idx = np.zeros((x.shape[0], top), np.int64)
    sim = np.zeros((x.shape[0], top), np.float32)
    for s in range(0, x.shape[0], ASSIGN_ROWS):
        c = x[s:s + ASSIGN_ROWS].astype(np.float32) @ centroids.T
        if top == 1:
            idx[s:s + ASSIGN_ROWS, 0] = best = np.argmax(c, axis=1)
            sim[s:s + ASSIGN_ROWS, 0] = c[np.arange(c.shape[0]), best]
            continue
        part = np.argpartition(-c, top - 1, axis=1)[:, :top] if top < c.shape[1] else np.argsort(-c, axis=1)
        vals = np.take_along_axis(c, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx[s:s + ASSIGN_ROWS] = np.take_along_axis(part, order, axis=1)
        sim[s:s + ASSIGN_ROWS] = np.take_along_axis(vals, order, axis=1)
    return idx, sim


def assign(x: np.ndarray, centroids: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(position in x, cell) of each row's nearest centroid, and of its second nearest when that
    is within `margin` (cosine) of the nearest; sorted by position."""
    idx, sim = nearest(x, centroids, top=2)
    pos = np.arange(x.shape[0])
    if idx.shape[1] < 2:
        return pos, idx[:, 0]
    second = (sim[:, 0] - sim[:, 1] <= margin) & (idx[:, 1] != idx[:, 0])
    who = np.concatenate([pos, pos[second]])
    cell = np.concatenate([idx[:, 0], idx[second, 1]])
    order = np.argsort(who, kind="stable")
    return who[order], cell[order]


def orderable(c: np.ndarray) -> np.ndarray:
    """float32 values as int64 of the same order (the sign-magnitude bits made two's complement)."""
    bits = np.ascontiguousarray(c, np.float32).view(np.int32)
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)


def top_partners(a: np.ndarray, cols: Callable[[int, int], np.ndarray], m: int, first: int,
                 threshold: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) positions of each of a's rows' top_k most similar columns at cosine >=
    threshold among the m columns (`cols(start, stop)` gives their vectors, float32); a's row i
    is column first + i, never its own partner; ties go to the smaller column. The cosines at or
    above the threshold are collected (few, in most leaves) and cut to each row's top_k by one
    sort key per pair (the cosine's bits, then the column) whenever they pass a block's worth."""
    low = np.int64(0xFFFFFFFF)
    rows: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    held = 0

    for t in range(0, m, BLOCK_COLS):
        c = a @ cols(t, min(m, t + BLOCK_COLS)).T  # (rows, <= BLOCK_COLS) cosines
        own = np.arange(a.shape[0]) + first - t
        inside = (own >= 0) & (own < c.shape[1])
        c[np.flatnonzero(inside), own[inside]] = -np.inf  # not its own partner
        r, j = np.nonzero(c >= threshold)
        if r.size:
            rows.append(r)
            keys.append((orderable(c[r, j]) << 32) + (low - (t + j)))
            held += r.size
        if held > BLOCK_ROWS * top_k * 4:  # bounded: at most a few times the result
            r, k = _cut(np.concatenate(rows), np.concatenate(keys), top_k)
            rows[:], keys[:] = [r], [k]
            held = r.size
    if not held:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r, k = _cut(np.concatenate(rows), np.concatenate(keys), top_k)
    return r, low - (k & low)


def _cut(rows: np.ndarray, keys: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries of each row's top_k keys (rows ascending, best first)."""
    order = np.lexsort((-keys, rows))
    rows, keys = rows[order], keys[order]
    keep = np.arange(rows.size) - np.searchsorted(rows, rows, side="left") < top_k
    return rows[keep], keys[keep]


def leaf_pairs(vectors: RowFile, members: np.ndarray, threshold: float, top_k: int | None,
               budget: Budget, sink: Callable[[np.ndarray, np.ndarray], None],
               triangle_max: int = TRIANGLE_MAX) -> int:
    """sink(a, b), a < b rows, with the pairs of a leaf's `members` (ascending rows) at cosine >=
    threshold: all of them, or each member's top_k (a pair may come twice); returns the pairs
    compared. The members' vectors are held when they fit a budget's part, else read per block.
    A leaf of up to `triangle_max` members computes each pair's cosine once (the blocks on and
    above the diagonal; the few cosines at or above the threshold are kept both ways round, cut
    to each row's top_k as they pass a block's worth); a larger one (thousands of nearly equal
    clips k-means could not split) takes a block of rows against every column at a time, so
    that what it holds stays a block's worth."""
    m = members.size
    held = vectors.take(members).astype(np.float32) if m * vectors.dtype.itemsize * 2 <= budget.part_bytes \
        else None

    def cols(s: int, t: int) -> np.ndarray:
        return held[s:t] if held is not None else vectors.take(members[s:t]).astype(np.float32)

    if top_k is not None and m > triangle_max:
        for s in range(0, m, BLOCK_ROWS):
            rows, partner = top_partners(cols(s, min(m, s + BLOCK_ROWS)), cols, m, s, threshold, top_k)
            x, y = members[s + rows], members[partner]
            sink(np.minimum(x, y), np.maximum(x, y))
        return m * (m - 1) // 2
    low = np.int64(0xFFFFFFFF)
    rows: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    count = 0
    for s in range(0, m, LEAF_BLOCK):
        a = cols(s, min(m, s + LEAF_BLOCK))
        for t in range(s, m, LEAF_BLOCK):
            c = a @ (a if t == s else cols(t, min(m, t + LEAF_BLOCK))).T  # each pair of blocks once
            i, j = np.nonzero(c >= threshold)
            if t == s:
                later = j > i
                i, j = i[later], j[later]
            if not i.size:
                continue
            if top_k is None:
                sink(members[s + i], members[t + j])
                continue
            bits = orderable(c[i, j]) << 32  # the sort key: the cosine, then the smaller partner
            rows += [s + i, t + j]
            keys += [bits + (low - (t + j)), bits + (low - (s + i))]
            count += 2 * i.size
            if count > LEAF_BLOCK * top_k * 4:
                r, k = _cut(np.concatenate(rows), np.concatenate(keys), top_k)
                rows[:], keys[:], count = [r], [k], r.size
    if count:
        r, k = _cut(np.concatenate(rows), np.concatenate(keys), top_k)
        x, y = members[r], members[low - (k & low)]
        sink(np.minimum(x, y), np.maximum(x, y))
    return m * (m - 1) // 2


@dataclass(frozen=True)
class Search:
    """How candidates are searched (module docstring, step 2)."""

    eps: float
    bucket_size: int = 1000
    margin: float = 0.1
    rounds: int = 2
    seed: int = 0
    top_k: int | None = 16


def candidate_search(vectors: RowFile, rows: RowFile, search: Search, work: Path, budget: Budget,
                     sink: Callable[[np.ndarray, np.ndarray], None]) -> dict[str, int]:
    """sink(a, b) with the candidate pairs among `rows` (ascending row numbers of `vectors`):
    each tree's leaves compared (leaf_pairs); returns counts."""
    threshold = 1.0 - search.eps
    n = len(rows)
    exhaustive = n <= 4 * search.bucket_size
    stats = {"leaves": 0, "compared": 0, "leaf_rows": 0, "splits": 0}
    progress = Progress("candidates")
    cell_no = 0
    for r in range(1 if exhaustive else search.rounds):
        todo: list[tuple[RowFile, int, int, bool]] = [(rows, 0, search.seed + 101 * r, False)]
        while todo:
            cell, depth, seed, own = todo.pop()
            size = len(cell)
            if size <= 4 * search.bucket_size or depth >= MAX_DEPTH:
                members = np.unique(cell.read(0, size))
                stats["compared"] += leaf_pairs(vectors, members, threshold, search.top_k, budget, sink)
                stats["leaves"] += 1
                stats["leaf_rows"] += members.size
            else:
                k = min(FANOUT, math.ceil(size / search.bucket_size))
                rng = np.random.default_rng(seed)
                sample = min(size, KMEANS_POINTS_PER_CENTROID * k)
                at = np.sort(rng.choice(size, size=sample, replace=False)) if sample < size else np.arange(size)
                centroids = spherical_kmeans(vectors.take(cell.take(at)), k, sample=sample, seed=seed)
                cell_no += 1
                children = Parts(work, f"cell{cell_no}", np.int64, k, budget)
                for _, block in cell.blocks(ASSIGN_ROWS):
                    pos, child = assign(vectors.take(block), centroids, search.margin)
                    children.add(block[pos], child)
                children.flush()
                stats["splits"] += 1
                todo += [(children.row_file(p), depth + 1, seed + 1 + p, True)
                         for p in range(k) if children.sizes[p]]
            if own:
                cell.path.unlink(missing_ok=True)
            progress("round %d/%d, %d leaves (%d rows) compared, %d cells waiting", r + 1, search.rounds,
                     stats["leaves"], stats["leaf_rows"], len(todo))
    progress("%d rows in %d leaves (%d row slots), %d splits, %d pairs compared by cosine", n, stats["leaves"],
             stats["leaf_rows"], stats["splits"], stats["compared"], force=True)
    return stats


# ---- 3. verification by temporal signatures ---------------------------------------------------

def match_block(a: list[int], b: list[int], sa: list[bytes], sb: list[bytes], min_match: float | None,
                max_shift_s: float) -> list[tuple[int, int, float, float]]:
    """[(a, b, score, shift)] of the pairs whose signatures match at >= min_match (None: all)."""
    out = []
    for i, j, x, y in zip(a, b, sa, sb):
        score, shift = signature.match(x, y, max_shift_s)
        if min_match is None or score >= min_match:
            out.append((i, j, score, shift))
    return out


EDGE = np.dtype([("a", "<i8"), ("b", "<i8"), ("score", "<f8"), ("shift", "<f8")])


class Matcher:
    """Blocks of pairs matched in this process, or over `workers` spawned processes with at most
    two blocks per worker in flight (memory: those blocks' signatures)."""

    def __init__(self, workers: int | None, parallel: bool):
        self.workers = workers or os.cpu_count() or 1
        self.pool: ProcessPoolExecutor | None = None
        if parallel and self.workers > 1:  # spawned: the driver may hold Ray's threads, which fork copies unsafely
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        self.flight: list[tuple[Future, tuple]] = []

    def submit(self, args: tuple) -> list[list[tuple[int, int, float, float]]]:
        """Queue a block; returns the results of the blocks finished meanwhile, in order."""
        if self.pool is not None:
            try:
                self.flight.append((self.pool.submit(match_block, *args), args))
            except BrokenProcessPool as exc:
                self._stop(exc)
        if self.pool is None:
            return [self._first() for _ in range(len(self.flight))] + [match_block(*args)]
        out = []
        while self.flight and (len(self.flight) > 2 * self.workers or self.flight[0][0].done()):
            out.append(self._first())
        return out

    def _first(self) -> list[tuple[int, int, float, float]]:
        future, args = self.flight.pop(0)
        try:
            return future.result()
        except BrokenProcessPool as exc:  # e.g. a __main__ that cannot be re-imported: go on here
            self._stop(exc)
            return match_block(*args)

    def _stop(self, exc: Exception) -> None:
        if self.pool is not None:
            log.warning("dedup: verification processes failed (%s); verifying the rest in this process", exc)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def drain(self) -> list[list[tuple[int, int, float, float]]]:
        out = [self._first() for _ in range(len(self.flight))]
        if self.pool is not None:
            self.pool.shutdown()
        return out


@dataclass(frozen=True)
class Matching:
    min_match: float
    max_shift_s: float
    workers: int | None = None


def verify(pairs: Parts, sigs: BytesFile, matching: Matching, edges: RowFile, selfs: RowFile,
           self_rows: RowFile, last: RowFile) -> dict[str, int]:
    """Match every unique candidate pair of `pairs` (representatives a < b) whose rows have
    signatures, b's signature against a's, and also a's against b's when a copy of b comes before
    a copy of a (last[a] > b: the clips are then matched that way round too, and the score
    depends a little on it): the matches at >= min_match go to `edges`, oriented. And every row
    of `self_rows` with itself (a class of copies: its (score, shift) goes to `selfs` at the row,
    whatever the score). Returns counts."""
    total = int(pairs.sizes.sum()) + len(self_rows)
    matcher = Matcher(matching.workers, total > PARALLEL_MIN_PAIRS)
    progress = Progress("verification")
    stats = {"candidate_pairs": 0, "verified": 0, "edges": 0, "self_matched": 0}

    def keep(results: list[list[tuple[int, int, float, float]]]) -> None:
        for found in results:
            if not found:
                continue
            rec = np.array(found, EDGE)
            same = rec["a"] == rec["b"]
            if same.any():
                out = np.empty(int(same.sum()), SELF)
                out["score"], out["shift"] = rec["score"][same], rec["shift"][same]
                selfs.put(rec["a"][same], out)
                stats["self_matched"] += len(out)
            edges.append(rec[~same])
            stats["edges"] += int((~same).sum())

    def blocks() -> Iterator[tuple[np.ndarray, float | None]]:
        for p in range(pairs.count):
            rec = pairs.read(p)
            if len(rec):
                rec = np.unique(rec)  # sorted by (a, b), each pair once
                stats["candidate_pairs"] += len(rec)
                for s in range(0, len(rec), VERIFY_BLOCK):
                    block = rec[s:s + VERIFY_BLOCK]
                    back = block[last.take(block["a"]) > block["b"]]
                    if len(back):
                        rev = np.empty(len(back), PAIR)
                        rev["a"], rev["b"] = back["b"], back["a"]
                        block = np.concatenate([block, rev])
                    yield block, matching.min_match
        for _, rows in self_rows.blocks(VERIFY_BLOCK):
            rec = np.empty(len(rows), PAIR)
            rec["a"] = rec["b"] = rows
            yield rec, None

    for rec, min_match in blocks():
        rows = np.unique(np.concatenate([rec["a"], rec["b"]]))
        values = dict(zip(rows.tolist(), sigs.take(rows)))
        a, b = rec["a"].tolist(), rec["b"].tolist()
        both = [k for k, (i, j) in enumerate(zip(a, b)) if values[i] is not None and values[j] is not None]
        a, b = [a[k] for k in both], [b[k] for k in both]
        if not a:
            continue
        stats["verified"] += len(a)
        keep(matcher.submit((a, b, [values[i] for i in a], [values[j] for j in b], min_match,
                             matching.max_shift_s)))
        progress("%d pairs matched in time, %d edges", stats["verified"], stats["edges"])
    keep(matcher.drain())
    progress("%d of %d candidate pairs match in time (score >= %.3g, shift <= %gs); %d classes of copies "
             "matched with themselves", stats["edges"], stats["candidate_pairs"], matching.min_match,
             matching.max_shift_s, stats["self_matched"], force=True)
    return stats


PAIR = np.dtype([("a", "<i8"), ("b", "<i8")])
SELF = np.dtype([("score", "<f8"), ("shift", "<f8")])


# ---- 4. components ------------------------------------------------------------------------------

def components(edges: RowFile, n: int, work: Path, budget: Budget) -> tuple[RowFile, RowFile]:
    """(label per row: the smallest row of its component, the rows in edges ascending): labels
    hooked along the edges and flattened by pointer jumping over those rows, until every edge's
    two rows share a label. Rows in no edge keep their own label."""
    label = RowFile(work / "label.i8", np.int64, n, budget)
    step = budget.block_rows(8)
    for start in range(0, n, step):
        label.write(start, np.arange(start, min(n, start + step), dtype=np.int64))
    nodes_parts = Parts(work, "nodes", np.int64, budget.parts(len(edges) * 16 * 4), budget)
    for _, e in edges.blocks():
        ends = np.concatenate([e["a"], e["b"]])
        nodes_parts.add(ends, mix_part(ends, nodes_parts.count))
    nodes = RowFile(work / "nodes.i8", np.int64, 0, budget)
    for p in range(nodes_parts.count):  # unique per partition; sorted after
        nodes.append(np.unique(nodes_parts.read(p)))
    nodes_parts.remove()
    if nodes_parts.count > 1:  # the rows of a partition are not in order across partitions
        nodes = _sorted_file(nodes, work, budget)
    progress = Progress("components")
    rounds = 0
    while True:
        rounds += 1
        hooked = 0
        for _, e in edges.blocks():
            la, lb = label.take(e["a"]), label.take(e["b"])
            apart = la != lb
            if not apart.any():
                continue
            hooked += int(apart.sum())
            hi, lo = np.maximum(la, lb)[apart], np.minimum(la, lb)[apart]
            order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]
            first = np.ones(hi.size, bool)
            first[1:] = hi[1:] != hi[:-1]
            hi, lo = hi[first], lo[first]  # each root hooked under the smallest label it meets
            label.put(hi, np.minimum(label.take(hi), lo))
        if not hooked:
            break
        for _, rows in nodes.blocks():  # pointer jumping: every node's label to its root
            cur = label.take(rows)
            while True:
                nxt = label.take(cur)
                if np.array_equal(nxt, cur):
                    break
                cur = nxt
            label.put(rows, cur)
        progress("round %d, %d edges across labels", rounds, hooked)
    progress("%d rows in edges joined in %d rounds", len(nodes), rounds, force=True)
    return label, nodes


def _sorted_file(rows: RowFile, work: Path, budget: Budget) -> RowFile:
    """The int64 values of `rows` ascending, by ranges of values partitioned and sorted."""
    n = len(rows)
    top = int(max((int(b.max()) for _, b in rows.blocks() if len(b)), default=0)) + 1
    count = budget.parts(n * 8 * 4)
    width = max(1, math.ceil(top / count))
    parts = Parts(work, "sorted", np.int64, count, budget)
    for _, block in rows.blocks():
        parts.add(block, np.minimum(block // width, count - 1))
    out = RowFile(rows.path.with_suffix(".sorted"), np.int64, 0, budget)
    for p in range(count):
        out.append(np.sort(parts.read(p)))
    parts.remove()
    rows.path.unlink(missing_ok=True)
    return out


# ---- the whole search: groups cache ------------------------------------------------------------

GROUPS_SCHEMA = pa.schema([("clip_id", pa.string()), ("row", pa.int64()), ("group", pa.int64()),
                           ("copy_of", pa.int64())])
PAIRS_SCHEMA = pa.schema([("clip_a", pa.string()), ("clip_b", pa.string()), ("row_a", pa.int64()),
                          ("row_b", pa.int64()), ("score", pa.float64()), ("shift_s", pa.float64()),
                          ("group", pa.int64())])
CLASSES_SCHEMA = pa.schema([("row", pa.int64()), ("group", pa.int64()), ("copies", pa.int64()),
                            ("self_score", pa.float64()), ("self_shift_s", pa.float64()),
                            (signature.COLUMN, pa.binary())])


@dataclass
class Corpus:
    """What find_groups reads: `vectors` (float16 unit vectors per row) and `keys` (row_keys) in
    RowFiles of n rows; `fetch(rows)` yields (rows, signatures) for ascending rows, in order
    (None: the clip has none); `ids(rows)` the clip ids of rows (any order)."""

    vectors: RowFile
    keys: RowFile
    fetch: Callable[[Iterator[np.ndarray]], Iterator[tuple[np.ndarray, list[bytes | None]]]]
    ids: Callable[[np.ndarray], pa.Array]


@dataclass
class Writers:
    """Where find_groups writes the groups cache: a callable per table taking record batches
    in row order (dedup.py: Parquet writers on the output's dedup/ files)."""

    groups: Callable[[pa.Table], None]
    pairs: Callable[[pa.Table], None]
    classes: Callable[[pa.Table], None]


@dataclass
class GroupStats:
    clips_embedded: int = 0
    distinct: int = 0
    compared: int = 0  # pairs of distinct clips compared by cosine
    copy_classes: int = 0
    candidate_pairs: int = 0
    verified: int = 0
    edges: int = 0
    without_signature: int = 0
    clips_in_groups: int = 0
    groups: int = 0
    grouped_classes: int = 0
    id_bytes: int = 0  # the longest clip id in a group
    signature_bytes: int = 0  # the grouped classes' signatures
    seconds: dict[str, float] = field(default_factory=dict)


def find_groups(corpus: Corpus, search: Search, matching: Matching, work: Path, budget: Budget,
                out: Writers, collapse: bool = True) -> GroupStats:
    """Steps 1-4 of the module docstring over `corpus`, the result written to `out`:
    groups (every clip of a group of two or more: clip_id, row, group = the group's smallest
    row, copy_of = its class's representative), pairs (the edges: matching pairs of distinct
    representatives, b's signature against a's; both ways round when copies of the two come in
    both orders, `verify`) and classes (each grouped
    representative: copies, its self-match, its signature), all in row order.
    collapse=False treats every row as its own class (for tests: the decisions must not change)."""
    n = len(corpus.vectors)
    stats = GroupStats(clips_embedded=n)
    t = time.monotonic()

    # 1. Exact copies: the representatives take part in the search, their classes follow them.
    if not collapse:
        unique = RowFile(work / "keys.unique", KEY, 0, budget)
        for start, block in corpus.keys.blocks():
            rec = np.empty(len(block), KEY)
            rec["k0"], rec["k1"] = np.arange(start, start + len(block)), 0
            unique.append(rec)
        classes = exact_classes(unique, work, budget)
    else:
        classes = exact_classes(corpus.keys, work, budget)
    stats.distinct, stats.copy_classes = len(classes.representatives), classes.multi
    stats.seconds["exact copies"] = time.monotonic() - t

    # 2. Candidate pairs among the representatives, spilled by partition of a.
    t = time.monotonic()
    top = search.top_k or search.bucket_size
    estimate = len(classes.representatives) * top * 2 * max(1, search.rounds) * PAIR.itemsize
    pairs = Parts(work, "pairs", PAIR, budget.parts(estimate), budget)

    def sink(a: np.ndarray, b: np.ndarray) -> None:
        rec = np.empty(a.size, PAIR)
        rec["a"], rec["b"] = a, b
        pairs.add(rec, mix_part(a, pairs.count))

    if len(classes.representatives) > 1:
        stats.compared = candidate_search(corpus.vectors, classes.representatives, search, work, budget,
                                          sink)["compared"]
    pairs.flush()
    stats.seconds["candidates"] = time.monotonic() - t

    # 3. Signatures of the rows that need one, then the verification.
    t = time.monotonic()
    need = RowFile(work / "need.u1", np.uint8, n, budget)  # 1: in a candidate pair, 2: a class of copies
    for p in range(pairs.count):
        rec = pairs.read(p)
        if len(rec):
            need.put(np.unique(np.concatenate([rec["a"], rec["b"]])), 1)
    self_rows = RowFile(work / "self_rows.i8", np.int64, 0, budget)
    for start, block in classes.copies.blocks():
        multi = np.flatnonzero(block > 1) + start
        if multi.size:
            need.put(multi, need.take(multi) | 2)
            self_rows.append(multi)
    sigs = BytesFile(work, "signatures", n, budget)

    def wanted() -> Iterator[np.ndarray]:
        for start, block in need.blocks():
            rows = np.flatnonzero(block) + start
            if rows.size:
                yield rows

    for rows, values in corpus.fetch(wanted()):
        sigs.put(rows, values)
    for start, block in need.blocks():  # candidates without a signature (no decodable video)
        rows = np.flatnonzero(block & 1) + start
        if rows.size:
            stats.without_signature += int((~sigs.has(rows)).sum())
    if stats.without_signature:
        log.warning("dedup: %d candidate clips have no temporal signature (no decodable video); "
                    "they are never marked duplicates", stats.without_signature)
    stats.seconds["signatures"] = time.monotonic() - t
    t = time.monotonic()
    edges = RowFile(work / "edges", EDGE, 0, budget)
    selfs = RowFile(work / "selfs", SELF, n, budget)
    counts = verify(pairs, sigs, matching, edges, selfs, self_rows, classes.last)
    pairs.remove()
    stats.candidate_pairs, stats.verified, stats.edges = counts["candidate_pairs"], counts["verified"], counts["edges"]
    stats.seconds["verification"] = time.monotonic() - t

    # 4. Components of the edges; a class is grouped with its representative's component when
    # the representative has an edge or the class's copies match one another.
    t = time.monotonic()
    label, nodes = components(edges, n, work, budget)
    flags = RowFile(work / "flags.u1", np.uint8, n, budget)  # 1: in an edge, 2: copies match each other
    for _, rows in nodes.blocks():
        flags.put(rows, 1)
    for _, rows in self_rows.blocks():
        ok = selfs.take(rows)["score"] >= matching.min_match
        flags.put(rows[ok], flags.take(rows[ok]) | 2)
    stats.seconds["components"] = time.monotonic() - t

    t = time.monotonic()
    progress = Progress("groups")
    group_sizes = Parts(work, "group_sizes", np.int64, budget.parts(n * 8 * 4), budget)
    for start, rep in classes.rep.blocks(budget.block_rows(ROW_OUT_BYTES)):
        rows = np.arange(start, start + len(rep))
        grouped = flags.take(rep) != 0
        if not grouped.any():
            continue
        rows, rep = rows[grouped], rep[grouped]
        group = label.take(rep)
        ids = corpus.ids(rows)
        stats.clips_in_groups += rows.size
        stats.id_bytes = max(stats.id_bytes, int(pc.max(pc.binary_length(ids)).as_py() or 0))
        out.groups(pa.table([ids, pa.array(rows), pa.array(group), pa.array(rep)], schema=GROUPS_SCHEMA))
        is_rep = rows == rep
        if is_rep.any():
            reps = rows[is_rep]
            group_sizes.add(group[is_rep], mix_part(group[is_rep], group_sizes.count))
            s = selfs.take(reps)
            copies = classes.copies.take(reps)
            single = copies < 2
            values = sigs.take_binary(reps)
            stats.grouped_classes += reps.size
            stats.signature_bytes += values.nbytes
            out.classes(pa.table([pa.array(reps), pa.array(group[is_rep]), pa.array(copies),
                                  pa.array(np.where(single, np.nan, s["score"])),
                                  pa.array(np.where(single, np.nan, s["shift"])),
                                  values], schema=CLASSES_SCHEMA))
        progress("%d/%d rows, %d in groups", start + len(rep), n, stats.clips_in_groups)
    for p in range(group_sizes.count):
        stats.groups += int(np.unique(group_sizes.read(p)).size)
    group_sizes.remove()
    # The edges in row order (they were found partition by partition), by ranges of rows.
    ranges = budget.parts(len(edges) * EDGE.itemsize * 4)
    span = max(1, math.ceil(max(1, n) / ranges))
    by_row = Parts(work, "edges_by_row", EDGE, ranges, budget)
    for _, e in edges.blocks():
        by_row.add(e, np.minimum(e["a"] // span, ranges - 1))
    for q in range(ranges):
        e = by_row.read(q)
        e = e[np.lexsort((e["b"], e["a"]))]
        step = budget.block_rows(ROW_OUT_BYTES)
        for s in range(0, len(e), step):
            b = e[s:s + step]
            out.pairs(pa.table([corpus.ids(b["a"]), corpus.ids(b["b"]), pa.array(b["a"]), pa.array(b["b"]),
                                pa.array(b["score"]), pa.array(b["shift"]), pa.array(label.take(b["a"]))],
                               schema=PAIRS_SCHEMA))
    by_row.remove()
    stats.seconds["groups"] = time.monotonic() - t
    progress("%d clips (%d distinct) in %d groups, %d matching pairs", stats.clips_in_groups, stats.distinct,
             stats.groups, stats.edges, force=True)
    return stats


# ---- which clip of a group is kept -------------------------------------------------------------

Score = Callable[[int, int], "tuple[float, float] | None"]


def choose_group(members: Iterable[int], class_of: Callable[[int], int], score: Score,
                 min_match: float) -> list[tuple[int, int, float]]:
    """[(duplicate, kept, match score)] of a group whose `members` come in priority order, best
    first: a member that matches a clip already kept (score >= min_match) is a duplicate of the
    best-matching one (ties: the smaller row), else it is kept (dedup.choose's rule). `score(i,
    k)` of two members depends only on their classes and on which row is smaller, so of the kept
    clips of one class only two can be the best match: the first one and the first after i."""
    out: list[tuple[int, int, float]] = []
    leaders: dict[int, list[int]] = {}  # class: its kept rows, ascending
    for i in members:
        best: tuple[float, int] | None = None
        for rows in leaders.values():
            ks = [rows[0]]
            if rows[0] < i:
                j = bisect.bisect_right(rows, i)
                if j < len(rows):
                    ks.append(rows[j])
            for k in ks:
                m = score(i, k)
                if m is not None and (best is None or (m[0], -k) > (best[0], -best[1])):
                    best = (m[0], k)
        if best is not None and best[0] >= min_match:
            out.append((i, best[1], float(best[0])))
        else:
            bisect.insort(leaders.setdefault(class_of(i), []), i)
    return out


def priority_keys(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(m, 1 + K) float64 sort keys of dedup.priority_of: 0 passing the rules / 1 not, then each
    keep_by value negated (highest first), missing as +inf (last)."""
    keys = np.empty((len(keep), 1 + values.shape[1]), np.float64)
    keys[:, 0] = np.where(keep, 0.0, 1.0)
    with np.errstate(invalid="ignore"):
        keys[:, 1:] = np.where(np.isnan(values), np.inf, -values)
    return keys


@dataclass
class Prioritised:
    """A chunk of the groups table (rows ascending) with each clip's keep under the rules and
    its keep_by values (NaN: missing), as dedup.py streams them from scores/."""

    groups: pa.Table
    keep: np.ndarray
    values: np.ndarray  # (m, K) float64


MEMBER_BYTES = 64  # a grouped clip's record in choose_duplicates, besides its id and keep_by values


def choose_duplicates(prioritised: Iterable[Prioritised], classes: Iterable[pa.Table], pairs: Iterable[pa.Table],
                      sizes: dict[str, int], keep_by: int, matching: Matching, work: Path, budget: Budget,
                      write: Callable[[pa.Table], None]) -> dict[str, int]:
    """The duplicates of every group (choose_group on the group's clips in priority order, with
    its classes' self-matches and its matching pairs; other pairs matched from the classes'
    signatures when needed), written in row order as tables of (clip_id, duplicate_of,
    similarity, shift_s, group). A group's clips, classes and pairs are gathered in partitions by
    group, the duplicates in partitions by row. `sizes`: the groups cache's rows (all of them),
    clips_in_groups, id_bytes and signature_bytes, to size the partitions. Returns counts."""
    progress = Progress("choosing the kept clips")
    grouped, width = max(1, sizes["clips_in_groups"]), max(1, sizes["id_bytes"])
    member = np.dtype([("group", "<i8"), ("row", "<i8"), ("copy_of", "<i8"), ("prio", "<f8", (1 + keep_by,)),
                       ("clip_id", f"S{width}")])
    count = budget.parts(grouped * member.itemsize * 4 + sizes["signature_bytes"] * 2)
    members = Parts(work, "members", member, count, budget)
    seen = 0
    for chunk in prioritised:
        rec = np.empty(chunk.groups.num_rows, member)
        rec["group"], rec["row"], rec["copy_of"] = (chunk.groups.column(c).to_numpy() for c in ("group", "row", "copy_of"))
        rec["prio"] = priority_keys(chunk.keep, chunk.values.reshape(len(rec), keep_by))
        rec["clip_id"] = _fixed_bytes(chunk.groups.column("clip_id"), width)
        members.add(rec, mix_part(rec["group"], count))
        seen += len(rec)
        progress("%d/%d grouped clips with their priority", seen, grouped)
    cls_rec = np.dtype([("group", "<i8"), ("row", "<i8"), ("score", "<f8"), ("shift", "<f8")])
    cls_parts = Parts(work, "classes", cls_rec, count, budget)
    sig_logs = [BytesLog(work / f"class_sigs-{p:05d}") for p in range(count)]
    for table in classes:
        rec = np.empty(table.num_rows, cls_rec)
        rec["group"], rec["row"] = table.column("group").to_numpy(), table.column("row").to_numpy()
        rec["score"] = table.column("self_score").to_numpy(zero_copy_only=False)
        rec["shift"] = table.column("self_shift_s").to_numpy(zero_copy_only=False)
        part = mix_part(rec["group"], count)
        cls_parts.add(rec, part)
        sigs = table.column(signature.COLUMN)
        for p in np.unique(part):
            at = np.flatnonzero(part == p)
            sig_logs[p].add(rec["row"][at], sigs.take(pa.array(at)).to_pylist())
    edge_rec = np.dtype([("group", "<i8"), ("a", "<i8"), ("b", "<i8"), ("score", "<f8"), ("shift", "<f8")])
    edge_parts = Parts(work, "group_edges", edge_rec, count, budget)
    for table in pairs:
        rec = np.empty(table.num_rows, edge_rec)
        for name, column in (("group", "group"), ("a", "row_a"), ("b", "row_b"), ("score", "score"),
                             ("shift", "shift_s")):
            rec[name] = table.column(column).to_numpy()
        edge_parts.add(rec, mix_part(rec["group"], count))

    out_rec = np.dtype([("row", "<i8"), ("score", "<f8"), ("shift", "<f8"), ("group", "<i8"),
                        ("clip_id", f"S{width}"), ("kept", f"S{width}")])
    ranges = budget.parts(grouped * out_rec.itemsize * 4)
    span = max(1, math.ceil(max(1, sizes["rows"]) / ranges))
    decided = Parts(work, "decided", out_rec, ranges, budget)
    stats = {"duplicates": 0, "groups": 0, "late_matches": 0}
    done = 0
    for p in range(count):
        rec = members.read(p)
        if not len(rec):
            continue
        rec = rec[np.lexsort([rec["clip_id"]] + [rec["prio"][:, j] for j in range(keep_by, -1, -1)] + [rec["group"]])]
        cls = cls_parts.read(p)
        cls = cls[np.argsort(cls["row"])]
        selfm = {int(r): (float(s), float(h)) for r, s, h in zip(cls["row"], cls["score"], cls["shift"])}
        edges = {(int(a), int(b)): (float(s), float(h)) for a, b, s, h in
                 zip(*(edge_parts.read(p)[c] for c in ("a", "b", "score", "shift")))}
        sigs: dict[int, bytes] | None = None  # read when a pair that was no candidate is needed
        late: dict[tuple[int, int], tuple[float, float] | None] = {}

        def class_score(ca: int, cb: int) -> tuple[float, float] | None:
            """The score of a clip of class ca (the smaller row) against one of class cb."""
            nonlocal sigs
            if ca == cb:
                return selfm.get(ca)
            found = edges.get((ca, cb))  # the pair matched this way round (when it matches)
            if found is not None:
                return found
            if (ca, cb) not in late:
                if sigs is None:
                    sigs = sig_logs[p].read()
                sa, sb = sigs.get(ca), sigs.get(cb)
                late[(ca, cb)] = signature.match(sa, sb, matching.max_shift_s) if sa and sb else None
                stats["late_matches"] += 1
            return late[(ca, cb)]

        # Groups of one class (copies only): the first clip is kept, the others are its
        # duplicates when the copies match one another; vectorised over the partition.
        starts = np.flatnonzero(np.concatenate([[True], rec["group"][1:] != rec["group"][:-1]]))
        ends = np.append(starts[1:], len(rec))
        stats["groups"] += starts.size
        lo, hi = np.minimum.reduceat(rec["copy_of"], starts), np.maximum.reduceat(rec["copy_of"], starts)
        one = lo == hi
        at = np.searchsorted(cls["row"], lo)
        found_cls = (at < len(cls)) & (cls["row"][np.minimum(at, len(cls) - 1)] == lo)
        s0 = np.where(found_cls, cls["score"][np.minimum(at, len(cls) - 1)], -np.inf)
        h0 = np.where(found_cls, cls["shift"][np.minimum(at, len(cls) - 1)], 0.0)
        fast = one & (s0 >= matching.min_match)
        group_of = np.repeat(np.arange(starts.size), ends - starts)  # per clip of the partition
        dup_at = np.flatnonzero(fast[group_of])
        dup_at = dup_at[dup_at != starts[group_of[dup_at]]]  # all but each group's first
        which = group_of[dup_at]
        kept_at = starts[which]
        dup_row, kept_row = rec["row"][dup_at], rec["row"][kept_at]
        parts_out = [(dup_at, kept_at, s0[which], np.where(kept_row > dup_row, h0[which], -h0[which]))]
        for g in np.flatnonzero(~one):  # groups of several classes: one clip at a time
            s, e = int(starts[g]), int(ends[g])
            rows = rec["row"][s:e].tolist()
            pos = {r: s + j for j, r in enumerate(rows)}
            cls_of = dict(zip(rows, rec["copy_of"][s:e].tolist()))

            def score(i: int, k: int) -> tuple[float, float] | None:
                a, b = (i, k) if i < k else (k, i)
                return class_score(cls_of[a], cls_of[b])

            chosen = choose_group(rows, cls_of.__getitem__, score, matching.min_match)
            if chosen:
                d = np.array([pos[i] for i, _, _ in chosen], np.int64)
                k = np.array([pos[kk] for _, kk, _ in chosen], np.int64)
                parts_out.append((d, k, np.array([c[2] for c in chosen]),
                                  np.array([_shift(score, i, kk) for i, kk, _ in chosen])))
        d, k, sc, sh = (np.concatenate(x) for x in zip(*parts_out))
        if d.size:
            out = np.empty(d.size, out_rec)
            out["row"], out["score"], out["shift"] = rec["row"][d], sc, sh
            out["group"], out["clip_id"], out["kept"] = rec["group"][d], rec["clip_id"][d], rec["clip_id"][k]
            decided.add(out, np.minimum(out["row"] // span, ranges - 1))
            stats["duplicates"] += int(d.size)
        done += len(rec)
        progress("%d/%d grouped clips decided, %d duplicates", done, grouped, stats["duplicates"])
    for q in range(ranges):
        rec = decided.read(q)
        if len(rec):
            rec = rec[np.argsort(rec["row"], kind="stable")]
            write(pa.table({"clip_id": _strings(rec["clip_id"]), "duplicate_of": _strings(rec["kept"]),
                            "similarity": pa.array(rec["score"], pa.float64()),
                            "shift_s": pa.array(rec["shift"], pa.float64()),
                            "group": pa.array(rec["group"], pa.int64())}))
    for x in (members, cls_parts, edge_parts, decided):
        x.remove()
    for x in sig_logs:
        x.path.unlink(missing_ok=True)
    progress("%d duplicates in %d groups (%d pairs that were no candidates matched)", stats["duplicates"],
             stats["groups"], stats["late_matches"], force=True)
    return stats


def _binary_buffers(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An Arrow string or binary array's bytes without a Python object per value: each value's
    offset into `data` (n + 1, from 0), the values' bytes (uint8) and which are not null."""
    arr = pc.cast(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values, pa.large_binary())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    buffer = arr.buffers()[2]
    data = np.frombuffer(buffer, np.uint8) if buffer is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], data[offsets[0]:offsets[-1]], valid


def _fixed_bytes(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """Strings as numpy bytes of `width` (their UTF-8, whose byte order is the strings' order),
    from the Arrow buffers (no Python object per value)."""
    offsets, data, _ = _binary_buffers(column)
    lens = np.diff(offsets)
    if lens.size and lens.max() > width:
        raise ValueError(f"dedup: a clip id longer than the {width} bytes the groups cache recorded")
    out = np.zeros((len(lens), width), np.uint8)
    for j in range(int(lens.max()) if lens.size else 0):  # a byte position at a time: no int64 per byte
        has = lens > j
        out[has, j] = data[offsets[:-1][has] + j]
    return out.view(f"S{width}").ravel()


def _strings(values: np.ndarray) -> pa.Array:
    """numpy bytes (UTF-8) as Arrow strings."""
    return pa.array(values, pa.binary()).cast(pa.string())


def _shift(score: Score, i: int, k: int) -> float:
    """The kept clip k's time against the duplicate i's, in seconds (dedup.record's sign rule)."""
    value = score(i, k)[1]
    return value if k > i else -value


class BytesLog:
    """(row, bytes) records appended to one file, read back as {row: bytes}."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.write_bytes(b"")

    def add(self, rows: np.ndarray, values: list[bytes | None]) -> None:
        with open(self.path, "ab") as f:
            for r, v in zip(rows.tolist(), values):
                v = v or b""
                f.write(np.array([r, len(v)], "<i8").tobytes() + v)

    def read(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        data = self.path.read_bytes()
        at = 0
        while at < len(data):
            r, length = np.frombuffer(data[at:at + 16], "<i8")
            at += 16
            if length:
                out[int(r)] = data[at:at + int(length)]
            at += int(length)
        return out


# ---- the temporary folder ----------------------------------------------------------------------

class Workdir:
    """A temporary folder for one dedup pass (removed after it), in `parent` or the system's
    temporary folder; refuses to start when the disk holds less than `need_bytes`."""

    def __init__(self, parent: str | None = None, need_bytes: int = 0):
        self.parent = parent
        self.need = need_bytes

    def __enter__(self) -> Path:
        root = self.parent or tempfile.gettempdir()
        free = shutil.disk_usage(root).free
        if self.need and free < self.need:
            raise OSError(f"dedup: {self.need / 2**30:.1f} GB of temporary files needed in {root}, "
                          f"{free / 2**30:.1f} GB free; set TMPDIR to a larger disk")
        self.path = Path(tempfile.mkdtemp(prefix="dedup-", dir=root))
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
