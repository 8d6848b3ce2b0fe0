"""Fades through black or white: the ramps the clip builder trims from a clip's ends
(_ClipBuilder, edge_fade) and the one cut a fade gets (_Segmenter, fade_at).

A fade scales one picture towards black (or white): frame = g * picture (+ (1 - g) * 255),
with the gain g going smoothly from 1 to 0 over several frames, and back up on the other
side of the fade. Seen from a frame's mean level x (measured from black; from white, 255 -
mean, for a fade to white) and its contrast (the standard deviation of a small grey copy):
  - the levels go monotonically from the extreme (near 0) up to the shot's steady level S,
    the ramp; black (white) frames may come first;
  - gradually: no step between two frames carries more than FADE_MAX_STEP of the change
    (a light switched on, the end of a flash, a hard cut: one or two big steps);
  - over at least FADE_MIN_FRAMES frames (a flash lasts 1-3);
  - with the picture kept: contrast / level stays that of the steady picture within a factor
    FADE_CONTRAST_FACTOR (where the contrast is large enough to measure). Frame-to-frame
    correlation would say the same on still shots, but falls to 0 on fast pans, where the
    contrast-to-level ratio of a scaled picture still holds.
A frame is at the steady level when it is within FADE_STEADY_TOL of S (at least 2 levels):
the ramp is every frame before that one. S is found by walking from the extreme while the
level keeps rising (within noise), at most `limit` frames past the black (white) frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from stages.dissolve import THUMB_WIDTH, thumbnail

FADE_MIN_FRAMES = 4  # a fade's ramp, with its black (white) frames at the clip's edge
FADE_MAX_STEP = 0.4  # largest step between two frames, as a share of the ramp's change
FADE_STEADY_TOL = 0.05  # a frame within this share of the steady level (or 2 levels) is steady
FADE_SETTLE_FRAMES = 3  # frames past the longest ramp, to see the steady level
FADE_MIN_CONTRAST = 2.0  # the contrast is checked where the picture would have at least this
FADE_CONTRAST_FACTOR = 2.0


def measure(detect_bgr: np.ndarray) -> tuple[float, float]:
    """A frame's mean level (of B, G, R, 0-255) and contrast (std of a 64 px wide grey copy)."""
    level = float(np.mean(cv2.mean(detect_bgr)[:3]))
    grey = (thumbnail(detect_bgr, grey=True) if detect_bgr.shape[1] > THUMB_WIDTH
            else cv2.cvtColor(detect_bgr, cv2.COLOR_BGR2GRAY))  # never scaled up
    return level, float(cv2.meanStdDev(grey)[1][0, 0])


class Ramp(NamedTuple):
    frames: int  # frames from the extreme end that are the fade's (its black or white, its ramp)
    black: int  # of which under `black` from the extreme (black or white frames)
    steady: float  # the level it ramps to (from the extreme)
    fade: bool  # whether it is a fade's ramp (see the module docstring)


def ramp(x: Sequence[float], contrast: Sequence[float], black: float, limit: int) -> Ramp:
    """The ramp starting at x[0], levels measured from the extreme (0: black or white);
    `black`: a frame under this level is the fade's black (white); `limit`: the longest ramp."""
    n = len(x)
    if n == 0:
        return Ramp(0, 0, 0.0, False)
    plateau = 0
    while plateau < n and x[plateau] < black:
        plateau += 1
    end = min(n - 1, plateau + limit)
    w = max(0, plateau - 1)  # the black (white) frames are the fade's, whatever their order
    while w < end and x[w + 1] >= x[w] - max(1.5, 0.03 * x[w]):
        w += 1
    top = max(range(w + 1), key=lambda i: x[i])
    steady = float(x[top])
    tol = max(2.0, FADE_STEADY_TOL * steady)
    frames = next(i for i in range(w + 1) if x[i] >= steady - tol)
    change = steady - x[0]
    fade = (steady >= 2 * black and x[0] <= 0.5 * steady and frames >= FADE_MIN_FRAMES
            and max(x[i + 1] - x[i] for i in range(frames)) <= FADE_MAX_STEP * change)
    if fade:
        ratio = contrast[top] / steady
        for i in range(frames):
            expect = ratio * x[i]
            if expect >= FADE_MIN_CONTRAST and not (
                    expect / FADE_CONTRAST_FACTOR - 1.0 <= contrast[i] <= expect * FADE_CONTRAST_FACTOR + 1.0):
                fade = False
                break
    return Ramp(frames, plateau, steady, fade)


