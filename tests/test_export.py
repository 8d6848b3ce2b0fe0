"""curate export: each format read back by the real readers (webdataset, datasets, Ray Data),
the files format's table against its files, selection, kill-safety, refusals."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from curation.cli import main  # noqa: E402
from curation.config import load_config  # noqa: E402
from curation.export import BATCH_ROWS, export, parse_select, plan_pieces, read_piece  # noqa: E402
from curation.runner import run_local, run_pipeline  # noqa: E402
from curation.writer import OutputStore  # noqa: E402
from training.data import decode_jpeg, decode_video  # noqa: E402
from training.synthetic import write_synthetic_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shard_rows(out: Path) -> dict[str, dict]:
    """Every committed shard row by clip_id (what an export must hold)."""
    rows = {}
    for path in OutputStore(out).committed_files("shards"):
        for r in pq.read_table(path).to_pylist():
            rows[r["clip_id"]] = r
    return rows


def wds_samples(export_dir: Path) -> list[dict]:
    import webdataset as wds

    tars = sorted(glob.glob(str(export_dir / "*.tar")))
    return list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory) -> Path:
    """12 kept clips in 3 committed units, 2 rows per row group (so pieces split shards)."""
    out = tmp_path_factory.mktemp("synthetic") / "out"
    write_synthetic_shards(str(out), num_shards=3, num_clips=12, row_group_rows=2, num_frames=8, size_px=32)
    return out


@pytest.fixture(scope="module")
def curated_out(footage, tmp_path_factory) -> Path:
    """A real curated run of the spine (split, motion, filter) on the generated footage."""
    root, _ = footage
    out = tmp_path_factory.mktemp("curated") / "out"
    cfg = load_config(REPO / "configs" / "spine.yaml", ["split.min_duration_s=1.0", "run.sources_per_unit=2"])
    run_pipeline(cfg, [str(root)], out, run_local)
    return out


def test_webdataset_samples_hold_each_clip_once_with_the_shards_bytes(synthetic_out, tmp_path):
    expected = shard_rows(synthetic_out)
    target_mb = 0.02  # a few clips per tar: several tars, each cut at row-group boundaries
    manifest = export(synthetic_out, "webdataset", tmp_path / "wds", target_mb=target_mb)
    tars = sorted((tmp_path / "wds").glob("*.tar"))
    assert len(tars) == len(manifest["pieces"]) > 1 and manifest["status"] == "complete"

    samples = wds_samples(tmp_path / "wds")
    assert Counter(s["__key__"] for s in samples) == Counter(list(expected))
    for s in samples:
        row = expected[s["__key__"]]
        assert s["mp4"] == row["video"]
        meta = s["json"]
        for col in ("caption", "fps_id", "motion_bucket_id", "source_path", "start_frame", "end_frame",
                    "aesthetic_score", "motion_score"):
            assert meta[col] == row[col], col
        assert s["txt"] == row["caption"]
        assert np.array_equal(np.asarray(s["jpg"]), decode_jpeg(row["keyframes"][1]))
        assert [k for k in s if k.startswith("kf")] == ["kf0.jpg", "kf1.jpg", "kf2.jpg"]
        assert np.allclose(s["caption_embedding.npy"], row["caption_embedding"])
        assert s["caption_embedding.npy"].dtype == np.float32
        assert "image_embedding.npy" not in s  # null in the shard: no member, not zeros
    # The decoded video equals the shard's, frame for frame.
    first = samples[0]
    assert np.array_equal(decode_video(first["mp4"]), decode_video(expected[first["__key__"]]["video"]))


def test_select_exports_exactly_the_clips_inside_the_bounds(synthetic_out, tmp_path):
    rows = shard_rows(synthetic_out)
    values = sorted(r["aesthetic_score"] for r in rows.values())
    bound = values[len(values) // 2]  # a value some clip has exactly: bounds are inclusive
    inside = {c for c, r in rows.items() if r["aesthetic_score"] >= bound and r["motion_score"] <= 150}
    assert 0 < len(inside) < len(rows)
    select = json.dumps({"aesthetic_score": {"min": bound}, "motion_score": {"max": 150}})
    assert main(["export", str(synthetic_out), "--format", "webdataset", "--to", str(tmp_path / "hq"),
                 "--select", select]) == 0
    assert Counter(s["__key__"] for s in wds_samples(tmp_path / "hq")) == Counter(list(inside))
    assert json.loads((tmp_path / "hq" / "export.json").read_text())["clips"] == len(inside)


def test_hf_export_opens_with_datasets_and_ray_data(synthetic_out, tmp_path):
    import datasets

    expected = shard_rows(synthetic_out)
    export(synthetic_out, "hf", tmp_path / "hf", target_mb=0.02)
    ds = datasets.load_dataset(str(tmp_path / "hf"), cache_dir=str(tmp_path / "cache"))["train"]
    assert sorted(ds["clip_id"]) == sorted(expected)
    assert ds.features["caption_embedding"].feature.dtype == "float32"
    for row in ds:
        assert row["video"] == expected[row["clip_id"]]["video"]
        assert np.allclose(row["caption_embedding"], expected[row["clip_id"]]["caption_embedding"])

    import ray

    ray.init(num_cpus=1, object_store_memory=80 * 1024 ** 2, include_dashboard=False)
    try:
        table = ray.data.read_parquet(str(tmp_path / "hf" / "data")).select_columns(
            ["clip_id", "fps_id"]).to_arrow_refs()
        ids = [i for ref in table for i in ray.get(ref).column("clip_id").to_pylist()]
    finally:
        ray.shutdown()
    assert Counter(ids) == Counter(list(expected))


def test_real_run_files_table_matches_its_files_and_webdataset_videos(curated_out, tmp_path):
    expected = shard_rows(curated_out)
    assert expected, "the spine run kept no clip"
    assert main(["export", str(curated_out), "--format", "files", "--to", str(tmp_path / "files")]) == 0
    with open(tmp_path / "files" / "meta.csv", newline="") as f:
        table = list(csv.DictReader(f))
    # Open-Sora's columns first, in its order.
    assert list(table[0])[:8] == ["path", "text", "num_frames", "fps", "height", "width", "aspect_ratio",
                                  "resolution"]
    on_disk = {str(p.resolve()) for p in (tmp_path / "files" / "videos").rglob("*.mp4")}
    assert sorted(r["path"] for r in table) == sorted(on_disk)
    assert Counter(r["clip_id"] for r in table) == Counter(list(expected))
    for r in table:
        frames = decode_video(Path(r["path"]).read_bytes())
        assert Path(r["path"]).read_bytes() == expected[r["clip_id"]]["video"]
        assert (int(r["num_frames"]), int(r["height"]), int(r["width"])) == frames.shape[:3]
        assert float(r["aspect_ratio"]) == pytest.approx(frames.shape[1] / frames.shape[2])
        assert int(r["resolution"]) == frames.shape[1] * frames.shape[2]

    # EasyAnimate's table: the same clips, paths relative to DIR (its --train_data_dir).
    easy = json.loads((tmp_path / "files" / "meta.json").read_text())
    assert sorted(str((tmp_path / "files" / e["file_path"]).resolve()) for e in easy) == sorted(on_disk)
    assert {e["type"] for e in easy} == {"video"}

    export(curated_out, "webdataset", tmp_path / "wds")
    samples = wds_samples(tmp_path / "wds")
    assert Counter(s["__key__"] for s in samples) == Counter(list(expected))
    for s in samples:
        assert np.array_equal(decode_video(s["mp4"]), decode_video(expected[s["__key__"]]["video"]))


def test_pieces_are_read_a_few_rows_at_a_time_and_cover_the_selection(tmp_path):
    # One shard of one 40-row row group: a reader of whole row groups would yield 40 rows at once.
    out = tmp_path / "out"
    write_synthetic_shards(str(out), num_shards=1, num_clips=40, num_frames=4, size_px=16)
    shards = OutputStore(out).committed_files("shards")
    assert pq.ParquetFile(shards[0]).metadata.row_group(0).num_rows == 40 > BATCH_ROWS
    select = parse_select("{aesthetic_score: {min: 5}}")  # the YAML flow form works too
    pieces = plan_pieces(shards, select, target_mb=1024)
    batches = list(read_piece(shards[0].parent, pieces[0], select))
    assert len(pieces) == 1 and max(b.num_rows for b in batches) <= BATCH_ROWS
    ids = [i for b in batches for i in b.column("clip_id").to_pylist()]
    passing = [c for c, r in shard_rows(out).items() if r["aesthetic_score"] >= 5]
    assert 0 < len(passing) < 40 and sorted(ids) == sorted(passing) and pieces[0].rows == len(passing)


def test_killed_export_rerun_finishes_with_every_clip_once(synthetic_out, tmp_path):
    expected = shard_rows(synthetic_out)
    wds_dir = tmp_path / "wds"
    export(synthetic_out, "webdataset", wds_dir, target_mb=0.02)
    tars = sorted(wds_dir.glob("*.tar"))
    assert len(tars) >= 3
    # The kill: one piece never written, one caught mid-write (a partial temp file), manifest unfinished.
    tars[0].unlink()
    partial = tars[1].read_bytes()[:1000]
    tars[1].unlink()
    (wds_dir / f".tmp-999-deadbeef-{tars[1].name}").write_bytes(partial)
    manifest = json.loads((wds_dir / "export.json").read_text())
    (wds_dir / "export.json").write_text(json.dumps({**manifest, "status": "running"}))
    untouched = {p.name: p.stat().st_mtime_ns for p in tars[2:]}

    assert main(["export", str(synthetic_out), "--format", "webdataset", "--to", str(wds_dir),
                 "--target-mb", "0.02"]) == 0
    assert Counter(s["__key__"] for s in wds_samples(wds_dir)) == Counter(list(expected))
    assert sorted(p.name for p in wds_dir.glob("*.tar")) == [p.name for p in tars]
    assert not list(wds_dir.glob(".tmp-*"))
    assert {n: (wds_dir / n).stat().st_mtime_ns for n in untouched} == untouched  # finished pieces kept
    assert json.loads((wds_dir / "export.json").read_text())["status"] == "complete"


def test_killed_files_export_rewrites_the_unfinished_piece(synthetic_out, tmp_path):
    expected = shard_rows(synthetic_out)
    out = tmp_path / "files"
    export(synthetic_out, "files", out, target_mb=0.02)
    # Killed inside a piece: some of its mp4s written, its part of the table not.
    piece = sorted((out / "videos").iterdir())[0]
    (out / ".parts" / f"{piece.name}.csv").unlink()
    (out / "meta.csv").unlink()
    next(piece.iterdir()).unlink()
    (piece / ".tmp-1-0000-x.mp4").write_bytes(b"partial")
    export(synthetic_out, "files", out, target_mb=0.02)
    with open(out / "meta.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert Counter(r["clip_id"] for r in table) == Counter(list(expected))
    assert sorted(r["path"] for r in table) == sorted(str(p.resolve()) for p in (out / "videos").rglob("*.mp4"))
    assert not list(out.rglob(".tmp-*"))


def test_bad_format_select_and_unfinished_outputs_exit_2_naming_the_problem(synthetic_out, tmp_path, capsys):
    base = ["export", str(synthetic_out), "--to", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--format", "tarball"])
    assert exc.value.code == 2 and "tarball" in capsys.readouterr().err

    assert main(base + ["--format", "hf", "--select", '{"sharpness": {"min": 1}}']) == 2
    assert "sharpness" in capsys.readouterr().err
    assert main(base + ["--format", "hf", "--select", '{"aesthetic_score": {"min": 99}}']) == 2
    assert "keeps none" in capsys.readouterr().err

    # Another export already in DIR: refused unless --overwrite.
    assert main(base + ["--format", "hf"]) == 0
    assert main(base + ["--format", "hf", "--select", '{"aesthetic_score": {"min": 5}}']) == 2
    assert "other options" in capsys.readouterr().err
    assert main(base + ["--format", "hf", "--select", '{"aesthetic_score": {"min": 5}}', "--overwrite"]) == 0
    assert 0 < json.loads((tmp_path / "x" / "export.json").read_text())["clips"] < len(shard_rows(synthetic_out))

    # An output whose run has not finished is not exported.
    unfinished = tmp_path / "unfinished"
    write_synthetic_shards(str(unfinished), num_shards=1, num_clips=2, num_frames=4, size_px=16)
    run = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**run, "status": "running"}))
    assert main(["export", str(unfinished), "--format", "files", "--to", str(tmp_path / "y")]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
