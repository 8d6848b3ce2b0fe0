"""The review page's data: a finished run's score columns held once in memory, and the rules
evaluated on them by the same code as `curate refilter` (stages/rules.py: percentile rules
resolved by `resolve_sorted`, every check by `rule_checks`), so the page and refilter cannot
disagree.

What is held, for R rows: each numeric scores column as float64 (8 R bytes), its clip values
sorted (for percentile rules and histograms, at most 8 R more), which rows are clips, which
rows the run's dedup pass rejected, and each row's source (an int32 code). At 10^6 rows and
the default pipeline's dozen numeric columns that is about 200 MB. Nothing per row is a
Python object.

Near-duplicates: a dedup decision depends on the rules (a group keeps its best clip under
them), so refilter decides them again; the page counts the duplicates the run's last pass
rejected as they stand and says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, schema
from curation.dedup import REASON_PREFIX
from curation.writer import OutputStore
from stages.rules import Rules, effective_bounds, filter_steps, percentile_rules, resolve_sorted, rule_checks

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 60


@dataclass
class Rule:
    """One rule's share of an evaluation."""

    step: str
    column: str
    bounds: dict[str, float]  # as written (absolute or percentile)
    effective: dict[str, float]  # the min/max it applies
    rejects: int = 0  # clips it rejects
    alone: int = 0  # clips it alone rejects (no other rule, not a duplicate)
    after: int = 0  # clips left after it in the funnel (rules in pipeline order)
    index: int = 0  # its filter step's place among the config's filter steps


@dataclass
class Evaluation:
    clips: int
    kept: int
    duplicates: int  # clips kept by the rules but rejected by the run's dedup pass
    rules: list[Rule]
    overlaps: list[list[int]]  # [i][j]: clips both rule i and rule j reject
    keep: np.ndarray = field(repr=False)  # per row
    checks: list[tuple[int, str, str, np.ndarray]] = field(repr=False, default_factory=list)  # rule_checks'
    masks: dict[tuple[int, str], np.ndarray] = field(repr=False, default_factory=dict)  # (step, column): rejected
    seconds: float = 0.0  # the server time this evaluation took

    def reasons(self, row: int, duplicate: bool) -> list[str]:
        """One row's reject_reasons under these rules (as refilter would store them, with the
        run's duplicate decision as it stands)."""
        out = list(dict.fromkeys(reason for _, _, reason, mask in self.checks if mask[row]))
        return out + (["duplicate (as the run decided)"] if duplicate else [])

    def as_json(self) -> dict[str, Any]:
        return {"clips": self.clips, "kept": self.kept, "duplicates": self.duplicates,
                "rules": [{"step": r.step, "column": r.column, "bounds": r.bounds, "effective": r.effective,
                           "rejects": r.rejects, "alone": r.alone, "after": r.after} for r in self.rules],
                "overlaps": self.overlaps, "server_ms": round(1000 * self.seconds, 1)}


