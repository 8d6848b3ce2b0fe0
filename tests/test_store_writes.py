"""Output writes under a failing store (issue 32, item 2): OUT_DIR in a local S3 endpoint
(moto) behind tests/s3_server.py's FaultProxy, which answers 503 SlowDown, drops requests
before the store sees them, or lets the store carry a request out and loses its answer, on
PUTs, multipart parts and completes, listings, deletes and the log upload. With kills on
top. Checked: every clip exactly once (the clips of a clean local run), nothing left that no
ledger entry lists, run.json's status and failed-request counts true, the run log uploaded
after retries, or the terminal told when it cannot be, with the run's own exit status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from curation import cli, outdir
from curation.cli import main as curate
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore
from s3_server import FaultProxy, s3_environment

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=1"]
KINDS = ("scores", "shards", "clips")


def is_write(method: str, path: str) -> bool:
    return method in ("PUT", "POST", "DELETE")


def is_listing(method: str, path: str) -> bool:
    return method == "GET" and ("list-type=" in path or "prefix=" in path)


def is_log(method: str, path: str) -> bool:
    return "/logs/" in path


def run_argv(inputs: str, output: str) -> list[str]:
    return ["run", str(REPO / "configs" / "spine.yaml"), "--input", inputs, "--output", output,
            "--runner", "local", "--num-cpus", "2", *[a for o in OVERRIDES for a in ("--set", o)]]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto, with the store variables pointing at a FaultProxy in front of it (faults off until
    a test sets them); `fs` talks to moto directly, for the checks."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")  # botocore's budget: 10 tries of a request
    with s3_environment(tmp_path, "testing-secret-0123456789", ("out",), tempdir=tmp) as fs:
        proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"], seed=7)
        with proxy as url:
            monkeypatch.setenv("AWS_ENDPOINT_URL", url)
            yield SimpleNamespace(fs=fs, proxy=proxy, tmp=tmp)


@pytest.fixture(scope="module")
def reference(footage, tmp_path_factory):
    """The clips of a clean run into a local folder: (file name, start frame) -> measured columns."""
    root, _ = footage
    out = tmp_path_factory.mktemp("clean") / "out"
    assert curate(run_argv(str(root), str(out))) == 0
    return comparable(out)


def comparable(out) -> dict[tuple, dict]:
    def same(v):
        return "nan" if isinstance(v, float) and v != v else v

    rows = OutputStore(out).read_scores().to_pylist()
    return {(Path(r["source_path"]).name, r["start_frame"]): {
        k: same(v) for k, v in r.items() if not k.startswith(STAGE_SECONDS_PREFIX)} for r in rows}


def keys(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(fs.find(prefix))
    except FileNotFoundError:
        return []


def check_exactly_once(fs, prefix: str, reference: dict) -> None:
    """Every clip of the clean run once, and the store holds exactly what the ledger lists."""
    store = OutputStore(f"s3://{prefix}")
    ids = store.read_scores().column("clip_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert comparable(f"s3://{prefix}") == reference
    for kind in KINDS:
        stored = [k.rsplit("/", 1)[1] for k in keys(fs, f"{prefix}{kind}/")]
        assert stored == sorted(p.name for p in store.committed_files(kind)), kind
    assert [k.rsplit("/", 1)[1] for k in keys(fs, f"{prefix}ledger/")] == sorted(store.ledger().listed()["ledger"])
    assert not keys(fs, f"{prefix}inflight/")


def test_a_multipart_upload_survives_failed_parts_and_a_lost_complete(s3, tmp_path, monkeypatch):
    """Shards above 2 x UPLOAD_PART_BYTES go up in parts. Parts and completes fail (503,
    dropped), and the first complete is carried out by the store with its answer lost: the
    client's retry then finds the upload gone, and the object, whole, is taken as written."""
    monkeypatch.setattr(outdir, "UPLOAD_PART_BYTES", 5 * 2**20)  # S3's smallest part
    completes = []

    def multipart(method: str, path: str) -> bool:
        return "uploadId=" in path or "uploads" in path

    def lose_first_complete(method: str, path: str) -> bool:
        if method == "POST" and "uploadId=" in path:
            completes.append(path)
            return len(completes) == 1
        return False

    payload = os.urandom(12 * 2**20 + 12345)  # 3 parts
    s3.proxy.faulty = lose_first_complete
    s3.proxy.lost_reply_share = 1.0
    with outdir.staged_file(outdir.out_path("s3://out/big/a.bin")) as local:
        local.write_bytes(payload)
    assert s3.proxy.counts["lost_replies"] == 1 and len(completes) >= 2
    assert s3.fs.cat_file("out/big/a.bin") == payload

    s3.proxy.faulty, s3.proxy.lost_reply_share = multipart, 0.0
    s3.proxy.error_share, s3.proxy.drop_share = 0.3, 0.1
    for k in range(3):
        data = os.urandom(11 * 2**20 + k)
        target = outdir.out_path(f"s3://out/big/b{k}.parquet")
        with outdir.staged_file(target) as local:
            local.write_bytes(data)
        assert s3.fs.cat_file(f"out/big/b{k}.parquet") == data
    assert s3.proxy.failed(multipart) >= 3


