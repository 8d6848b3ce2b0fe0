"""End to end: local and Ray executors, outputs, resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import shutil
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.config import load_config
from curation.report import funnel
from curation.runner import run_local, run_pipeline
from curation.sources import discover, plan_units
from curation.writer import STAGE_SECONDS_PREFIX, OutputError, OutputStore

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=2"]


def config(extra=()):
    return load_config(REPO / "configs" / "spine.yaml", OVERRIDES + list(extra))


def cli_run(root: Path, out: Path, ray_tmp: str, extra: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """`curate run` of the spine on the embedded cluster, one source per unit: (argv, env)."""
    cmd = [sys.executable, "-m", "curation.cli", "run", str(REPO / "configs" / "spine.yaml"), "--input", str(root),
           "--output", str(out), "--num-cpus", "2", "--object-store-mb", "100",
           *[a for o in OVERRIDES + ["run.sources_per_unit=1", *extra] for a in ("--set", o)]]
    return cmd, {**os.environ, "RAY_TMPDIR": ray_tmp}


def clip_ids(out: Path) -> list[str]:
    return sorted(OutputStore(out).read_scores().column("clip_id").to_pylist())


def file_state(path: Path) -> tuple[str, int, int]:
    """The content (a hash), inode and mtime of a file: a rewrite changes the inode (files are
    written under a temporary name and renamed over the old one)."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns


def committed_data_files(out: Path) -> list[Path]:
    store = OutputStore(out)
    return [p for kind in ("scores", "shards", "clips") for p in store.committed_files(kind)]


def assert_only_committed_files(out: Path) -> None:
    """scores/, shards/ and clips/ hold exactly the files the ledger lists (no orphan, no
    temporary file, none missing), and ledger/ only the entries of committed units."""
    store = OutputStore(out)
    for kind in ("scores", "shards", "clips"):
        on_disk = sorted(p.name for p in (out / kind).iterdir())
        assert on_disk == sorted(p.name for p in store.committed_files(kind)), kind
    assert sorted(p.name for p in (out / "ledger").iterdir()) == sorted(store.ledger().listed()["ledger"])


def shard_clip_ids(out: Path) -> list[str]:
    return [c for p in committed_data_files(out) if p.parent.name == "shards"
            for c in pq.read_table(p, columns=["clip_id"]).column("clip_id").to_pylist()]


@pytest.fixture(scope="module")
def local_run(footage, tmp_path_factory):
    root, _ = footage
    out = tmp_path_factory.mktemp("local") / "out"
    record = run_pipeline(config(), [str(root)], out, run_local)
    return out, record


def test_local_run_writes_the_contract(local_run, footage):
    out, record = local_run
    root, truth = footage
    scores = OutputStore(out).read_scores()
    assert scores.schema.equals(schema.SCORES_SCHEMA)
    rows = scores.to_pylist()
    # Every good source is covered by clips; three bad files are one error row each.
    errors = [r for r in rows if r["split_error"] is not None]
    assert sorted(Path(r["source_path"]).name for r in errors) == ["empty.mp4", "notes.mp4", "truncated.mp4"]
    clips = [r for r in rows if r["start_frame"] is not None]
    assert {Path(r["source_path"]).name for r in clips} == set(truth)
    assert len({r["clip_id"] for r in rows}) == len(rows)
    for r in clips:
        assert r["keep"] == (not r["reject_reasons"])
        assert r["motion_score"] >= 0
    # Static shots are rejected by the motion rule, moving ones kept.
    assert any("motion_score<1" in r["reject_reasons"] for r in clips)
    assert any(r["keep"] for r in clips)
    # Shards: exactly the kept clips, with video bytes and micro-conditioning.
    shards = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    shard_rows = [r for t in shards for r in t.to_pylist()]
    assert shards[0].schema.equals(schema.SHARDS_SCHEMA)
    assert sorted(r["clip_id"] for r in shard_rows) == sorted(r["clip_id"] for r in clips if r["keep"])
    for r in shard_rows:
        assert r["video"][4:8] == b"ftyp" and len(r["keyframes"]) == 3
        assert r["fps_id"] == round(r["fps"]) - 1
        assert r["motion_bucket_id"] == schema.motion_bucket_id_for(r["motion_score"])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["clips"] == len(clips)
    assert set(run["stage_busy_seconds"]) == {"split", "motion", "filter"}
    assert run["versions"]["pyarrow"] and run["config"]["steps"][0]["stage"] == "split"
    # (Log files are written by the CLI, not by this API: test_sigkill_then_same_command_... checks them.)


