"""OUT_DIR in object storage (`--output s3://bucket/run/`), against a real S3 API server on
localhost (moto in server mode, tests/s3_server.py): a run into the bucket gives the scores of
the same run into a folder and leaves exactly the files its ledger lists; a killed run resumes
with every clip once; report, refilter, dedup and export read (and write) the remote OUT_DIR;
nothing local is left behind, and no credential reaches any output."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from curation.cli import main as curate
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore
from s3_server import s3_environment

REPO = Path(__file__).resolve().parents[1]
SECRET = "PLANTEDsecretVALUE0123456789abcdef"  # no output, object or local, may hold this
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=2"]
# configs/spine.yaml keeps motion_score >= 1 and duration_s >= 2; these keep fewer clips.
TIGHTER = ["filter.rules.motion_score.min=2.5", "filter.rules.motion_score.max=5",
           "filter.rules.duration_s.min=2.8"]
KINDS = ("scores", "shards", "clips")


def run_argv(inputs: str, output: str) -> list[str]:
    return ["run", str(REPO / "configs" / "spine.yaml"), "--input", inputs, "--output", output,
            "--runner", "local", "--num-cpus", "2", *[a for o in OVERRIDES for a in ("--set", o)]]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, the AWS variables pointing at it (the planted secret as
    the secret key), our own temporary folder, and an empty bucket "out"; all undone after."""
    tmp = tmp_path_factory.mktemp("tmpdir")
    with s3_environment(tmp_path_factory.mktemp("moto"), SECRET, ("out",), tempdir=tmp) as fs:
        yield SimpleNamespace(fs=fs, tmp=tmp)


def listing(fs, prefix: str) -> list[str]:
    """Every object key under `prefix` (bucket/key...), asked of the store, not of a cache."""
    fs.invalidate_cache()
    try:
        return sorted(fs.find(prefix))
    except FileNotFoundError:
        return []


def names_in(fs, prefix: str) -> list[str]:
    """The object names directly under a prefix (like a folder's entries)."""
    return sorted(k.rsplit("/", 1)[1] for k in listing(fs, prefix) if k[len(prefix):].count("/") == 0)


def comparable_scores(out) -> list[dict]:
    """The scores rows by clip id, without the timing columns (as in test_runner)."""
    def same(v):
        return "nan" if isinstance(v, float) and v != v else v

    rows = OutputStore(out).read_scores().to_pylist()
    return sorted(({k: same(v) for k, v in r.items() if not k.startswith(STAGE_SECONDS_PREFIX)} for r in rows),
                  key=lambda r: r["clip_id"])


def ids_of(fs, keys: list[str]) -> list[str]:
    """clip_id of every row of these parquet objects, read with pyarrow directly."""
    out = []
    for key in keys:
        with fs.open(key, "rb") as f:
            out += pq.read_table(f, columns=["clip_id"]).column("clip_id").to_pylist()
    return out


def ledger_keys(fs, prefix: str, kind: str) -> list[str]:
    """The object keys of one kind the ledger under `prefix` lists (its checkpoint and entries)."""
    fs.invalidate_cache()
    names = OutputStore(f"s3://{prefix}").ledger().file_names(kind)
    return sorted(f"{prefix}{kind}/{n}" for n in names)


@pytest.fixture(scope="module")
def local_out(footage, tmp_path_factory):
    root, _ = footage
    out = tmp_path_factory.mktemp("local") / "out"
    assert curate(run_argv(str(root), str(out))) == 0
    return out


@pytest.fixture(scope="module")
def remote_a(s3, footage, tmp_path_factory):
    """One `curate run` into s3://out/runA/, from the current directory `cwd` (shared by the
    reader tests below, which run after the test of the run itself)."""
    root, _ = footage
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        rc = curate(run_argv(str(root), "s3://out/runA/"))
    return SimpleNamespace(rc=rc, uri="s3://out/runA/", prefix="out/runA/", cwd=cwd)


# ---- the run ------------------------------------------------------------------------------------

