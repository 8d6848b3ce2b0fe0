"""The stand-in split (stages/standin.py) that bench/scale_bench.py rehearses the control plane with:
rows of the real schema for any file, deterministic per source, through the real runner, the
commit protocol and the compaction."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curation import schema
from curation.config import ConfigError, parse_config
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore
from stages.standin import StandinSplitStage, keyframe, table_for

CONFIG = {"run": {"sources_per_unit": 3},
          "steps": [{"stage": "split_standin", "args": {"clips_per_source": 4.0, "error_share": 0.25,
                                                        "keyframe_bytes": 2000, "embedding_dims": 8}},
                    {"stage": "filter", "args": {"rules": {"motion_score": {"min": 1.0}}}}]}


def test_rows_follow_the_contract_and_depend_only_on_the_source():
    ids, paths = ["a" * 16, "b" * 16, "c" * 16], ["/x/a.mp4", "/x/b.mp4", "/x/c.mp4"]
    t = table_for(ids, paths, seed=7, clips_per_source=5.0, error_share=0.0, keyframe_bytes=3000, embedding_dims=16)
    emitted = set(t.column_names)
    assert {f.name for f in schema.IDENTITY_FIELDS} - {"dissolve_frames_trimmed"} <= emitted
    assert set(schema.SCORE_COLUMNS) | {"split_error", "source_status"} <= emitted
    schema.conform(t, schema.SHARDS_SCHEMA)  # every column casts to its contract type
    clips = t.filter(pa.compute.is_null(t.column("split_error")))
    assert clips.num_rows == t.num_rows and clips.num_rows >= 3
    # Clips of a source follow each other; keyframes decode (a real JPEG, padded).
    rows = clips.to_pylist()
    for a, b in zip(rows, rows[1:]):
        if a["source_id"] == b["source_id"]:
            assert b["start_frame"] == a["end_frame"]
    assert all(len(k) == len(keyframe(3000, 0)) for r in rows for k in r["keyframes"])
    import cv2
    import numpy as np

    assert cv2.imdecode(np.frombuffer(rows[0]["keyframes"][0], np.uint8), cv2.IMREAD_COLOR) is not None
    assert all(len(r["image_embedding"]) == 16 for r in rows)
    stage = StandinSplitStage(clips_per_source=5.0)
    one = stage({"source_id": [ids[0]], "source_path": [paths[0]], "unit_id": ["u1"]})
    again = stage({"source_id": [ids[0]], "source_path": [paths[0]], "unit_id": ["u1"]})
    assert one["clip_id"] == again["clip_id"] and set(one["unit_id"]) == {"u1"}


def test_a_run_of_empty_files_commits_every_source_once(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    for i in range(10):
        (sources / f"s{i:02d}.mp4").write_bytes(b"")  # nothing to decode: the stand-in does not read
    cfg = parse_config(CONFIG)
    record = run_pipeline(cfg, [str(sources)], tmp_path / "out", run_local)
    assert record["sources"] == {"total": 10, "committed": 10} and record["units"] == 4
    scores = OutputStore(tmp_path / "out").read_scores()
    assert set(scores.column("source_path").to_pylist()) == {str(p) for p in sources.iterdir()}
    ids = scores.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) and record["clips"] + record["source_errors"] == len(ids)
    assert record["source_outcomes"].get("unreadable", 0) == record["source_errors"]


def test_a_pipeline_starts_with_exactly_one_splitter():
    bad = {"steps": [{"stage": "split_standin"}, {"stage": "split"}]}
    with pytest.raises(ConfigError, match="the first step must be the only 'split' step"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="clips_per_source"):
        parse_config({"steps": [{"stage": "split_standin", "args": {"clips_per_source": 0.0}}]})


def test_a_ray_run_records_where_each_units_time_went(tmp_path, ray_tmp):
    """run.json's unit_seconds, by part, on the Ray runner: the per-source steps hold the
    stand-in's known work, units queue behind each other on one slot, and the task's, the
    marker's, the write's and the driver's parts are all measured."""
    import json

    from curation.pipeline import init_ray, run_ray

    work_s, n_sources, per_unit = 0.25, 12, 4
    sources = tmp_path / "sources"
    sources.mkdir()
    for i in range(n_sources):
        (sources / f"s{i:02d}.mp4").write_bytes(b"")
    config = {"run": {"sources_per_unit": per_unit},
              "steps": [{"stage": "split_standin", "ray": {"num_cpus": 1},
                         "args": {"clips_per_source": 2.0, "keyframe_bytes": 500, "embedding_dims": 8,
                                  "work_s": work_s}},
                        {"stage": "filter", "args": {"rules": {"motion_score": {"min": 1.0}}}}]}
    init_ray(None, num_cpus=1, object_store_mb=100, temp_dir=ray_tmp)
    record = run_pipeline(parse_config(config), [str(sources)], tmp_path / "out", run_ray)
    units = record["units"]
    assert units == n_sources // per_unit
    parts = record["unit_seconds"]
    # Every source slept work_s in the split, inside the per-source steps.
    assert parts["source_steps"] >= n_sources * work_s
    # (No model step: the filter runs per source too, and no step is left for the unit.)
    assert "unit_steps" not in parts and parts["write"] > 0 and parts["markers"] > 0
    assert parts["probe"] > 0 and parts["task_setup"] > 0 and parts["task_return"] >= 0
    # One slot and two units in flight: every unit after the first waited for a whole unit
    # (per_unit x work_s at least) before it started.
    assert parts["task_queued"] >= (units - 1) * per_unit * work_s
    # The worker process was reused, so later units had a gap after their previous one.
    assert "task_gap" in parts
    attempt = json.loads((tmp_path / "out" / "run.json").read_text())["attempts"][-1]
    assert attempt["driver_seconds"]["commit"] > 0 and attempt["scheduler_seconds"]["submit"] > 0
