"""Step 3 of the search (groups.py): candidate pairs verified by their temporal signatures.

Candidate pairs are spilled and made unique per partition; those whose signatures match at >=
min_match become edges. Signatures come from the caller's streamed fetch of the rows that need
one (candidates, representatives of classes of two or more clips) into a spill read per block of
pairs; blocks are matched over a process per CPU when there are many, a few blocks in flight.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from curation.dedup.budget import Progress
from curation.dedup.spill import BytesFile, Parts, RowFile
from stages import signature

log = logging.getLogger("curation.dedup")

# Candidate pairs per verification task: ~0.7 s of matching (a task's start-up is a few ms),
# with the signatures of its pairs (up to ~5 MB) in flight twice per worker.
VERIFY_BLOCK = 1024
PARALLEL_MIN_PAIRS = 20_000  # more than this: verified over a process per CPU


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
