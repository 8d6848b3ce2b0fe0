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
