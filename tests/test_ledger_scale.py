"""The ledger's reads at the start and end of a resume hold columns, not a Python object per
unit or per source: what a resume over 10^6 committed sources keeps in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.ledger import UNITS_SCHEMA, SourceIds, checkpoint_name, source_key, source_keys
from curation.writer import OutputStore

REPO = Path(__file__).resolve().parents[1]


def test_source_keys_of_a_column_equal_each_ids_key():
    """The keys read from the Arrow column's bytes equal the key of each id taken alone, for
    the ids the pipeline makes (16 hex digits, either case) and for any other text."""
    ids = ["0123456789abcdef", "0123456789ABCDEF", "ffffffffffffffff", "0000000000000000", "8000000000000000",
           "xyz", "", "0x23456789abcdef", "0123456789abcdeg", "é123456789abcde", "0123456789abcdef0",
           " 123456789abcdef", "+123456789abcdef", "1234_5678_9abcde"]
    want = [source_key(i) for i in ids]
    assert want[:5] == [0x0123456789ABCDEF, 0x0123456789ABCDEF, 2**64 - 1, 0, 2**63]
    assert len(set(want[5:])) == len(want) - 5  # the others are hashed
    assert source_keys(ids).tolist() == want
    # Chunked, sliced and offset arrays (a list column flattened) read the right bytes.
    chunked = pa.chunked_array([pa.array(ids[:3]), pa.array(ids[3:])])
    assert source_keys(chunked).tolist() == want
    assert source_keys(pa.array(ids).slice(2, 5)).tolist() == want[2:7]
    listed = pa.array([["aaaaaaaaaaaaaaaa", "b"], ids[:2], ids[2:]]).slice(1)
    assert source_keys(pa.compute.list_flatten(listed)).tolist() == want
    # Past one chunk of keys, and as the committed set a resume asks.
    many = [f"{i * 7919:016x}" for i in range(150_000)] + ["other-id"]
    keys = source_keys(pa.array(many))
    assert keys[:-1].tolist() == [i * 7919 for i in range(150_000)] and keys[-1] == source_key("other-id")
    done = SourceIds(np.concatenate([keys, keys[:10]]))
    assert len(done) == len(many)
    assert all(s in done for s in many[::997]) and "other-id" in done
    assert f"{7919 * 150_000:016x}" not in done and "other-id2" not in done


def units_table(ids: list[str], first_source, node_id: str | None = None, loose: bool = False) -> pa.Table:
    """A units' table of these unit ids, 4 sources each: compacted units (no files of their
    own), or `loose` ones with the file names a run gives them."""
    n = len(ids)
    name = (lambda u, end: f"{u}-a3f998a1{end}") if loose else (lambda u, end: None)
    return pa.table({"unit_id": ids, "source_ids": [[f"{4 * i + k:016x}" for k in range(4)] for i in range(n)],
                     "first_source": [first_source(i) for i in range(n)], "rows": [10] * n, "clips": [10] * n,
                     "kept": [5] * n, "source_errors": [0] * n, "attempts": [1] * n, "committed_at": [1.0] * n,
                     "node_id": [node_id] * n, "scores_file": [name(u, ".parquet") for u in ids],
                     "clips_file": [name(u, ".parquet") for u in ids],
                     "shard_files": [[name(u, "-0000.parquet")] if loose else None for u in ids]}, UNITS_SCHEMA)


def write_checkpoint(store: OutputStore, units: pa.Table, **parquet) -> None:
    """`units` as the ledger's checkpoint 1: its units' table (row groups of 16,384, as a
    checkpoint writes them) and its manifest."""
    pq.write_table(units, store.ledger_dir / "units-00000001-t.parquet", row_group_size=16_384, **parquet)
    sources = pa.compute.sum(pa.compute.list_value_length(units.column("source_ids"))).as_py() or 0
    (store.ledger_dir / checkpoint_name(1)).write_text(json.dumps(
        {"format": 1, "seq": 1, "units_file": "units-00000001-t.parquet", "units": units.num_rows, "files": {},
         "totals": {"units": units.num_rows, "sources": sources}}))


PLANNING = """
import json, sys, tracemalloc
import pyarrow as pa
from curation import compact
from curation.writer import OutputStore
store = OutputStore(sys.argv[1])

def resume(strays):
    ledger = store.ledger()                         # read once, as `prepare` does for the run
    removed = store.remove_uncommitted(ledger)      # a resume's sweep
    done = ledger.source_ids()                      # the sources it skips
    del ledger
    # Strays the end's sweep judges: an old attempt's file of a checkpoint unit, and a file of
    # a unit that has not committed (left: it may be in flight).
    for name in strays:
        (store.scores_dir / name).write_bytes(b"x")
    manifest = compact.checkpoint(store, compact=True, created_by="curate run")  # the resume's end
    return removed, done, manifest, store.ledger().unit_count()

