"""GPU pools on a cluster that declares GPUs (issue 32, item 7), on a machine without one:
Ray accepts a declared GPU count, hands fractional GPU actors their device ids
(CUDA_VISIBLE_DEVICES), and torch still sees no CUDA. The real OCR step with num_gpus 0.25:
- its pool holds 4 actors per declared GPU, each handed GPU 0, each with two calls in flight;
- with `device: auto` the actors run on the CPU and give the scores of an in-process run;
- with `device: cuda` the run stops at once with a message naming the step and the setting;
- a step asking for more GPU than the cluster has is refused before any actor waits forever.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation import synth
from curation.config import parse_config
from curation.pipeline import init_ray, run_ray
from curation.pools import ModelSetupError, pools_bounds, start_actor_pools
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore

REPO = Path(__file__).resolve().parents[1]


def ocr_config(device: str = "auto", num_gpus: float = 0.25, actors="auto"):
    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"][0]["args"]["min_duration_s"] = 1.0
    # One torch thread on both sides of the comparison: the same sums in the same order.
    raw["steps"].insert(2, {"stage": "ocr", "args": {"languages": ["en"], "device": device, "torch_threads": 1},
                            "ray": {"actors": actors, "num_gpus": num_gpus, "num_cpus": 1, "batch_size": 4}})
    raw["run"]["sources_per_unit"] = 1
    return parse_config(raw)


def test_gpu_pools_are_sized_by_the_declared_gpus():
    cfg = ocr_config()
    assert pools_bounds(cfg, {"CPU": 2, "GPU": 1, "memory": 8e9}) == {"ocr": (1, 4)}
    assert pools_bounds(cfg, {"CPU": 2, "GPU": 3, "memory": 8e9}) == {"ocr": (1, 12)}
    assert pools_bounds(ocr_config(num_gpus=0.5), {"CPU": 2, "GPU": 3, "memory": 8e9}) == {"ocr": (1, 6)}
    assert pools_bounds(ocr_config(actors=2), {"CPU": 2, "GPU": 3, "memory": 8e9}) == {"ocr": (2, 2)}
    with pytest.raises(ModelSetupError, match=r"ocr\.ray\.num_gpus=0\.25 but the Ray cluster has 0 GPUs"):
        pools_bounds(cfg, {"CPU": 2, "memory": 8e9})


@pytest.fixture(scope="module")
def text_footage(tmp_path_factory):
    """Two short sources with a caption box in some shots (text to find) and one without."""
    root = tmp_path_factory.mktemp("gpu_footage")
    synth.make_video(root / "titles.mp4", [
        {"frames": 30, "seed": 41, "motion": "pan", "speed_px_per_frame": 3.0, "text": "CURATED CLIPS"},
        {"frames": 30, "seed": 42, "motion": "square", "speed_px_per_frame": 4.0}], 15, (320, 180))
    synth.make_video(root / "subtitles.mp4", [
        {"frames": 30, "seed": 43, "motion": "pan", "speed_px_per_frame": 2.0, "text": "HELLO WORLD",
         "text_height_frac": 0.2}], 15, (320, 180))
    return root


def test_ocr_on_declared_gpus_runs_on_the_cpu_with_device_auto_and_stops_with_device_cuda(
        text_footage, tmp_path, ray_tmp):
    import ray

    reference = run_pipeline(ocr_config(), [str(text_footage)], tmp_path / "local", run_local)
    init_ray(None, num_cpus=2, num_gpus=1, object_store_mb=100, temp_dir=ray_tmp)
    try:
        assert ray.cluster_resources().get("GPU") == 1.0
        # A full pool: 4 actors on the one declared GPU, each handed GPU 0, none with CUDA.
        sizer = start_actor_pools(ocr_config(), ray.cluster_resources(), busy_units=8)
        try:
            handles = sizer.actors["ocr"]
            assert sizer.bounds["ocr"] == (1, 4) and len(handles) == 4
            placements = ray.get([h.placement.remote() for h in handles], timeout=300)
            assert [p["gpu_ids"] for p in placements] == [["0"]] * 4
            assert [p["cuda_visible_devices"] for p in placements] == ["0"] * 4
            assert [p["device"] for p in placements] == ["cpu"] * 4
            stats = ray.get(sizer.pools.dispatcher.stats.remote())["ocr"]
            assert stats["actors"] == 4 and stats["slots"] == 8  # two calls in flight per GPU actor
        finally:
            for h in sizer.actors["ocr"]:
                ray.kill(h)
            ray.kill(sizer.pools.dispatcher)

        record = run_pipeline(ocr_config(), [str(text_footage)], tmp_path / "ray", lambda c, u, s: run_ray(
            c, u, s, num_gpus=1))
        pools = record["attempts"][-1]["model_pools"]["ocr"]
        assert pools["devices"] == {"cpu": pools["actors"]} and pools["gpu_ids"] == ["0"]
        assert pools["call_slots"] == 2 * pools["actors"]

        with pytest.raises(ModelSetupError, match=r"step ocr: RuntimeError: device: 'cuda' was asked for"):
            run_pipeline(ocr_config(device="cuda"), [str(text_footage)], tmp_path / "cuda", lambda c, u, s: run_ray(
                c, u, s, num_gpus=1))
    finally:
        ray.shutdown()

    def scores(out):
        rows = OutputStore(out).read_scores().to_pylist()
        return {(Path(r["source_path"]).name, r["start_frame"]): (r["text_area_ratio"], r["ocr_error"])
                for r in rows}

    here, there = scores(tmp_path / "local"), scores(tmp_path / "ray")
    assert there == here and record["clips"] == reference["clips"]
    assert sum(1 for ratio, _ in here.values() if ratio and ratio > 0.01) >= 2  # text was found
    assert OutputStore(tmp_path / "cuda").committed() == {}