def test_a_run_into_s3_equals_the_local_run_and_leaves_only_committed_objects(s3, remote_a, local_out):
    fs = s3.fs
    assert remote_a.rc == 0
    assert comparable_scores(remote_a.uri) == comparable_scores(local_out)
    assert comparable_scores(remote_a.uri), "the run gave no rows"
    store = OutputStore(remote_a.uri)
    for kind in KINDS:  # exactly the files the ledger lists: no orphan, no temporary, none missing
        in_bucket = names_in(fs, f"{remote_a.prefix}{kind}/")
        assert in_bucket == sorted(p.name for p in store.committed_files(kind)), kind
        assert [f"{remote_a.prefix}{kind}/{n}" for n in in_bucket] == ledger_keys(fs, remote_a.prefix, kind)
    assert names_in(fs, f"{remote_a.prefix}ledger/") == sorted(store.ledger().listed()["ledger"])
    assert len(store.committed()) == 3  # 6 sources, 2 a unit
    assert [len(names_in(fs, f"{remote_a.prefix}{kind}/")) for kind in KINDS] == [1, 1, 1]  # compacted
    run = json.loads(fs.cat_file(f"{remote_a.prefix}run.json"))
    assert run["status"] == "complete"
    assert store.read_run()["status"] == "complete"
    # Nothing local: no folder named "s3:" where the command ran, no log folder left in TMPDIR.
    assert not (remote_a.cwd / "s3:").exists()
    assert not any(remote_a.cwd.iterdir())
    assert not list(s3.tmp.glob("curate-logs*"))
    # The run's log was uploaded into OUT_DIR/logs/ and says what the run did.
    logs = [k for k in listing(fs, f"{remote_a.prefix}logs/") if k.rsplit("/", 1)[1].startswith("run-")
            and k.endswith(".log")]
    assert logs
    assert b"done:" in b"".join(fs.cat_file(k) for k in logs)


def test_a_killed_run_on_s3_resumes_with_every_clip_once(s3, footage, tmp_path, monkeypatch):
    """A run killed between a unit's data files and its ledger entry, and after another
    attempt wrote shards of a committed unit: the same command finishes it, the files no
    ledger entry lists are deleted, and every clip is in the output once."""
    fs = s3.fs
    root, _ = footage
    monkeypatch.chdir(tmp_path)
    uri, prefix = "s3://out/runB/", "out/runB/"
    argv = run_argv(str(root), uri) + ["--set", "run.compact_at_end=false"]  # the units' own files
    assert curate(argv) == 0
    first = OutputStore(uri)
    ledger = first.committed()
    scores_ids = sorted(ids_of(fs, ledger_keys(fs, prefix, "scores")))
    shard_ids = sorted(ids_of(fs, ledger_keys(fs, prefix, "shards")))
    assert scores_ids and shard_ids

    # The kill: one unit's ledger entry never written (its data files stay, unlisted) ...
    with_shards = [u for u, e in ledger.items() if e["shard_files"]]
    lost = with_shards[0]
    other = next(u for u in with_shards if u != lost) if len(with_shards) > 1 else lost
    fs.rm_file(f"{prefix}ledger/{lost}.json")
    some_scores = ledger_keys(fs, prefix, "scores")[0]
    some_shard = f"{prefix}shards/{ledger[other]['shard_files'][0]}"
    # ... files of attempts nobody committed: one of the lost unit, one of a committed unit ...
    orphans = [f"{prefix}scores/{lost}-deadbeef.parquet", f"{prefix}shards/{other}-0badf00d-0000.parquet"]
    fs.pipe_file(orphans[0], fs.cat_file(some_scores))
    fs.pipe_file(orphans[1], fs.cat_file(some_shard))
    # ... and run.json as a running run leaves it.
    run = json.loads(fs.cat_file(f"{prefix}run.json"))
    run["status"] = "running"
    fs.pipe_file(f"{prefix}run.json", json.dumps(run).encode())
    fs.invalidate_cache()

    assert curate(argv) == 0
    store = OutputStore(uri)
    assert sorted(store.committed()) == sorted(ledger)  # the lost unit was redone and committed
    again_scores = ids_of(fs, ledger_keys(fs, prefix, "scores"))
    again_shards = ids_of(fs, ledger_keys(fs, prefix, "shards"))
    assert len(again_scores) == len(set(again_scores)) and sorted(again_scores) == scores_ids
    assert len(again_shards) == len(set(again_shards)) and sorted(again_shards) == shard_ids
    assert sorted(store.read_scores().column("clip_id").to_pylist()) == scores_ids
    in_bucket = set(listing(fs, prefix))
    assert not set(orphans) & in_bucket
    for kind in KINDS:
        assert [f"{prefix}{kind}/{n}" for n in names_in(fs, f"{prefix}{kind}/")] == ledger_keys(fs, prefix, kind)
    assert store.read_run()["status"] == "complete"
    assert not (tmp_path / "s3:").exists()