# Arrow's peak over the first pass; Python's over the second (the modules the first imports on
# first use are not what is measured). The pool's peak cannot be reset, so it comes first.
pool = pa.default_memory_pool()
before = pool.max_memory()
first_removed = resume([])[0]
arrow_peak = pool.max_memory() - before
tracemalloc.start()
removed, done, manifest, units = resume(["u00000005-old.parquet", "uinflight-a.parquet"])
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"removed": first_removed + removed, "sources": len(done), "seq": manifest["seq"], "units": units,
                  "arrow_peak": arrow_peak, "python_peak": python_peak,
                  "has_first": "%016x" % 7 in done, "has_last": "%016x" % (4 * int(sys.argv[2]) - 1) in done}))
"""


def test_a_resumes_ledger_reads_hold_no_python_object_per_source_and_skip_unneeded_columns(tmp_path):
    """A finished, compacted run of 60,000 units (240,000 sources) resumed: the sweep, the
    committed source ids and the end-of-run checkpoint. The source ids become uint64 keys
    from their column (a Python string each would be 16 MB here), the lock's sweep asks the
    unit ids column about the few stray files (a set of every unit id was 5 MB), and the
    columns a resume does not need (here, 24 MB of first source paths) are not read."""
    n = 60_000
    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    ids = [f"u{i:08d}" for i in range(n)]
    units = units_table(ids, lambda i: f"/footage/{'deep/' * 84}{i:08d}.mp4")
    assert units.column("first_source").nbytes > 24 * 2**20
    write_checkpoint(store, units)
    (store.scores_dir / "ugone-a.parquet").write_bytes(b"x")  # an attempt that never committed
    del units, ids

    done = subprocess.run([sys.executable, "-c", PLANNING, str(store.root), str(n)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["removed"] == 1 and not (store.scores_dir / "ugone-a.parquet").exists()
    assert got["sources"] == 4 * n and got["has_first"] and got["has_last"]
    assert got["seq"] == 1 and got["units"] == n  # nothing new: the checkpoint stands
    assert not (store.scores_dir / "u00000005-old.parquet").exists()
    assert (store.scores_dir / "uinflight-a.parquet").exists()
    # Python: the keys are numpy (tracemalloc counts numpy's buffers too, about 2 MB of keys
    # and their sort here); 240,000 id strings would be 16 MB more, 60,000 unit ids 5 MB.
    assert got["python_peak"] < 8 * 2**20, f"{got['python_peak'] / 2**20:.1f} MB of Python objects"
    # Arrow: unit_id, source_ids and scores_file are about 6 MB (14 MB at the peak of their
    # reading); first_source alone is 25 MB, and the whole table read took 45 MB.
    assert got["arrow_peak"] < 24 * 2**20, f"{got['arrow_peak'] / 2**20:.1f} MB of Arrow memory"


def test_an_older_units_file_without_some_columns_reads_them_as_nulls(tmp_path):
    """A checkpoint written before node_id and the per-unit file columns existed: every way
    the ledger reads its units table (whole, by columns, batch by batch) gives those columns
    as nulls, with the file's rows, instead of failing."""
    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    old = [n for n in UNITS_SCHEMA.names if n not in ("node_id", "scores_file", "clips_file", "shard_files")]
    units = pa.table({"unit_id": ["u1", "u2", "u3"], "source_ids": [["a"], ["b"], ["c", "d"]],
                      "first_source": ["/a", "/b", "/c"], "rows": [1, 2, 3], "clips": [1, 2, 3],
                      "kept": [1, 1, 1], "source_errors": [0, 0, 0], "attempts": [1, 1, 1],
                      "committed_at": [1.0, 2.0, 3.0]}, pa.schema([UNITS_SCHEMA.field(n) for n in old]))
    write_checkpoint(store, units)
    ledger = store.ledger()
    assert ledger.columns(["node_id", "rows"]).to_pydict() == {"node_id": [None] * 3, "rows": [1, 2, 3]}
    batches = list(ledger.unit_batches(rows=2, names=["unit_id", "shard_files"]))
    assert [b.num_rows for b in batches] == [2, 1]
    assert pa.concat_tables(batches).to_pydict() == {"unit_id": ["u1", "u2", "u3"], "shard_files": [None] * 3}
    assert len(ledger.source_ids()) == 4
    whole = store.ledger().units
    assert whole.schema == UNITS_SCHEMA and whole.column("scores_file").null_count == 3
    assert whole.column("kept").to_pylist() == [1, 1, 1]


DRIVER_CHECKPOINT = """
import json, sys
out, entries = sys.argv[1], int(sys.argv[2])
sys.argv = ["curate", "run"]  # the driver's process: the C heap, as `curate run` has it
import curation
import pyarrow as pa
from curation import compact
from curation.writer import OutputStore
store = OutputStore(out)
for i in range(entries):  # the units committed since the last checkpoint
    u = f"unew{i:012x}"
    store.write_ledger({"unit_id": u, "source_ids": [f"{i:012x}{k:04x}" for k in range(4)], "first_source": f"/footage/new/{i:08d}.mp4",
                        "rows": 10, "clips": 10, "kept": 5, "source_errors": 0, "scores_file": f"{u}-a3f998a1.parquet",
                        "clips_file": f"{u}-a3f998a1.parquet", "shard_files": [f"{u}-a3f998a1-0000.parquet"]})
pool = pa.default_memory_pool()
before = pool.max_memory()
manifest = compact.checkpoint(store, compact=False, created_by="curate run (ledger)")
print(json.dumps({"pool": pool.backend_name, "units": manifest["units"], "arrow_peak": pool.max_memory() - before}))
"""


