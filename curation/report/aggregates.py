"""Pass 1 of the summary (summary.py's docstring): the aggregates one streamed pass over the
scores gives, per row group: which rule rejected each clip (`Membership`), the per-source rows
(`Sources`), and the counts, cascade, overlaps, errors, score counts and the clips nearest each
rule's threshold (`Pass1`)."""

from __future__ import annotations

import functools
import heapq
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, schema
from curation.report.rules import DUPLICATE_REASON, attribute_reason, unexplained_rule


def status_of(status: str | None) -> str:
    """A non-clip row's status; outputs written before source_status existed read as unreadable."""
    return status or "unreadable"


def keep_of(table: pa.Table) -> np.ndarray:
    return pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False).astype(bool)


# ---- which rules rejected each clip -------------------------------------------------------------

class Membership:
    """Per row group: a (rows x rules) matrix of which rule rejected each clip, from the stored
    reject_reasons. Reasons are attributed once per distinct string; a reason no configured
    rule explains gets a rule line of its own (appended: callers grow their arrays)."""

    def __init__(self, rules: list[dict[str, Any]]):
        self.rules = rules
        self.of_reason: dict[str, list[int]] = {}
        self.totals: Counter[str] = Counter()
        self.alone: Counter[str] = Counter()

    def matrix(self, clips: pa.Table, count: bool = False) -> np.ndarray:
        n = clips.num_rows
        reasons = clips.column("reject_reasons").combine_chunks() if n else pa.array([], pa.list_(pa.string()))
        flat = pc.list_flatten(reasons)
        # "duplicate_of:<clip_id>" names a clip: one reason for the counts, not one per kept clip.
        flat = pc.if_else(pc.starts_with(flat, DUPLICATE_REASON + ":"), pa.scalar(DUPLICATE_REASON), flat)
        parents = pc.list_parent_indices(reasons).to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(reasons), 0).to_numpy(zero_copy_only=False)
        matrix = np.zeros((n, len(self.rules)), dtype=bool)
        if not len(flat):
            return matrix
        encoded = flat.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        for u, reason in enumerate(encoded.dictionary.to_pylist()):
            rows = parents[codes == u]
            if count:
                self.totals[reason] += int(rows.size)
                self.alone[reason] += int((lengths[rows] == 1).sum())
            if reason not in self.of_reason:
                idx = attribute_reason(reason, self.rules)
                if not idx:  # a reason no configured rule explains (e.g. an older config): its own line
                    self.rules.append(unexplained_rule(reason))
                    idx = [len(self.rules) - 1]
                self.of_reason[reason] = idx
            if matrix.shape[1] < len(self.rules):
                matrix = np.pad(matrix, ((0, 0), (0, len(self.rules) - matrix.shape[1])))
            for i in self.of_reason[reason]:
                matrix[rows, i] = True
        return matrix

    def reasons(self) -> dict[str, dict[str, int]]:
        return {r: {"total": n, "only_this": self.alone[r]} for r, n in
                sorted(self.totals.items(), key=lambda kv: (-kv[1], kv[0]))}


def _grow(a: np.ndarray, size: int, axes: tuple[int, ...] = (0,)) -> np.ndarray:
    pad = [(0, size - a.shape[k]) if k in axes else (0, 0) for k in range(a.ndim)]
    return np.pad(a, pad) if any(p[1] for p in pad) else a


def distance(values: np.ndarray, effective: dict[str, float]) -> np.ndarray:
    """Signed distance to the rule's threshold: > 0 outside (rejected side), <= 0 inside."""
    d = np.full(values.shape, -np.inf)
    if "min" in effective:
        d = np.maximum(d, effective["min"] - values)
    if "max" in effective:
        d = np.maximum(d, values - effective["max"])
    return d


# ---- per source ---------------------------------------------------------------------------------

