"""Motion scores on synthetic motion of known speed."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from curation import synth
from stages.motion import MotionStage


def samples(motion: str, speed: float, fps: int = 24, seconds: float = 3.0) -> list[bytes]:
    shot = synth.Shot(frames=int(fps * seconds), seed=5, motion=motion, speed_px_per_frame=speed)
    frames = list(synth.shot_frames(shot, (320, 180)))
    step = fps // 2  # 2 fps
    return [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames[::step]]


def score(batch_samples: list[list[bytes]]) -> dict:
    n = len(batch_samples)
    return MotionStage()({"sample_frames": batch_samples, "sample_fps": [2.0] * n,
                          "split_error": [None] * n, "clip_id": list(range(n))})


def test_static_slow_fast_ordering():
    out = score([samples("static", 0), samples("pan", 0.5), samples("pan", 3.0)])
    static, slow, fast = out["motion_score"]
    assert static < slow < fast
    assert static < 0.5
    assert out["motion_error"] == [None, None, None]


def test_score_unit_is_percent_of_short_side_per_second():
    # A finely textured strip panning 6 px per 2 fps sample (12 px/s) over a 180 px short
    # side moves 12 / 180 * 100 = 6.67 % of the short side per second.
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur((rng.random((180, 400)) * 255).astype(np.uint8), (0, 0), 2)
    frames = [texture[:, 6 * k: 6 * k + 320] for k in range(6)]
    jpegs = [cv2.imencode(".png", f)[1].tobytes() for f in frames]
    (value,) = score([jpegs])["motion_score"]
    assert value == pytest.approx(100 * 12 / 180, rel=0.1)


def test_moving_square_scores_above_static():
    out = score([samples("static", 0), samples("square", 6.0)])
    assert out["motion_score"][0] < out["motion_score"][1]


def test_too_short_for_a_flow_pair_is_nan_with_reason():
    out = score([samples("pan", 1.0)[:1]])
    assert math.isnan(out["motion_score"][0])
    assert "too short" in out["motion_error"][0]


def test_source_error_rows_are_not_motion_failures():
    out = MotionStage()({"sample_frames": [None], "sample_fps": [None], "split_error": ["boom"],
                         "clip_id": ["x"]})
    assert math.isnan(out["motion_score"][0]) and out["motion_error"] == [None]


def test_undecodable_frame_is_a_per_clip_failure():
    good = samples("pan", 1.0)
    out = score([good, [b"not a jpeg", b"nope"]])
    assert not math.isnan(out["motion_score"][0])
    assert math.isnan(out["motion_score"][1]) and "undecodable" in out["motion_error"][1]


@pytest.mark.parametrize("percent_per_s", [10, 25, 50, 100])
def test_pans_score_their_speed_up_to_a_frame_height_per_second(percent_per_s):
    """Farneback alone saturates near 45 %/s at 2 fps and 128 px; the score must follow fast
    pans. Through split's real sampling: 25 fps, 320x180, the pan in px per frame."""
    fps, short = 25, 180
    speed = percent_per_s / 100 * short / fps
    shot = synth.Shot(frames=75, seed=3, motion="pan", speed_px_per_frame=speed)
    frames = list(synth.shot_frames(shot, (320, 180)))
    offsets = [round(k * fps / 2.0) for k in range(6)]  # split's 2 fps sample offsets
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(frames[o], cv2.COLOR_RGB2BGR))[1].tobytes() for o in offsets]
    real_fps = fps * (len(offsets) - 1) / (offsets[-1] - offsets[0])
    out = MotionStage()({"sample_frames": [jpegs], "sample_fps": [real_fps], "split_error": [None]})
    assert out["motion_score"][0] == pytest.approx(percent_per_s, rel=0.15)


def test_a_source_slower_than_sample_fps_is_scored_at_its_own_rate(tmp_path):
    """A 1 fps source has a sample per frame, 1 s apart: split records 1 fps, not 2."""
    from stages.split import SplitStage

    path = tmp_path / "slow.mp4"
    speed = 0.10 * 180  # 10 % of the short side per second, one frame a second
    synth.make_video(path, [{"frames": 8, "seed": 3, "motion": "pan", "speed_px_per_frame": speed}], 1, (320, 180))
    (row,) = SplitStage(min_duration_s=2.0).split_source(str(path), "s")
    assert row["sample_fps"] == pytest.approx(1.0)
    out = MotionStage()({"sample_frames": [row["sample_frames"]], "sample_fps": [row["sample_fps"]],
                         "split_error": [None]})
    assert out["motion_score"][0] == pytest.approx(10.0, rel=0.15)


def test_a_fast_object_does_not_lend_its_motion_to_a_still_smooth_background():
    """A bright square crossing a still, smooth background can decide the global shift; the
    background must keep its zero flow, so the clip scores far below the square's own speed."""
    speed = 4.0  # px per frame at 24 fps over a 180 px short side: the square moves 53 %/s
    out = score([samples("square", speed)])
    assert 0.5 < out["motion_score"][0] < 0.25 * speed * 24 / 180 * 100