def test_a_ledger_checkpoint_of_the_driver_holds_a_bounded_part_of_the_units_table(tmp_path):
    """The driver checkpoints its ledger every 2,000 units: it copies the units' table into
    the new checkpoint and asks it which entries it folded already. Both go a row group of
    16,384 units at a time, so the checkpoint's memory stops growing at that many units.
    Measured over 250,000 units (10^6 sources): 19.9 MB of Arrow, and 93 MB when the table
    was copied 65,536 rows at a time, read ahead across groups, and its unit ids read whole.
    Here 60,000 loose units, with a run's lengths of names: a row group of them is about
    5.5 MB of Arrow; reading it holds its pages compressed and decoded (up to 3x that) while
    the writer encodes it (1x), so 24 MB is room for that and the 2,000 new entries (43 MB
    with the old reads)."""
    n = 60_000
    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    ids = [f"u{i:016x}" for i in range(n)]
    units = units_table(ids, lambda i: f"/work/footage/batch-{i % 97:03d}/sources/src{i:08d}.mp4",
                        node_id="86d2a5941c9f957d5f8c768c8f545130158e5a391823e6c60dee11c8", loose=True)
    write_checkpoint(store, units, compression="zstd")
    (store.ledger_dir / f"{ids[7]}.json").write_text(json.dumps(  # folded already, not yet deleted
        {"unit_id": ids[7], "source_ids": ["0000000000000007"], "rows": 10, "clips": 10, "kept": 5}))
    del units, ids

    done = subprocess.run([sys.executable, "-c", DRIVER_CHECKPOINT, str(store.root), "2000"], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["units"] == n + 2000  # the folded entry counted once
    assert not (store.ledger_dir / "u0000000000000007.json").exists()
    assert got["arrow_peak"] < 24 * 2**20, f"{got['arrow_peak'] / 2**20:.1f} MB of Arrow ({got['pool']})"


def test_a_checkpoint_reads_many_newer_entries_a_group_at_a_time(tmp_path):
    """The driver checkpoints after 5% of the units it holds: at 10^6 sources, 12,500 newer
    entries at a time. They were read whole as dicts (about 4 kB of Python objects each), and
    the freed objects' arenas stayed in the driver's RSS, which grew with the run. They are
    read ENTRY_CHUNK (2,048) at a time into Arrow rows and the totals. Here 12,000 entries of a
    run's shape: the checkpoint's Python peak was 70 MB; now a group's dicts (about 11 MB) and
    a name of every entry (about 0.5 kB each) are held, so 30 MB is room for both. The totals
    and the units are those of every entry."""
    import tracemalloc

    from curation import compact

    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    n, node = 12_000, "cc86886cdc41aa61cf671b05105542dc7bdce6f4031c6e6607fd947b"
    for i in range(n):
        u = f"u{i:016x}"
        (store.ledger_dir / f"{u}.json").write_text(json.dumps({
            "unit_id": u, "attempts": 1 + (i % 1000 == 0), "clips": 37, "rows": 37, "kept": 28, "source_errors": 0,
            "committed_at": 1796636977.96 + i, "node_id": node, "node_ip": "192.0.2.2",
            "first_source": f"/work/footage/sources/src{i:08d}.mp4", "source_ids": [f"{4 * i + k:016x}" for k in range(4)],
            "scores_file": f"{u}-0cbda342.parquet", "clips_file": f"{u}-0cbda342.parquet",
            "shard_files": [f"{u}-0cbda342-0000.parquet"], "errors": {"split": i % 2}, "source_outcomes": {},
            "model_sent_bytes": {}, "model_wait_s": {}, "stage_seconds": {"filter": 0.004, "split": 0.5},
            "unit_seconds": {"markers": 0.005, "probe": 0.001, "source_steps": 0.013, "task_gap": 0.008,
                             "task_queued": 0.049, "task_return": 0.002, "task_setup": 0.0003, "write": 0.016},
            "unit_wall_s": 0.037}, indent=2))
    tracemalloc.start()
    try:
        manifest = compact.checkpoint(store, compact=False, created_by="curate run (ledger)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * 2**20, f"{peak / 2**20:.1f} MB of Python objects"
    totals = manifest["totals"]
    assert manifest["units"] == totals["units"] == n and totals["sources"] == 4 * n
    assert totals["clips"] == 37 * n and totals["kept"] == 28 * n and totals["errors"] == {"split": n // 2}
    assert totals["units_retried"] == n // 1000 and abs(totals["stage_seconds"]["split"] - 0.5 * n) < 1e-6 * n
    ledger = store.ledger()
    assert ledger.unit_count() == n and not ledger.new_units.num_rows and len(ledger.source_ids()) == 4 * n
    assert not list(store.ledger_dir.glob("u*.json"))  # every entry folded, then deleted
