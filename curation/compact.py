"""Checkpoints and compaction of an OUT_DIR's ledger (curation/ledger.py says what they hold).

`checkpoint(store, compact=True)` (`curate compact OUT_DIR`, and the end of every `curate run`):
1. a lock, ledger/compaction.lock (which process, since when, refreshed as it goes): a second
   compaction refuses to start while it is fresh, and `OutputStore.prepare`'s sweep leaves the
   files of a compaction in progress alone;
2. with `compact`, the loose units' rows (units with files of their own: the newer entries and
   the checkpoint's uncompacted units, by first source path), after the rows of the
   checkpoint's last compacted file when that one is small, rewritten per kind into files of
   about `target_mb` (scores/, clips/, shards/ c<seq>-<token>-<k>.parquet; a file ends only
   between units, so a unit's rows, and a source's, are never split), streamed a row group at
   a time: memory is a row group and the units' table, never the corpus;
3. the new units' table (ledger/units-<seq>-<token>.parquet), streamed from the old one;
4. the new checkpoint's JSON, written last: the commit. Until then readers see the old state,
   and a compaction killed before it changes nothing a reader sees;
5. the folded entries, the replaced files and the older checkpoints deleted; a compaction
   killed here leaves them to the next one or to the sweep (readers ignore them already).

Without `compact` only the ledger is checkpointed (steps 1, 3-5, no data file rewritten): the
driver does that every CHECKPOINT_EVERY_UNITS commits, so a resume reads one checkpoint and
a few entries, not a million. It is safe to run while a run goes on: the entries committed
after its listing stay entries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import outdir, schema
from curation.ledger import KINDS, UNITS_SCHEMA, Ledger, checkpoint_name, entry_names

log = logging.getLogger(__name__)

LOCK = "compaction.lock"
LOCK_STALE_S = 600.0  # a lock not refreshed for this long belongs to a compaction that died
LOCK_REFRESH_S = 60.0
CHECKPOINT_EVERY_UNITS = 2000  # the driver checkpoints the ledger after this many new entries
PROGRESS_EVERY_S = 10.0
SMALL_SHARE = 0.5  # a last compacted file under this share of the target is rewritten with the next
ROW_GROUP = {"scores": 65_536, "clips": 64, "shards": 64}  # rows: scores are small, clips carry videos
GROUP_BYTES = 64 * 2**20  # and a row group is written once it holds this many bytes
SCHEMAS = {"scores": schema.SCORES_SCHEMA, "clips": schema.CLIPS_SCHEMA, "shards": schema.SHARDS_SCHEMA}


class CompactionBusy(RuntimeError):
    """Another compaction of the same OUT_DIR is running (its lock is fresh)."""


# ---- the lock ---------------------------------------------------------------------------------

def read_lock(store: Any) -> dict[str, Any] | None:
    """The compaction lock when it is fresh (a compaction is running), else None. A lock of
    this host whose process is gone is stale at once (a killed compaction on this machine
    does not hold up the next one for LOCK_STALE_S)."""
    from stages.storage import _pid_alive

    try:
        lock = json.loads((store.ledger_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None
    if lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", 0))):
        return None
    return lock if time.time() - float(lock.get("refreshed_at", 0)) < LOCK_STALE_S else None


class Lock:
    """ledger/compaction.lock, held by the one process that may checkpoint or compact now."""

    def __init__(self, store: Any):
        self.store = store
        self.seq: int | None = None
        self.token = uuid.uuid4().hex[:8]
        self.path = store.ledger_dir / LOCK
        self.started = time.time()
        self.refreshed = 0.0

    def acquire(self, sweep_data: bool = True) -> Ledger:
        """Take the lock (CompactionBusy while another process holds it), then read the ledger
        (read under the lock: no other checkpoint can be committed while this one is made),
        and delete what compactions that died left: files c<seq>-<token>-* and units-* that no
        checkpoint lists (with the lock held no other compaction is writing such files), and
        the own files of units the checkpoint holds that it does not list (a clean-up cut
        short; files of units in flight are never touched). Returns the ledger; the new
        checkpoint's number is its seq + 1. Without `sweep_data` (the driver's ledger-only
        checkpoints, every few thousand units) only ledger/ is swept: the data folders' sweep
        holds a name of every loose unit's files; the next compaction does it."""
        held = read_lock(self.store)
        if held is not None:
            raise CompactionBusy(
                f"{self.store.root}: a compaction is running (pid {held.get('pid')} on {held.get('host')}, "
                f"since {time.strftime('%H:%M:%S', time.localtime(held.get('started_at', 0)))}); wait for it, "
                f"or delete {self.path} if that process is gone (a lock older than {LOCK_STALE_S:.0f} s is "
                "ignored)")
        self.refresh(force=True)
        ledger = Ledger(self.store)
        self.seq = ledger.seq + 1
        self.refresh(force=True)
        listed = ledger.listed() if sweep_data else {"ledger": ledger.ledger_names()}
        strays = []  # (kind, path, the unit id its name starts with) in the data folders and ledger/
        for kind in listed:
            folder = self.store.root / kind
            if folder.exists():  # asked once a folder (on a store, a request each)
                strays += [(kind, path, path.name.split("-", 1)[0]) for path in folder.iterdir()
                           if path.name not in listed[kind]]
        held = ledger.holds([unit for kind, _, unit in strays if kind != "ledger"])
        for kind, path, unit in strays:
            if kind == "ledger":
                dead = path.name.startswith("units-")
            else:  # a dead compaction's file, or a compacted unit's own file left behind
                dead = path.name.startswith("c") or unit in held
            if dead:
                log.info("removing a file no checkpoint needs (a compaction that did not finish): %s", path)
                path.unlink(missing_ok=True)
        return ledger

    @property
    def prefix(self) -> str:
        return f"c{self.seq:08d}-{self.token}"

    def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self.refreshed > LOCK_REFRESH_S:
            self.refreshed = time.monotonic()
            outdir.write_json(self.path, {"pid": os.getpid(), "host": socket.gethostname(), "seq": self.seq,
                                          "token": self.token, "started_at": self.started,
                                          "refreshed_at": time.time()}, durable=False)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def in_progress_prefixes(store: Any) -> tuple[str, ...]:
    """Name prefixes of the files a running compaction is writing (none when none runs)."""
    lock = read_lock(store)
    if lock is None or lock.get("seq") is None:
        return ()
    return (f"c{int(lock['seq']):08d}-{lock['token']}-", f"units-{int(lock['seq']):08d}-{lock['token']}")