class Sources:
    """Per-source rows from contiguous runs of rows: clips, kept, minutes, the rule rejecting
    most of its clips, and why it has none (its error row). Each finished source goes to
    `on_source`; the `keep_top` largest are kept for the page, in the page's order."""

    def __init__(self, on_source: Callable[[dict[str, Any]], None] | None, keep_top: int):
        self.on_source, self.keep_top = on_source, keep_top
        self.top: list[tuple] = []
        self.count = 0
        self.outcomes: Counter[str] = Counter()
        self.open: dict[str, Any] | None = None

    def add(self, table: pa.Table, is_clip: np.ndarray, keep: np.ndarray, matrix_all: np.ndarray,
            rules: list[dict[str, Any]]) -> None:
        ids = table.column("source_id").to_numpy(zero_copy_only=False).astype(str)
        if not ids.size:
            return
        starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
        ends = np.concatenate([starts[1:], [ids.size]])
        paths, errors = table.column("source_path"), table.column("split_error")
        statuses = table.column("source_status")
        dur = np.nan_to_num(columns.floats(table, "duration_s"))
        for s, e in zip(starts.tolist(), ends.tolist()):
            part = {"source_id": ids[s], "source_path": paths[s].as_py(),
                    "clips": int(is_clip[s:e].sum()), "kept": int((keep[s:e] & is_clip[s:e]).sum()),
                    "minutes": float((dur[s:e] * is_clip[s:e]).sum()) / 60,
                    "by_rule": matrix_all[s:e].sum(axis=0),
                    "error": next((errors[i].as_py() for i in range(s, e) if not is_clip[i]), None),
                    "statuses": {status_of(statuses[i].as_py()) for i in range(s, e) if not is_clip[i]}}
            if self.open is not None and self.open["source_id"] == part["source_id"]:
                self._merge(part)
            else:
                self._finish()
                self.open = part

    def _merge(self, part: dict[str, Any]) -> None:
        o = self.open
        for key in ("clips", "kept", "minutes"):
            o[key] += part[key]
        n = max(o["by_rule"].size, part["by_rule"].size)
        o["by_rule"] = _grow(o["by_rule"], n) + _grow(part["by_rule"], n)
        o["error"] = o["error"] or part["error"]
        o["statuses"] |= part["statuses"]

    def _finish(self) -> None:
        o, self.open = self.open, None
        if o is None:
            return
        self.count += 1
        self.outcomes.update(o["statuses"])
        row = {"source_id": o["source_id"], "source_path": o["source_path"], "clips": o["clips"],
               "kept": o["kept"], "clip_minutes": round(o["minutes"], 3), "top_rejection": None,
               "error": o["error"] if not o["clips"] else None, "by_rule": o["by_rule"]}
        if self.on_source is not None:
            self.on_source(row)
        key = (o["clips"], row["error"] is not None, _Reverse(o["source_path"]))
        if len(self.top) < self.keep_top:
            heapq.heappush(self.top, (key, self.count, row))
        elif key > self.top[0][0]:
            heapq.heapreplace(self.top, (key, self.count, row))

    def rows(self) -> list[dict[str, Any]]:
        self._finish()
        return [r for _, _, r in sorted(self.top, key=lambda t: t[0], reverse=True)]


@functools.total_ordering
class _Reverse:
    """A string that sorts backwards (ties between equal counts or distances: the smallest
    path or clip_id wins, in heaps that keep the largest keys)."""

    def __init__(self, text: str):
        self.text = text

    def __lt__(self, other: "_Reverse") -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reverse) and self.text == other.text


def top_rejection(row: dict[str, Any], rules: list[dict[str, Any]]) -> dict[str, Any]:
    """The source row as written: its most frequent rejecting rule named."""
    by_rule = row.pop("by_rule")
    if by_rule.size and by_rule.max() > 0:
        i = int(by_rule.argmax())
        row["top_rejection"] = {"rule": rules[i]["label"], "clips": int(by_rule[i])}
    return row


# ---- the passes ---------------------------------------------------------------------------------

