"""A clip's stored payload (its mp4, caption) for the review page's galleries, found by its
place among the run's clip rows: the clips/ files, in the ledger's order, hold every clip's
payload in the order of the scores' clip rows (curation/finalize.py reads them alongside the
same way). Only the row groups' row counts are held (Parquet metadata); a clip's row group is
read when the page asks for it, and the last few are cached, since a gallery's clips sit
near each other in a sorted score but not in the files."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from curation import outdir
from curation.finalize import payload_source
from curation.writer import OutputStore

CACHED_ROW_GROUPS = 8  # clips/ row groups hold at most 64 clips (curation/compact.py ROW_GROUP)


class Payloads:
    def __init__(self, store: OutputStore):
        ledger = store.ledger()
        # Without run.store_all_clips only the kept clips' payload is stored (in shards/):
        # the galleries then show no video.
        self.available = payload_source(ledger) == "clips"
        self.files = ledger.files("clips") if self.available else []
        groups, starts, total = [], [], 0
        for i, path in enumerate(self.files):
            meta = outdir.parquet_file(path).metadata
            for g in range(meta.num_row_groups):
                groups.append((i, g))
                starts.append(total)
                total += meta.row_group(g).num_rows
        self.groups, self.starts, self.rows = groups, np.asarray(starts, np.int64), total
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def row(self, rank: int, clip_id: str, columns: tuple[str, ...] = ("caption",)) -> dict[str, Any] | None:
        """The payload of the clip at `rank` among the clip rows (None without payload, or
        when the row found is not `clip_id`: the files do not match the scores)."""
        if not self.available or not 0 <= rank < self.rows:
            return None
        k = int(np.searchsorted(self.starts, rank, side="right")) - 1
        table = self._group(self.groups[k], columns)
        at = rank - int(self.starts[k])
        if table.column("clip_id")[at].as_py() != clip_id:
            return None
        return {c: table.column(c)[at].as_py() if c in table.column_names else None for c in columns}

    def _group(self, group: tuple[int, int], columns: tuple[str, ...]):
        """One row group's clip_id and `columns` (only those: a caption does not read videos)."""
        key = (*group, columns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        f = outdir.parquet_file(self.files[group[0]])
        wanted = [c for c in ("clip_id", *columns) if c in f.schema_arrow.names]
        table = f.read_row_group(group[1], columns=wanted)
        with self._lock:
            self._cache[key] = table
            while len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return table