# ---- writing large files -----------------------------------------------------------------------

class RollingWriter:
    """Rows of one kind into files of about `target_bytes`: row groups of ROW_GROUP rows (or
    GROUP_BYTES), a new file only at a unit boundary (`end_unit`). Each file is written
    locally and becomes its final name atomically (outdir.staged_file)."""

    def __init__(self, folder: Any, prefix: str, kind: str, target_bytes: float, lock: Lock | None = None):
        self.folder, self.prefix, self.kind = folder, prefix, kind
        self.schema = SCHEMAS[kind]
        self.target_bytes, self.lock = target_bytes, lock
        self.files: list[dict[str, Any]] = []
        self.buffer: list[pa.Table] = []
        self.buffered_rows = self.buffered_bytes = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._local: Path | None = None
        self._rows = self._written_nbytes = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buffer.append(schema.conform(table, self.schema))
        self.buffered_rows += table.num_rows
        self.buffered_bytes += table.nbytes
        if self.buffered_rows >= ROW_GROUP[self.kind] or self.buffered_bytes >= GROUP_BYTES:
            self._flush()

    def end_unit(self) -> None:
        """A unit ended: the file may end here (once its bytes, the buffered rows counted at
        the compression the file has had so far, reach the target)."""
        size = self._size()
        ratio = size / self._written_nbytes if self._written_nbytes else 1.0
        if size + ratio * self.buffered_bytes >= self.target_bytes:
            self._flush()
            self._close()
        if self.lock is not None:
            self.lock.refresh()

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self._close()
        return self.files

    def abort(self) -> None:
        """Give up the file being written (nothing of it is published)."""
        if self._writer is not None:
            self._writer.close()
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._stack = self._writer = self._local = None

    def _size(self) -> int:
        return self._local.stat().st_size if self._local is not None and self._local.exists() else 0

    def _flush(self) -> None:
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0
        if self._writer is None:
            name = f"{self.prefix}-{len(self.files):05d}.parquet"
            stack = contextlib.ExitStack()
            self._local = stack.enter_context(outdir.staged_file(self.folder / name))
            self._stack = stack
            self._writer = pq.ParquetWriter(str(self._local), self.schema, compression="zstd",
                                            write_statistics=schema.statistics_columns(self.schema))
            self._name, self._rows, self._written_nbytes = name, 0, 0
        # Row groups of ROW_GROUP rows, fewer when that many would pass GROUP_BYTES.
        per_group = min(ROW_GROUP[self.kind], max(1, int(GROUP_BYTES * table.num_rows / max(1, table.nbytes))))
        self._writer.write_table(table, row_group_size=per_group)
        self._rows += table.num_rows
        self._written_nbytes += table.nbytes

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        size = self._size()
        self._stack.close()  # renamed into place, or uploaded
        self.files.append({"name": self._name, "rows": self._rows, "bytes": size})
        self._stack = self._writer = self._local = None


