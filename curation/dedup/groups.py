"""Near-duplicate groups of a corpus larger than memory: the out-of-core search (steps 1-4).

The package's docstring (curation/dedup/__init__.py) says what is decided (candidates by vector
cosine, duplicates by temporal signature, groups as the connected components of matching pairs,
the clip kept of a group by priority); this module and the ones it runs compute it for 10^7
clips and more in memory bounded by `memory_mb` (the dedup.memory_mb setting; budget.py)
whatever the number of clips n, and in time linear in n however many exact copies the corpus
holds. Rows and the files that hold them: spill.py.

1. Exact copies (copies.py, `exact_classes`).
2. Candidates (candidates.py, `candidate_search`).
3. Verification (matching.py, `verify`).
4. Components (`components`, here): labels over the rows in edges, hooked along the edges and
   flattened by pointer jumping, a round per pass over the edges (about log n rounds): no
   union-find in memory. A class is in a group when its representative has an edge or its
   copies match one another.

`find_groups` runs 1-4 and writes the groups cache (cache.py: groups, pairs and classes tables,
in row order); `choose_duplicates` (choosing.py) takes it with each grouped clip's priority.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.budget import Budget, Progress
from curation.dedup.candidates import Search, candidate_search
from curation.dedup.copies import KEY, exact_classes
from curation.dedup.matching import EDGE, PAIR, SELF, Matching, verify
from curation.dedup.spill import BytesFile, Parts, RowFile, mix_part
from stages import signature

log = logging.getLogger("curation.dedup")

ENGINE_VERSION = "ooc-v1"  # part of the groups cache's key (cache.py): the cache's format and the search's rule
ROW_OUT_BYTES = 256  # a row of an output table while built (its clip id a Python string)


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
    in row order (cache.py: Parquet writers on the output's dedup/ files)."""

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
    """Steps 1-4 (the module docstring) over `corpus`, the result written to `out`:
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
