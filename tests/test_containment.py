"""A source that kills or hangs its worker, or a node that goes away, does not stop the run."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from curation.config import load_config, parse_config
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore

REPO = Path(__file__).resolve().parents[1]


def spine_config(faults: dict | None = None, run: dict | None = None):
    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"][0]["args"]["min_duration_s"] = 1.0
    if faults:
        raw["steps"].insert(1, {"stage": "fault", "args": {"faults": faults}})
    raw["run"].update({"sources_per_unit": 2, **(run or {})})
    return parse_config(raw)


def rows_by_source(out: Path) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for r in OutputStore(out).read_scores().to_pylist():
        by_name.setdefault(Path(r["source_path"]).name, []).append(r)
    return by_name


def clip_ids(rows: dict[str, list[dict]], names) -> list[str]:
    return sorted(r["clip_id"] for n in names for r in rows[n])


@pytest.fixture(scope="module")
def corpus(footage, tmp_path_factory):
    """The fixture footage plus copies of a good source that the fault stage will fail on."""
    root, _ = footage
    folder = tmp_path_factory.mktemp("containment")
    for p in root.iterdir():
        shutil.copy(p, folder / p.name)
    for name in ("segfault_me.mp4", "kill_me.mp4", "hang_me.mp4"):
        shutil.copy(root / "pan.mp4", folder / name)
    reference = folder.parent / "reference"
    run_pipeline(spine_config(), [str(folder)], reference, run_local)
    return folder, rows_by_source(reference)


def test_crashing_and_hanging_sources_are_recorded_and_the_rest_finish(corpus, tmp_path, ray_tmp):
    import ray

    from curation.pipeline import run_ray

    folder, reference = corpus
    cfg = spine_config({"segfault_me": "segfault", "kill_me": "kill", "hang_me": "hang"},
                       {"source_timeout_floor_s": 12.0, "source_timeout_per_video_s": 0.5,
                        "max_source_attempts": 2})
    out = tmp_path / "out"
    started = time.monotonic()
    try:
        record = run_pipeline(cfg, [str(folder)], out, lambda c, u, s: run_ray(
            c, u, s, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp))
    finally:
        ray.shutdown()
    wall = time.monotonic() - started
    assert record["status"] == "complete" and record["sources"] == {"total": 9, "committed": 9}
    rows = rows_by_source(out)
    for name, status, reason in (("segfault_me.mp4", "worker_died", "worker died"),
                                 ("kill_me.mp4", "worker_died", "worker died"),
                                 ("hang_me.mp4", "timed_out", "timed out after 12 s")):
        [row] = rows[name]
        assert row["source_status"] == status and reason in row["split_error"], row
        assert "2 attempts" in row["split_error"] and not row["keep"]
    # Every other source: exactly the clips of an in-process run without faults.
    good = [n for n in reference if n not in ("segfault_me.mp4", "kill_me.mp4", "hang_me.mp4")]
    assert clip_ids(rows, good) == clip_ids(reference, good)
    assert record["source_outcomes"] == {"unreadable": 3, "worker_died": 2, "timed_out": 1}
    assert record["units_retried"] >= 2
    # The hang cost two time limits, not forever.
    assert wall < 240
    assert not list((out / "inflight").iterdir())


def test_losing_a_node_mid_run_gives_every_clip_once(corpus, tmp_path, ray_tmp):
    import ray
    from ray.cluster_utils import Cluster

    from curation.pipeline import run_ray

    folder, reference = corpus
    names = [n for n in reference if n not in ("segfault_me.mp4", "kill_me.mp4", "hang_me.mp4")]
    inputs = [str(folder / n) for n in names]
    cfg = spine_config(run={"sources_per_unit": 1})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024**2, "temp_dir": ray_tmp,
        "include_dashboard": False})
    out = tmp_path / "out"
    result: dict = {}
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
        cluster.wait_for_nodes()

        def drive():
            try:
                result["record"] = run_pipeline(cfg, inputs, out, lambda c, u, s: run_ray(
                    c, u, s, address=cluster.address))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=drive)
        thread.start()
        # Remove the worker node while it is splitting a source (its unit's in-flight marker
        # names the node), after the first unit is committed.
        def busy_on_worker() -> bool:
            for marker in out.glob("inflight/u*.json"):  # not a temp file (renamed at any time)
                try:
                    m = json.loads(marker.read_text())
                except (OSError, ValueError):
                    continue
                if m.get("node_id") == worker.node_id and m.get("phase") == "source":
                    return True
            return False

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (list(out.glob("ledger/u*.json")) and busy_on_worker()):
            time.sleep(0.01)
        removed_while_running = busy_on_worker()
        cluster.remove_node(worker)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run did not finish after the node was removed"
        assert "error" not in result, result.get("error")
        assert removed_while_running
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = rows_by_source(out)
    ids = [r["clip_id"] for n in names for r in rows[n]]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == clip_ids(reference, names)
    assert result["record"]["sources"]["committed"] == len(names)
    # The worker node had a unit in flight when it went: that unit ran again on the head.
    assert result["record"]["units_retried"] >= 1


def test_a_dying_model_actor_costs_only_the_rows_of_the_source_that_killed_it(ray_tmp):
    import ray

    from curation.config import RayOptions, Step
    from curation.pipeline import init_ray, start_actor_pools

    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"].append({"stage": "fault", "args": {"faults": {"kill_me": "kill", "hang_me": "hang"}},
                         "ray": {"actors": 1, "num_cpus": 0.5, "batch_size": 8}})
    raw["run"].update({"source_timeout_floor_s": 3.0, "model_timeout_per_row_s": 0.5})
    cfg = parse_config(raw)
    step: Step = cfg.steps[-1]
    assert isinstance(step.ray, RayOptions) and step.ray.actors == 1
    init_ray(None, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp)
    try:
        pools = start_actor_pools(cfg, {"CPU": 2.0, "memory": 8 * 1024**3}).pools
        batch = {"source_path": ["/a/good.mp4", "/a/kill_me.mp4", "/a/good.mp4", "/a/other.mp4"],
                 "source_id": ["g", "k", "g", "o"], "clip_id": ["1", "2", "3", "4"]}
        out = pools(step, batch)
        assert out["clip_id"] == ["1", "3", "2", "4"]  # retried source by source, in order
        errors = dict(zip(out["clip_id"], out["fault_error"]))
        assert errors["2"] == "worker died (model actor)"
        assert errors["1"] is None and errors["3"] is None and errors["4"] is None
        # A hung call is cut at floor + rows * per-row, and the restarted actor serves again.
        hung = pools(step, {"source_path": ["/a/hang_me.mp4"], "source_id": ["h"], "clip_id": ["5"]})
        assert hung["fault_error"] == ["timed out after 4 s"]
        again = pools(step, {"source_path": ["/a/good.mp4"], "source_id": ["g"], "clip_id": ["6"]})
        assert again["fault_error"] == [None]
    finally:
        ray.shutdown()


def test_a_busy_model_actor_holds_up_no_batch_another_actor_is_free_for(ray_tmp):
    """The dispatcher hands each batch to the first free actor: while one actor of a pool of
    two is stuck in a long call, every other batch goes through the second one."""

    import ray

    from curation.pipeline import init_ray, start_actor_pools

    raw = yaml.safe_load((REPO / "configs" / "spine.yaml").read_text())
    raw["steps"].append({"stage": "fault", "args": {"faults": {"hang_me": "hang"}},
                         "ray": {"actors": 2, "num_cpus": 0.25, "batch_size": 1}})
    raw["run"].update({"source_timeout_floor_s": 60.0, "model_timeout_per_row_s": 0.01})
    cfg = parse_config(raw)
    step = cfg.steps[-1]
    init_ray(None, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp)
    try:
        sizer = start_actor_pools(cfg, {"CPU": 2.0, "memory": 8 * 1024**3})
        pools = sizer.pools
        ray.get([h.ready.remote() for h in sizer.actors[step.name]])
        def hang() -> None:
            try:
                pools(step, {"source_path": ["/a/hang_me.mp4"], "source_id": ["h"], "clip_id": ["0"]})
            except BaseException:  # noqa: BLE001 - ends with ray.shutdown()
                pass

        stuck = threading.Thread(target=hang, daemon=True)
        stuck.start()
        time.sleep(1.0)
        started = time.monotonic()
        rows = {"source_path": [f"/a/good{i}.mp4" for i in range(6)], "source_id": [str(i) for i in range(6)],
                "clip_id": [str(i + 1) for i in range(6)]}
        out = pools(step, rows)  # six batches of one row: none may wait for the stuck actor
        assert out["fault_error"] == [None] * 6
        assert time.monotonic() - started < 30.0
        stats = ray.get(pools.dispatcher.stats.remote())[step.name]
        assert stats["actors"] == 2 and stats["running"] == 1 and stats["batches"] == 6
        assert stats["busy_s"] >= time.monotonic() - started  # the stuck call counts as busy
    finally:
        ray.shutdown()


def test_the_progress_line_names_the_busiest_step(caplog):
    from curation.pipeline import StepMonitor

    cfg = load_config(REPO / "pipeline.yaml")
    monitor = StepMonitor(cfg, slots=2, every_s=0.0)
    monitor.started -= 100.0  # 100 s into the run
    monitor.observe({"clips": 40, "stage_seconds": {"split": 50.0, "motion": 10.0}})
    stats = {"ocr": {"actors": 2, "queued": 3, "rows": 20, "busy_s": 190.0},
             "aesthetics": {"actors": 1, "queued": 0, "rows": 40, "busy_s": 20.0}}
    with caplog.at_level(logging.INFO, logger="curation.pipeline"):
        monitor.report(stats, running=4)
    line = caplog.records[-1].getMessage()
    assert "bottleneck: ocr" in line
    assert "ocr 0.20 rows/s 95% busy (2 actors, 3 batches queued)" in line
    assert "split 0.40 rows/s 25% busy" in line
