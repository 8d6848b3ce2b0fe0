"""Where the cuts are: the detector cascade (make_detector, min_scene_len scaled to the
source's rate), the merging of near-coincident cuts of several detectors (CutMerger), the
frame score content and adaptive share (share_content_scores), and the flash filter's
constants (applied by stages/split/segment.py, _Segmenter._is_flash)."""

from __future__ import annotations

import collections
from fractions import Fraction
from typing import Any

import cv2
import numpy as np

from stages.dissolve import DissolveDetector


# The SVD-style cascade: the union of the cuts of several detectors, so that hard cuts
# (content), cuts during camera motion (adaptive), fades through black (threshold) and
# cross-fades (dissolve, stages/dissolve.py) are all caught.
DEFAULT_CASCADE: list[dict[str, Any]] = [
    {"detector": "content", "threshold": 27.0},
    {"detector": "adaptive", "adaptive_threshold": 3.0},
    {"detector": "threshold", "threshold": 12.0},
    {"detector": "dissolve"},
]


_DETECTOR_ARGS = {
    "content": {"threshold", "min_scene_len"},
    "adaptive": {"adaptive_threshold", "min_scene_len", "window_width", "min_content_val"},
    "threshold": {"threshold", "min_scene_len", "fade_bias"},
    "dissolve": {"window", "min_change", "max_residual", "min_level", "max_correlation", "min_scene_len"},
}


def make_detector(spec: dict[str, Any]):
    """A PySceneDetect detector from {"detector": name, **its keyword arguments}.

    Content, adaptive and threshold are PySceneDetect's, with their frame scores computed by
    OpenCV (stages/scene_scores.py: the same numbers, at less cost)."""
    from stages.scene_scores import FastAdaptiveDetector, FastContentDetector, FastThresholdDetector

    spec = dict(spec)
    kind = spec.pop("detector", None)
    if kind not in _DETECTOR_ARGS:
        raise ValueError(f"cascade entry detector={kind!r}; allowed: {sorted(_DETECTOR_ARGS)}")
    unknown = sorted(set(spec) - _DETECTOR_ARGS[kind])
    if unknown:
        raise ValueError(f"cascade entry for {kind!r} has unknown keys {unknown}; "
                         f"allowed: {sorted(_DETECTOR_ARGS[kind])}")
    cls = {"content": FastContentDetector, "adaptive": FastAdaptiveDetector, "threshold": FastThresholdDetector,
           "dissolve": DissolveDetector}[kind]
    return cls(**spec)


REFERENCE_FPS = 25.0  # min_scene_len_frames is meant at this rate


def spec_at_rate(spec: dict[str, Any], rate: Fraction) -> dict[str, Any]:
    """A detector spec with min_scene_len scaled down for sources slower than REFERENCE_FPS.

    15 frames is 0.6 s at 25 fps but 15 s in a 1 fps slideshow, where it would hide every
    cut; the minimum shot length is kept in seconds below the reference rate.
    """
    frames = spec.get("min_scene_len")
    if frames is None or float(rate) >= REFERENCE_FPS:
        return spec
    return {**spec, "min_scene_len": max(1, min(frames, round(frames * float(rate) / REFERENCE_FPS)))}