def test_a_run_into_a_failing_store_gives_every_clip_once_and_counts_its_failures(s3, footage, reference,
                                                                                 tmp_path, monkeypatch):
    root, _ = footage
    monkeypatch.chdir(tmp_path)
    proxy = s3.proxy
    proxy.faulty = lambda m, p: is_write(m, p) or is_listing(m, p)
    proxy.error_share, proxy.drop_share, proxy.lost_reply_share = 0.2, 0.05, 0.1
    assert curate(run_argv(str(root), "s3://out/run/")) == 0
    proxy.faulty = lambda m, p: False
    # What run.json can count: not the log's upload (after it), and not all of run.json's own
    # last write (its counts are taken before it).
    failed_in_run = proxy.failed(lambda m, p: not is_log(m, p))
    answered_503 = sum(1 for m, p, fate in proxy.requests
                       if fate == "errors" and not is_log(m, p) and not p.endswith("/run.json"))
    assert answered_503 >= 5 and proxy.counts["lost_replies"] >= 2  # the faults did happen

    check_exactly_once(s3.fs, "out/run/", reference)
    run = json.loads(s3.fs.cat_file("out/run/run.json"))
    assert run["status"] == "complete" and len(run["attempts"]) == 1
    # Every 503 is an attempt botocore saw fail; a dropped or unanswered request is counted
    # when botocore retries it (aiohttp may reopen a dropped keep-alive connection itself).
    assert answered_503 <= run["storage"]["failed_requests"] <= failed_in_run
    assert any(k.rsplit("/", 1)[1].startswith("run-") for k in keys(s3.fs, "out/run/logs/"))


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "curation.cli", *argv], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def unlisted(fs, prefix: str) -> list[str]:
    """Data files under `prefix` that the ledger does not list."""
    fs.invalidate_cache()
    ledger = OutputStore(f"s3://{prefix}").ledger()
    return [k for kind in KINDS for k in keys(fs, f"{prefix}{kind}/")
            if k.rsplit("/", 1)[1] not in ledger.file_names(kind)]


def test_runs_killed_while_the_store_fails_finish_with_every_clip_once(s3, footage, reference, tmp_path):
    """Two commands SIGKILLed while writes and listings fail, each at a unit whose data files
    are written and whose ledger entry (the commit) is held in the store's proxy: then the
    same command finishes. No clip twice or missing, the killed attempts' files deleted, three
    attempts in run.json, and every command's log uploaded (the killed ones' by the next)."""
    root, _ = footage
    proxy = s3.proxy
    proxy.faulty = lambda m, p: is_write(m, p) or is_listing(m, p)
    proxy.error_share, proxy.drop_share, proxy.lost_reply_share = 0.15, 0.05, 0.05
    env = {**os.environ, "TMPDIR": str(s3.tmp), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    argv = run_argv(str(root), "s3://out/killed/")
    orphans_seen = []
    for commits in (1, 3):
        proxy.release.clear()
        proxy.held.clear()
        proxy.hold = lambda m, p, n=commits: (m == "PUT" and "/ledger/" in p
                                              and len(keys(s3.fs, "out/killed/ledger/")) >= n)
        command = _start(argv, env, tmp_path / "commands.log")
        deadline = time.monotonic() + 180
        try:
            while not proxy.held:
                assert command.poll() is None, (tmp_path / "commands.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no commit was held in time"
                time.sleep(0.05)
            orphans_seen.append(unlisted(s3.fs, "out/killed/"))
        finally:
            command.send_signal(signal.SIGKILL)
            command.wait()
            proxy.hold = lambda m, p: False
            proxy.release.set()
    assert all(orphans_seen), orphans_seen  # each kill left data files no entry lists
    killed = json.loads(s3.fs.cat_file("out/killed/run.json"))
    assert killed["status"] == "running"  # as a killed command leaves it
    final = _start(argv, env, tmp_path / "commands.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "commands.log").read_text()[-3000:]
    proxy.faulty = lambda m, p: False

    check_exactly_once(s3.fs, "out/killed/", reference)
    assert not unlisted(s3.fs, "out/killed/")
    run = json.loads(s3.fs.cat_file("out/killed/run.json"))
    assert run["status"] == "complete" and len(run["attempts"]) == 3
    logs = [k for k in keys(s3.fs, "out/killed/logs/") if k.rsplit("/", 1)[1].startswith("run-")]
    assert len(logs) == 3
    assert not list(s3.tmp.glob("curate-*"))  # nothing of the commands left in their TMPDIR


def test_the_run_log_upload_is_retried_and_a_lasting_failure_is_said_without_failing_the_run(
        s3, footage, tmp_path, monkeypatch, capfd):
    root, _ = footage
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "LOG_UPLOAD_FIRST_WAIT_S", 0.05)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy = s3.proxy
    # One try of the upload is up to 5 calls (s3fs) of 2 attempts (botocore): 12 failures
    # outlast the first try and not the second.
    proxy.always_fail = lambda m, p: m == "PUT" and is_log(m, p)
    proxy.always_fail_budget = 12
    assert curate(run_argv(str(root / "pan.mp4"), "s3://out/logretry/")) == 0
    assert proxy.always_fail_budget == 0
    assert [k for k in keys(s3.fs, "out/logretry/logs/") if k.endswith(".log")]
    assert not list(s3.tmp.glob(cli.LOG_PREFIX + "*"))

    proxy.always_fail_budget = None  # the log cannot be uploaded at all
    assert curate(run_argv(str(root / "cuts.mp4"), "s3://out/lognever/")) == 0
    err = capfd.readouterr().err
    assert "could not upload the run log" in err and "the next `curate run` on this machine uploads it" in err
    assert json.loads(s3.fs.cat_file("out/lognever/run.json"))["status"] == "complete"
    assert not keys(s3.fs, "out/lognever/logs/")
    [kept] = list(s3.tmp.glob(cli.LOG_PREFIX + "*"))  # kept for the next command
    assert list(kept.glob("run-*.log"))
