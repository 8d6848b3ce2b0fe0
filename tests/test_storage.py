"""Sources in object storage, against a real S3 API server on localhost (moto in server mode,
started and stopped by the fixture on a free port): discovery by prefix, glob and list files,
versioned source ids, fetching with ranged reads, a run whose inputs are s3:// URIs giving the
scores of the same footage read from a folder, failures as rows, no temporary file left, no
credential in any output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curation import sources
from curation.cli import main as curate
from curation.config import load_config
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore
from s3_server import FaultProxy, s3_environment
from stages import storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "PLANTEDsecretVALUE0123456789abcdef"  # the run must never write this anywhere
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=2"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, the AWS variables pointing at it (credentials by the
    standard environment chain), and a fetch temporary folder of our own; all undone after."""
    tmp = tmp_path_factory.mktemp("fetchtmp")
    with s3_environment(tmp_path_factory.mktemp("moto"), SECRET, ("footage",), tempdir=tmp) as fs:
        yield fs, tmp


@pytest.fixture(scope="module")
def bucket(s3, footage):
    """The session's footage (3 good sources, truncated, zero-byte, not a video) uploaded under
    s3://footage/raw/ (two of them in a sub-prefix), plus a text object that is not a video."""
    fs, _ = s3
    root, _ = footage
    for i, path in enumerate(sorted(root.iterdir())):
        key = f"footage/raw/{'sub/' if i % 2 else ''}{path.name}"
        fs.put_file(str(path), key)
    fs.pipe("footage/raw/readme.txt", b"not footage")
    return fs


def names(found: list[sources.Source]) -> list[str]:
    return sorted(Path(s.path).name for s in found)


def test_inputs_by_prefix_glob_and_list_files(bucket, footage, tmp_path):
    root, _ = footage
    local = names(sources.discover([str(root)]))
    by_prefix = sources.discover(["s3://footage/raw/"])
    assert names(by_prefix) == local  # the video objects, recursively; readme.txt is no video
    assert all(s.path.startswith("s3://footage/raw/") for s in by_prefix)
    assert {s.size_bytes for s in by_prefix} == {p.stat().st_size for p in root.iterdir()}
    assert names(sources.discover(["s3://footage/raw/**/*.mp4"])) == local
    assert names(sources.discover(["s3://footage/raw/sub/*.mp4"])) == sorted(
        p.name for i, p in enumerate(sorted(root.iterdir())) if i % 2)
    # A list file, local or in the bucket, whose lines are URIs (and a relative entry).
    lines = "# two sources\ns3://footage/raw/cuts.mp4\n\ns3://footage/raw/sub/empty.mp4\n"
    (tmp_path / "list.txt").write_text(lines)
    bucket.pipe("footage/lists/a.txt", (lines + "../raw/pan.mp4\n").encode())
    assert names(sources.discover([f"@{tmp_path / 'list.txt'}"])) == ["cuts.mp4", "empty.mp4"]
    assert names(sources.discover(["s3://footage/lists/a.txt"])) == ["cuts.mp4", "empty.mp4", "pan.mp4"]
    # The same listing gives the same units, in the store's order.
    again = sources.discover(["s3://footage/raw/"])
    assert [u.unit_id for u in sources.plan_units(again, 2)] == [u.unit_id for u in sources.plan_units(by_prefix, 2)]
    for missing in ("s3://footage/nothing/", "s3://footage/raw/*.mkv", "s3://footage/raw/none.mp4"):
        with pytest.raises(sources.SourceError):
            sources.discover([missing])
    with pytest.raises(sources.SourceError, match="presigned") as err:
        sources.discover(["s3://footage/raw/cuts.mp4?X-Amz-Signature=abcdef0123456789"])
    assert "abcdef0123456789" not in str(err.value)


def test_units_are_planned_while_the_listing_goes_on(s3):
    """2100 objects are 3 pages of listing: the first unit is out after the first page, the
    feed keeps counts, not sources, and a resume with committed sources forms the same units
    of the rest."""
    fs, _ = s3
    fs.pipe({f"footage/many/{k:05d}.mp4": b"x" for k in range(2100)})
    feed = sources.UnitFeed(sources.iter_sources(["s3://footage/many/"]), 4)
    units = iter(feed)
    first = next(units)
    assert [Path(s.path).name for s in first.sources] == ["00000.mp4", "00001.mp4", "00002.mp4", "00003.mp4"]
    assert 4 <= feed.listed <= 1000 and not feed.complete  # one page listed, not 2100 objects
    rest = list(units)
    assert feed.complete and feed.listed == feed.todo == 2100 and feed.units == 1 + len(rest) == 525
    assert len(feed.open) == 525  # given out and not finished: what the feed holds
    done = {s.source_id for u in rest[:10] for s in u.sources}
    again = list(sources.UnitFeed(sources.iter_sources(["s3://footage/many/"]), 4, done))
    assert [u.unit_id for u in again] == [first.unit_id] + [u.unit_id for u in rest[10:]]
    fs.rm("footage/many", recursive=True)