# ---- the readers on a remote OUT_DIR ------------------------------------------------------------

def test_report_of_a_remote_output_to_a_local_folder_and_into_the_bucket(s3, remote_a, tmp_path, monkeypatch):
    fs = s3.fs
    assert remote_a.rc == 0
    monkeypatch.chdir(tmp_path)
    assert curate(["report", remote_a.uri, "--to", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<html" in page.lower() and len(page) > 1000
    assert (tmp_path / "report" / "summary.json").exists()
    assert curate(["report", remote_a.uri]) == 0
    keys = listing(fs, f"{remote_a.prefix}report/")
    assert f"{remote_a.prefix}report/index.html" in keys
    assert any(k.startswith(f"{remote_a.prefix}report/plots/") and k.endswith(".png") for k in keys)
    assert b"<html" in fs.cat_file(f"{remote_a.prefix}report/index.html").lower()
    assert not (tmp_path / "s3:").exists()


def test_export_files_of_a_remote_output_to_a_local_folder(s3, remote_a, tmp_path):
    fs = s3.fs
    assert remote_a.rc == 0
    kept = ids_of(fs, ledger_keys(fs, remote_a.prefix, "shards"))
    assert kept
    assert curate(["export", remote_a.uri, "--format", "files", "--to", str(tmp_path / "files")]) == 0
    with open(tmp_path / "files" / "meta.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["clip_id"] for r in table) == sorted(kept)
    videos = sorted((tmp_path / "files" / "videos").rglob("*.mp4"))
    assert len(videos) == len(kept) and all(p.stat().st_size > 0 for p in videos)
    assert json.loads((tmp_path / "files" / "export.json").read_text())["status"] == "complete"


def test_export_webdataset_of_a_remote_output_into_the_bucket(s3, remote_a, tmp_path, monkeypatch):
    fs = s3.fs
    assert remote_a.rc == 0
    monkeypatch.chdir(tmp_path)
    kept = ids_of(fs, ledger_keys(fs, remote_a.prefix, "shards"))
    assert curate(["export", remote_a.uri, "--format", "webdataset", "--to", "s3://out/exportA/"]) == 0
    tars = [k for k in listing(fs, "out/exportA/") if k.endswith(".tar")]
    assert tars
    import io
    import tarfile

    keys = set()
    for k in tars:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(k))) as t:
            keys |= {m.name.split(".", 1)[0] for m in t.getmembers() if m.name.endswith(".mp4")}
    assert keys == set(kept)
    assert json.loads(fs.cat_file("out/exportA/export.json"))["status"] == "complete"
    assert not any(tmp_path.iterdir())  # nothing local (no "s3:" folder)


def test_refilter_of_a_remote_output_changes_the_kept_clips(s3, remote_a, tmp_path, monkeypatch):
    fs = s3.fs
    assert remote_a.rc == 0
    monkeypatch.chdir(tmp_path)
    store = OutputStore(remote_a.uri)
    before = store.read_run()["kept"]
    assert curate(["refilter", remote_a.uri, *[a for o in TIGHTER for a in ("--set", o)]]) == 0
    run = OutputStore(remote_a.uri).read_run()
    assert run["kept"] != before
    assert run["refilters"][-1]["finished"] is True
    shards = OutputStore(remote_a.uri).committed_files("shards")
    assert all(p.exists() for p in shards)  # every listed shard file is there
    kept = ids_of(fs, ledger_keys(fs, remote_a.prefix, "shards"))
    assert len(kept) == run["kept"] == len(set(kept))
    scores = OutputStore(remote_a.uri).read_scores()
    assert sorted(kept) == sorted(c for c, k in zip(scores.column("clip_id").to_pylist(),
                                                    scores.column("keep").to_pylist()) if k)
    for kind in KINDS:  # the old shards went: the bucket holds what the ledger lists
        assert [f"{remote_a.prefix}{kind}/{n}" for n in names_in(fs, f"{remote_a.prefix}{kind}/")] == \
            ledger_keys(fs, remote_a.prefix, kind)
    assert OutputStore(remote_a.uri).not_ready_reason() is None
    assert not any(tmp_path.iterdir())


def test_dedup_of_a_remote_output(s3, remote_a, tmp_path, monkeypatch):
    fs = s3.fs
    assert remote_a.rc == 0
    monkeypatch.chdir(tmp_path)
    assert curate(["dedup", remote_a.uri]) == 0
    run = OutputStore(remote_a.uri).read_run()
    assert run["config"].get("dedup") is not None and run["refilters"][-1]["finished"] is True
    assert f"{remote_a.prefix}dedup/dedup.json" in listing(fs, f"{remote_a.prefix}dedup/")
    assert OutputStore(remote_a.uri).not_ready_reason() is None
    assert all(p.exists() for p in OutputStore(remote_a.uri).committed_files("shards"))
    assert not any(tmp_path.iterdir())


def test_train_streams_the_shards_of_a_remote_output(s3, tmp_path, monkeypatch):
    """`curate train` on an s3:// OUT_DIR reads the shards the ledger lists from the store and
    trains exactly as on the same output in a local folder (same seed, same rows, same order:
    the same losses), its checkpoints in --work-dir."""
    from training.cli import train_command
    from training.loop import latest_checkpoint, load_checkpoint
    from training.synthetic import write_synthetic_shards

    local = tmp_path / "local"
    write_synthetic_shards(str(local), num_clips=8, num_frames=10, size_px=16, caption_dim=8)
    s3.fs.put(str(local), "out/trainsrc", recursive=True)
    micro = ["resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2",
             "attention_levels=1", "num_heads=2", "total_steps=3", "device=cpu"]
    sets = [a for m in micro for a in ("--set", m)]
    monkeypatch.chdir(tmp_path)
    assert train_command([str(local), "--stage", "image", "--preset-size", "tiny", *sets]) == 0
    assert train_command(["s3://out/trainsrc/", "--stage", "image", "--preset-size", "tiny", *sets,
                          "--work-dir", str(tmp_path / "work")]) == 0
    here = load_checkpoint(latest_checkpoint(str(local / "train" / "image")))
    there = load_checkpoint(latest_checkpoint(str(tmp_path / "work" / "train" / "image")))
    assert there["step"] == here["step"] == 3
    for name, value in here["model"].items():
        assert (there["model"][name] == value).all(), name
    # Without --work-dir, a remote OUT_DIR's checkpoints go under ./curate-work/.
    assert train_command(["s3://out/trainsrc/", "--stage", "image", "--preset-size", "tiny", *sets]) == 0
    assert latest_checkpoint(str(tmp_path / "curate-work" / "s3" / "out" / "trainsrc" / "train" / "image"))


def test_the_study_reads_a_remote_output(s3, remote_a, local_out, tmp_path):
    """`curate ablate`'s corpus and the arms' shard files come from the store's clips/ as from
    a folder's (the same clips decode, the same rows are written)."""
    from training.study import load_corpus, write_clip_files

    here, there = load_corpus(str(local_out)), load_corpus(remote_a.uri)
    assert there.ids == here.ids and len(here.ids) > 0
    assert (there.decodable == here.decodable).all() and here.decodable.any()
    wanted = here.ids[::2]
    write_clip_files(here, {str(tmp_path / "here.parquet"): wanted})
    write_clip_files(there, {str(tmp_path / "there.parquet"): wanted})
    a, b = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("here", "there"))
    assert b.column("clip_id").to_pylist() == a.column("clip_id").to_pylist() == wanted
    # The remote arm's videos are the bytes stored in the bucket's clips/ (each run encodes its
    # own, so the local run's bytes need not be the same).
    from curation import outdir

    stored = {}
    for f in OutputStore(remote_a.uri).committed_files("clips"):
        t = outdir.read_table(f, columns=["clip_id", "video"])
        stored.update(zip(t.column("clip_id").to_pylist(), t.column("video").to_pylist()))
    assert b.column("video").to_pylist() == [stored[c] for c in wanted]


# ---- credentials (last: it reads what every test above wrote) -----------------------------------

def test_the_secret_is_in_no_object_and_no_local_output(s3, remote_a, local_out, tmp_path_factory):
    fs = s3.fs
    keys = listing(fs, "out/")
    assert any(k.startswith("out/runA/") for k in keys)
    leaked = [key for key in keys if SECRET.encode() in fs.cat_file(key)]
    assert not leaked, f"the secret is in {leaked}"
    base = tmp_path_factory.getbasetemp()  # every local folder of this session's tests
    leaked = [str(p) for p in base.rglob("*")
              if p.is_file() and "moto" not in p.parts[-2] and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the secret is in {leaked}"
