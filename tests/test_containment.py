"""A source that kills or hangs its worker, or a node that goes away, does not stop the run."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from curation import synth
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


HANG_FRAMES, STALL_FRAMES, HUNG_FPS = 3, 8, 10  # the hung sources: 0.3 s and 0.8 s


@pytest.fixture(scope="module")
def corpus(footage, tmp_path_factory):
    """The fixture footage plus sources that the fault stage will fail on: copies of a good one
    (segfault_me, kill_me) and a short clip (hang_me: a hung source's limit is set by its
    duration, and a short one's stays far below a good source's)."""
    root, _ = footage
    folder = tmp_path_factory.mktemp("containment")
    for p in root.iterdir():
        shutil.copy(p, folder / p.name)
    for name in ("segfault_me.mp4", "kill_me.mp4"):
        shutil.copy(root / "pan.mp4", folder / name)
    synth.make_video(folder / "hang_me.mp4", [{"frames": HANG_FRAMES, "seed": 32}], HUNG_FPS, (160, 90))
    reference = folder.parent / "reference"
    run_pipeline(spine_config(), [str(folder)], reference, run_local)
    return folder, rows_by_source(reference)


# How long after its limit a hung source's death may reach the driver: SIGALRM ends the worker
# at the limit, Ray reports the dead worker to the driver, whose loop waits at most 1 s for
# it. A few seconds even on a loaded 2-core machine; 15 s is generous, and still half the
# driver's default backstop (DRIVER_GRACE_S, 30 s), so no backstop ending passes for the timer.
DEATH_NOTICED_WITHIN_S = 15.0
RUN_GUARD_S = 780.0  # under pytest's 900 s per test
HOLD_WAIT_S = 240.0  # for the head's first commit while the worker node holds a source
DEATH_LINE = re.compile(r"unit (\S+) attempt (\d+): (.*) on (\S+) \(\d+ of \d+ attempts\)$")


def test_crashing_and_hanging_sources_are_recorded_and_the_rest_finish(corpus, footage, tmp_path, ray_tmp,
                                                                         caplog):
    """Each hung attempt ends at its source's own limit, by the worker's own timer: the driver's
    backstop is put out of reach, and the in-flight markers give when each attempt began."""
    import ray

    from curation.pipeline import init_ray, run_ray

    folder, reference = corpus
    _, truth = footage
    floor_s, per_video_s = 10.0, 20.0
    # A source's limit is max(floor, per_video_s x its duration). hang_me.mp4 (0.3 s) gets the
    # floor; stall_me.mp4 (0.8 s) per_video_s x its duration, above the floor; every good source
    # (5.7 s and longer) over 100 s, so however busy the machine, only the hung ones time out.
    extra = tmp_path / "stall"
    extra.mkdir()
    synth.make_video(extra / "stall_me.mp4", [{"frames": STALL_FRAMES, "seed": 31, "motion": "pan",
                                               "speed_px_per_frame": 2.0}], HUNG_FPS, (160, 90))
    limits = {"hang_me.mp4": floor_s, "stall_me.mp4": per_video_s * STALL_FRAMES / HUNG_FPS}
    good_s = min(t["frames"] / t["fps"] for t in truth.values())
    assert per_video_s * HANG_FRAMES / HUNG_FPS < floor_s < limits["stall_me.mp4"] < 100.0 < per_video_s * good_s
    faulty = ("segfault_me.mp4", "kill_me.mp4", "hang_me.mp4", "stall_me.mp4")
    cfg = spine_config({"segfault_me": "segfault", "kill_me": "kill", "hang_me": "hang", "stall_me": "hang"},
                       {"source_timeout_floor_s": floor_s, "source_timeout_per_video_s": per_video_s,
                        "max_source_attempts": 2})
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="curation.pipeline")
    result: dict = {}

    def drive():
        try:
            # The driver's backstop would cancel a hung task an hour past its limit: never here.
            result["record"] = run_pipeline(cfg, [str(folder), str(extra)], out, lambda c, u, s: run_ray(
                c, u, s, driver_grace_s=3600.0))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    def deaths() -> list[tuple[str, int, str, str, float]]:
        """(unit, attempt, reason, source file, when the driver logged it) of each death."""
        found = []
        for r in list(caplog.records):
            m = DEATH_LINE.match(r.getMessage()) if r.name == "curation.pipeline" else None
            if m:
                found.append((m[1], int(m[2]), m[3], Path(m[4]).name, r.created))
        return found

    markers: dict[tuple[str, int, str], dict] = {}  # (unit, attempt, source file) -> its last marker
    init_ray(None, num_cpus=2, object_store_mb=100, temp_dir=ray_tmp)  # on the main thread
    thread = threading.Thread(target=drive)
    try:
        thread.start()
        # Only a guard against a run that never ends (the check below is what times each hang):
        # idle, the run takes about 50 s; with both cores kept busy by other work, up to 300 s.
        deadline = time.monotonic() + RUN_GUARD_S
        while thread.is_alive():
            assert time.monotonic() < deadline, f"the run did not finish in {RUN_GUARD_S:.0f} s"
            ended = {(u, a) for u, a, *_ in deaths()}
            now = time.time()
            for path in out.glob("inflight/u*.json"):  # not a temp file (renamed at any time)
                try:
                    m = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if m.get("phase") != "source":
                    continue
                markers[m["unit_id"], m["attempt"], Path(m["source_path"]).name] = m
                past = now - m["started_at"] - m["limit_s"]
                assert (m["unit_id"], m["attempt"]) in ended or past < DEATH_NOTICED_WITHIN_S, (
                    f"{m['source_path']} is {past:.0f} s past its {m['limit_s']:.0f} s limit and its "
                    "worker still runs: the worker's own timer did not end it")
            thread.join(0.05)
    finally:
        ray.shutdown()
        thread.join(60)
    assert "error" not in result, result.get("error")
    record = result["record"]
    assert record["status"] == "complete" and record["sources"] == {"total": 10, "committed": 10}
    # Each hung attempt ended at its own limit (measured from when its marker armed the timer),
    # not before, and not at a backstop.
    hung = [d for d in deaths() if "timed out" in d[2]]
    assert sorted(d[3] for d in hung) == ["hang_me.mp4"] * 2 + ["stall_me.mp4"] * 2, deaths()
    for unit, attempt, reason, name, noticed in hung:
        m = markers[unit, attempt, name]
        assert m["limit_s"] == limits[name] and reason == f"timed out after {limits[name]:.0f} s", (m, reason)
        lasted = noticed - m["started_at"]
        assert limits[name] - 0.5 <= lasted < limits[name] + DEATH_NOTICED_WITHIN_S, (name, attempt, lasted)
    rows = rows_by_source(out)
    for name, status, reason in (("segfault_me.mp4", "worker_died", "worker died"),
                                 ("kill_me.mp4", "worker_died", "worker died"),
                                 ("hang_me.mp4", "timed_out", f"timed out after {floor_s:.0f} s"),
                                 ("stall_me.mp4", "timed_out", f"timed out after {limits['stall_me.mp4']:.0f} s")):
        [row] = rows[name]
        assert row["source_status"] == status and reason in row["split_error"], row
        assert "2 attempts" in row["split_error"] and not row["keep"]
    # Every other source: exactly the clips of an in-process run without faults.
    good = [n for n in reference if n not in faulty]
    assert clip_ids(rows, good) == clip_ids(reference, good)
    assert record["source_outcomes"] == {"unreadable": 3, "worker_died": 2, "timed_out": 2}
    # Each faulty source cost its unit two attempts (max_source_attempts), no more, no fewer.
    faulty_ids = {rows[name][0]["source_id"] for name in faulty}
    entries = OutputStore(out).committed().values()
    for e in entries:
        assert e["attempts"] == 1 + 2 * len(faulty_ids & set(e["source_ids"])), e
    assert record["units_retried"] == sum(1 for e in entries if faulty_ids & set(e["source_ids"]))
    assert not list((out / "inflight").iterdir())


def test_losing_a_node_mid_run_gives_every_clip_once(corpus, tmp_path, ray_tmp):
    """The worker node holds (fault mode `hold`) the first source it gets until the test removes
    it, so the removal always finds it mid-source, however slow the machine; the head, where
    `hold` passes, runs that unit again and every other one."""
    import ray
    from ray.cluster_utils import Cluster

    from curation.pipeline import run_ray
    from stages.fault import HOLD_ENV

    folder, reference = corpus
    names = [n for n in reference if n not in ("segfault_me.mp4", "kill_me.mp4", "hang_me.mp4")]
    inputs = [str(folder / n) for n in names]
    # Every source holds on the worker node; the held one stays within its limit (the floor,
    # 300 s by default) until the node is removed, which happens before HOLD_WAIT_S.
    cfg = spine_config({".mp4": "hold"}, {"sources_per_unit": 1})
    assert HOLD_WAIT_S < cfg.run.source_timeout_floor_s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024**2, "temp_dir": ray_tmp,
        "include_dashboard": False})
    head_id = cluster.head_node.node_id
    out = tmp_path / "out"
    result: dict = {}
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2, env_vars={HOLD_ENV: "1"})
        cluster.wait_for_nodes()

        def drive():
            try:
                result["record"] = run_pipeline(cfg, inputs, out, lambda c, u, s: run_ray(
                    c, u, s, address=cluster.address))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        def held_on_worker() -> dict | None:
            """The in-flight marker of the unit the worker node holds in a source, if any."""
            for marker in out.glob("inflight/u*.json"):  # not a temp file (renamed at any time)
                try:
                    m = json.loads(marker.read_text())
                except (OSError, ValueError):
                    continue
                if m.get("node_id") == worker.node_id and m.get("phase") == "source":
                    return m
            return None

        thread = threading.Thread(target=drive)
        thread.start()
        # Once the head has committed a unit and the worker holds one: a state that lasts until
        # the node goes, so how often it is looked for does not matter.
        deadline = time.monotonic() + HOLD_WAIT_S
        while not (list(out.glob("ledger/u*.json")) and (held := held_on_worker())):
            assert thread.is_alive(), result.get("error")
            assert time.monotonic() < deadline, "no committed unit and held source within the wait"
            time.sleep(0.1)
        cluster.remove_node(worker)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run did not finish after the node was removed"
        assert "error" not in result, result.get("error")
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = rows_by_source(out)
    ids = [r["clip_id"] for n in names for r in rows[n]]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == clip_ids(reference, names)
    record = result["record"]
    assert record["sources"]["committed"] == len(names)
    # The held unit ran again on the head, with its real clips; the worker committed nothing.
    entries = OutputStore(out).committed()
    assert entries[held["unit_id"]]["attempts"] == 2 and entries[held["unit_id"]]["node_id"] == head_id
    assert {e["node_id"] for e in entries.values()} == {head_id} and set(record["nodes"]) == {head_id}
    assert record["units_retried"] >= 1


def test_a_dying_model_actor_costs_only_the_rows_of_the_source_that_killed_it(ray_tmp):
    import ray

    from curation.config import RayOptions, Step
    from curation.pipeline import init_ray
    from curation.pools import start_actor_pools

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

    from curation.pipeline import init_ray
    from curation.pools import start_actor_pools

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

        def running() -> int:
            return ray.get(pools.dispatcher.stats.remote())[step.name]["running"]

        stuck = threading.Thread(target=hang, daemon=True)
        stuck.start()
        deadline = time.monotonic() + 60.0
        while running() < 1:  # the dispatcher has handed the stuck call to an actor
            assert time.monotonic() < deadline and stuck.is_alive(), "the stuck call never started"
            time.sleep(0.05)
        started = time.monotonic()
        rows = {"source_path": [f"/a/good{i}.mp4" for i in range(6)], "source_id": [str(i) for i in range(6)],
                "clip_id": [str(i + 1) for i in range(6)]}
        out = pools(step, rows)  # six batches of one row: none may wait for the stuck actor
        assert out["fault_error"] == [None] * 6
        elapsed = time.monotonic() - started
        stats = ray.get(pools.dispatcher.stats.remote())[step.name]
        # The stuck call still runs (it ends only at its 60 s limit), so no batch waited for it.
        assert stats["actors"] == 2 and stats["running"] == 1 and stats["batches"] == 6
        assert stats["busy_s"] >= elapsed  # the stuck call counts as busy all along
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
    # At start-up, before any row: every step says "starting", and no step is the bottleneck.
    fresh = StepMonitor(cfg, slots=2, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="curation.pipeline"):
        fresh.report({"ocr": {"actors": 2, "queued": 0, "rows": 0, "busy_s": 0.0}}, running=2)
    line = caplog.records[-1].getMessage()
    assert "rows/s" not in line and "% busy" not in line and "bottleneck: none yet" in line
    assert "split starting" in line and "ocr starting (2 actors, 0 batches queued)" in line