def row_groups(paths: list[Any]) -> Iterator[pa.Table]:
    """The rows of parquet files, a row group at a time."""
    for path in paths:
        f = outdir.parquet_file(path)
        for g in range(f.num_row_groups):
            yield f.read_row_group(g)


# ---- the units' table ---------------------------------------------------------------------------

def write_units(store: Any, ledger: Ledger, name: str, compacted: bool, kept_unknown: bool = False) -> int:
    """The new checkpoint's units' table: the old one's rows (their file names cleared when
    `compacted`), then the newer entries'; `kept_unknown` clears the units' kept counts (new
    rules changed them; the totals hold the new sum). Streamed in slices; returns its rows."""
    rows = 0
    with outdir.staged_file(store.ledger_dir / name) as local:
        with pq.ParquetWriter(str(local), UNITS_SCHEMA, compression="zstd") as writer:
            for part in itertools.chain(ledger.unit_batches(), [ledger.new_units]):
                if not part.num_rows:
                    continue
                if compacted:
                    for column in ("scores_file", "clips_file"):
                        part = part.set_column(part.schema.get_field_index(column), column,
                                               pa.nulls(part.num_rows, pa.string()))
                    part = part.set_column(part.schema.get_field_index("shard_files"), "shard_files",
                                           pa.nulls(part.num_rows, pa.list_(pa.string())))
                writer.write_table(_without_kept(part) if kept_unknown else part)
                rows += part.num_rows
    return rows


def _without_kept(part: pa.Table) -> pa.Table:
    return part.set_column(part.schema.get_field_index("kept"), "kept", pa.nulls(part.num_rows, pa.int64()))


# ---- the checkpoint -----------------------------------------------------------------------------

def commit(store: Any, seq: int, units_file: str, units: int, files: dict[str, list],
           totals: dict[str, Any], created_by: str) -> dict[str, Any]:
    manifest = {"format": 1, "seq": seq, "created_at": time.time(), "created_by": created_by,
                "units_file": units_file, "units": units, "files": files, "totals": totals}
    outdir.write_json(store.ledger_dir / checkpoint_name(seq), manifest)
    return manifest


