"""Compaction and ledger checkpoints (curation/compact.py, curation/ledger.py): every reader gives
the same result before and after; a compaction killed at any moment leaves readers the same rows
and the next one finishes; a compacted output mixed with newer units reads right; a run resumes
after compaction with every clip once; a compaction while a run goes on loses nothing. On a
folder, and the kill test also on a local S3 endpoint (moto)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import compact
from curation.config import load_config
from curation.refilter import refilter
from curation.report import summarize
from curation.runner import run_local, run_pipeline
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore

REPO = Path(__file__).resolve().parents[1]
LOOSE = ["split.min_duration_s=1.0", "run.sources_per_unit=1", "run.compact_at_end=false"]
TIGHTER = ["filter.rules.motion_score.min=2.5", "filter.rules.duration_s.min=2.8"]
KINDS = ("scores", "clips", "shards")
SMALL_MB = 0.15  # a compacted file target small enough that the fixture's clips fill several


def config(extra=()):
    return load_config(REPO / "configs" / "spine.yaml", LOOSE + list(extra))


@pytest.fixture(scope="module")
def loose(footage, tmp_path_factory):
    """The fixture footage run one source a unit, left uncompacted (an entry per unit)."""
    out = tmp_path_factory.mktemp("compact") / "loose"
    run_pipeline(config(), [str(footage[0])], out, run_local)
    assert len(list((out / "ledger").glob("u*.json"))) == 6
    return out


def rows(out, kind: str = "scores") -> dict[str, dict]:
    """{clip_id: row} of the files the ledger lists, without the busy-time columns; asserts
    every clip comes once."""
    tables = [pq.read_table(p) if isinstance(p, Path) else None for p in OutputStore(out).committed_files(kind)]
    table = pa.concat_tables(tables) if tables else None
    out_rows = {}
    for r in (table.to_pylist() if table is not None else []):
        assert r["clip_id"] not in out_rows, f"clip {r['clip_id']} twice in {kind}"
        out_rows[r["clip_id"]] = {k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()
                                  if not k.startswith(STAGE_SECONDS_PREFIX)}
    return out_rows


def assert_only_listed(out: Path) -> None:
    ledger = OutputStore(out).ledger()
    for kind in KINDS:
        assert sorted(p.name for p in (out / kind).iterdir()) == sorted(ledger.file_names(kind)), kind
    assert sorted(p.name for p in (out / "ledger").iterdir()) == sorted(ledger.listed()["ledger"])


def test_every_reader_gives_the_same_result_after_compaction(loose, tmp_path):
    from curation.export import export
    from training.config import preset
    from training.data import shard_paths
    from training.stream import plan_data

    a = shutil.copytree(loose, tmp_path / "a")
    b = shutil.copytree(loose, tmp_path / "b")
    manifest = compact.checkpoint(OutputStore(b), target_mb=SMALL_MB)
    assert manifest["units"] == 6 and not list((b / "ledger").glob("u*.json"))
    assert_only_listed(b)
    # Large files: each kind's files but its last hold at least the target's bytes (a file
    # ends only between units, so it may hold more), and there are fewer of them.
    for kind in KINDS:
        files = manifest["files"][kind]
        assert len(files) < len(OutputStore(a).committed_files(kind)), kind
        assert all(f["bytes"] >= SMALL_MB * 2**20 for f in files[:-1]), (kind, files)
    assert len(manifest["files"]["clips"]) >= 2  # the target made the clips span files

    for kind in KINDS:
        assert rows(a, kind) == rows(b, kind), kind
    sa, sb = summarize(a)[0], summarize(b)[0]
    for key in ("totals", "funnel", "reasons", "overlaps", "errors"):
        assert sa[key] == sb[key], key
    assert {r["id"]: r["rejected"] for r in sa["rules"]} == {r["id"]: r["rejected"] for r in sb["rules"]}
    assert sa["scores"]["motion_score"]["quantiles"] == sb["scores"]["motion_score"]["quantiles"]
    assert sa["scores"]["motion_score"]["histogram"] == sb["scores"]["motion_score"]["histogram"]
    # The trainer's plan covers the same rows.
    cfg = preset("image", "tiny")
    covered = {str(p): 0 for p in []}
    for out in (a, b):
        plan = plan_data(shard_paths(str(out)), cfg, num_streams=2)
        covered[str(out)] = sum(p.num_rows for p in plan.pieces)
    assert covered[str(a)] == covered[str(b)] == len(rows(a, "shards"))
    # Export and refilter.
    for out in (a, b):
        export(str(out), "files", str(out.parent / f"export-{out.name}"))
    assert sorted(p.name for p in (tmp_path / "export-a" / "videos").rglob("*.mp4")) == \
        sorted(p.name for p in (tmp_path / "export-b" / "videos").rglob("*.mp4"))
    for out in (a, b):
        refilter(out, TIGHTER)
    keep = {out: {k for k, r in rows(out).items() if r["keep"]} for out in (a, b)}
    assert keep[a] == keep[b] and 0 < len(keep[a]) < len(rows(loose))
    assert set(rows(b, "shards")) == keep[b]
    assert_only_listed(a)
    assert_only_listed(b)


class Killed(BaseException):
    """A kill at a chosen step (BaseException: no `except Exception` of the code catches it)."""


def kill_at(monkeypatch, step: int) -> list[str]:
    """Make the `step`-th write or delete of a compaction raise Killed; returns the steps seen."""
    seen: list[str] = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen.append(name)
            if len(seen) == step:
                raise Killed(f"killed at step {step}: {name}")
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(compact.outdir, "staged_file", counted("stage", compact.outdir.staged_file))
    monkeypatch.setattr(compact.outdir, "write_json", counted("json", compact.outdir.write_json))
    monkeypatch.setattr(compact, "clean_up", counted("clean_up", compact.clean_up))
    return seen


def count_steps(store_root, monkeypatch) -> int:
    with monkeypatch.context() as m:
        seen = kill_at(m, 10**9)
        compact.checkpoint(OutputStore(store_root), target_mb=SMALL_MB)
    return len(seen)


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    from s3_server import s3_environment

    with s3_environment(tmp_path_factory.mktemp("moto"), "testing-secret-0123456789", ("out",),
                        tempdir=tmp_path_factory.mktemp("tmpdir")) as fs:
        yield fs


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_compaction_killed_at_any_moment_leaves_readers_the_same_rows(loose, tmp_path, monkeypatch, where,
                                                                         request):
    expected = {kind: rows(loose, kind) for kind in ("scores", "shards")}
    steps = count_steps(shutil.copytree(loose, tmp_path / "count"), monkeypatch)
    assert steps >= 6  # files of three kinds, the units' table, the checkpoint, the clean-up
    for step in range(1, steps + 1):
        if where == "folder":
            out = shutil.copytree(loose, tmp_path / f"k{step}")
        else:
            fs = request.getfixturevalue("s3_store")
            fs.put(str(loose), f"out/k{step}", recursive=True)
            out = f"s3://out/k{step}/"
        with monkeypatch.context() as m:
            kill_at(m, step)
            with pytest.raises(Killed):
                compact.checkpoint(OutputStore(out), target_mb=SMALL_MB)
        as_if_its_process_died(OutputStore(out))
        for kind in ("scores", "shards"):
            assert remote_rows(out, kind) == expected[kind], (step, kind)
        compact.checkpoint(OutputStore(out), target_mb=SMALL_MB)  # the next one finishes
        for kind in ("scores", "shards"):
            assert remote_rows(out, kind) == expected[kind], (step, kind)
        store = OutputStore(out)
        ledger = store.ledger()
        assert not ledger.new_units.num_rows and ledger.unit_count() == 6
        for kind in KINDS:  # nothing the ledger does not list, nothing it lists missing
            assert sorted(p.name for p in (store.root / kind).iterdir()) == sorted(ledger.file_names(kind))
        assert not (store.ledger_dir / compact.LOCK).exists()


def as_if_its_process_died(store: OutputStore) -> None:
    """A lock the killed compaction left names this (live) process: make it name one that is
    gone, as after a SIGKILL."""
    import subprocess
    import sys

    path = store.ledger_dir / compact.LOCK
    if path.exists():
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        lock = json.loads(path.read_text())
        path.write_text(json.dumps({**lock, "pid": gone.pid}))


def remote_rows(out, kind: str) -> dict[str, dict]:
    """As rows(), for a folder or a URI."""
    from curation import outdir

    table = pa.concat_tables([outdir.read_table(p) for p in OutputStore(out).committed_files(kind)])
    found = {}
    for r in table.to_pylist():
        assert r["clip_id"] not in found, f"clip {r['clip_id']} twice"
        found[r["clip_id"]] = {k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()
                               if not k.startswith(STAGE_SECONDS_PREFIX)}
    return found


def test_a_compacted_output_with_newer_units_reads_right_and_resumes(footage, loose, tmp_path):
    """Half the sources run and compacted, then the same run over all of them: the new units
    come as entries after the checkpoint (read together), and the end's compaction merges them
    with the checkpoint's last small file."""
    root, _ = footage
    half = [str(root / name) for name in sorted(p.name for p in root.iterdir())[:3]]
    out = tmp_path / "out"
    run_pipeline(config(), half, out, run_local)
    compact.checkpoint(OutputStore(out))
    record = run_pipeline(config(), [str(root)], out, run_local)  # the other half: entries
    assert record["attempts"][-1]["units"] == 3 and record["units"] == 6
    ledger = OutputStore(out).ledger()
    assert ledger.checkpoint and ledger.new_units.num_rows == 3  # mixed
    expected = rows(loose)
    assert rows(out) == expected
    assert summarize(out)[0]["totals"] == summarize(loose)[0]["totals"]
    compact.checkpoint(OutputStore(out))
    assert rows(out).keys() == expected.keys()
    assert [len(list((out / kind).iterdir())) for kind in KINDS] == [1, 1, 1]
    assert_only_listed(out)