class ReviewData:
    """A run's score columns (module docstring). `load` reads them once, streaming the
    committed scores files a row group at a time."""

    def __init__(self, values: dict[str, np.ndarray], is_clip: np.ndarray, duplicate: np.ndarray,
                 source: np.ndarray, source_ids: list[str], clip_ids: pa.Array | None = None,
                 source_paths: list[str] | None = None, duplicate_rows: np.ndarray | None = None,
                 duplicate_targets: pa.Array | None = None, split_errors: dict[int, tuple[str, str]] | None = None):
        self.values, self.is_clip, self.duplicate = values, is_clip, duplicate
        self.source, self.source_ids = source, source_ids
        self.source_paths = source_paths or []
        self.clip_ids = clip_ids if clip_ids is not None else pa.array([], pa.string())
        self.clip_rank = np.cumsum(is_clip, dtype=np.int64) - 1  # a clip row's place among the clip rows
        # Only for the rows that have one: a duplicate's kept clip (rows ascending, with the
        # clip ids as Arrow strings), a source error's reason (few: a dict).
        self.duplicate_rows = duplicate_rows if duplicate_rows is not None else np.zeros(0, np.int64)
        self.duplicate_targets = duplicate_targets if duplicate_targets is not None else pa.array([], pa.string())
        self.split_errors = split_errors or {}  # row -> (source_status, split_error)
        self.rows = int(is_clip.size)
        self.clips = int(is_clip.sum())
        self.sorted = {c: np.sort(v[is_clip & ~np.isnan(v)]) for c, v in values.items()}

    @classmethod
    def load(cls, store: OutputStore) -> ReviewData:
        started = time.monotonic()
        files = store.ledger().files("scores")
        numeric = list(schema.NUMERIC_COLUMNS)
        parts: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
        is_clip, duplicate, source, clip_ids = [], [], [], []
        dup_rows: list[np.ndarray] = []
        dup_targets: list[pa.Array] = []
        split_errors: dict[int, tuple[str, str]] = {}
        offset = 0
        codes: dict[str, int] = {}
        paths: list[str] = []
        wanted = ["clip_id", "source_id", "source_path", "split_error", "source_status", "start_frame",
                  "reject_reasons", *numeric]
        # (source errors are a few rows: their status and reason are held as Python strings;
        # every other per-row figure is a numpy or Arrow array)
        for table in columns.scan(files, wanted):
            clip_ids.append(table.column("clip_id").combine_chunks())
            is_clip.append(columns.is_clip(table))
            for c in numeric:
                parts[c].append(columns.floats(table, c))
            dup, rows, targets = _duplicates(table.column("reject_reasons"), with_targets=True)
            duplicate.append(dup)
            dup_rows.append(rows + offset)
            dup_targets.append(targets)
            for i in np.flatnonzero(~is_clip[-1]):
                status = table.column("source_status")[int(i)].as_py() or "unreadable"
                split_errors[offset + int(i)] = (status, table.column("split_error")[int(i)].as_py() or "")
            offset += table.num_rows
            ids = pc.dictionary_encode(table.column("source_id")).combine_chunks()
            dictionary = ids.dictionary.to_pylist()  # one string per source in the row group
            indices = ids.indices.to_numpy(zero_copy_only=False)
            first = np.zeros(len(dictionary), np.int64)  # each source's first row in the group
            present, at = np.unique(indices, return_index=True)
            first[present] = at
            new = [k for k, sid in enumerate(dictionary) if sid not in codes]
            if new:
                taken = table.column("source_path").take(pa.array(first[new])).to_pylist()
                for k, path in zip(new, taken):
                    codes[dictionary[k]] = len(codes)
                    paths.append(path)
            remap = np.array([codes[s] for s in dictionary], np.int32)
            source.append(remap[indices] if len(remap) else np.zeros(0, np.int32))
        cat = (lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype))
        clip_mask = cat(is_clip, bool)
        values = {c: cat(parts[c], np.float64) for c in numeric}
        # Columns no clip has a value in (a stage that did not run) are left out of the page.
        values = {c: v for c, v in values.items() if np.any(~np.isnan(v[clip_mask]))}
        data = cls(values, clip_mask, cat(duplicate, bool), cat(source, np.int32), list(codes),
                   pa.concat_arrays(clip_ids) if clip_ids else None, paths,
                   cat(dup_rows, np.int64), pa.concat_arrays([t.cast(pa.string()) for t in dup_targets])
                   if dup_targets else None, split_errors)
        log.info("review: %d rows (%d clips, %d sources) of %d columns in %.1fs", data.rows, data.clips,
                 len(codes), len(values), time.monotonic() - started)
        return data

    def resolve(self, steps: list[tuple[str, Rules]]) -> list[tuple[str, str, dict[str, float], dict[str, float]]]:
        """(step, column, bounds, effective min/max) of every rule, percentile rules resolved
        over the held sorted values exactly as finalize resolves them."""
        out = []
        for name, rules in steps:
            percentile = percentile_rules(rules)
            for column, bounds in rules.items():
                resolved = None
                if column in percentile:
                    resolved = resolve_sorted(self.sorted.get(column, np.zeros(0)), bounds)
                out.append((name, column, bounds, effective_bounds(bounds, resolved)))
        return out

    def evaluate(self, steps: list[tuple[str, Rules]]) -> Evaluation:
        """The funnel, each rule's rejects (all, alone), the overlaps and the kept total."""
        started = time.perf_counter()
        resolved = self.resolve(steps)
        effective: list[Rules] = [{} for _ in steps]
        index_of = {name: i for i, (name, _) in enumerate(steps)}
        for name, column, _, bounds in resolved:
            effective[index_of[name]][column] = bounds
        masks: dict[tuple[int, str], np.ndarray] = {}  # each rule's rejected rows: its checks together
        checks = rule_checks(~self.is_clip, self.values, effective)
        for index, column, _, mask in checks:
            key = (index, column)
            masks[key] = masks[key] | mask if key in masks else mask
        rules = [Rule(name, column, bounds, eff, index=index_of[name]) for name, column, bounds, eff in resolved]
        stack = [masks[(index_of[r.step], r.column)] for r in rules]
        count = np.zeros(self.rows, np.int16)
        for m in stack:
            count += m
        rejected = count > 0
        left = self.is_clip.copy()
        for r, m in zip(rules, stack):
            r.rejects = int(m.sum())
            r.alone = int((m & (count == 1) & ~self.duplicate).sum())
            left &= ~m
            r.after = int(left.sum())
        overlaps = [[int((a & b).sum()) for b in stack] for a in stack]
        keep = self.is_clip & ~rejected & ~self.duplicate
        duplicates = int((self.is_clip & ~rejected & self.duplicate).sum())
        return Evaluation(self.clips, int(keep.sum()), duplicates, rules, overlaps, keep, checks, masks,
                          time.perf_counter() - started)

    def near_threshold(self, evaluation: Evaluation, rule: Rule, n: int = 12) -> dict[str, list[int]]:
        """The rows just kept and just dropped at a rule's thresholds: among the clips no other
        rule rejects (and not duplicates), the `n` the rule keeps and the `n` it rejects whose
        values are nearest one of its thresholds, nearest first."""
        v = self.values.get(rule.column)
        bounds = [b for b in (rule.effective.get("min"), rule.effective.get("max")) if b is not None]
        if v is None or not bounds:
            return {"kept": [], "dropped": []}
        own = evaluation.masks[(rule.index, rule.column)]
        others = np.zeros(self.rows, bool)
        for key, mask in evaluation.masks.items():
            if key != (rule.index, rule.column):
                others |= mask
        free = self.is_clip & ~others & ~self.duplicate & ~np.isnan(v)
        distance = np.min(np.abs(v[:, None] - np.asarray(bounds)[None, :]), axis=1)
        out = {}
        for side, rows in (("kept", np.flatnonzero(free & ~own)), ("dropped", np.flatnonzero(free & own))):
            if rows.size > n:
                rows = rows[np.argpartition(distance[rows], n)[:n]]
            out[side] = rows[np.argsort(distance[rows], kind="stable")].tolist()
        return out

    def row_of(self, clip_id: str) -> int | None:
        """The row of a clip id (None when the output has no such row)."""
        found = pc.index(self.clip_ids, clip_id).as_py()
        return None if found is None or found < 0 else int(found)

    def source_rows(self, source_id: str) -> np.ndarray:
        """The rows of one source, in order (a source's rows are contiguous and in time order)."""
        try:
            code = self.source_ids.index(source_id)
        except ValueError:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.source == code)

    def sources(self, evaluation: Evaluation, n: int = 20) -> dict[str, Any]:
        """The sources with their outcomes under these rules: how many have kept clips, have
        clips all rejected, have no clip (by the split's status: unreadable, no_clips,
        decode_error), and the `n` sources that lose the most clips, with their counts."""
        sources = len(self.source_ids)
        clips = np.bincount(self.source, weights=self.is_clip, minlength=sources).astype(np.int64)
        kept = np.bincount(self.source, weights=evaluation.keep, minlength=sources).astype(np.int64)
        outcomes = {"with kept clips": int((kept > 0).sum()),
                    "every clip rejected": int(((clips > 0) & (kept == 0)).sum())}
        errors: dict[int, tuple[str, str]] = {}
        for row, (status, reason) in self.split_errors.items():
            errors.setdefault(int(self.source[row]), (status, reason))
        for code, (status, _) in errors.items():
            if clips[code] == 0:
                outcomes[status] = outcomes.get(status, 0) + 1
        lost = clips - kept
        top = np.argsort(-lost, kind="stable")[:n]
        return {"total": sources, "outcomes": outcomes,
                "most_rejected": [{"source_id": self.source_ids[c], "source": self.source_paths[c] if self.source_paths
                                   else None, "clips": int(clips[c]), "kept": int(kept[c]),
                                   "error": errors.get(int(c), (None, None))[1]} for c in top.tolist() if lost[c] > 0]}

    def duplicate_of(self, row: int) -> str | None:
        """The clip a duplicate row duplicates (the run's dedup pass kept), or None."""
        i = int(np.searchsorted(self.duplicate_rows, row))
        if i < self.duplicate_rows.size and self.duplicate_rows[i] == row:
            return self.duplicate_targets[i].as_py()
        return None

    def histogram(self, column: str, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
        """Counts of the clips' values of `column` in `bins` equal bins over the 0.5th to
        99.5th percentile (the outermost bins take the tails), and the values missing."""
        values = self.sorted[column]
        n = int(values.size)
        lo = float(values[int(0.005 * (n - 1))]) if n else 0.0
        hi = float(values[int(0.995 * (n - 1))]) if n else 1.0
        if hi <= lo:
            lo, hi = (float(values[0]), float(values[-1])) if n else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        counts = np.bincount(np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1),
                             minlength=bins)
        return {"column": column, "edges": edges.tolist(), "counts": counts.tolist(),
                "missing": self.clips - n, "min": float(values[0]) if n else None,
                "max": float(values[-1]) if n else None}

    def percentile_of(self, column: str, value: float) -> float:
        """The share of the clips' values of `column` below `value`."""
        values = self.sorted[column]
        return float(np.searchsorted(values, value, side="left")) / max(1, values.size)


