"""Which clip of each group is kept, out of core: `choose_duplicates` takes the groups cache with
each grouped clip's priority, streamed in row order, and writes the duplicates in row order,
group by group in partitions (`choose_group`: the rule of dedup.choose, in time linear in a
group's clips when its copies form few classes)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.dedup.arrow_bytes import arrow_strings, fixed_bytes
from curation.dedup.budget import Budget, Progress
from curation.dedup.matching import Matching
from curation.dedup.spill import BytesLog, Parts, mix_part
from stages import signature


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
    its keep_by values (NaN: missing), as decisions.py streams them from scores/."""

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
        rec["clip_id"] = fixed_bytes(chunk.groups.column("clip_id"), width)
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
            write(pa.table({"clip_id": arrow_strings(rec["clip_id"]), "duplicate_of": arrow_strings(rec["kept"]),
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


def _shift(score: Score, i: int, k: int) -> float:
    """The kept clip k's time against the duplicate i's, in seconds (dedup.record's sign rule)."""
    value = score(i, k)[1]
    return value if k > i else -value
