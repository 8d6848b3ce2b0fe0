"""The ledger of an OUT_DIR: which units are committed, and which data files hold their rows.

Two parts, read together (as Delta Lake and Iceberg read a checkpoint and the log after it):
- entries: ledger/<unit>.json, one per unit committed since the newest checkpoint; the
  driver writes a unit's entry after its data files, and that write commits the unit;
- the newest checkpoint: ledger/checkpoint-<seq>.json, which holds every unit committed
  before it. It names
    - its units' table, ledger/units-<seq>-<token>.parquet: one row per unit (UNITS_SCHEMA:
      its source ids, first source path, counts, and for a unit whose rows were not
      compacted yet, the names of its own data files);
    - the compacted data files, per kind, in order (scores/, clips/, shards/
      c<seq>-<token>-<k>.parquet, of about shard_target_mb each, units in source order);
    - the totals of its units' records (clips, kept, errors, stage seconds, nodes, store
      traffic), so a run's summary never reads every unit again.
  Writing the checkpoint's JSON (one PUT on a store, a rename on a disk) commits it; the
  files it names are written before, under names no earlier attempt used.

Reading (`Ledger(store)`): one listing of ledger/, the newest checkpoint and the ids of its
units, and only the entries of units it does not hold: an entry it holds was folded into it
and is only waiting to be deleted (curation/compact.py deletes folded entries and files after
the checkpoint is written; a compaction killed in between leaves them to the next one, or to
`OutputStore.prepare`'s sweep). Nothing here is a Python object per unit of the checkpoint:
its units are read as Arrow columns.

Order: a kind's files are the checkpoint's compacted files, then the loose units' files
(checkpoint units not compacted yet, then newer entries), loose units by their first source
path. Scores and clips files of a unit hold its clips in the same order, and compaction keeps
that order, so the clip rows of `files("scores")` and the rows of `files("clips")` come in
the same sequence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir

log = logging.getLogger(__name__)

KINDS = ("scores", "clips", "shards")
CHECKPOINT = re.compile(r"^checkpoint-(\d{8})\.json$")
ENTRY = re.compile(r"^(u[0-9a-zA-Z]+)\.json$")
FORMAT = 1
# Rows of the units' table read (and, by a new checkpoint, written) at a time. A checkpoint's
# memory grows with this, not with the units: 65,536 rows of all the columns took 72 MB of Arrow
# to rewrite at 250,000 units; 16,384 take 30 MB.
UNIT_BATCH_ROWS = 16_384
# Newer entries parsed at a time: each group's JSON becomes Arrow rows and a share of the
# totals, then goes. The driver checkpoints after 5% of the units it holds, so at 10^6 sources
# it read 12,500 entries as dicts (about 4 kB of Python objects each) on every checkpoint, and
# the freed objects' arenas stayed in its RSS: it grew with the run.
ENTRY_CHUNK = 2048

UNITS_SCHEMA = pa.schema([
    pa.field("unit_id", pa.string(), nullable=False),
    pa.field("source_ids", pa.list_(pa.string())),
    pa.field("first_source", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("clips", pa.int64()),
    pa.field("kept", pa.int64()),
    pa.field("source_errors", pa.int64()),
    pa.field("attempts", pa.int32()),
    pa.field("committed_at", pa.float64()),
    pa.field("node_id", pa.string()),  # the Ray node that ran the unit and wrote its files
    # Files of a unit whose rows are not in the compacted files yet (null once compacted).
    pa.field("scores_file", pa.string()),
    pa.field("clips_file", pa.string()),
    pa.field("shard_files", pa.list_(pa.string())),
])
ENTRY_FILE_KEYS = {"scores": "scores_file", "clips": "clips_file", "shards": "shard_files"}


def entry_names(entry: dict[str, Any], kind: str) -> list[str]:
    """The file names of one kind a ledger entry (or units-table row) lists."""
    names = entry.get(ENTRY_FILE_KEYS[kind])
    return [names] if isinstance(names, str) else list(names or [])


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:08d}.json"


# ---- totals: what a run's summary needs of every unit ------------------------------------------

def contribution(entry: dict[str, Any]) -> dict[str, Any]:
    """What one unit's entry adds to the totals (merged with `merge`)."""
    from curation.runner import nodes_summary  # the per-node record's shape lives there

    return {
        "units": 1, "rows": int(entry.get("rows", 0)), "clips": int(entry.get("clips", 0)),
        "kept": int(entry.get("kept", 0)), "source_errors": int(entry.get("source_errors", 0)),
        "sources": len(entry.get("source_ids") or []),
        "units_retried": int(entry.get("attempts", 1) > 1),
        "source_outcomes": dict(entry.get("source_outcomes") or {}),
        "errors": dict(entry.get("errors") or {}),
        "stage_seconds": dict(entry.get("stage_seconds") or {}),
        "unit_seconds": dict(entry.get("unit_seconds") or {}),
        "model_sent_bytes": dict(entry.get("model_sent_bytes") or {}),
        "storage": dict(entry.get("storage") or {}),
        "nodes": nodes_summary([entry]),
    }


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a + b, key by key: numbers add, mappings merge, lists are unioned in order, and for
    anything else (a node's address) the first value stays."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, (int, float)) and isinstance(out[key], (int, float)) \
                and not isinstance(value, bool):
            out[key] = out[key] + value
        elif isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
    return out


def fold(entries: Iterable[dict[str, Any]], totals: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(totals or {})
    for entry in entries:
        out = merge(out, contribution(entry))
    return out


# ---- source ids as integers ---------------------------------------------------------------------

KEY_CHUNK = 65_536  # ids turned into keys at a time (bounds the temporary arrays)
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_NIBBLE = np.full(256, 255, np.uint8)  # an ASCII byte's hex value; 255 for a byte that is not a hex digit
for _digits, _first in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _NIBBLE[np.frombuffer(_digits, np.uint8)] = np.arange(_first, _first + len(_digits), dtype=np.uint8)


def source_key(source_id: str) -> int:
    """The uint64 key of one source id: an id of 16 hex digits is its own value, anything
    else a hash (a collision among 10^7 sources has a chance of about 3e-6)."""
    return int(source_id, 16) if _HEX16.fullmatch(source_id) else _hashed(source_id)


def source_keys(ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """`source_key` of every id, read from the Arrow column's bytes: no Python object per id
    (at 10^6 committed sources, a list of the ids was 100 MB of a resume's peak). Only ids
    that are not 16 hex digits, which the pipeline does not make, are hashed one by one."""
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(ids, pa.string())
    out = np.empty(len(ids), np.uint64)
    at = 0
    for chunk in ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]:
        for start in range(0, len(chunk), KEY_CHUNK):
            keys = _keys(chunk.slice(start, KEY_CHUNK))
            out[at:at + keys.size] = keys
            at += keys.size
    return out


def _keys(ids: pa.Array) -> np.ndarray:
    ids = ids.cast(pa.string()).fill_null("")
    out = np.empty(len(ids), np.uint64)
    if not len(ids):
        return out
    # The rows of 16 bytes: their bytes, in order, from the string data between their offsets.
    sized = pc.binary_length(ids).to_numpy(zero_copy_only=False) == 16
    rows = np.flatnonzero(sized)
    if rows.size:
        hexes = pc.filter(ids, pa.array(sized))
        offsets = np.frombuffer(hexes.buffers()[1], np.int32)[hexes.offset:hexes.offset + rows.size + 1]
        data = np.frombuffer(hexes.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(rows.size, 16)
        nibbles = _NIBBLE[data]
        digits = (nibbles != 255).all(axis=1)
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (n, 8) bytes, most significant first
        out[rows] = np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)
        sized[rows[~digits]] = False
    for i in np.flatnonzero(~sized):  # not 16 hex digits: hashed (rare)
        out[i] = _hashed(ids[int(i)].as_py())
    return out


def _hashed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class SourceIds:
    """The committed sources, as a sorted uint64 array: 8 bytes a source (UnitFeed asks
    `source_id in done` once per listed source)."""

    def __init__(self, keys: np.ndarray):
        """`keys` is sorted in place. (np.unique took 45 MB and 0.66 s over 10^6 keys here; the
        sort and a mask take 9 MB and 0.08 s.)"""
        keys.sort()
        self.keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys

    def __contains__(self, source_id: str) -> bool:
        k = np.uint64(source_key(source_id))
        i = int(np.searchsorted(self.keys, k))
        return i < self.keys.size and self.keys[i] == k

    def __len__(self) -> int:
        return int(self.keys.size)


# ---- the ledger ---------------------------------------------------------------------------------

class Ledger:
    """The committed state of an OUT_DIR (module docstring), read once at construction: the
    listing of ledger/, the checkpoint, its units' ids and the newer entries. The other
    columns of the checkpoint's units table are read when first asked for (`columns`), so a
    resume's planning holds the source ids and not the rest (at 10^6 sources the whole table
    is 52 MB of Arrow, and reading it added 170 MB to the process's peak)."""

    def __init__(self, store: Any):
        self.store = store
        names = [p.name for p in store.ledger_dir.iterdir()] if _exists(store.ledger_dir) else []
        checkpoints = sorted(n for n in names if CHECKPOINT.match(n))
        self.checkpoint: dict[str, Any] | None = None
        self._units: pa.Table | None = UNITS_SCHEMA.empty_table()
        self._columns: dict[str, pa.ChunkedArray] = {}
        if checkpoints:
            self.checkpoint = json.loads((store.ledger_dir / checkpoints[-1]).read_text())
            self._units = None
        self.held = self._units_file([])[0].metadata.num_rows if checkpoints else 0
        self.seq = int(self.checkpoint["seq"]) if self.checkpoint else 0
        self.old_checkpoints = checkpoints[:-1]
        entry_ids = sorted(m.group(1) for n in names if (m := ENTRY.match(n)))
        folded = self.holds(entry_ids)  # entries a checkpoint took in, not yet deleted
        self.folded_entries = [u for u in entry_ids if u in folded]
        new = [u for u in entry_ids if u not in folded]
        # The entries newer than the checkpoint, as rows of UNITS_SCHEMA in unit id order, and
        # the checkpoint's totals with theirs folded in.
        self.new_units, self._totals = self._read_entries(new)
        self.names = names

    def _read_entries(self, unit_ids: list[str]) -> tuple[pa.Table, dict[str, Any]]:
        """These entries read ENTRY_CHUNK at a time: (their rows, the totals with theirs)."""
        totals = dict((self.checkpoint or {}).get("totals") or {})
        parts = [UNITS_SCHEMA.empty_table()]
        for start in range(0, len(unit_ids), ENTRY_CHUNK):
            paths = [self.store.ledger_dir / f"{u}.json" for u in unit_ids[start:start + ENTRY_CHUNK]]
            entries = [json.loads(data) for data in outdir.read_many(paths)]
            totals = fold(entries, totals)
            parts.append(pa.Table.from_pylist([entry_row(e) for e in entries], UNITS_SCHEMA))
            del entries  # before the next group is read
        return pa.concat_tables(parts).combine_chunks(), totals

    def new_unit_ids(self) -> list[str]:
        """The ids of the units committed since the checkpoint (their entries), in order."""
        return self.new_units.column("unit_id").to_pylist()

    @property
    def units(self) -> pa.Table:
        """The checkpoint's units table, whole (UNITS_SCHEMA), read on first use."""
        if self._units is None:
            self._units = self._read_units(UNITS_SCHEMA.names)
            self._columns.clear()
        return self._units

    def columns(self, names: list[str]) -> pa.Table:
        """These columns of the checkpoint's units table, each read from its file once."""
        if self._units is not None:
            return self._units.select(names)
        missing = [n for n in names if n not in self._columns]
        if missing:
            self._columns.update(zip(missing, self._read_units(missing).columns))
        return pa.Table.from_arrays([self._columns[n] for n in names], schema=_units_schema(names))

    def unit_batches(self, rows: int = UNIT_BATCH_ROWS, names: list[str] | None = None) -> Iterator[pa.Table]:
        """The checkpoint's units table (or these columns of it) in pieces of up to `rows`
        rows, read from its file one batch at a time: a new checkpoint copies the table, and
        the source ids become keys, without holding it."""
        names = names or UNITS_SCHEMA.names
        if self._units is not None:
            table = self._units.select(names)
            yield from (table.slice(start, rows) for start in range(0, table.num_rows, rows))
            return
        from curation import schema

        # A row group at a time (a checkpoint writes groups of UNIT_BATCH_ROWS): iter_batches
        # read ahead across groups, 45 MB of Arrow against 15 MB over 250,000 units.
        units, present = self._units_file(names)
        for g in range(units.num_row_groups):
            group = schema.conform(units.read_row_group(g, columns=present), _units_schema(names))
            yield from (group.slice(start, rows) for start in range(0, group.num_rows, rows))

    def _read_units(self, names: list[str]) -> pa.Table:
        from curation import schema

        units, present = self._units_file(names)
        return schema.conform(units.read(columns=present), _units_schema(names))

    def _units_file(self, names: list[str]) -> tuple[Any, list[str]]:
        """The checkpoint's units file, open (its footer parsed once for the ledger's reads:
        a units file's name is never reused), and which of these columns it has: an older
        format may lack one (schema.conform adds it as nulls). unit_id is in every units file
        and gives such a column its row count."""
        units = outdir.open_parquet(self.store.ledger_dir / self.checkpoint["units_file"])
        present = [n for n in UNITS_SCHEMA.names
                   if (n in names or n == "unit_id") and n in units.schema_arrow.names]
        return units, present

    # ---- what is committed --------------------------------------------------------------
    def holds(self, unit_ids: list[str]) -> set[str]:
        """Those of `unit_ids` the checkpoint holds. Asked of its unit_id column batch by
        batch (the column is not kept: at 10^6 sources it is 5 MB, 14 MB at the peak of its
        reading, on every ledger checkpoint of the driver), or of the column when a reader
        has it already."""
        if not unit_ids or not self.held:
            return set()
        asked = pa.array(unit_ids, pa.string())
        if self._units is not None or "unit_id" in self._columns:
            parts = [self.columns(["unit_id"])]
        else:
            parts = self.unit_batches(names=["unit_id"])
        found: set[str] = set()
        for part in parts:
            found.update(asked.filter(pc.is_in(asked, value_set=part.column(0).combine_chunks())).to_pylist())
        return found

    def unit_count(self) -> int:
        return self.held + self.new_units.num_rows

    def unit_ids(self) -> list[str]:
        return sorted(self.columns(["unit_id"]).column(0).to_pylist() + self.new_unit_ids())

    def source_ids(self) -> SourceIds:
        # Batch by batch from the units file: the ids' column (20 MB at 10^6 sources) is never whole.
        keys = np.empty(0, np.uint64)
        if self.held:
            keys = np.concatenate([source_keys(pc.list_flatten(part.column(0)))
                                   for part in self.unit_batches(names=["source_ids"])])
        new = pc.list_flatten(self.new_units.column("source_ids"))
        return SourceIds(np.concatenate([keys, source_keys(new)]) if len(new) else keys)

    def fingerprint(self) -> str:
        """A hash of which units are committed and when: the same whatever holds them (a
        checkpoint or entries; a compaction does not change it; a new or redone unit does)."""
        held = self.columns(["unit_id", "committed_at"])
        new = self.new_units.select(["unit_id", "committed_at"])
        units = pa.concat_tables([held.cast(new.schema), new]).sort_by("unit_id")
        digest = hashlib.sha1()
        for batch in units.to_batches(65_536):
            digest.update(json.dumps([batch.column(0).to_pylist(), batch.column(1).to_pylist()]).encode())
        return digest.hexdigest()[:16]

    def totals(self) -> dict[str, Any]:
        """The merged records of every committed unit (see `contribution`): the checkpoint's,
        and the newer entries' folded in as they were read."""
        return dict(self._totals)

    # ---- the data files ---------------------------------------------------------------------
    def loose_units(self) -> list[dict[str, Any]]:
        """Units whose rows are in files of their own (not compacted), in file order: the
        checkpoint's, then the newer entries, each group by first source path."""
        loose = pc.is_valid(self.columns(["scores_file"]).column(0))  # a compacted unit's is null
        rows = []
        if pc.any(loose).as_py():
            rows = self.columns(["unit_id", "first_source", "scores_file", "clips_file", "shard_files",
                                 "source_ids", "kept", "clips"]).filter(loose).to_pylist()
        rows.sort(key=lambda r: (r["first_source"] or "", r["unit_id"]))
        new = sorted(self.new_units.to_pylist(), key=lambda e: (e.get("first_source") or "", e["unit_id"]))
        return rows + new

    def compacted(self, kind: str) -> list[dict[str, Any]]:
        """The checkpoint's compacted files of a kind: [{name, rows, bytes}], in order."""
        return list(((self.checkpoint or {}).get("files") or {}).get(kind) or [])

    def file_names(self, kind: str) -> list[str]:
        names = [f["name"] for f in self.compacted(kind)]
        for unit in self.loose_units():
            names += entry_names(unit, kind)
        return names

    def files(self, kind: str) -> list[Any]:
        """Paths of a kind's committed files, in order (module docstring)."""
        folder = self.store.root / kind
        return [folder / name for name in self.file_names(kind)]

    def listed(self) -> dict[str, set[str]]:
        """Every name the ledger needs kept: per data folder, and in ledger/ (the newest
        checkpoint, its units table, the newer entries)."""
        out = {kind: set(self.file_names(kind)) for kind in KINDS}
        out["ledger"] = self.ledger_names()
        return out

    def ledger_names(self) -> set[str]:
        """The names in ledger/ it needs kept (a name per newer entry, none per checkpoint unit)."""
        keep = {f"{u}.json" for u in self.new_unit_ids()}
        if self.checkpoint:
            keep |= {checkpoint_name(self.seq), self.checkpoint["units_file"]}
        return keep


def _units_schema(names: list[str]) -> pa.Schema:
    """UNITS_SCHEMA's fields of these names, in this order."""
    return pa.schema([UNITS_SCHEMA.field(n) for n in names])


def _exists(path: Any) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def iter_units(ledger: Ledger, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Every committed unit's `columns` (of UNITS_SCHEMA), the checkpoint's then the newer
    entries' (for tests and small outputs: one dict per unit)."""
    yield from ledger.columns(columns).to_pylist()
    yield from ledger.new_units.select(columns).to_pylist()


def entry_row(entry: dict[str, Any]) -> dict[str, Any]:
    """A ledger entry as a row of UNITS_SCHEMA."""
    return {"unit_id": entry["unit_id"], "source_ids": list(entry.get("source_ids") or []),
            "first_source": entry.get("first_source"), "rows": int(entry.get("rows", 0)),
            "clips": int(entry.get("clips", 0)), "kept": int(entry.get("kept", 0)),
            "source_errors": int(entry.get("source_errors", 0)), "attempts": int(entry.get("attempts", 1)),
            "committed_at": float(entry.get("committed_at") or 0.0), "node_id": entry.get("node_id"),
            "scores_file": entry.get("scores_file"), "clips_file": entry.get("clips_file"),
            "shard_files": list(entry.get("shard_files") or [])}
