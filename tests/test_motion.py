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