def test_a_checkpoint_with_nothing_new_is_not_rewritten(loose, tmp_path):
    """Once every unit is in a compacted checkpoint, compacting again (as a resume of a finished
    run does at its end) leaves the ledger's objects as they are: rewriting them would read and
    write a row per unit (12 s at 10^6 sources on an object store) for nothing. An entry
    committed after it is folded by the next one, as before."""
    out = tmp_path / "out"
    shutil.copytree(loose, out)
    first = compact.checkpoint(OutputStore(out))
    names = sorted(p.name for p in (out / "ledger").iterdir())
    again = compact.checkpoint(OutputStore(out))
    assert again["seq"] == first["seq"] and sorted(p.name for p in (out / "ledger").iterdir()) == names
    assert rows(out) == rows(loose)
    # A unit committed afterwards (this one's entry again, under its own name) needs a new one.
    entry = {**compact_entry(out), "unit_id": "uextra"}
    (out / "ledger" / "uextra.json").write_text(json.dumps(entry))
    third = compact.checkpoint(OutputStore(out), compact=False)
    assert third["seq"] == first["seq"] + 1 and OutputStore(out).ledger().unit_count() == first["units"] + 1


def test_the_drivers_ledger_checkpoint_holds_no_row_per_unit(tmp_path):
    """The driver checkpoints its ledger every few thousand units, with every unit still loose
    (its own files). That checkpoint streams the units' table and sweeps only ledger/: it
    makes no Python row or file name of each unit (at 10^6 sources, 250,000 units and 750,000
    names), so the driver's memory does not grow with the run."""
    import tracemalloc

    from curation.ledger import UNITS_SCHEMA, checkpoint_name

    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    n = 60_000
    ids = [f"u{i:08d}" for i in range(n)]
    units = pa.table({"unit_id": ids, "source_ids": [[f"{i:016x}"] * 4 for i in range(n)],
                      "first_source": [f"/s/{i:08d}.mp4" for i in range(n)], "rows": [10] * n,
                      "clips": [10] * n, "kept": [5] * n, "source_errors": [0] * n, "attempts": [1] * n,
                      "committed_at": [1.0] * n, "node_id": [None] * n,
                      "scores_file": [f"{u}-a.parquet" for u in ids], "clips_file": [f"{u}-a.parquet" for u in ids],
                      "shard_files": [[f"{u}-a-0.parquet"] for u in ids]}, UNITS_SCHEMA)
    pq.write_table(units, store.ledger_dir / "units-00000001-t.parquet")
    (store.ledger_dir / checkpoint_name(1)).write_text(json.dumps(
        {"format": 1, "seq": 1, "units_file": "units-00000001-t.parquet", "units": n, "files": {},
         "totals": {"units": n}}))
    (store.ledger_dir / "uextra.json").write_text(json.dumps(
        {"unit_id": "uextra", "source_ids": ["ffffffffffffffff"], "first_source": "/s/x.mp4", "rows": 1,
         "clips": 1, "kept": 1, "source_errors": 0, "scores_file": "uextra-a.parquet"}))
    del units, ids
    tracemalloc.start()
    manifest = compact.checkpoint(store, compact=False, created_by="curate run (ledger)")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert manifest["seq"] == 2 and manifest["units"] == n + 1
    assert not (store.ledger_dir / "uextra.json").exists()  # folded
    # A Python row of each unit, or its three file names, would be tens of MB here.
    assert peak < 12 * 2**20, f"{peak / 2**20:.1f} MB of Python objects"