def test_report_funnel_counts(local_run):
    out, record = local_run
    f = funnel(out)
    assert f["sources"] == 6 and f["source_errors"] == 3
    assert f["clips"] == record["clips"] and f["kept"] == record["kept"]
    assert f["rejections"]["motion_score<1"]["total"] >= 1


def test_rerun_is_a_no_op_and_other_config_is_refused(local_run, footage):
    out, record = local_run
    root, _ = footage
    before = clip_ids(out)
    again = run_pipeline(config(), [str(root)], out, run_local)
    assert again["attempts"][-1]["units"] == 0 and clip_ids(out) == before
    with pytest.raises(OutputError, match="different pipeline config"):
        run_pipeline(config(["split.min_duration_s=2"]), [str(root)], out, run_local)


@pytest.mark.parametrize("compacted", [False, True])
def test_leftovers_of_uncommitted_units_are_removed(local_run, footage, tmp_path, compacted):
    """A run killed after a unit's data files were written and before its ledger entry (its
    files stay, unlisted), with files of attempts and compactions nobody committed planted
    beside: the same command finishes with every clip once and only the listed files. Over an
    output of entries (no compaction at the end), and over a compacted one."""
    out, _ = local_run
    root, _ = footage
    loose = config(["run.compact_at_end=false"])
    copy = tmp_path / "copy"
    run_pipeline(loose, [str(root)], copy, run_local)
    entries = sorted((copy / "ledger").glob("u*.json"))
    victim, survivor = entries[0], entries[1].stem
    unit = victim.stem
    some_scores = (copy / "scores" / json.loads(victim.read_text())["scores_file"]).read_bytes()
    victim.unlink()
    if compacted:  # the other units compacted and checkpointed, the victim's files left loose
        from curation.compact import checkpoint

        checkpoint(OutputStore(copy))
        assert not list((copy / "ledger").glob("u*.json"))
    (copy / "scores" / ".tmp-zzz.parquet").write_bytes(b"partial")
    # Files under the writer's names that no unit of this run writes again, so only the clean-up
    # can remove them: a unit id that no unit of these sources hashes to, a shard number beyond
    # any the victim's redo writes, a temporary shard of the victim, the files of a second
    # attempt at a unit that another attempt committed (an attempt thought dead that went on),
    # and the files of a compaction that died before its checkpoint.
    orphan = "u" + "0" * 16
    planted = [copy / "scores" / f"{orphan}-00000000.parquet", copy / "clips" / f"{orphan}-00000000.parquet",
               copy / "shards" / f"{orphan}-00000000-0000.parquet", copy / "shards" / f"{unit}-00000000-0099.parquet",
               copy / "shards" / f".tmp-123-abcdef12-{unit}-0000.parquet",
               copy / "scores" / f"{survivor}-0badf00d.parquet", copy / "shards" / f"{survivor}-0badf00d-0000.parquet",
               copy / "scores" / "c00000009-deadbeef-00000.parquet", copy / "ledger" / "units-00000009-deadbeef.parquet"]
    assert orphan not in {u.unit_id for u in plan_units(discover([str(root)]), config().run.sources_per_unit)}
    for path in planted:
        assert not path.exists()
        path.write_bytes(some_scores)
    record = run_pipeline(loose, [str(root)], copy, run_local)
    assert record["attempts"][-1]["units"] == 1  # the victim's unit, done again
    assert clip_ids(copy) == clip_ids(out)
    assert unit in OutputStore(copy).ledger().unit_ids()
    assert not list((copy / "scores").glob(".tmp-*"))
    assert_only_committed_files(copy)
    assert not [p for p in planted if p.exists()]