def test_a_replaced_object_is_a_new_source(bucket, footage):
    root, _ = footage
    before = {s.path: s.source_id for s in sources.discover(["s3://footage/raw/"])}
    bucket.put_file(str(root / "pan.mp4"), "footage/raw/copy.mp4")
    first = {s.path: s.source_id for s in sources.discover(["s3://footage/raw/"])}
    assert {k: v for k, v in first.items() if k in before} == before  # stable while unchanged
    bucket.put_file(str(root / "ntsc.mp4"), "footage/raw/copy.mp4")  # other bytes, other ETag
    second = {s.path: s.source_id for s in sources.discover(["s3://footage/raw/"])}
    assert second["s3://footage/raw/copy.mp4"] != first["s3://footage/raw/copy.mp4"]
    bucket.rm("footage/raw/copy.mp4")


def test_fetch_reads_every_byte_once_in_parallel_ranges(bucket, footage, tmp_path, monkeypatch):
    root, _ = footage
    monkeypatch.setattr(storage, "PART_BYTES", 4096)  # many parts of a ~100 kB source
    data = (root / "cuts.mp4").read_bytes()
    before = dict(storage.FETCHED)
    got = storage.fetch("s3://footage/raw/cuts.mp4", tmp_path / "copy.mp4")
    assert got == len(data) and (tmp_path / "copy.mp4").read_bytes() == data
    assert storage.FETCHED["bytes"] - before["bytes"] == len(data)
    with pytest.raises(storage.StorageError, match="not found"):
        storage.fetch("s3://footage/raw/gone.mp4", tmp_path / "gone.mp4")


def test_prefetcher_removes_its_files_on_every_path(bucket, s3):
    _, tmp = s3
    uris = ["s3://footage/raw/cuts.mp4", "s3://footage/raw/gone.mp4", "s3://footage/raw/sub/ntsc.mp4"]
    with storage.Prefetcher(uris) as pf:
        first = pf.take(uris[0])
        assert Path(first).stat().st_size > 0
        with pytest.raises(storage.StorageError, match="not found"):
            pf.take(uris[1])
        with storage.local_copy(uris[2]) as local:  # the split stage's view: the prefetched copy
            assert Path(local).parent == pf.dir
        assert not Path(local).exists()  # deleted once split
        folder = pf.dir
    assert not folder.exists()
    with pytest.raises(RuntimeError):
        with storage.local_copy(uris[0]) as local:
            raise RuntimeError("decoding failed")
    assert not Path(local).exists()
    # A folder left by a process that died is swept by the next prefetcher.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp / f"{storage.TEMP_PREFIX}{int(dead.stdout)}-x"
    orphan.mkdir()
    (orphan / "00000.mp4").write_bytes(b"partial")
    with storage.Prefetcher(uris[:1]):
        pass
    assert not orphan.exists()
    assert not list(tmp.glob(storage.TEMP_PREFIX + "*"))


def comparable(out: Path) -> dict[tuple, tuple]:
    """(file name, start_frame) -> what a run measured, whatever the path the source had."""
    t = OutputStore(out).read_scores().to_pylist()
    def num(v):
        return None if v is None or math.isnan(v) else round(v, 6)
    return {(Path(r["source_path"]).name, r["start_frame"]): (
        r["end_frame"], r["source_status"], num(r["duration_s"]), num(r["motion_score"]), r["keep"]) for r in t}


def test_a_run_on_s3_inputs_matches_the_local_run(bucket, footage, s3, tmp_path, caplog):
    root, _ = footage
    _, tmp = s3
    cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)
    local = run_pipeline(cfg, [str(root)], tmp_path / "local", run_local)
    caplog.set_level("DEBUG")
    remote = run_pipeline(cfg, ["s3://footage/raw/"], tmp_path / "s3", run_local)
    assert remote["sources"] == local["sources"] and remote["source_outcomes"] == local["source_outcomes"]
    assert comparable(tmp_path / "s3") == comparable(tmp_path / "local")
    assert not list(tmp.glob(storage.TEMP_PREFIX + "*"))  # every fetched copy removed
    # The secret is in no output file and no log line.
    for path in (tmp_path / "s3").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    assert json.loads((tmp_path / "s3" / "run.json").read_text())["inputs"] == ["s3://footage/raw/"]


