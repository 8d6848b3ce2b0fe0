"""PySceneDetect's content, adaptive and threshold detectors with their frame scores computed
by OpenCV instead of numpy: the same numbers, bit for bit, at a fraction of the cost.

split runs the detectors on every decoded frame, so their per-frame cost is part of the
spine's (bench/spine_bench.py). ContentDetector scores a frame by the mean absolute
difference of each HSV channel from the frame before; its numpy code casts each channel to
int32, subtracts, takes the absolute value and sums, three times per frame. Here one
`cv2.absdiff` of the two HSV images and one `cv2.sumElems` give the same three integer
sums (exact in float64 below 2**53), divided by the same pixel count: the same floats.
ThresholdDetector's frame average (`numpy.mean`, a float64 sum of integers, also exact) is
computed the same way. Only the scores change hands; the detectors' logic (thresholds,
flash filter, adaptive windows, fade bias) is PySceneDetect's own.

Where a detector would compute more than these scores (edge weights, a stats manager), it
runs PySceneDetect's own code.
"""

from __future__ import annotations

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, ThresholdDetector


class _HSVScore:
    """ContentDetector._calculate_frame_score by OpenCV (see the module docstring)."""

    _last_hsv: np.ndarray | None = None

    def _calculate_frame_score(self, timecode, frame_img: np.ndarray) -> float:
        if self._weights.delta_edges > 0.0 or self.stats_manager is not None:
            return super()._calculate_frame_score(timecode, frame_img)
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        last, self._last_hsv = self._last_hsv, hsv
        if last is None:
            return 0.0  # as ContentDetector: the first frame has nothing to differ from
        pixels = float(hsv.shape[0] * hsv.shape[1])
        hue, sat, lum, _ = cv2.sumElems(cv2.absdiff(hsv, last))
        components = (hue / pixels, sat / pixels, lum / pixels, 0.0)
        return sum(c * w for c, w in zip(components, self._weights, strict=True)) / sum(
            abs(w) for w in self._weights)


class FastContentDetector(_HSVScore, ContentDetector):
    """ContentDetector, scores by OpenCV."""


class FastAdaptiveDetector(_HSVScore, AdaptiveDetector):
    """AdaptiveDetector, scores by OpenCV (when no content detector shares its own)."""


class FastThresholdDetector(ThresholdDetector):
    """ThresholdDetector with the frame average by OpenCV.

    ThresholdDetector reads a frame only through `numpy.mean(frame_img)`; it is handed a
    one-element array holding that mean, computed as an exact sum over the pixels divided
    by their count, which is what numpy computes.
    """

    def process_frame(self, timecode, frame_img: np.ndarray) -> list:
        if self.stats_manager is not None:
            return super().process_frame(timecode, frame_img)
        mean = sum(cv2.sumElems(frame_img)) / frame_img.size
        return super().process_frame(timecode, np.full(1, mean))