def compact_entry(out: Path) -> dict:
    """A units-table row of `out`'s checkpoint as a ledger entry (its files are the compacted ones)."""
    unit = OutputStore(out).ledger().units.slice(0, 1).to_pylist()[0]
    return {k: v for k, v in unit.items() if k not in ("scores_file", "clips_file", "shard_files")}


def test_a_compaction_while_a_run_goes_on_loses_nothing(footage, loose, tmp_path, monkeypatch):
    """`curate compact` started while units are being committed: the units committed after its
    listing stay entries, and the run ends with every clip once."""
    root, _ = footage
    out = tmp_path / "out"
    cfg = config()
    started = threading.Event()
    real = run_local

    def slow_local(c, units, store):  # one unit at a time, a pause between commits
        for entry in real(c, units, store, workers=1):
            started.set()
            time.sleep(0.3)
            yield entry

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(record=run_pipeline(cfg, [str(root)], out, slow_local)))
    thread.start()
    try:
        assert started.wait(120)
        time.sleep(0.4)
        manifest = compact.checkpoint(OutputStore(out))
        assert 1 <= manifest["units"] < 6
    finally:
        thread.join(300)
    assert result["record"]["status"] == "complete" and result["record"]["units"] == 6
    assert rows(out).keys() == rows(loose).keys()
    assert_only_listed(out)