def _duplicates(reasons: pa.ChunkedArray, with_targets: bool = False):
    """Per row: a reason of the run's dedup pass is among its reject_reasons. With
    `with_targets`, also (the rows that have one, the clip each duplicates), vectorised."""
    reasons = reasons.combine_chunks() if isinstance(reasons, pa.ChunkedArray) else reasons
    n = len(reasons)
    out = np.zeros(n, bool)
    flat = pc.list_flatten(reasons)
    rows, targets = np.zeros(0, np.int64), pa.array([], pa.string())
    if len(flat):
        hit = np.asarray(pc.starts_with(flat, REASON_PREFIX).to_numpy(zero_copy_only=False), bool)
        parents = pc.list_parent_indices(reasons).to_numpy(zero_copy_only=False)
        out[parents[hit]] = True
        if with_targets and hit.any():
            # A row's first dedup reason (it has one): its rows ascending, and the clip after the prefix.
            first = np.flatnonzero(hit)
            rows_all = parents[first]
            keep_first = np.r_[True, rows_all[1:] != rows_all[:-1]]
            picked = first[keep_first]
            rows = rows_all[keep_first].astype(np.int64)
            targets = pc.utf8_slice_codeunits(flat.take(pa.array(picked)), len(REASON_PREFIX))
    return (out, rows, targets) if with_targets else out


def rules_of(config: dict[str, Any]) -> list[tuple[str, Rules]]:
    """The filter steps' rules of a config dict, checked (stages.rules.filter_steps)."""
    return filter_steps(config)
