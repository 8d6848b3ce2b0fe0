"""pipeline.yaml validation and --set overrides: errors name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "run": {"sources_per_unit": 2},
    "steps": [
        {"stage": "split", "args": {"min_duration_s": 1.0}, "ray": {"num_cpus": 1}},
        {"stage": "motion"},
        {"stage": "filter", "args": {"rules": {"motion_score": {"min": 1.0}}}},
    ],
}


def write(tmp_path, raw) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_are_valid():
    config = load_config(REPO / "pipeline.yaml")
    assert [s.stage for s in config.steps] == ["split", "motion", "ocr", "aesthetics", "filter", "caption",
                                               "clip_similarity", "filter"]
    assert config.step("filter").args["rules"]["text_area_ratio"] == {"max": 0.07}  # SVD's 7%
    spine = load_config(REPO / "configs" / "spine.yaml")
    assert [s.stage for s in spine.steps] == ["split", "motion", "filter"]


def test_overrides_are_applied_and_type_checked(tmp_path):
    path = write(tmp_path, BASE)
    config = load_config(path, ["split.min_duration_s=3", "filter.rules.motion_score.min=0.5",
                                "run.sources_per_unit=7", "motion.ray.batch_size=4"])
    assert config.step("split").args["min_duration_s"] == 3.0
    assert isinstance(config.step("split").args["min_duration_s"], float)
    assert config.step("filter").args["rules"]["motion_score"] == {"min": 0.5}
    assert config.run.sources_per_unit == 7
    assert config.step("motion").ray.batch_size == 4


@pytest.mark.parametrize("override, key", [
    ("split.min_duration_s=soon", "split.min_duration_s"),
    ("split.min_durration_s=3", "min_durration_s"),
    ("splitter.min_duration_s=3", "splitter"),
    ("split.detector=magic", "detector"),
    ("run.sources_per_unit=many", "run.sources_per_unit"),
    ("run.unit_size=3", "unit_size"),
    ("motion.ray.gpus=1", "gpus"),
    ("filter.rules.motion.min=1", "motion"),
    ("split.max_duration_s=0.5", "max_duration_s"),
    ("nonsense", "KEY=VALUE"),
])
def test_bad_overrides_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, BASE), [override])


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["steps"].append({"stage": "sharpen"}), "sharpen"),
    (lambda r: r["steps"][1].update(args={"window": 3}), "window"),
    (lambda r: r["steps"][1].update(args={"working_short_side_px": "big"}), "working_short_side_px"),
    (lambda r: r["steps"][0].update(ray={"num_cpu": 1}), "num_cpu"),
    (lambda r: r["steps"][0].update(extra=1), "extra"),
    (lambda r: r.update(output="x"), "output"),
    (lambda r: r["steps"].append({"stage": "motion"}), "motion"),
    (lambda r: r["steps"].reverse(), "split"),
])
def test_bad_config_names_the_key(mutate, key):
    import copy

    raw = copy.deepcopy(BASE)
    mutate(raw)
    with pytest.raises(ConfigError, match=key):
        parse_config(raw)


def test_fingerprint_ignores_ray_resources_and_time_limits_but_not_args(tmp_path):
    path = write(tmp_path, BASE)
    base = load_config(path).fingerprint()
    # The README's execution settings: a run can be resumed with other resources and time limits.
    for setting in ("split.ray.num_cpus=2", "run.source_timeout_floor_s=7", "run.source_timeout_per_video_s=3",
                    "run.model_timeout_per_row_s=9", "run.max_source_attempts=5"):
        assert load_config(path, [setting]).fingerprint() == base, setting
    # What changes results, or how sources form units (resume needs the same units), does not.
    for setting in ("split.min_duration_s=2", "run.sources_per_unit=7"):
        assert load_config(path, [setting]).fingerprint() != base, setting


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, footage, capsys):
    from curation.cli import main

    root, _ = footage
    code = main(["run", str(write(tmp_path, BASE)), "--input", str(root), "--output",
                 str(tmp_path / "out"), "--set", "split.min_durration_s=3"])
    assert code == 2
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("actors, bounds", [
    (None, (1, 6)), ("auto", (1, 6)), (3, (3, 3)), ({"max": 4}, (1, 4)), ({"min": 2, "max": 5}, (2, 5)),
])
def test_actor_pool_bounds(actors, bounds):
    from curation.config import pool_bounds

    assert pool_bounds(actors, 6) == bounds


@pytest.mark.parametrize("value, message", [
    ("0", "must be >= 1"), ("many", "is none of: int, 'auto', dict, null"),
    ("{min: 3, max: 2}", "1 <= min <= max"), ("{most: 2}", "expected {min: A, max: B}"),
])
def test_bad_actor_pool_sizes_name_the_key(value, message):
    with pytest.raises(ConfigError, match="ocr.ray.actors") as err:
        load_config(REPO / "pipeline.yaml", [f"ocr.ray.actors={value}"])
    assert message in str(err.value)


def test_pools_grow_while_batches_wait_for_them_and_stop_at_their_maximum():
    from curation.pipeline import ActorPools, PoolSizer

    made, added = [], []
    sizer = PoolSizer(ActorPools(), {"ocr": (1, 3), "caption": (1, 3)},
                      make_actor=lambda name: made.append(name) or f"{name}{len(made)}",
                      add_to_dispatcher=lambda name, handle: added.append(handle), grow_every_s=0.0)
    sizer.add_actor("ocr")
    sizer.add_actor("caption")
    idle = {"actors": 1, "queued": 0}
    sizer.check({"ocr": {**idle, "queued": 4}, "caption": idle})
    assert len(sizer.actors["ocr"]) == 1  # one look at a queue is not enough: it may be a burst
    for _ in range(5):  # ocr's batches keep waiting; caption's actor keeps up
        sizer.check({"ocr": {**idle, "queued": 4}, "caption": idle})
    assert sizer.actors["ocr"] == ["ocr1", "ocr3", "ocr4"]  # and not past its maximum
    assert sizer.actors["caption"] == ["caption2"]
    assert added == ["ocr1", "caption2", "ocr3", "ocr4"]  # every actor reaches the dispatcher


def test_a_units_rows_go_to_a_pool_in_batches_of_even_sizes(monkeypatch):
    """A unit's batches for a model step run side by side on the pool's actors and the unit
    waits for the longest: 9 rows at a batch size of 8 go as 5 and 4 (8 and 1 kept one actor
    busy eight times as long as the other), and no batch is above the batch size."""
    from curation.pools import ActorPools

    step = load_config(REPO / "pipeline.yaml", ["ocr.ray.batch_size=8"]).step("ocr")
    sent: list[list[str]] = []
    pools = ActorPools()
    monkeypatch.setattr(pools, "submit", lambda step, part: sent.append(part["clip_id"]) or len(sent))
    monkeypatch.setattr(pools, "result", lambda step, part, call, isolate: part)
    for n, sizes in [(9, [4, 5]), (8, [8]), (17, [5, 6, 6]), (1, [1])]:
        sent.clear()
        ids = [f"c{i}" for i in range(n)]
        out = pools(step, {"clip_id": ids, "source_id": ["s"] * n})
        assert [len(ids) for ids in sent] == sizes
        assert out["clip_id"] == ids  # every row once, in order


def test_pools_start_with_an_actor_per_unit_running_at_once_within_their_bounds():
    from curation.pipeline import starting_size

    assert starting_size((1, 4), busy_units=1) == 1  # a one-source run loads one model
    assert starting_size((1, 4), busy_units=2) == 2  # two units at once: both actors load now
    assert starting_size((1, 4), busy_units=50) == 4  # never past the maximum
    assert starting_size((3, 4), busy_units=1) == 3  # nor below the minimum


@pytest.mark.parametrize("cpus", [1, 2, 3, 8])
def test_model_actors_always_leave_a_unit_task_its_cpus(cpus):
    """On one CPU the OCR actor reserved 0.01 and no 1-CPU unit task could ever start."""
    from curation.pipeline import actor_cpus, unit_task_cpus

    cfg = load_config(REPO / "pipeline.yaml")
    steps = [s for s in cfg.steps if s.ray.actors is not None]
    bounds = {s.name: (1, cpus) for s in steps}
    reserved = actor_cpus(steps, bounds, float(cpus), unit_task_cpus(cfg))
    at_most = sum(bounds[s.name][1] * reserved[s.name] for s in steps)
    assert at_most + unit_task_cpus(cfg) <= cpus
    assert all(0 <= r <= s.ray.num_cpus for s, r in zip(steps, reserved.values()))