def clean_up(store: Any, ledger: Ledger, replaced: dict[str, list[str]], superseded: bool = True) -> None:
    """After a commit: the entries it folded, the files it replaced, the older checkpoints
    (`superseded`: the one the ledger was read from too; not when nothing was committed)."""
    for kind, names in replaced.items():
        for name in names:
            (store.root / kind / name).unlink(missing_ok=True)
    old = list(ledger.old_checkpoints)
    if ledger.checkpoint and superseded:
        old.append(checkpoint_name(ledger.seq))
    for name in old:  # the manifest first: its units file is never needed without it
        units_file = None
        try:
            units_file = json.loads((store.ledger_dir / name).read_text()).get("units_file")
        except (OSError, ValueError):
            pass
        (store.ledger_dir / name).unlink(missing_ok=True)
        if units_file:
            (store.ledger_dir / units_file).unlink(missing_ok=True)
    for unit_id in ledger.new_unit_ids() + ledger.folded_entries:
        (store.ledger_dir / f"{unit_id}.json").unlink(missing_ok=True)


def checkpoint(store: Any, compact: bool = True, target_mb: float | None = None,
               created_by: str = "curate compact") -> dict[str, Any]:
    """Checkpoint the ledger, compacting the loose units' files first when `compact` (module
    docstring). Returns the checkpoint's manifest."""
    started = time.monotonic()
    lock = Lock(store)
    ledger = lock.acquire(sweep_data=compact)
    try:
        seq = lock.seq
        target_bytes = float(target_mb or _target_mb(store)) * 2**20
        files = {kind: ledger.compacted(kind) for kind in KINDS}
        replaced: dict[str, list[str]] = {kind: [] for kind in KINDS}
        # The loose units as Python rows: only for a compaction (a ledger-only checkpoint, every
        # few thousand units in the driver, would make a row of every unit so far).
        loose = ledger.loose_units() if compact else []
        # Nothing committed since the newest checkpoint and nothing to compact (a resume of a
        # finished run): it stands. Rewriting it would read and write every unit's row.
        current = ledger.checkpoint is not None and not ledger.new_units.num_rows and not (compact and loose)
        if current:
            manifest = ledger.checkpoint
        else:
            if compact and loose:
                for kind in KINDS:
                    files[kind], replaced[kind] = compact_kind(store, ledger, kind, loose, lock, target_bytes)
            units_file = f"units-{seq:08d}-{lock.token}.parquet"
            units = write_units(store, ledger, units_file, compacted=compact)
            manifest = commit(store, seq, units_file, units, files, ledger.totals(), created_by)
    finally:
        lock.release()
    clean_up(store, ledger, replaced, superseded=not current)
    if current:
        log.info("%s %s: checkpoint %d already holds all %d units, nothing to rewrite", created_by, store.root,
                 ledger.seq, ledger.unit_count())
        return manifest
    log.info("%s %s: checkpoint %d holds %d units; %s, %.1fs", created_by, store.root, seq, units,
             ", ".join(f"{len(files[k])} {k} files" for k in KINDS) if compact else "ledger only",
             time.monotonic() - started)
    return manifest


def compact_kind(store: Any, ledger: Ledger, kind: str, loose: list[dict[str, Any]], lock: Lock,
                 target_bytes: float) -> tuple[list[dict[str, Any]], list[str]]:
    """(the kind's files after compaction, the names they replace): the loose units' files of
    `kind` (after the last compacted file when it is small) rewritten into large ones."""
    kept = ledger.compacted(kind)
    replaced: list[str] = []
    if kept and kept[-1].get("bytes", 0) < SMALL_SHARE * target_bytes:
        tail = kept.pop()
        replaced.append(tail["name"])
        inputs = [[store.root / kind / tail["name"]]]
    else:
        inputs = []
    for unit in loose:
        names = entry_names(unit, kind)
        replaced += names
        inputs.append([store.root / kind / n for n in names])
    writer = RollingWriter(store.root / kind, lock.prefix, kind, target_bytes, lock)
    started = last = time.monotonic()
    try:
        for k, paths in enumerate(inputs):
            for table in row_groups(paths):
                writer.add(table)
            writer.end_unit()
            if time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                log.info("compacting %s: %d/%d units, %d files written, %.0fs", kind, k + 1, len(inputs),
                         len(writer.files), last - started)
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    return kept + written, replaced


def _target_mb(store: Any) -> float:
    return float((store.read_run().get("config") or {}).get("run", {}).get("shard_target_mb", 256.0))
