"""No credential leaves the process (stages/redaction.py).

The end-to-end test plants secrets in every way an error can carry them (the secret key in
the environment, a proxy URL with user info in the environment, and an exception raised
inside a Ray worker whose chained cause quotes both, logged there with its traceback) and runs
`curate run` on the embedded Ray cluster with inputs and OUT_DIR in a local S3 endpoint, then
`curate report`. It then reads every way out: every object in the store (the uploaded log,
scores with their error columns, run.json, the report), every local file of the session's
tests, Ray's session folder (the workers' own logs) and the command's stdout and stderr at
the file-descriptor level. It also checks that the leak happened (the redaction mark is in the
worker's log and in the driver's), so the test cannot pass by the secrets never being written.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from curation.cli import main as curate
from curation.writer import OutputStore
from s3_server import s3_environment
from stages import redaction

REPO = Path(__file__).resolve().parents[1]
SECRET = "PLANTEDsecretKEY0123456789abcdefXYZ"  # the environment's secret key
PROXY_PASSWORD = "PLANTEDproxyPASS7531"  # the password of a proxy URL with user info
PROXY = f"http://curate-user:{PROXY_PASSWORD}@proxy.invalid:3128"
PLANTED = (SECRET, PROXY_PASSWORD)


def leaks_in(data: bytes) -> list[str]:
    return [s for s in PLANTED if s.encode() in data]


# ---- the filter, the function ---------------------------------------------------------------------

def test_the_filter_cleans_the_message_the_chained_traceback_and_the_stack(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(redaction.RedactingFilter())
    logger = logging.getLogger("test_redaction.filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            try:
                raise KeyError(f"key {SECRET}")
            except KeyError as inner:
                raise ConnectionError(f"via {PROXY}") from inner
        except ConnectionError as exc:
            logger.error("store failed for %s", SECRET, exc_info=exc, stack_info=True)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert not leaks_in(text.encode()), text
    # Everything else is kept: the message, both exceptions of the chain, the stack.
    assert "store failed for <redacted>" in text
    assert "KeyError" in text and "ConnectionError: via http://<redacted>@proxy.invalid:3128" in text
    assert "direct cause of the following exception" in text and "Stack (most recent call last)" in text


def test_redact_removes_user_info_query_strings_and_the_environments_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc/def+ghi=" + SECRET)
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    text = (f"GET https://b.s3.amazonaws.com/k.mp4?X-Amz-Signature=abc failed via {PROXY}; key "
            f"abc/def+ghi={SECRET}, encoded abc%2Fdef%2Bghi%3D{SECRET}; pass {PROXY_PASSWORD} alone; "
            "s3://bucket/key.mp4 stays")
    clean = redaction.redact(text)
    assert not leaks_in(clean.encode()) and "X-Amz-Signature" not in clean and "abc%2F" not in clean
    assert "https://b.s3.amazonaws.com/k.mp4?<redacted>" in clean
    assert "http://<redacted>@proxy.invalid:3128" in clean and "s3://bucket/key.mp4 stays" in clean


def test_error_columns_are_redacted_before_they_are_written(monkeypatch):
    import pyarrow as pa

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    table = pa.table({"split_error": [None, f"worker raised X: {SECRET}"], "motion_score": [1.0, None],
                      "ocr_error": [None, None]})
    clean = redaction.redact_errors(table)
    assert clean.column("split_error").to_pylist() == [None, "worker raised X: <redacted>"]
    assert clean.column("motion_score").to_pylist() == [1.0, None]


# ---- every way out of a real run -------------------------------------------------------------------

@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the local endpoint is reached directly
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    with s3_environment(tmp_path, SECRET, ("footage", "out"), tempdir=tmp) as fs:
        yield fs


def test_no_secret_reaches_any_output_of_a_run_on_ray(store, footage, tmp_path, tmp_path_factory, ray_tmp,
                                                      capfd, monkeypatch):
    from curation.pipeline import init_ray

    root, _ = footage
    for path in sorted(root.iterdir()):
        store.put_file(str(path), f"footage/raw/{path.name}")
    store.put_file(str(root / "pan.mp4"), "footage/raw/leak_me.mp4")
    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"][0]["args"]["min_duration_s"] = 1.0
    raw["steps"].insert(1, {"stage": "fault", "args": {"faults": {"leak_me": "leak"}}})
    raw["run"].update({"sources_per_unit": 2, "max_source_attempts": 2})
    config = tmp_path / "leaky.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)

    init_ray(None, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp)  # its session folder is read below
    try:
        assert curate(["run", str(config), "--input", "s3://footage/raw/", "--output", "s3://out/leak/"]) == 0
        assert curate(["report", "s3://out/leak/"]) == 0
        assert curate(["report", "s3://out/leak/", "--to", str(tmp_path / "report")]) == 0
    finally:
        import ray

        ray.shutdown()
    printed = capfd.readouterr()

    # The leak happened: the source's row says its worker raised, and the traceback that
    # quoted the secrets reached the worker's log and the driver's log.
    rows = {Path(r["source_path"]).name: r for r in OutputStore("s3://out/leak/").read_scores().to_pylist()}
    assert rows["leak_me.mp4"]["source_status"] == "worker_died"
    assert "worker raised RuntimeError: fault stage: leaked on purpose" in rows["leak_me.mp4"]["split_error"]
    assert rows["cuts.mp4"]["split_error"] is None
    store.invalidate_cache()
    uploaded_log = b"".join(store.cat_file(k) for k in store.find("out/leak/logs/"))
    worker_logs = b"".join(p.read_bytes() for p in Path(ray_tmp).rglob("worker-*") if p.is_file())
    assert b"cannot reach" in uploaded_log and b"cannot reach" in worker_logs

    # No secret anywhere: objects, local files, Ray's session folder, the terminal.
    leaked = {k: leaks_in(store.cat_file(k)) for k in store.find("out/")}
    assert not {k: v for k, v in leaked.items() if v}
    local = [p for base in (tmp_path_factory.getbasetemp(), Path(ray_tmp)) for p in base.rglob("*")
             if p.is_file() and not p.name.startswith("moto") and not p.is_symlink()]
    leaked_files = {str(p): leaks_in(p.read_bytes()) for p in local}
    assert not {k: v for k, v in leaked_files.items() if v}
    assert not leaks_in(printed.out.encode()) and not leaks_in(printed.err.encode())
    assert "leaked on purpose" in printed.err  # the terminal did get the worker's failure
    # They were masked where they were.
    assert b"<redacted>" in uploaded_log and b"<redacted>" in worker_logs
    shutil.rmtree(tmp_path / "report", ignore_errors=True)
