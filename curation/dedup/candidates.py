"""Step 2 of the search (groups.py): candidate pairs by vector cosine, from a tree of k-means buckets.

Buckets are the leaves of a tree: a cell of more than 4 x bucket_size representatives is split
by spherical k-means, fitted on KMEANS_POINTS_PER_CENTROID sampled rows per centroid, into at
most FANOUT cells (a row also joins its second-nearest cell when that centroid is within
`margin` of its nearest), the assignment streamed over the cell's rows into one file per child.
In a leaf every row gets its top_k most similar partners at cosine >= 1 - eps (ties: the
smaller row), in blocks of BLOCK_ROWS x BLOCK_COLS cosines. `rounds` trees from other seeds are
unioned. A row costs FANOUT dot products per level (one level at 10^5 clips, two at 10^7) and a
leaf's worth of cosines, so time per row barely grows with n.

A row that joins two cells at every level is in up to 2^levels leaves a round, so the tree is
kept to two levels: a cell too large for its children to be leaves after one more split of
FANOUT (more than about FANOUT x bucket_size / 2 rows each, counting the rows that join two) is
split into more cells (`fanout`), up to MAX_FANOUT. Below about 2 x 10^6 distinct clips this is
FANOUT, as before; at 5 x 10^6 a third level doubled every row's leaves and compared cosines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.dedup.budget import Budget, Progress
from curation.dedup.spill import Parts, RowFile

# Tree of buckets: a split costs each row FANOUT dot products; 64 keeps that a small share of a
# leaf's ~1000-4000 cosines and gives one level up to ~2.5 x 10^5 distinct clips (at
# bucket_size 1000), two up to ~1.6 x 10^7.
FANOUT = 64
MAX_FANOUT = 1024  # a top split of up to ~3 x 10^7 distinct clips (bucket_size 1000) in two levels
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


def fanout(size: int, bucket_size: int) -> int:
    """The cells a cell of `size` rows is split into (module docstring): one per bucket_size
    rows up to FANOUT; more when even FANOUT children would need splitting twice more (each
    child, with the rows that also join it, must split by FANOUT into leaves)."""
    small = min(FANOUT, math.ceil(size / bucket_size))
    return int(min(MAX_FANOUT, max(small, math.ceil(2 * size / (FANOUT * bucket_size)))))


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
    """How candidates are searched (the module docstring)."""

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
    stats = {"leaves": 0, "compared": 0, "leaf_rows": 0, "splits": 0, "depth": 0}
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
                stats["depth"] = max(stats["depth"], depth)
            else:
                k = fanout(size, search.bucket_size)
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
    progress("%d rows in %d leaves (%d row slots, %d levels deep), %d splits, %d pairs compared by cosine", n,
             stats["leaves"], stats["leaf_rows"], stats["depth"], stats["splits"], stats["compared"], force=True)
    return stats
