"""The near-duplicate decisions of a pass: each grouped clip's priority under the rules, the
duplicates written to dedup/duplicates.parquet (`Decisions` reads them alongside scores/) and
the pass's record, dedup/dedup.json (`decide`: the pass)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import columns, outdir
from curation.dedup.budget import Budget, Progress
from curation.dedup.cache import GroupsCache, run_groups
from curation.dedup.choosing import Prioritised, choose_duplicates
from curation.dedup.corpus import payload_files, remove_stale_caches
from curation.dedup.defaults import settings
from curation.dedup.matching import Matching
from curation.dedup.spill import Workdir
from curation.ledger import Ledger
from curation.writer import OutputError, OutputStore, write_json

REASON_PREFIX = "duplicate_of:"


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
            chosen = choose_duplicates(
                prioritised(cache, score_files, effective, keep_by), cache.tables("classes"), cache.tables("pairs"),
                meta, len(keep_by), Matching(meta["min_match"], meta["max_shift_s"]), work, budget,
                writer.write_table)
    summary = record(store, meta, chosen, opts)
    remove_stale_caches(store, payload_files(ledger))
    progress("%d duplicates in %d groups (%s candidates at cosine >= %.3g, matching in time at >= %.3g) among "
             "%d clips (%d distinct)", summary["duplicates"], summary["groups"], meta["embedding"], 1 - meta["eps"],
             meta["min_match"], meta["clips_embedded"], meta["distinct"], force=True)
    return Decisions(path, chosen["duplicates"]), summary
