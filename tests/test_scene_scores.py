"""stages/scene_scores.py: PySceneDetect's detectors with OpenCV frame scores give the same
numbers and the same cuts as PySceneDetect's own code."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, StatsManager, ThresholdDetector

from curation import synth
from stages.scene_scores import FastAdaptiveDetector, FastContentDetector, FastThresholdDetector

RATE = Fraction(24)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[np.ndarray]:
    """Detector-size BGR frames of hard cuts, a pan, a fade through black and noise."""
    path = tmp_path_factory.mktemp("scores") / "mixed.mp4"
    synth.make_video(path, [
        {"frames": 30, "seed": 1},
        {"frames": 30, "seed": 2, "motion": "pan", "speed_px_per_frame": 3.0, "fade_out": 10},
        {"frames": 30, "seed": 3, "fade_in": 10},
        {"frames": 20, "seed": 4},
    ], 24, (320, 180))
    with av.open(str(path)) as c:
        decoded = [cv2.resize(f.to_ndarray(format="bgr24"), (256, 144)) for f in c.decode(video=0)]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (144, 256, 3), dtype=np.uint8) for _ in range(5)]
    return decoded + noise


def run(detector, frames):
    """Each frame's score (None where the detector keeps none) and all cuts, post-process included."""
    scores, cuts = [], []
    for i, frame in enumerate(frames):
        cuts += [c.frame_num for c in detector.process_frame(FrameTimecode(i, fps=RATE), frame)]
        scores.append(getattr(detector, "_frame_score", None))
    cuts += [c.frame_num for c in detector.post_process(FrameTimecode(len(frames), fps=RATE)) or []]
    return scores, cuts


@pytest.mark.parametrize("fast, reference, kwargs", [
    (FastContentDetector, ContentDetector, {}),
    (FastContentDetector, ContentDetector, {"threshold": 10.0, "min_scene_len": 5}),
    (FastContentDetector, ContentDetector, {"weights": ContentDetector.Components(1.0, 0.5, 2.0, 0.0)}),
    (FastAdaptiveDetector, AdaptiveDetector, {}),
    (FastAdaptiveDetector, AdaptiveDetector, {"adaptive_threshold": 1.5, "window_width": 3}),
    (FastThresholdDetector, ThresholdDetector, {"threshold": 12.0}),
    (FastThresholdDetector, ThresholdDetector, {"threshold": 40.0, "fade_bias": 0.5}),
])
def test_same_scores_and_cuts_bit_for_bit(frames, fast, reference, kwargs):
    scores, cuts = run(fast(**kwargs), frames)
    ref_scores, ref_cuts = run(reference(**kwargs), frames)
    assert scores == ref_scores  # exact float equality, frame by frame
    assert cuts == ref_cuts
    if reference is not ThresholdDetector:
        assert len(ref_cuts) >= 2 and max(s for s in scores if s is not None) > 20  # the footage has cuts


def test_the_threshold_average_equals_numpys(frames):
    for frame in frames:
        assert sum(cv2.sumElems(frame)) / frame.size == np.mean(frame)


def test_edge_weights_and_a_stats_manager_use_pyscenedetects_code(frames):
    """What the OpenCV path does not compute (edges, per-frame metrics) is left to PySceneDetect."""
    with_edges = {"weights": ContentDetector.Components(1.0, 1.0, 1.0, 1.0)}
    assert run(FastContentDetector(**with_edges), frames) == run(ContentDetector(**with_edges), frames)
    fast, reference = FastContentDetector(), ContentDetector()
    for det in (fast, reference):
        det.stats_manager = StatsManager()
        run(det, frames)
    key = ContentDetector.FRAME_SCORE_KEY
    for i in range(1, len(frames)):
        tc = FrameTimecode(i, fps=RATE)
        assert fast.stats_manager.get_metrics(tc, [key]) == reference.stats_manager.get_metrics(tc, [key])
