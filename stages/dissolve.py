"""A gradual-transition (dissolve) detector for split's cascade, in PySceneDetect's interface.

PySceneDetect's detectors compare each frame with the one before it, and a 10-20 frame
cross-fade changes each frame by a tenth of a cut, so dissolves go unseen (bench/cut_bench.py:
12 of 16 had no cut at all). This detector compares frames `window` apart: across a dissolve
the two ends differ like two shots, and the frame half way is their blend,
    middle ~ (first + last) / 2,
which a hard cut (the middle is one of the ends), fast motion (the middle is a third
picture) and a static shot (the ends do not differ) are not. Frames are compared as small
colour thumbnails. Windows that pass come in a run around the dissolve; the cut goes to the
score-weighted centre of the run (which is about symmetric around the dissolve's middle),
reported when the run ends, so `event_buffer_length` frames after the dissolve. Fades through black are
left to the fade detector: windows whose first or last frame is dark do not count.
"""

from __future__ import annotations

import collections

import cv2
import numpy as np

THUMB_WIDTH = 64
# What two shots blended look like, on thumbnails (the defaults of DissolveDetector, and the
# checks stages/split/dissolves.py applies to a dissolve's measured span): the ends differ by
# at least MIN_CHANGE (mean absolute difference, 0-255), a blended frame is within
# MAX_RESIDUAL of that change from its mix of the ends, ends darker than MIN_LEVEL are a
# fade's, and ends correlated above MAX_CORRELATION are one picture (a fade, a change of
# exposure or of light).
MIN_CHANGE = 12.0
MAX_RESIDUAL = 0.25
MIN_LEVEL = 24.0
MAX_CORRELATION = 0.6


def thumbnail(bgr: np.ndarray, grey: bool = False) -> np.ndarray:
    """A THUMB_WIDTH px wide copy (aspect kept) for comparing frames; grey or colour."""
    h, w = bgr.shape[:2]
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if grey else bgr
    return cv2.resize(img, (THUMB_WIDTH, max(1, round(THUMB_WIDTH * h / w))), interpolation=cv2.INTER_AREA)


class DissolveDetector:
    """Cuts in the middle of cross-fades; see the module docstring.

    window        frames between the compared ends (about a dissolve's length)
    min_change    mean absolute difference (0-255) the ends must have, as two shots do
    max_residual  largest mean |middle - (first + last) / 2| as a share of that change
    min_level     ends darker than this (mean level) are a fade's, not a dissolve's
    max_correlation  ends correlated more than this are one picture (a fade, an exposure change)
    min_scene_len frames between two cuts of this detector
    """

    def __init__(self, window: int = 12, min_change: float = MIN_CHANGE, max_residual: float = MAX_RESIDUAL,
                 min_level: float = MIN_LEVEL, max_correlation: float = MAX_CORRELATION, min_scene_len: int = 15):
        if window < 4 or min_change <= 0 or not 0 < max_residual < 0.5 or min_scene_len < 1:
            raise ValueError("dissolve: window >= 4, min_change > 0, 0 < max_residual < 0.5, "
                             "min_scene_len >= 1")
        self.window, self.min_change, self.max_residual = window, min_change, max_residual
        self.min_level, self.max_correlation, self.min_scene_len = min_level, max_correlation, min_scene_len
        self._thumbs: collections.deque[tuple[np.ndarray, np.float32]] = collections.deque(maxlen=window + 1)
        self._run: list[tuple[float, int]] = []  # (score, middle frame) of consecutive passing windows
        self._last_cut: int | None = None

    @property
    def event_buffer_length(self) -> int:
        return 2 * self.window

    def _window_score(self) -> float | None:
        (first, first_mean), (middle, _), (last, last_mean) = (
            self._thumbs[0], self._thumbs[self.window // 2], self._thumbs[-1])
        if min(first_mean, last_mean) < self.min_level:
            return None
        change = float(np.abs(first - last).mean())
        if change < self.min_change:
            return None
        residual = float(np.abs(middle - (first + last) / 2).mean())
        if residual > self.max_residual * change:
            return None
        # A fade (or a change of exposure) scales one picture: its ends are the same picture.
        a, b = first - first_mean, last - last_mean
        if float((a * b).sum()) > self.max_correlation * float(np.sqrt((a * a).sum() * (b * b).sum())) + 1e-9:
            return None
        return change - 2.0 * residual

    def process_frame(self, timecode, frame_img: np.ndarray) -> list:
        thumb = thumbnail(frame_img).astype(np.float32)
        self._thumbs.append((thumb, thumb.mean()))  # each thumbnail's mean is read in up to 2 windows
        index = timecode.frame_num
        if len(self._thumbs) <= self.window:
            return []
        score = self._window_score()
        if score is not None:
            self._run.append((score, index - self.window + self.window // 2))
            return []
        return self._end_run(timecode)

    def post_process(self, timecode) -> list:
        return self._end_run(timecode)

    def _end_run(self, timecode) -> list:
        if not self._run:
            return []
        # The run of passing windows is about symmetric around a dissolve's middle, and the
        # windows nearest it score best (largest change, least residual): a weighted centre.
        weights = np.array([max(score, 1e-6) for score, _ in self._run])
        cut = int(round(float(np.dot(weights, [m for _, m in self._run]) / weights.sum())))
        self._run = []
        if self._last_cut is not None and cut - self._last_cut < self.min_scene_len:
            return []
        self._last_cut = cut
        return [type(timecode)(cut, fps=timecode)]  # a FrameTimecode at the same rate