class Pass1:
    """Everything one streamed pass over the scores gives (summary.py's docstring, pass 1)."""

    def __init__(self, rules: list[dict[str, Any]], score_columns: list[str], max_gallery: int, max_strip: int,
                 on_source: Callable[[dict[str, Any]], None] | None, max_source_rows: int,
                 video_ranks: set[int] | None = None):
        self.rules, self.score_columns = rules, score_columns
        self.membership = Membership(rules)
        self.n_near, self.max_strip = max(1, (2 * max_gallery) // 3), max_strip
        self.sources = Sources(on_source, max_source_rows)
        self.rows = self.clips = self.kept = 0
        self.clip_s = self.kept_s = 0.0
        r = len(rules)
        self.rejected, self.only, self.missing = np.zeros(r, np.int64), np.zeros(r, np.int64), np.zeros(r, np.int64)
        self.removed, self.removed_s = np.zeros(r, np.int64), np.zeros(r)
        self.pairs = np.zeros((r, r), np.int64)
        self.combos: Counter[tuple[int, ...]] = Counter()
        self.errors: dict[str, dict[str, list]] = {}
        self.stats = {c: {"values": 0, "missing": 0, "sum": 0.0, "kept": 0, "rejected": 0} for c in score_columns}
        self.near: dict[int, list] = {}  # rule -> heap of (-distance, _Reverse(clip_id), item)
        self.strip: dict[int, list] = {}
        self.rejected_valued = np.zeros(r, np.int64)
        self.video_ranks = video_ranks or set()
        self.spread_kept: list[dict[str, Any]] = []  # kept clips at evenly spaced ranks (videos)

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        self.rows += n
        is_clip = columns.is_clip(table)
        keep_all = keep_of(table)
        clips = table.filter(pa.array(is_clip))
        keep = keep_all[is_clip]
        matrix = self.membership.matrix(clips, count=True)
        r = len(self.rules)
        for name in ("rejected", "only", "missing", "removed", "rejected_valued"):
            setattr(self, name, _grow(getattr(self, name), r))
        self.removed_s = _grow(self.removed_s, r)
        self.pairs = _grow(self.pairs, r, (0, 1))
        duration = np.nan_to_num(columns.floats(clips, "duration_s"))
        self.clips += clips.num_rows
        for j in np.flatnonzero(keep)[[r - self.kept for r in sorted(self.video_ranks)
                                       if self.kept <= r < self.kept + int(keep.sum())]].tolist():
            self.spread_kept.append(caption_of(clips, j))
        self.kept += int(keep.sum())
        self.clip_s += float(duration.sum())
        self.kept_s += float(duration[keep].sum())
        self._rules(clips, matrix, duration)
        matrix_all = np.zeros((n, r), dtype=bool)
        matrix_all[is_clip] = matrix
        self.sources.add(table, is_clip, keep_all, matrix_all, self.rules)
        self._errors(table)
        self._scores(clips, keep)
        self._galleries(clips, matrix, keep)

    def _rules(self, clips: pa.Table, matrix: np.ndarray, duration: np.ndarray) -> None:
        single = matrix.sum(axis=1) == 1
        self.rejected += matrix.sum(axis=0)
        self.only += (matrix & single[:, None]).sum(axis=0)
        for i, rule in enumerate(self.rules):
            if rule["step"] != "dedup":
                self.missing[i] += int((matrix[:, i] & np.isnan(columns.floats(clips, rule["column"]))).sum())
        first = np.where(matrix.any(axis=1), matrix.argmax(axis=1), -1)  # the cascade: first rule in order
        for i in range(len(self.rules)):
            hit = first == i
            self.removed[i] += int(hit.sum())
            self.removed_s[i] += float(duration[hit].sum())
        m = matrix.astype(np.int64)
        self.pairs += m.T @ m
        rejected = matrix[matrix.any(axis=1)]
        if rejected.size:
            patterns, counts = np.unique(rejected, axis=0, return_counts=True)
            for p, c in zip(patterns, counts):
                self.combos[tuple(np.flatnonzero(p).tolist())] += int(c)

    def _errors(self, table: pa.Table) -> None:
        for column in schema.ERROR_COLUMNS:
            if column not in table.column_names or table.column(column).null_count == table.num_rows:
                continue
            groups = self.errors.setdefault(column, {})
            for v in table.column(column).drop_null().to_pylist():
                kind = v.split(":", 1)[0].strip()[:80] or "error"
                g = groups.setdefault(kind, [0, v[:300]])
                g[0] += 1

    def _scores(self, clips: pa.Table, keep: np.ndarray) -> None:
        for column in self.score_columns:
            v = columns.floats(clips, column)
            ok = ~np.isnan(v)
            st = self.stats[column]
            st["values"] += int(ok.sum())
            st["missing"] += int((~ok).sum())
            st["sum"] += float(v[ok].sum())
            st["kept"] += int((keep & ok).sum())
            st["rejected"] += int((~keep & ok).sum())

    def _galleries(self, clips: pa.Table, matrix: np.ndarray, keep: np.ndarray) -> None:
        ids = clips.column("clip_id")
        for i, rule in enumerate(self.rules):
            if not rule["effective"] or not rule["applied"]:
                continue
            values = columns.floats(clips, rule["column"])
            dist = distance(values, rule["effective"])
            rejected = np.flatnonzero(matrix[:, i] & ~np.isnan(values))
            self.rejected_valued[i] += rejected.size
            heap = self.near.setdefault(i, [])
            for j in rejected[np.argsort(dist[rejected], kind="stable")][:self.n_near].tolist():
                item = (-float(dist[j]), _Reverse(ids[j].as_py()))
                self._push(heap, item, self.n_near, clips, j, float(values[j]), float(dist[j]))
            strip = self.strip.setdefault(i, [])
            inside = np.flatnonzero(keep & ~np.isnan(values))
            for j in inside[np.argsort(-dist[inside], kind="stable")][:self.max_strip].tolist():
                item = (float(dist[j]), _Reverse(ids[j].as_py()))
                self._push(strip, item, self.max_strip, clips, j, float(values[j]), float(-dist[j]))

    @staticmethod
    def _push(heap: list, key: tuple, size: int, clips: pa.Table, j: int, value: float, dist: float) -> None:
        """Keep the `size` items of smallest distance (ties: smallest clip_id), as a max-heap."""
        if len(heap) >= size and not key > heap[0][0]:
            return
        item = {"clip_id": clips.column("clip_id")[j].as_py(), "value": value, "distance": dist,
                "caption": caption_of(clips, j)}
        if len(heap) < size:
            heapq.heappush(heap, (key, item))
        else:
            heapq.heapreplace(heap, (key, item))


def caption_of(clips: pa.Table, j: int) -> dict[str, Any]:
    """What a thumbnail shows under it: identity, scores and every rejection reason."""
    def value(c: str) -> Any:
        return clips.column(c)[j].as_py() if c in clips.column_names else None

    shown = {c: value(c) for c in ["duration_s"] + schema.SCORE_COLUMNS
             if value(c) is not None and not (isinstance(value(c), float) and np.isnan(value(c)))}
    return {"clip_id": value("clip_id"), "source": Path(value("source_path") or "?").name,
            "start_s": value("start_s"), "scores": shown, "reasons": value("reject_reasons") or [],
            "keep": bool(value("keep"))}
