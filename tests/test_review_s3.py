"""`curate review` on an OUT_DIR in object storage (a real S3 API server on localhost,
tests/s3_server.py) and on a run still in progress: the same counts as on a folder, labels and
the saved config written to the store, clips served from it; a run in progress shows what is
committed."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import yaml

from curation.review import Review, ReviewServer
from curation.writer import OutputStore, write_json
from s3_server import s3_environment
from test_review import ABSOLUTE, PERCENTILE, call, motion_gallery, run_out  # noqa: F401  (the fabricated output)

SECRET = "reviewSECRETvalue0123456789abcdef"


@pytest.fixture(scope="module")
def remote(run_out, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("tmpdir")
    with s3_environment(tmp_path_factory.mktemp("moto"), SECRET, ("out",), tempdir=tmp) as fs:
        fs.put(str(run_out) + "/", "out/run/", recursive=True)
        yield fs


def test_a_remote_output_reviews_as_its_local_copy(remote, run_out):  # noqa: F811
    local, there = Review(run_out), Review("s3://out/run")
    for rules in (ABSOLUTE, PERCENTILE):
        steps = local.parse_rules({"rules": {"filter": rules}})
        assert there.data.evaluate(steps).as_json() | {"server_ms": 0} == \
            local.data.evaluate(steps).as_json() | {"server_ms": 0}
    server = ReviewServer(there).start()
    token = {"X-Review-Token": server.token}
    try:
        g = motion_gallery(server, ABSOLUTE, 2)
        clip_id = g["kept"][0]["clip_id"]
        assert call(f"{server.base}/api/label", {"clip_id": clip_id, "label": "keep"}, token)[0] == 200
        assert call(f"{server.base}/api/save", {"rules": {"filter": ABSOLUTE}, "write": True}, token)[0] == 200
        request = urllib.request.Request(f"{server.base}/clip/{clip_id}.mp4?token={server.token}",
                                         headers={"Range": "bytes=0-9"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 206 and len(r.read()) == 10
    finally:
        server.close()
    remote.invalidate_cache()
    labels = json.loads(remote.cat("out/run/review/labels.json"))["labels"]
    assert labels[clip_id]["label"] == "keep"
    saved = yaml.safe_load(remote.cat("out/run/review/pipeline.yaml"))
    assert [s["args"]["rules"] for s in saved["steps"] if s["stage"] == "filter"] == [ABSOLUTE]
    assert Review("s3://out/run").labels.label_of(clip_id) == "keep"  # read back from the store


def test_a_run_in_progress_shows_what_is_committed(run_out, tmp_path):  # noqa: F811
    out = tmp_path / "running"
    shutil.copytree(run_out, out)
    store = OutputStore(out)
    run = store.read_run()
    run["status"] = "running"
    write_json(store.run_json, run)
    (out / "scores" / "u0000000000000000.parquet").write_bytes(b"a unit being written, not committed")
    review = Review(out)
    assert review.state()["status"] == "running"
    assert review.data.clips == int(store.ledger().totals()["clips"])
    assert review.state()["evaluation"]["kept"] == int(store.ledger().totals()["kept"])


def test_an_output_without_clips_is_a_clear_error(tmp_path):
    from curation.review import ReviewError

    out = tmp_path / "empty"
    (out / "ledger").mkdir(parents=True)
    write_json(out / "run.json", {"status": "running", "config": {
        "steps": [{"stage": "filter", "name": "filter", "args": {"rules": {"duration_s": {"min": 2}}}}]}})
    with pytest.raises(ReviewError, match="no committed clips yet"):
        Review(out)
