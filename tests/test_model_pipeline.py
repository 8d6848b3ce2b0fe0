"""A model stage inside the real Ray pipeline: actor pool, setup once, scores in the outputs."""

from __future__ import annotations

import math

import model_fixtures as mf

from curation.config import parse_config
from curation.pipeline import run_ray
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore


def test_aesthetics_actor_in_ray_matches_in_process(footage, tmp_path, ray_tmp):
    import ray

    root, _ = footage
    config_path, checkpoint = mf.write_open_clip_checkpoint(tmp_path, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG)
    head = mf.write_linear_head(tmp_path / "head.pth")
    raw = {
        "run": {"sources_per_unit": 3},
        "steps": [
            {"stage": "split", "args": {"min_duration_s": 1.0}},
            {"stage": "aesthetics", "args": {"model": mf.TINY_CLIP, "pretrained": str(checkpoint),
                                             "model_config": str(config_path), "head_path": str(head),
                                             "device": "cpu"},
             "ray": {"actors": 1, "num_cpus": 1, "batch_size": 4}},
            {"stage": "filter", "args": {"rules": {"aesthetic_score": {"min": -100.0}}}},
        ],
    }
    config = parse_config(raw)
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    run_pipeline(config, [str(root)], local_out, run_local)
    try:
        record = run_pipeline(config, [str(root)], ray_out,
                              lambda c, u, s: run_ray(c, u, s, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp))
    finally:
        ray.shutdown()
    # One actor, set up once, served every batch: the model loads its process counted, per actor.
    pool = record["attempts"][-1]["model_pools"]["aesthetics"]
    clips_n = sum(1 for r in OutputStore(ray_out).read_scores().to_pylist() if r["start_frame"] is not None)
    assert pool["actors"] == 1 and pool["model_loads"] == 1 and pool["failed_calls"] == 0
    assert pool["batches"] >= math.ceil(clips_n / 4) >= 2 and pool["rows"] >= clips_n
    local = {r["clip_id"]: r for r in OutputStore(local_out).read_scores().to_pylist()}
    remote = {r["clip_id"]: r for r in OutputStore(ray_out).read_scores().to_pylist()}
    assert local.keys() == remote.keys()
    clips = [cid for cid, r in local.items() if r["start_frame"] is not None]
    assert clips
    for cid in clips:
        assert not math.isnan(remote[cid]["aesthetic_score"])
        assert abs(remote[cid]["aesthetic_score"] - local[cid]["aesthetic_score"]) < 1e-3
        assert remote[cid]["keep"] and remote[cid]["aesthetics_error"] is None