def test_ray_workers_fetch_s3_sources_and_leave_no_temporary_file(bucket, footage, s3, tmp_path, ray_tmp,
                                                                   monkeypatch):
    """The embedded cluster's workers read the sources from the endpoint (the standard
    variables reach them through the environment) into their own temporary folders: each
    source once, counted in run.json's `nodes` with the folder its fetches went to."""
    from curation.pipeline import run_ray

    root, _ = footage
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(worker_tmp))  # the workers' temporary folder
    cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)
    local = run_pipeline(cfg, [str(root)], tmp_path / "local", run_local)
    record = run_pipeline(cfg, ["s3://footage/raw/"], tmp_path / "ray", lambda c, u, s: run_ray(
        c, u, s, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp))
    assert record["source_outcomes"] == local["source_outcomes"]
    assert comparable(tmp_path / "ray") == comparable(tmp_path / "local")
    [node] = record["nodes"].values()
    split = {r["source_id"] for r in OutputStore(tmp_path / "ray").read_scores().to_pylist()}
    assert node["fetch_temp_dirs"] == [str(worker_tmp)], node
    assert node["fetched_objects"] == len(split) == len(list(root.iterdir())), node
    assert not list(worker_tmp.glob(storage.TEMP_PREFIX + "*"))


def test_an_object_gone_before_its_fetch_is_an_unreadable_row(bucket, footage, tmp_path, monkeypatch):
    root, _ = footage
    bucket.put_file(str(root / "pan.mp4"), "footage/vanishing/pan.mp4")
    bucket.put_file(str(root / "cuts.mp4"), "footage/vanishing/cuts.mp4")
    cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)
    real_fetch = storage.fetch

    def fetch(uri, *args, **kwargs):  # the object is deleted after listing, before its fetch
        if uri.endswith("/pan.mp4"):
            bucket.rm("footage/vanishing/pan.mp4")
        return real_fetch(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "fetch", fetch)
    record = run_pipeline(cfg, ["s3://footage/vanishing/"], tmp_path / "out", run_local)
    rows = {Path(r["source_path"]).name: r for r in OutputStore(tmp_path / "out").read_scores().to_pylist()
            if r["source_status"] or r["start_frame"] == 0}
    assert rows["pan.mp4"]["source_status"] == "unreadable"
    assert "not found" in rows["pan.mp4"]["split_error"] and "s3://footage/vanishing/pan.mp4" in rows["pan.mp4"]["split_error"]
    assert SECRET not in rows["pan.mp4"]["split_error"]
    assert rows["cuts.mp4"]["source_status"] is None  # the other source gave its clips
    assert record["sources"] == {"total": 2, "committed": 2}


@pytest.fixture
def flaky(s3, bucket, monkeypatch):
    """A FaultProxy in front of the fixture's endpoint, with the store variables pointing at it."""
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"], seed=3)
    with proxy as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield proxy