class CutMerger:
    """Cuts of several detectors into one set, near-coincident ones merged.

    Detectors place the same cut a frame or two apart (content at N, adaptive at N+1), and
    the union of both would make a fragment of a frame or two between them, which is then
    silently dropped as too short. A cut within `within_frames` of a pending (not yet
    applied) cut of another detector becomes one cut with it, at the frame (of the candidates
    still pending) that differs most from the frame before it; the earliest when those frames
    are gone. Cuts of one detector are never merged (it keeps its own minimum shot length),
    and `within_frames` is meant at REFERENCE_FPS: a 1 fps slideshow merges nothing.
    """

    def __init__(self, cuts: set[int], within_frames: int, rate: Fraction):
        self.cuts = cuts
        self.within = round(within_frames * min(1.0, float(rate) / REFERENCE_FPS))
        self.by: dict[int, int] = {}  # pending cut -> the detector that reported it
        self.flashes: list[int] = []  # cuts dropped when applied: flashes (_Segmenter._is_flash)

    def add(self, cut: int, detector: int, pending: collections.deque) -> None:
        for c in [c for c in self.by if c not in self.cuts]:
            del self.by[c]  # applied since
        near = sorted(c for c in self.cuts if abs(c - cut) <= self.within and self.by.get(c) != detector)
        if not near or cut in self.cuts:
            self.cuts.add(cut)
            self.by.setdefault(cut, detector)
            return
        lo, hi = min(near[0], cut), max(near[-1], cut)
        frames = {f.index: f.bgr for f in pending if lo - 1 <= f.index <= hi}
        scores = {k: float(cv2.absdiff(frames[k - 1], frames[k]).mean())
                  for k in range(lo, hi + 1) if k in frames and k - 1 in frames}
        owner = self.by[near[0]]
        self.cuts.difference_update(near)
        best = max(scores, key=lambda k: (scores[k], -k)) if scores else lo
        self.cuts.add(best)
        self.by[best] = owner

    def join(self, lo: int, hi: int, target: int | None) -> None:
        """The pending cuts in lo..hi are one transition's, a fade's or a dissolve's
        (_Segmenter._join_fade_cuts, _join_dissolve_cuts): one cut at `target` replaces them
        (none when `target` is None: the transition's cut was applied already, or a fade
        starts or ends the source), also where none was pending (a long dissolve found by
        the segmenter alone)."""
        inside = sorted(c for c in self.cuts if lo <= c <= hi)
        owner = self.by.get(inside[0]) if inside else None
        self.cuts.difference_update(inside)
        if target is not None:
            self.cuts.add(target)
            if owner is not None:
                self.by[target] = owner


def share_content_scores(detectors: list) -> list[int]:
    """Let adaptive detectors reuse a content detector's frame score; return the order to feed them.

    AdaptiveDetector computes ContentDetector's HSV frame score and then compares it with its
    neighbours'; in the cascade both run on the same frames, so with the same score weights
    and edge settings the score is computed once (by the content detector, fed first) and
    read by the adaptive one. Detectors without those internals are left as they are.
    """
    from scenedetect import AdaptiveDetector, ContentDetector

    def key(det):
        return repr((getattr(det, "_weights", None), getattr(det, "_kernel", None), getattr(det, "_luma_only", None)))

    def is_content(det):
        return isinstance(det, ContentDetector) and not isinstance(det, AdaptiveDetector)

    content = [i for i, d in enumerate(detectors) if is_content(d) and hasattr(d, "_frame_score")]
    for i, det in enumerate(detectors):
        source = next((detectors[c] for c in content if key(detectors[c]) == key(det)), None)
        if isinstance(det, AdaptiveDetector) and source is not None and hasattr(det, "_calculate_frame_score"):
            det._calculate_frame_score = lambda timecode, frame_img, source=source: source._frame_score
    return content + [i for i in range(len(detectors)) if i not in content]


# Flash filter: detectors cut at a flash (its first frame differs from the shot as much as a
# new shot does). A cut is dropped when one of the FLASH_MAX_FRAMES frames before it and one
# of the FLASH_MAX_FRAMES from it on differ by less than FLASH_MATCH_SHARE of the jump across
# the cut, which must be at least FLASH_MIN_JUMP, and by less than FLASH_MAX_MATCH (mean
# absolute difference of 0-255 grey thumbnails; two different shots differ by more): the
# picture came back, so the shot goes on.
FLASH_MAX_FRAMES = 6
FLASH_MATCH_SHARE = 0.35
FLASH_MIN_JUMP = 10.0
FLASH_MAX_MATCH = 8.0


def frame_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(cv2.absdiff(a, b).mean())