def test_the_lock_of_a_live_compaction_keeps_a_second_one_out(loose, tmp_path):
    out = shutil.copytree(loose, tmp_path / "out")
    store = OutputStore(out)
    lock = compact.Lock(store)
    lock.acquire()
    try:
        with pytest.raises(compact.CompactionBusy, match="a compaction is running"):
            compact.checkpoint(store)
        # The driver's checkpoints skip it, and a run's prepare leaves its files alone.
        planted = out / "scores" / f"{lock.prefix}-00000.parquet"
        planted.write_bytes(b"being written")
        store.remove_uncommitted()
        assert planted.exists()
    finally:
        lock.release()
    store.remove_uncommitted()
    assert not planted.exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_the_locks_sweep_asks_the_store_about_each_folder_once(tmp_path, monkeypatch):
    """The sweep lists each folder and compares the names; it does not ask whether the folder
    exists once per file in it. On an object store each question is a request: 5,664 of them
    (187 s against the local endpoint) in a resume of a 10^6-row output, found by profiling."""
    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    for i in range(200):
        unit = f"u{i:04d}"
        store.write_ledger({"unit_id": unit, "source_ids": [f"{i:016x}"], "first_source": f"/s/{i}.mp4",
                            "rows": 1, "clips": 1, "kept": 1, "source_errors": 0, "scores_file": f"{unit}-a.parquet",
                            "clips_file": f"{unit}-a.parquet", "shard_files": [f"{unit}-a-0000.parquet"]})
        for folder, name in ((store.scores_dir, f"{unit}-a.parquet"), (store.clips_dir, f"{unit}-a.parquet"),
                             (store.shards_dir, f"{unit}-a-0000.parquet")):
            (folder / name).write_bytes(b"x")
    dead = store.scores_dir / "c00000007-deadbeef-00000.parquet"  # a dead compaction's file
    dead.write_bytes(b"x")
    asked = []
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: asked.append(self) or real_exists(self, *a, **k))
    lock = compact.Lock(store)
    lock.acquire()
    lock.release()
    assert not dead.exists() and (store.scores_dir / "u0199-a.parquet").exists()
    assert len(asked) < 20, f"{len(asked)} questions about 4 folders of 801 files"


def test_the_driver_checkpoints_its_ledger_while_it_runs(footage, loose, tmp_path, monkeypatch):
    """Every CHECKPOINT_EVERY_UNITS commits the driver checkpoints the ledger alone (no data
    file rewritten): the units stay in their own files, listed by the checkpoint's table, and
    only the units committed since are entries. Readers, a resume and a compaction agree."""
    root, _ = footage
    monkeypatch.setattr(compact, "CHECKPOINT_EVERY_UNITS", 2)
    out = tmp_path / "out"
    run_pipeline(config(), [str(root)], out, run_local)
    ledger = OutputStore(out).ledger()
    assert ledger.checkpoint and ledger.seq == 3 and ledger.new_units.num_rows == 0  # after units 2, 4, 6
    assert not ledger.compacted("scores") and ledger.units.num_rows == 6  # a ledger-only checkpoint
    assert sorted(p.name for p in (out / "scores").iterdir()) == sorted(ledger.file_names("scores"))
    assert rows(out) == rows(loose)
    again = run_pipeline(config(), [str(root)], out, run_local)
    assert again["attempts"][-1]["units"] == 0 and again["units"] == 6
    compact.checkpoint(OutputStore(out))
    assert rows(out) == rows(loose)
    assert_only_listed(out)