def _from_extreme(levels: Sequence[float], white: bool) -> list[float]:
    return [255.0 - v for v in levels] if white else list(levels)


def edge_fade(levels: Sequence[float], contrast: Sequence[float], black: float, limit: int) -> int:
    """How many frames from levels[0] (a clip's first frame, or its last with the lists
    reversed) are a fade's black (white) and ramp: 0 when the clip does not start in a fade."""
    for white in (False, True):
        r = ramp(_from_extreme(levels, white), contrast, black, limit)
        if r.fade:
            return r.frames
    return 0


class Fade(NamedTuple):
    lo: int  # first frame of the fade (of its fade-out's ramp, or of its black after a hard cut)
    hi: int  # last frame of the fade (of its fade-in's ramp, or of its black before a hard cut)
    cut: int | None  # where the one cut goes; None: the fade is the source's start or end


def fade_at(levels: Sequence[float], contrast: Sequence[float], c: int, black: float, limit: int,
            open_start: bool = False, open_end: bool = False) -> Fade | None:
    """The fade through black (white) that frame c (an index into the lists) is in, if any.

    Its black (under `black`, or over 255 - black) is the extreme near c; on each side of it
    is a fade's ramp (`ramp`), a hard step (a hard cut into or out of the black), or, where
    `open_start` (`open_end`) says the lists begin (end) with the source, the source's start
    (end). At least one side must be a ramp. The cut goes in the middle of the frames under
    half their shot's steady level when both sides are ramps, at the hard step when one is
    one, nowhere when the fade starts or ends the source."""
    n = len(levels)
    lo_w, hi_w = max(0, c - limit), min(n - 1, c + limit)
    for white in (False, True):
        x = _from_extreme(levels, white)
        low = min(x[lo_w:hi_w + 1])
        if low >= black:
            continue
        m = min((i for i in range(lo_w, hi_w + 1) if x[i] <= low + 1.0 and x[i] < black), key=lambda i: abs(i - c))
        left = ramp(x[m::-1], contrast[m::-1], black, limit)
        right = ramp(x[m:], contrast[m:], black, limit)
        kinds = []
        for side, length, source_edge in ((left, m + 1, open_start), (right, n - m, open_end)):
            if side.fade:
                kinds.append("ramp")
            elif side.black == length:
                kinds.append("source" if source_edge else None)
            elif side.frames - side.black <= 1 and side.steady >= 2 * black:
                kinds.append("step")
            else:
                kinds.append(None)
        if None in kinds or "ramp" not in kinds:
            continue
        lo = m - (left.frames if kinds[0] == "ramp" else left.black) + 1
        hi = m + (right.frames if kinds[1] == "ramp" else right.black) - 1
        if not lo - 1 <= c <= hi + 1:
            continue
        if "source" in kinds:
            return Fade(lo, hi, None)
        if kinds[0] == "step":
            return Fade(lo, hi, lo)
        if kinds[1] == "step":
            return Fade(lo, hi, hi + 1)
        p = m
        while p - 1 >= lo and x[p - 1] <= 0.5 * left.steady:
            p -= 1
        q = m
        while q + 1 <= hi and x[q + 1] <= 0.5 * right.steady:
            q += 1
        return Fade(lo, hi, (p + q + 1) // 2)
    return None
