"""Near-duplicate grouping and the choice of the kept clip in memory: small inputs, the benches
and the tests of the search, and the rule (`choose`) the out-of-core pass (choosing.py) follows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from curation.dedup.budget import Budget
from curation.dedup.candidates import Search, candidate_search
from curation.dedup.choosing import choose_group
from curation.dedup.defaults import CANDIDATES_PER_CLIP, DEFAULT_MAX_SHIFT_S
from curation.dedup.spill import RowFile, Workdir
from stages import signature

log = logging.getLogger("curation.dedup")


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
    """candidate_search over the rows of x (an array in memory), every row searched."""
    with Workdir() as work:
        budget = Budget()
        vectors = RowFile(work / "vectors", np.dtype((np.float16, (x.shape[1],))), 0, budget)
        vectors.append(x.astype(np.float16))
        rows = RowFile(work / "rows", np.int64, 0, budget)
        rows.append(np.arange(x.shape[0]))
        candidate_search(vectors, rows, Search(eps, bucket_size, margin, rounds, seed, top_k), work, budget,
                         sink)


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
    on small inputs (the run's groups are in the groups cache, choosing.choose_duplicates)."""

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
    """{duplicate clip_id: (kept clip_id, match score)} (see the package docstring, curation/dedup/__init__.py).

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