def test_transient_errors_are_retried_and_counted(flaky, footage, tmp_path):
    """503 SlowDown on 25% of the requests and 10% dropped connections: the run finishes with the
    clips of a clean run, each once, and run.json counts every failed request."""
    root, _ = footage
    cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)
    clean = run_pipeline(cfg, [str(root)], tmp_path / "local", run_local)
    flaky.error_share, flaky.drop_share = 0.25, 0.10
    record = run_pipeline(cfg, ["s3://footage/raw/"], tmp_path / "s3", run_local)
    injected = flaky.counts["errors"] + flaky.counts["dropped"]
    # Answered: a listing page and a read of each of the 5 objects that are not empty.
    assert injected >= 2 and flaky.counts["forwarded"] >= 6
    # Every 503 is one failed attempt that botocore saw and retried (this process made every
    # request through the proxy); a dropped connection is counted when botocore retries it, not
    # when the HTTP client reopens a dropped keep-alive connection at once on its own.
    assert flaky.counts["errors"] <= record["storage"]["failed_requests"] <= injected
    assert record["storage"]["objects"] == 6 and record["clips"] == clean["clips"]
    ids = OutputStore(tmp_path / "s3").read_scores().column("clip_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert comparable(tmp_path / "s3") == comparable(tmp_path / "local")


def test_a_store_down_past_its_retries_stops_the_run_and_a_rerun_resumes(flaky, footage, tmp_path,
                                                                           monkeypatch):
    root, _ = footage
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a small retry budget (botocore's standard variable)
    out = tmp_path / "out"
    argv = ["run", str(REPO / "configs" / "spine.yaml"), "--input", "s3://footage/raw/", "--output", str(out),
            "--runner", "local", "--num-cpus", "1", *[a for o in OVERRIDES for a in ("--set", o)]]
    real_fetch = storage.fetch
    calls = []

    def fetch_then_fail(*args, **kwargs):  # the store goes down after two sources were read
        calls.append(args[0])
        if len(calls) == 3:
            flaky.error_share = 1.0
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(storage, "fetch", fetch_then_fail)
    assert curate(argv) == 1  # stopped with a message, not a row per source
    assert flaky.counts["errors"] >= 2
    failed = json.loads((out / "run.json").read_text())
    assert failed["status"] == "failed" and "the store failed after its retries" in failed["attempts"][-1]["error"]
    assert failed["attempts"][-1]["storage"]["failed_requests"] >= 2
    committed = OutputStore(out).committed()
    assert len(committed) >= 1  # the unit of the first two sources was committed before
    flaky.error_share = 0.0
    assert curate(argv) == 0  # the same command resumes
    record = json.loads((out / "run.json").read_text())
    assert len(record["attempts"]) == 2 and record["sources"] == {"total": 6, "committed": 6}
    ids = OutputStore(out).read_scores().column("clip_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert not any(r["split_error"] and "store failed" in r["split_error"]
                   for r in OutputStore(out).read_scores().to_pylist())
    assert record["storage"]["failed_requests"] >= 2


def test_on_ray_a_store_down_stops_the_run_instead_of_failing_its_sources(flaky, footage, tmp_path, ray_tmp,
                                                                           monkeypatch):
    from curation.pipeline import run_ray

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)

    def executor(config, units, store):  # down after the listing, for the workers' fetches
        flaky.error_share = 1.0
        return run_ray(config, units, store, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp)

    with pytest.raises(storage.StoreUnavailable, match="the store failed after its retries"):
        run_pipeline(cfg, ["s3://footage/raw/"], tmp_path / "out", executor)
    assert not OutputStore(tmp_path / "out").committed()  # no unit committed rows of failed sources
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"


def test_any_fsspec_filesystem_goes_through_the_same_path(footage, tmp_path):
    """gs:// and az:// are not installed here; fsspec's in-memory filesystem stands in for
    "any filesystem fsspec resolves": listing by find, ranged reads, a version from its
    timestamps. The run gives the local run's scores."""
    import fsspec

    root, _ = footage
    mem = fsspec.filesystem("memory")
    for path in sorted(root.iterdir()):
        mem.pipe(f"/fsspec-footage/raw/{path.name}", path.read_bytes())
    try:
        found = sources.discover(["memory://fsspec-footage/raw/"])
        assert names(found) == names(sources.discover([str(root)]))
        assert all(s.path.startswith("memory://fsspec-footage/raw/") for s in found)
        assert names(sources.discover(["memory://fsspec-footage/raw/c*.mp4"])) == ["cuts.mp4"]
        cfg = load_config(REPO / "configs" / "spine.yaml", OVERRIDES)
        run_pipeline(cfg, [str(root)], tmp_path / "local", run_local)
        run_pipeline(cfg, ["memory://fsspec-footage/raw/"], tmp_path / "mem", run_local)
        assert comparable(tmp_path / "mem") == comparable(tmp_path / "local")
    finally:
        mem.rm("/fsspec-footage", recursive=True)


def test_redact_removes_query_strings_and_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = f"GET https://b.s3.amazonaws.com/k.mp4?X-Amz-Signature=abc&X-Amz-Credential=def failed; key {SECRET}"
    clean = storage.redact(text)
    assert "X-Amz-Signature" not in clean and SECRET not in clean
    assert "https://b.s3.amazonaws.com/k.mp4?<redacted>" in clean
    assert storage.redact("s3://bucket/key.mp4: not found") == "s3://bucket/key.mp4: not found"
    assert storage.glob_pattern("s3://b/raw/**/*.mp4").match("s3://b/raw/x.mp4")
    assert storage.glob_pattern("s3://b/raw/**/*.mp4").match("s3://b/raw/a/b/x.mp4")
    assert not storage.glob_pattern("s3://b/raw/*.mp4").match("s3://b/raw/a/x.mp4")

