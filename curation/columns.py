"""Streaming over an OUT_DIR's committed tables, column by column, in bounded memory.

Readers never hold the corpus: they read the columns they need from the files the ledger
lists (curation/ledger.py), one Parquet row group at a time, and keep aggregates. This module
has the pieces they share:
- `scan(paths, columns)`: the row groups of a kind's files, only `columns` (absent ones as
  nulls of the contract's type);
- `is_clip`: which rows are clips (source-error rows are not);
- `RowStream`: rows of a second kind read alongside, in the same order (a unit's clips/ rows
  are its scores' clip rows in the same order, and compaction keeps that order);
- `order_statistics`: exact k-th smallest values of a column over every file, in a few passes
  with a histogram each (never the column in memory): what percentile rules and the report's
  quantiles rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir, schema

HISTOGRAM_BINS = 4096  # bins per refinement pass of order_statistics
COLLECT_AT_MOST = 1 << 20  # values of one bin collected and sorted once a bin holds no more


def scan(paths: Iterable[Any], columns: list[str] | None = None,
         on_file: Callable[[Any], None] | None = None) -> Iterator[pa.Table]:
    """Row groups of the parquet files `paths`, in order: `columns` only (those a file lacks
    come back as nulls of the contract's type). `on_file(path)` is called after each file."""
    for path in paths:
        f = outdir.parquet_file(path)
        names = set(f.schema_arrow.names)
        present = None if columns is None else [c for c in columns if c in names]
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=present)
            if columns is not None and len(present) < len(columns):
                table = _with_nulls(table, columns)
            yield table
        if on_file is not None:
            on_file(path)


def _with_nulls(table: pa.Table, columns: list[str]) -> pa.Table:
    arrays = [table.column(c) if c in table.column_names else
              pa.nulls(table.num_rows, schema.arrow_type(c) or pa.null()) for c in columns]
    return pa.Table.from_arrays(arrays, names=columns)


def is_clip(table: pa.Table) -> np.ndarray:
    """Rows that are clips: not a source-error row (split_error set and no frame range)."""
    if not table.num_rows:
        return np.zeros(0, bool)
    error = pc.is_valid(table.column("split_error")).to_numpy(zero_copy_only=False)
    no_range = pc.is_null(table.column("start_frame")).to_numpy(zero_copy_only=False)
    return ~(error & no_range)


def floats(table: pa.Table, column: str) -> np.ndarray:
    """A column as float64, NaN for null; all NaN when the table lacks it."""
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


class RowStream:
    """The rows of parquet files read in order, handed out `take(n)` rows at a time."""

    def __init__(self, paths: Iterable[Any], columns: list[str]):
        self._groups = scan(paths, columns)
        self._columns = columns
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def take(self, n: int) -> pa.Table:
        if n == 0:
            return _with_nulls(pa.table({}), self._columns).slice(0, 0)
        while self._buffered < n:
            table = next(self._groups, None)
            if table is None:
                raise ValueError(f"the files ended {n - self._buffered} rows early: the output is damaged "
                                 "(a kind's files do not hold the same clips in the same order)")
            self._buffer.append(table)
            self._buffered += table.num_rows
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        head, rest = table.slice(0, n), table.slice(n)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        return head

    def exhausted(self) -> bool:
        if self._buffered:
            return False
        for table in self._groups:
            if table.num_rows:
                self._buffer, self._buffered = [table], table.num_rows
                return False
        return True


# ---- exact order statistics in bounded memory -------------------------------------------------

def order_statistics(values: Callable[[], Iterator[np.ndarray]], ranks: Iterable[int]) -> dict[int, float]:
    """{rank: the rank-th smallest value (0-based)} of the values `values()` yields (float
    arrays without NaN; called once per pass, it must yield the same values each time).

    Each pass narrows every rank's interval [lo, hi] to one of HISTOGRAM_BINS bins by
    counting; once a bin holds at most COLLECT_AT_MOST values, the next pass collects and
    sorts them. Exact, in memory of a bin; passes: 2 plus about one per factor 4096 that the
    values' spread exceeds COLLECT_AT_MOST (usually 3 in all)."""
    ranks = sorted(set(int(r) for r in ranks))
    n, lo, hi = 0, math.inf, -math.inf
    for v in values():
        if v.size:
            n += v.size
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    bad = [r for r in ranks if not 0 <= r < n]
    if bad:
        raise ValueError(f"rank {bad[0]} outside 0..{n - 1}")
    # Per rank: [lo, hi] holding it, the values below lo, and the answer once known.
    state = {r: {"lo": lo, "hi": hi, "below": 0} for r in ranks}
    found: dict[int, float] = {}
    while len(found) < len(ranks):
        todo = {r: s for r, s in state.items() if r not in found}
        for r, s in todo.items():
            if s["lo"] == s["hi"]:
                found[r] = s["lo"]
        todo = {r: s for r, s in todo.items() if r not in found}
        if not todo:
            break
        collect = {r: s for r, s in todo.items() if s.get("count", n) <= COLLECT_AT_MOST}
        count = {r: s for r, s in todo.items() if r not in collect}
        edges = {r: np.linspace(s["lo"], s["hi"], HISTOGRAM_BINS + 1) for r, s in count.items()}
        hists = {r: np.zeros(HISTOGRAM_BINS, np.int64) for r in count}
        below = {r: 0 for r in count}
        picked: dict[int, list[np.ndarray]] = {r: [] for r in collect}
        for v in values():
            for r, s in count.items():
                inside = v[(v >= s["lo"]) & (v <= s["hi"])]
                below[r] += int((v < s["lo"]).sum())
                bins = np.clip(np.searchsorted(edges[r], inside, side="right") - 1, 0, HISTOGRAM_BINS - 1)
                hists[r] += np.bincount(bins, minlength=HISTOGRAM_BINS)
            for r, s in collect.items():
                picked[r].append(v[(v >= s["lo"]) & (v <= s["hi"])])
        for r, s in collect.items():
            inside = np.sort(np.concatenate(picked[r])) if picked[r] else np.zeros(0)
            found[r] = float(inside[r - s["below"]])
        for r, s in count.items():
            cum = np.cumsum(hists[r])
            want = r - below[r]
            b = int(np.searchsorted(cum, want, side="right"))
            lo_b = float(edges[r][b])
            hi_b = float(edges[r][b + 1]) if b + 1 < HISTOGRAM_BINS else s["hi"]
            if b + 1 < HISTOGRAM_BINS:
                hi_b = float(np.nextafter(hi_b, -math.inf))  # bin b is [edge b, edge b+1)
            state[r] = {"lo": lo_b, "hi": max(lo_b, hi_b), "below": below[r] + (int(cum[b - 1]) if b else 0),
                        "count": int(hists[r][b])}
    return found