def comparable_scores(out: Path) -> list[dict]:
    """The scores rows by clip id, without the timing columns (busy seconds differ per run)."""
    def same(v):
        return "nan" if isinstance(v, float) and v != v else v  # NaN (no score) equals NaN here

    rows = OutputStore(out).read_scores().to_pylist()
    return sorted(({k: same(v) for k, v in r.items() if not k.startswith(STAGE_SECONDS_PREFIX)} for r in rows),
                  key=lambda r: r["clip_id"])


def test_curate_run_on_a_two_node_cluster_uses_both_nodes_and_matches_the_embedded_run(footage, tmp_path,
                                                                                       ray_tmp):
    """`curate run --ray-address` on a real two-node cluster (two raylets on this machine)."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    root, _ = footage
    cmd, env = cli_run(root, tmp_path / "embedded", ray_tmp)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    # Cluster() writes the head's address to /tmp/ray/ray_current_cluster whatever temp_dir
    # says, and fails where nothing has made /tmp/ray yet (a fresh machine, this test alone).
    Path(ray._private.utils.get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024**2, "temp_dir": ray_tmp,
        "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
        cluster.wait_for_nodes()
        out = tmp_path / "cluster"
        cmd, env = cli_run(root, out, ray_tmp)
        cmd = [a for a in cmd if a not in ("--num-cpus", "2", "--object-store-mb", "100")]
        done = subprocess.run([*cmd, "--ray-address", cluster.address], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        head_id = cluster.head_node.node_id
    finally:
        cluster.shutdown()
    # Both nodes ran units, and so wrote their files (the worker that runs a unit writes it).
    record = json.loads((out / "run.json").read_text())
    nodes = record["nodes"]
    assert set(nodes) == {head_id, worker.node_id}, nodes
    assert all(n["units"] >= 1 for n in nodes.values())
    assert sum(n["units"] for n in nodes.values()) == record["units"] == 6
    by_node = {e["node_id"] for e in OutputStore(out).committed().values()}
    assert by_node == {head_id, worker.node_id}
    assert comparable_scores(out) == comparable_scores(tmp_path / "embedded")


def test_sigkill_then_same_command_gives_every_clip_once(local_run, footage, tmp_path, ray_tmp):
    """The CLI on the embedded Ray cluster, killed part-way with SIGKILL, then rerun (without
    the compaction at the end, so that the committed units' own files can be watched; then
    `curate compact`)."""
    out_local, _ = local_run
    root, _ = footage
    out = tmp_path / "out"
    cmd, env = cli_run(root, out, ray_tmp, ("run.compact_at_end=false",))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    killed_part_way = False
    while time.monotonic() < deadline and proc.poll() is None:
        committed = list((out / "ledger").glob("u*.json")) if (out / "ledger").is_dir() else []
        if committed:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process it started
            killed_part_way = True
            break
        time.sleep(0.02)
    proc.wait()
    killed_at = time.time()
    assert killed_part_way, "the run finished or stalled before it could be killed part-way"
    # What the killed run committed: its ledger entries and the data files they list.
    before = OutputStore(out).committed()
    n_before = len(before)
    assert 1 <= n_before < 6
    kept = [out / "ledger" / f"{u}.json" for u in before] + committed_data_files(out)
    states = {p: file_state(p) for p in kept}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # (1) Not one committed file was rewritten (a new version would be a new inode).
    assert {p: file_state(p) for p in kept} == states
    # (2) The restart planned, ran and committed exactly the units the killed run had not.
    units = {u.unit_id for u in plan_units(discover([str(root)]), 1)}  # one source per unit
    assert len(units) == 6
    record = json.loads((out / "run.json").read_text())
    # The killed attempt never finished its listing's count; the restart planned the rest.
    assert "units" not in record["attempts"][0] and record["attempts"][1]["units"] == 6 - n_before
    assert record["driver_arrow_pool"] == expected_driver_pool()
    resumed = f"resuming: {n_before} sources already committed"
    assert resumed in done.stderr
    assert f"listing done: 6 sources, {6 - n_before} to do in {6 - n_before} units" in done.stderr
    # The CLI also logs each run to a file of its own in OUT_DIR/logs, DEBUG lines included.
    log_file = Path(re.search(r"logging to (\S+)", done.stderr)[1])
    assert log_file.parent == out / "logs" and resumed in log_file.read_text()
    after = OutputStore(out).committed()
    assert set(after) == units and record["units"] == 6
    assert all(after[u]["committed_at"] > killed_at for u in units - set(before))
    # (3) On disk: exactly the committed files, and every clip once.
    assert_only_committed_files(out)
    ids = clip_ids(out)
    assert len(ids) == len(set(ids))
    assert ids == clip_ids(out_local)
    shard_ids = shard_clip_ids(out)
    assert len(shard_ids) == len(set(shard_ids))
    assert sorted(shard_ids) == sorted(shard_clip_ids(out_local))
    # (4) Compacted afterwards: the same clips, in one file of each kind, no entry left.
    compacted = subprocess.run([sys.executable, "-m", "curation.cli", "compact", str(out)], env=env,
                               capture_output=True, text=True, timeout=300)
    assert compacted.returncode == 0, compacted.stderr[-3000:]
    assert clip_ids(out) == ids and sorted(shard_clip_ids(out)) == sorted(shard_ids)
    assert_only_committed_files(out)
    assert [len(list((out / kind).iterdir())) for kind in ("scores", "clips", "shards")] == [1, 1, 1]
    assert not list((out / "ledger").glob("u*.json"))


def expected_driver_pool(environ: dict[str, str] = os.environ) -> str:
    """Arrow's memory pool in `curate run`'s driver: the one ARROW_DEFAULT_MEMORY_POOL names,
    else the C heap."""
    return environ.get("ARROW_DEFAULT_MEMORY_POOL") or "system"


POOL = """
import os, sys
sys.argv = sys.argv[1:]  # as the command line of the process: curate run ... or curate report ...
import curation
import pyarrow as pa
print(pa.default_memory_pool().backend_name, os.environ.get("ARROW_DEFAULT_MEMORY_POOL"))
"""


def env_without(*names: str) -> dict[str, str]:
    """This process's environment less the allocator settings a child's test must choose itself."""
    return {k: v for k, v in os.environ.items() if k not in names}


def test_the_run_drivers_arrow_pool_is_the_c_heap_and_its_children_keep_the_users_environment():
    """Arrow's default allocator here (mimalloc), and jemalloc, kept what each ledger checkpoint
    read and wrote in the driver's RSS; the pool is chosen when pyarrow loads, so `curation`
    chooses the C heap for `curate run` before it loads pyarrow, then gives the environment
    back (Ray's workers inherit it). A pool the user names stays; other commands keep the
    default."""
    def pool(argv: list[str], chosen: str | None) -> list[str]:
        env = env_without("ARROW_DEFAULT_MEMORY_POOL")
        if chosen:
            env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
        done = subprocess.run([sys.executable, "-c", POOL, *argv], env=env, capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert pool(["curate", "run", "pipeline.yaml"], None) == ["system", "None"]
    assert pool(["curate", "run", "pipeline.yaml"], "jemalloc") == ["jemalloc", "jemalloc"]
    plain = subprocess.run([sys.executable, "-c", "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"],
                           env=env_without("ARROW_DEFAULT_MEMORY_POOL"), capture_output=True, text=True,
                           timeout=120).stdout.strip()
    assert pool(["curate", "report", "OUT"], None) == [plain, "None"]  # pyarrow's own default


HEAP = """
import gc, json, sys
size, count, give_back = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "give_back"
sys.argv = sys.argv[4:]  # as the command line of the process
import curation
from curation import arrow_pool

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

warm = b"w" * (4 << 20)  # a freed 4 MiB block: glibc's own threshold rises past it
del warm
# Blocks written and freed, each with a small block kept after it: the freed blocks are holes
# the heap cannot hand back from its top.
blocks, pins = [], []
before = rss()
for _ in range(count):
    blocks.append(b"x" * size)
    pins.append(b"y" * 1000)
grown = rss() - before
del blocks
gc.collect()
if give_back:
    arrow_pool.give_back()
print(json.dumps({"grown": grown, "freed": grown - (rss() - before)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_the_run_driver_hands_freed_memory_back_to_the_system():
    """The driver's heap grew with each ledger checkpoint although what it held did not:
    glibc raises its mmap threshold to the largest block freed, and the next such blocks come
    from the heap, between small ones that stay, as holes it never hands back. `curate run`
    fixes the threshold (a block of 256 KiB or more is unmapped when freed) and hands the
    heap's free pages back after a checkpoint (`give_back`). Here 160 MiB of 1 MiB blocks, or
    117 MiB of 200 KiB blocks, are freed between kept small ones, in the driver's process and
    in another command's."""
    def freed(size: int, count: int, give_back: bool, argv: list[str]) -> dict:
        done = subprocess.run([sys.executable, "-c", HEAP, str(size), str(count), "give_back" if give_back else "-",
                               *argv], env=env_without("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_MMAP_THRESHOLD_"),
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["grown"] > 0.9 * size * count / 2**20, got  # every block was written: resident while held
        return got["freed"]

    run, report = ["curate", "run", "pipeline.yaml"], ["curate", "report", "OUT"]
    # 1 MiB blocks: unmapped when freed in the driver; holes in the heap of another command.
    assert freed(1 << 20, 160, False, run) > 150
    assert freed(1 << 20, 160, False, report) < 40
    # Blocks under the threshold are holes everywhere, until the driver gives them back.
    assert freed(200 << 10, 600, False, run) < 30
    assert freed(200 << 10, 600, True, run) > 100


def test_a_ledger_checkpoint_of_the_driver_gives_back_what_it_freed(tmp_path, monkeypatch):
    """LedgerCheckpoints hands the heap's free pages back after each checkpoint it makes."""
    from curation import arrow_pool, compact
    from curation.runner import LedgerCheckpoints

    store = OutputStore(tmp_path / "out")
    store.prepare("f", overwrite=False)
    calls = []
    monkeypatch.setattr(arrow_pool, "give_back", lambda: calls.append(store.ledger().seq))
    monkeypatch.setattr(compact, "CHECKPOINT_EVERY_UNITS", 3)
    checkpoints = LedgerCheckpoints(store)
    for i in range(7):
        store.write_ledger({"unit_id": f"u{i:04d}", "source_ids": [f"{i:016x}"], "first_source": f"/s/{i}.mp4",
                            "rows": 1, "clips": 1, "kept": 1, "source_errors": 0, "scores_file": f"u{i:04d}-a.parquet"})
        checkpoints.committed()
    assert calls == [1, 2]  # after the checkpoints of units 3 and 6, each once it was written


def test_sources_without_clips_commit_and_are_counted_apart(footage, tmp_path):
    """A unit whose sources give no clip still commits; the report tells them from unreadable ones."""
    from curation import synth
    from curation.report import summarize

    root, _ = footage
    odd = tmp_path / "odd"
    expected = synth.write_no_clip_sources(odd)
    shutil.copy(root / "pan.mp4", odd / "pan.mp4")  # a good source shares a unit with them
    shutil.copy(root / "empty.mp4", odd / "empty.mp4")
    out = tmp_path / "out"
    cfg = load_config(REPO / "configs" / "spine.yaml", ["split.min_duration_s=2.0", "run.sources_per_unit=3"])
    record = run_pipeline(cfg, [str(odd)], out, run_local)
    assert record["sources"] == {"total": 8, "committed": 8}
    rows = OutputStore(out).read_scores().to_pylist()
    by_name = {}
    for r in rows:
        by_name.setdefault(Path(r["source_path"]).name, []).append(r)
    assert set(by_name) == set(expected) | {"pan.mp4", "empty.mp4"}
    for name, (status, reason) in expected.items():
        [row] = by_name[name]
        assert row["source_status"] == status and reason in row["split_error"] and not row["keep"]
    assert all(r["start_frame"] is not None for r in by_name["pan.mp4"])
    summary, _ = summarize(out)
    assert summary["totals"]["source_outcomes"] == {"no_clips": 4, "unreadable": 3}
    assert funnel(out)["source_outcomes"] == {"no_clips": 4, "unreadable": 3}


def test_a_sigkilled_driver_leaves_no_process_running(footage, tmp_path, ray_tmp):
    """Only the driver is killed (not its process group): the embedded cluster goes too."""
    from curation.reaper import alive, descendants

    root, _ = footage
    out = tmp_path / "out"
    cmd, env = cli_run(root, out, ray_tmp)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    noted: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("ledger/u*.json")):
            noted.update(descendants(proc.pid))
            time.sleep(0.05)
        noted.update(descendants(proc.pid))
        assert proc.poll() is None, "the run ended before it could be killed"
        assert len(noted) >= 4  # GCS, raylet, agents, workers (and the watcher itself)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while alive(noted) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(noted), sorted(alive(noted))
    finally:
        for pid in alive(noted):
            os.kill(pid, signal.SIGKILL)


def _comparable(out: Path) -> list[dict]:
    """Scores rows without timings (which differ from run to run)."""
    import math

    rows = OutputStore(out).read_scores().to_pylist()
    return sorted(({k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
                    if not k.startswith(STAGE_SECONDS_PREFIX)} for r in rows), key=lambda r: r["clip_id"])


def _concurrency(monkeypatch, cls, method: str, linger_s: float) -> dict:
    """Wrap cls.method to record how many threads are inside it at once (each stays linger_s longer)."""
    import threading

    seen = {"now": 0, "max": 0}
    lock = threading.Lock()
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            time.sleep(linger_s)
            return original(self, *args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(cls, method, wrapped)
    return seen


def test_local_threads_split_sources_at_once_with_the_outputs_of_one_thread(footage, local_run, tmp_path,
                                                                            monkeypatch):
    """`run_local` with 2 workers has two sources in split at once, runs a model step for one
    unit at a time, and writes what one unit after another writes, ledger order included."""
    import functools

    from stages.fault import FaultStage
    from stages.split import SplitStage

    root, _ = footage
    one_out, _ = local_run
    split_seen = _concurrency(monkeypatch, SplitStage, "split_source", 0.2)
    # The fault stage (with no faults) as a stand-in model step: ray.actors makes it one. It
    # lingers long enough for the next unit's sources to reach it while one unit is inside.
    model_seen = _concurrency(monkeypatch, FaultStage, "__call__", 1.5)
    import yaml

    from curation.config import apply_override, parse_config

    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"].append({"stage": "fault", "ray": {"actors": 1}})
    for override in OVERRIDES:
        apply_override(raw, override)
    cfg = parse_config(raw)
    out = tmp_path / "two"
    run_pipeline(cfg, [str(root)], out, functools.partial(run_local, workers=2))
    assert split_seen["max"] == 2
    assert model_seen["max"] == 1
    one, two = _comparable(one_out), _comparable(out)
    assert [r["clip_id"] for r in one] == [r["clip_id"] for r in two]
    for a, b in zip(one, two):
        b.pop("fault_error", None)
        assert {k: v for k, v in a.items() if k != "video"} == {k: v for k, v in b.items() if k != "video"}
    assert list(OutputStore(one_out).committed()) == list(OutputStore(out).committed())
