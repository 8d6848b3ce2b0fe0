"""Dissolves (cross-fades): the span of frames in which two shots are blended, which the
segmenter cuts out of both clips as a fade's ramp is (_Segmenter._join_dissolve_cuts), the
one cut the dissolve gets, and candidate cuts in dissolves too long for the dissolve detector.

A dissolve mixes two moving pictures, frame t = (1 - a_t) * A_t + a_t * B_t, the weight a_t
going steadily from 0 to 1 (linearly, or eased: slow at both ends). With P a frame of the
first shot just before the dissolve and Q one of the second just after it, each frame's
weight is its least-squares position on the line from P to Q (`weights`),
    a_t = <F_t - P, Q - P> / |Q - P|^2,
on small colour thumbnails (stages/dissolve.thumbnail, 64 px wide) less their mean level.
The shots' own motion adds to it: a picture that moves away from P is, on that line,
|A_t - P|^2 / 2 further from P (and B_t from Q), which `_unbiased` takes out, the change
measured over as many frames beyond the reference. The span is the frames around the cut in
which both shots weigh at least DISSOLVE_MIN_WEIGHT: the 5% within which a fade's frame is at
its shot's steady level (stages/split/fades.py, FADE_STEADY_TOL). A frame outside it belongs
to one shot. The dissolve's one cut is in the span's middle.

P and Q must be outside the span but near it, and are found by iteration (`dissolve_at`):
references two frames either side of the cut, the span they give, new references
`ramp_margin` frames outside that span, until the span stays put (within `reach` frames of
the cut). Starting next to the cut, the references move out with the span and stop where
the shots are alone. The margin is the part of an eased dissolve (smoothstep, the slowest
start of the usual curves) under the threshold at one end, so that a reference is not a
blended frame (a linear one needs less). A reference that still weighs w of the other shot
moves the edge it measures by about w / (the weights' slope there) frames.

What is not a dissolve (None), by the tests the dissolve detector applies to its windows
(stages/dissolve.py), here applied to the span and its references:
  - a hard cut: no frame at the cut has both shots at DISSOLVE_MIN_WEIGHT or more;
  - a fade, a light switched on, a change of exposure: P and Q are one picture (correlated
    above MAX_CORRELATION), or one of them is black or white (MIN_LEVEL from either end);
  - not a steady blend: the weights go back by more than DISSOLVE_MIN_WEIGHT, P and Q differ
    by less than MIN_CHANGE, or a frame lies further from its mix of P and Q than
    MAX_RESIDUAL of their change plus what the shots change by themselves over those frames;
  - one moving picture (a pan, a zoom, a change of exposure during a pan): over the span the
    frames keep one picture's contrast instead of losing a blend's, which motion alone leaves
    as it is;
  - a dissolve longer than `max_frames`, or one whose references fall outside the frames
    given (another shot, the source's start or end, frames not decoded yet).
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

import numpy as np

from stages.dissolve import MAX_CORRELATION, MAX_RESIDUAL, MIN_CHANGE, MIN_LEVEL
from stages.split.fades import FADE_STEADY_TOL

DISSOLVE_MIN_WEIGHT = FADE_STEADY_TOL  # a frame is blended while both shots weigh at least this
MAX_ITERATIONS = 16  # from 5 frames, a span grows by a third and 2 frames each step: 50 frames in 7


def _smoothstep_share(weight: float) -> float:
    """Where (0-0.5, as a share of the dissolve) an eased dissolve, 3u^2 - 2u^3, reaches `weight`."""
    lo, hi = 0.0, 0.5
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 3 * mid * mid - 2 * mid ** 3 < weight else (lo, mid)
    return hi


EASE_START = _smoothstep_share(DISSOLVE_MIN_WEIGHT)  # 0.138 of an eased dissolve is under 5%, each end


def ramp_margin(span_frames: int) -> int:
    """Frames between a measured span and its references: the frames an eased dissolve spends
    under DISSOLVE_MIN_WEIGHT at one end (EASE_START of the whole dissolve, of which the span
    is 1 - 2 * EASE_START), plus one."""
    return math.ceil(EASE_START / (1 - 2 * EASE_START) * span_frames) + 1


def reach(max_frames: int) -> int:
    """Frames either side of a cut that the measurement reads for a dissolve of up to
    `max_frames` centred on it: half of it, its margin and the reference."""
    return (max_frames + 1) // 2 + ramp_margin(max_frames) + 1


class Dissolve(NamedTuple):
    lo: int  # first frame of the span (both shots weigh at least DISSOLVE_MIN_WEIGHT)
    hi: int  # last frame of the span
    cut: int  # the dissolve's one cut: the first frame of the span's second half


def weights(thumbs: np.ndarray, p: int, q: int) -> np.ndarray:
    """Each frame's position on the line from thumbs[p] to thumbs[q]: 0 at p, 1 at q. (n,)
    (dissolve_at passes thumbnails less their mean level: a frame's level follows the blend as
    its picture does, and without it the level drifts of a moving shot weigh in.)"""
    flat = thumbs.reshape(len(thumbs), -1)  # (n, h * w * 3)
    v = flat[q] - flat[p]
    # einsum's own loop: a BLAS matrix-vector product spreads this over threads, 15x slower
    # on a busy machine for 100 frames of 7k values.
    return (np.einsum("ij,j->i", flat, v) - float(np.dot(flat[p], v))) / max(float(np.dot(v, v)), 1e-9)


def _span(w: np.ndarray, c: int, p: int, q: int) -> tuple[int, int] | None:
    """The frames around c (or c - 1: a cut is the first frame of the new shot) strictly
    between p and q whose weights are both at least DISSOLVE_MIN_WEIGHT."""
    eps = DISSOLVE_MIN_WEIGHT
    start = next((i for i in (c, c - 1) if p < i < q and eps <= w[i] <= 1 - eps), None)
    if start is None:
        return None
    lo = hi = start
    while lo - 1 > p and w[lo - 1] >= eps:
        lo -= 1
    while hi + 1 < q and w[hi + 1] <= 1 - eps:
        hi += 1
    return lo, hi


def _own_change(thumbs: np.ndarray, ref: int, step: int, frames: int) -> tuple[float, float]:
    """How much the shot at thumbs[ref] changes by itself (its motion, its noise) over `frames`
    frames: (mean absolute difference, sum of squared differences) to the frame that far
    beyond it (step -1: before, +1: after), or to the farthest one there is, scaled up
    linearly; (0, 0) when there is none."""
    there = ref if step < 0 else len(thumbs) - 1 - ref
    seen = min(frames, there)
    if seen <= 0:
        return 0.0, 0.0
    diff = thumbs[ref] - thumbs[ref + step * seen]
    return float(np.abs(diff).mean()) * frames / seen, float(np.vdot(diff, diff)) * frames / seen


def _unbiased(thumbs: np.ndarray, w: np.ndarray, p: int, q: int) -> np.ndarray:
    """The weights of the frames between p and q with the shots' own motion taken out. With
    A_t = P + dA and B_t = Q + dB, a frame's weight is a + (1 - a) <dA, Q - P> / |Q - P|^2 +
    a <dB, Q - P> / |Q - P|^2, and a picture that moves away from P is, on the line from P to
    Q, |dA|^2 / 2 further from P (<dA, P> = -|dA|^2 / 2 for a picture that keeps its
    contrast; <dA, Q> averages out): the pure frames of a moving shot look blended, the
    more so the further the reference. |dA|^2 over t - p frames (|dB|^2 over q - t) is
    measured beyond the reference (_own_change)."""
    v = thumbs[q] - thumbs[p]
    scale = 2.0 * max(float(np.vdot(v, v)), 1e-9)
    out = w.copy()
    for t in range(p + 1, q):
        moved_a, moved_b = _own_change(thumbs, p, -1, t - p)[1], _own_change(thumbs, q, 1, q - t)[1]
        out[t] = w[t] - (1 - w[t]) * moved_a / scale + w[t] * moved_b / scale
    return out


def _blends(thumbs: np.ndarray, w: np.ndarray, lo: int, hi: int, p: int, q: int) -> bool:
    """Whether every frame t of lo..hi is its mix of the references: within MAX_RESIDUAL of
    their change, as the dissolve detector asks of a window's middle, plus what the two shots
    change by themselves between the references and t (each in its share), measured beyond
    the references: F_t - mix = (1 - w)(A_t - P) + w(B_t - Q)."""
    first, last = thumbs[p], thumbs[q]
    change = float(np.abs(last - first).mean())
    for t in range(lo, hi + 1):
        moved = (1 - w[t]) * _own_change(thumbs, p, -1, t - p)[0] + w[t] * _own_change(thumbs, q, 1, q - t)[0]
        if float(np.abs(thumbs[t] - ((1 - w[t]) * first + w[t] * last)).mean()) > MAX_RESIDUAL * change + moved:
            return False
    return True


def two_pictures(first: np.ndarray, last: np.ndarray) -> bool:
    """Whether two thumbnails are two different pictures a dissolve could join: neither dark
    nor white (a fade's end), far enough apart, and not one picture brightened or dimmed
    (their mean-removed patterns not correlated)."""
    levels = (float(first.mean()), float(last.mean()))
    if min(levels) < MIN_LEVEL or max(levels) > 255.0 - MIN_LEVEL:
        return False
    if float(np.abs(last - first).mean()) < MIN_CHANGE:
        return False
    a, b = first - levels[0], last - levels[1]
    return float((a * b).sum()) <= MAX_CORRELATION * float(np.sqrt((a * a).sum() * (b * b).sum()))


def _is_mix(thumbs: np.ndarray, w: np.ndarray, lo: int, hi: int, p: int, q: int) -> bool:
    """Whether frames lo..hi are a steady blend of two different pictures, thumbs[p] and
    thumbs[q] (the module docstring's tests)."""
    first, last = thumbs[p], thumbs[q]
    if not two_pictures(first, last):
        return False
    if float(np.diff(w[p:q + 1]).min()) < -DISSOLVE_MIN_WEIGHT:
        return False
    # One picture moving keeps its contrast; a blend of two loses some (half-way, two pictures
    # correlated rho keep sqrt((1 + rho) / 2) of it). Over the span the frames' contrast must be
    # nearer the blend's than one picture's going from P's to Q's: a pan of a smooth picture
    # is otherwise close to a mix of its ends, the more so as the shots' motion is allowed for.
    span = range(lo, hi + 1)
    contrast = [float(thumbs[t].std()) for t in span]
    blend = [float(((1 - w[t]) * first + w[t] * last).std()) for t in span]
    one = [(1 - w[t]) * float(first.std()) + w[t] * float(last.std()) for t in span]
    if sum(abs(x - y) for x, y in zip(contrast, blend)) >= sum(abs(x - y) for x, y in zip(contrast, one)):
        return False
    return _blends(thumbs, w, lo, hi, p, q)


def dissolve_at(thumbs: np.ndarray, c: int, max_frames: int) -> Dissolve | None:
    """The dissolve that the cut at frame c (an index into thumbs) is in, if any.

    thumbs: (n, h, w, 3) float32 thumbnails of consecutive frames of one shot pair (none of
    another shot). The span and its references are looked for within `reach(max_frames)` of
    c: all those frames must be there unless the source starts or ends there. Frames further
    out (up to another `ramp_margin(max_frames)`) tell how much the shots move by themselves.
    The span must be at most `max_frames` long, with a reference on each side."""
    n = len(thumbs)
    first, last = max(0, c - reach(max_frames)), min(n - 1, c + reach(max_frames))
    centred = thumbs - thumbs.mean(axis=(1, 2, 3), keepdims=True)
    # The references start next to the cut, where the shots' motion has not moved the
    # pictures yet, and move out with the span until it stays put.
    p, q = max(first, c - 2), min(last, c + 2)
    seen: list[tuple[int, int]] = []
    for _ in range(MAX_ITERATIONS):
        w = _unbiased(centred, weights(centred, p, q), p, q)
        found = _span(w, c, p, q)
        if found is None:
            return None
        if seen and found == seen[-1]:
            break
        if found in seen:
            # A cycle (an edge frame at the threshold, in and out as the reference moves by
            # one): the widest span of the cycle, measured from its own references.
            cycle = seen[seen.index(found):]
            found = min(s[0] for s in cycle), max(s[1] for s in cycle)
            margin = ramp_margin(found[1] - found[0] + 1)
            p, q = max(first, found[0] - margin), min(last, found[1] + margin)
            w = _unbiased(centred, weights(centred, p, q), p, q)
            seen.append(found)
            break
        seen.append(found)
        margin = ramp_margin(found[1] - found[0] + 1)
        p, q = max(first, found[0] - margin), min(last, found[1] + margin)
    else:
        return None  # the span kept moving
    lo, hi = seen[-1]
    if hi - lo + 1 > max_frames or not (p < lo and hi < q) or not _is_mix(thumbs, w, lo, hi, p, q):
        return None
    # The one cut: the first frame of the span's second half, where the new shot weighs more
    # than half on a symmetric curve (linear, eased). The span's ends are measured from near
    # references; the weights half-way, furthest from both, carry the shots' motion the most.
    return Dissolve(lo, hi, (lo + hi + 2) // 2)


class LongDissolves:
    """Candidate cuts in dissolves too long for the dissolve detector (stages/dissolve.py: its
    12-frame windows see the two ends of a 48-frame dissolve as one picture, three quarters
    of each being the same mix). A window of `window` frames (the longest dissolve trimmed)
    passes where its two ends are two different pictures (MIN_CHANGE apart, correlated at
    most MAX_CORRELATION, neither black nor white) and its middle frame has a blend's
    contrast rather than one picture's (as _is_mix asks; motion leaves contrast alone). The
    windows that pass come in a run around a dissolve: its centre is reported when the run
    ends, `window` frames after the dissolve's first at most. A candidate is only a cut if
    dissolve_at measures a dissolve there (the segmenter's _join_dissolve_cuts)."""

    def __init__(self, window: int):
        self.window = window
        self.thumbs: collections.deque[np.ndarray] = collections.deque(maxlen=window + 1)
        self.run: list[int] = []  # middle frames of consecutive windows that pass

    @property
    def latency(self) -> int:
        return self.window + 1

    def _passes(self) -> bool:
        first, middle, last = self.thumbs[0], self.thumbs[self.window // 2], self.thumbs[-1]
        if not two_pictures(first, last):
            return False
        blend = float(((first + last) / 2).std())
        one = (float(first.std()) + float(last.std())) / 2
        return abs(float(middle.std()) - blend) < abs(float(middle.std()) - one)

    def push(self, index: int, thumb: np.ndarray) -> int | None:
        """Take frame `index`'s thumbnail; return a candidate cut when a run of windows ends."""
        self.thumbs.append(thumb.astype(np.float32))
        if len(self.thumbs) > self.window and self._passes():
            self.run.append(index - self.window + self.window // 2)
            return None
        return self.end()

    def end(self) -> int | None:
        """The centre of the run of passing windows, if one has just ended."""
        run, self.run = self.run, []
        return (run[0] + run[-1] + 1) // 2 if run else None
