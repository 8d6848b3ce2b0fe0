"""One source's frames into clips: _Segmenter runs the detectors on each frame, applies the
cuts (merged, the cuts inside one fade made one, a dissolve's span cut out, flashes dropped,
a backward timestamp jump cut) and assigns frames to clips once they are `lag` frames behind
the decoder."""

from __future__ import annotations

import collections
import itertools
import logging
import math
from fractions import Fraction
from typing import Any, NamedTuple

import av
import cv2
import numpy as np

from stages.dissolve import thumbnail
from stages.split.clip import _ClipBuilder, _Frame
from stages.split.cuts import (
    FLASH_MATCH_SHARE,
    FLASH_MAX_FRAMES,
    FLASH_MAX_MATCH,
    FLASH_MIN_JUMP,
    CutMerger,
    frame_distance,
    make_detector,
    share_content_scores,
    spec_at_rate,
)
from stages.split.dissolves import LongDissolves, dissolve_at, ramp_margin, reach
from stages.split.fades import fade_at, measure
from stages.split.scale import FrameScaler, SourceColour, even, output_size

from stages.split.settings import SplitSettings

log = logging.getLogger(__name__)


class _Scaled(NamedTuple):
    """A decoded frame after the work that needs no other frame (FrameScaler, detector copy)."""

    time: float | None  # the frame's timestamp in seconds, as decoded
    bgr: np.ndarray
    encodable: av.VideoFrame | None
    detect: np.ndarray  # the small copy the detectors read
    dark: bool
    level: float
    contrast: float
    thumb: np.ndarray | None  # for the dissolve span (stages/split/dissolves.py), when dissolves are trimmed


class _Segmenter:
    """One source's frames into clips: detectors, cut merging, and the assignment of frames
    to clips once they are `lag` frames behind the decoder (see stages/split/__init__.py)."""

    def __init__(self, settings: SplitSettings, rate: Fraction, stats: dict[str, Any]):
        self.settings, self.rate, self.stats = settings, rate, stats
        self.detectors = [make_detector(spec_at_rate(spec, rate)) for spec in settings.detector_specs]
        self.order = share_content_scores(self.detectors)
        self.lag = max(int(math.ceil(settings.lag_s * float(rate))),
                       max(getattr(d, "event_buffer_length", 0) for d in self.detectors) + 2,
                       settings.trim_frames + 1)
        self.max_frames = max(1, int(math.floor(settings.max_duration_s * float(rate) + 1e-6)))
        self.pending: collections.deque[_Frame] = collections.deque()  # decoded, not yet assigned
        self.cuts: set[int] = set()
        self.merger = CutMerger(self.cuts, settings.merge_cuts_within_frames, rate)
        self.clip: _ClipBuilder | None = None
        self.skip_until = -1
        self.index = -1
        self.scaler: FrameScaler | None = None
        self.t0: float | None = None
        self.shift = 0.0  # added to timestamps after a backward jump, so source time only advances
        self.last_t = -math.inf
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=FLASH_MAX_FRAMES)  # last assigned frames' BGR
        # One cut per fade (_join_fade_cuts): the levels of the last assigned frames, the cuts
        # already looked at, and the fades whose cuts were joined (first, last frame, cut).
        self.fade_frames = settings.fade_frames(rate)
        self.fade_horizon = min(self.fade_frames, self.lag // 3)
        self.history: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=self.lag)
        self.fade_checked: set[int] = set()
        self.fades: collections.deque[tuple[int, int, int | None]] = collections.deque(maxlen=8)
        self.ended = False  # the decoder is done: the last pending frame is the source's last
        # A dissolve's span cut out (_join_dissolve_cuts): the span is measured on thumbnails
        # `dissolve_reach` frames either side of a cut (and `dissolve_ahead` more, where the shots'
        # own motion is read) once they are decoded, and must still be waiting then; so the lag
        # covers that (or the detectors' latency, or that of the long dissolves' candidates)
        # and half the longest dissolve (the cut is about its middle). The fades' horizon above
        # is left as it was. Frames of the last assigned ones since the shot began (their
        # thumbnails), the cuts and candidates looked at, the spans decided (first, last frame,
        # cut) and the next clip's share of the last one.
        self.dissolve_frames = settings.dissolve_frames(rate)
        self.dissolve_reach = reach(self.dissolve_frames) if self.dissolve_frames else 0
        self.dissolve_ahead = self.dissolve_reach + ramp_margin(self.dissolve_frames) if self.dissolve_frames else 0
        self.long_dissolves = LongDissolves(self.dissolve_frames) if self.dissolve_frames >= 4 else None
        if self.dissolve_frames:
            latency = max([getattr(d, "event_buffer_length", 0) for d in self.detectors]
                          + [self.long_dissolves.latency if self.long_dissolves else 0])
            self.lag = max(self.lag, max(self.dissolve_ahead, latency) + (self.dissolve_frames + 1) // 2 + 1)
        self.thumbs: collections.deque[tuple[int, np.ndarray]] = collections.deque(maxlen=self.dissolve_ahead + 1)
        self.candidates: set[int] = set()  # LongDissolves' cuts, cuts only if a dissolve is measured there
        self.shot_start = 0  # the first frame after the last cut or dissolve applied
        self.dissolve_checked: set[int] = set()
        self.dissolves: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=8)
        self.gaps: dict[int, tuple[int, int, int]] = {}  # first frame of a span not yet reached -> the span
        self.dissolve_after = 0  # frames of the last dissolve cut from the start of the clip after it
        from scenedetect import FrameTimecode

        self._timecode = FrameTimecode

    def _start(self, frame: av.VideoFrame) -> None:
        rotation = int(getattr(frame, "rotation", 0) or 0) % 360
        w, h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        size = output_size(w, h, self.settings.short_side_px)
        self.scaler = FrameScaler(size, rotation, SourceColour.of(frame))
        small_w = min(self.settings.detect_width_px, size[0])
        self.detect_size = (even(small_w), even(small_w * size[1] / size[0]))

    def _time(self, time: float | None) -> float:
        """Seconds since the first frame, from a frame's timestamp `time`; a jump back (a
        spliced or broken stream) is a cut, and time goes on from the frame before it."""
        t = float(time) if time is not None else self.index / float(self.rate)
        if self.t0 is None:
            self.t0 = t
        t = t - self.t0 + self.shift
        if t < self.last_t - 0.5 / float(self.rate):
            log.debug("timestamps jump back %.3f s at frame %d: cut there", self.last_t - t, self.index)
            self.shift += self.last_t + 1.0 / float(self.rate) - t
            t = self.last_t + 1.0 / float(self.rate)
            self.cuts.add(self.index)
        self.last_t = max(self.last_t, t)
        return t

    def prepare(self, frame: av.VideoFrame) -> _Scaled:
        """The per-frame work that needs no other frame (run ahead, in the decoding thread)."""
        if self.scaler is None:
            self._start(frame)
        small, encodable = self.scaler(frame)
        # Bilinear is 10x cheaper than area here, and detectors only compare frame statistics.
        detect = cv2.resize(small, self.detect_size, interpolation=cv2.INTER_LINEAR)
        level, contrast = measure(detect)
        thumb = thumbnail(detect) if self.dissolve_frames else None
        return _Scaled(frame.time, small, encodable, detect, level < self.settings.trim_dark_below, level, contrast,
                       thumb)

    def push(self, scaled: _Scaled):
        """Take the next prepared frame; yield the clips it lets finish."""
        self.index += 1
        small, encodable, detect = scaled.bgr, scaled.encodable, scaled.detect
        self.pending.append(_Frame(self.index, self._time(scaled.time), small, encodable, scaled.dark,
                                   scaled.level, scaled.contrast, scaled.thumb))
        timecode = self._timecode(self.index, fps=self.rate)
        for d in self.order:
            for cut in self.detectors[d].process_frame(timecode, detect):
                self.merger.add(int(cut.frame_num), d, self.pending)
        if self.long_dissolves is not None:
            candidate = self.long_dissolves.push(self.index, scaled.thumb)
            if candidate is not None:
                self.candidates.add(candidate)
        while self.pending and self.pending[0].index <= self.index - self.lag:
            yield from self._assign(self.pending.popleft())

    def end(self):
        """The source ended: the detectors' last cuts, then every frame still held."""
        if self.index < 0:
            raise ValueError("no decodable video frames")
        end = self._timecode(self.index, fps=self.rate)
        for d, det in enumerate(self.detectors):
            post = getattr(det, "post_process", None)
            for cut in (post(end) if post else []) or []:
                self.merger.add(int(cut.frame_num), d, self.pending)
        if self.long_dissolves is not None:
            candidate = self.long_dissolves.end()
            if candidate is not None:
                self.candidates.add(candidate)
        self.ended = True
        self.fade_checked.clear()  # a fade that runs into the source's end is one now
        while self.pending:
            yield from self._assign(self.pending.popleft())
        if self.clip is not None:
            yield from self._emit(drop_tail=False, next_t=None)

    def _is_flash(self, frame: _Frame) -> bool:
        """Whether a cut at `frame` is a flash (a camera flash, a white frame or two, a brief
        insert): some frame of the few before the cut matches some frame of the few after it
        far better than the frames on each side of the cut match each other."""
        if not self.recent:
            return False
        before = [thumbnail(b, grey=True) for b in self.recent]
        after = [thumbnail(f.bgr, grey=True) for f in itertools.islice(self.pending, FLASH_MAX_FRAMES)]
        across = frame_distance(before[-1], thumbnail(frame.bgr, grey=True))
        if across < FLASH_MIN_JUMP or not after:
            return False
        best = min(frame_distance(a, b) for a in before for b in after)
        return best < min(FLASH_MATCH_SHARE * across, FLASH_MAX_MATCH)

    def _join_fade_cuts(self, frame: _Frame) -> None:
        """One cut per fade: the cuts (of any detector) that fall in one fade through black
        or white (stages/split/fades.py, fade_at: its ramps and its black) become one, in the
        middle of the frames under half their shot's steady level. Content and adaptive cut
        where the picture gets dark, the fade detector in the middle of the black, the
        dissolve detector sometimes in a ramp. A fade into the black of a hard cut gets its cut
        at the hard cut; a fade that starts or ends the source gets none. Each cut is looked at
        once (again when the source has ended), when it is at most `fade_horizon` frames ahead
        of `frame` (the next frame to assign): the fade's frames before it are in `history`,
        those after it in `pending`. A cut whose fade's centre was already assigned goes to
        `frame`."""
        k = frame.index
        todo = sorted(c for c in self.cuts if c <= k + self.fade_horizon and c not in self.fade_checked)
        if not todo:
            return
        series = [*self.history, (k, frame.level, frame.contrast),
                  *((f.index, f.level, f.contrast) for f in self.pending)]
        base = series[0][0]
        levels = [s[1] for s in series]
        contrast = [s[2] for s in series]
        for c in todo:
            self.fade_checked.add(c)
            if c not in self.cuts:
                continue
            done = next((f for f in self.fades if f[0] - 1 <= c <= f[1] + 1), None)
            if done is not None:  # a late cut in a fade already joined
                others = any(d != c and done[0] - 1 <= d <= done[1] + 1 for d in self.cuts)
                if done[2] is None or done[2] < k or others:
                    self.merger.join(c, c, None)
                continue
            if not 0 <= c - base < len(levels):
                continue
            fade = fade_at(levels, contrast, c - base, self.settings.trim_dark_below, self.fade_frames,
                           open_start=base == 0, open_end=self.ended)
            if fade is None:
                continue
            lo, hi = fade.lo + base, fade.hi + base
            cut = None if fade.cut is None else max(k, fade.cut + base)
            log.debug("cuts %s in the fade at frames %d-%d: one cut at %s",
                      sorted(d for d in self.cuts if lo - 1 <= d <= hi + 1), lo, hi, cut)
            self.merger.join(lo - 1, hi + 1, cut)
            if cut is not None:
                self.fade_checked.add(cut)
            self.fades.append((lo, hi, cut))
        self.fade_checked = {c for c in self.fade_checked if c >= k}

    def _join_dissolve_cuts(self, frame: _Frame) -> None:
        """A dissolve's span (stages/split/dissolves.py: the frames in which both shots weigh
        at least 5%) is cut out of the clips on both sides, and its cuts (of any detector:
        the dissolve detector about its middle, content or adaptive where a short one changes
        most) become one, in the span's middle. Each cut, and each candidate of LongDissolves
        (a cut only if a dissolve is measured there), is looked at once, when `dissolve_ahead`
        frames past it are decoded (or the source has ended): the span's frames before `frame`
        (the next to assign) are then thumbnails in `thumbs`, those from it on in `pending`.
        A span longer than the longest trimmed, or not a dissolve, leaves a cut as it is.
        Cuts that come later inside a decided span are dropped."""
        k = frame.index
        for lo, hi, cut in self.dissolves:
            inside = {c for c in self.cuts if lo - 1 <= c <= hi + 1}
            if lo in self.gaps and inside != {cut}:  # not applied yet: its one cut, and only it
                self.merger.join(lo - 1, hi + 1, cut)
            elif lo not in self.gaps and inside:
                self.merger.join(lo - 1, hi + 1, None)
        ripe = sorted(c for c in self.cuts | self.candidates if c not in self.dissolve_checked
                      and (self.ended or c + self.dissolve_ahead <= self.index))
        for c in ripe:
            self.dissolve_checked.add(c)
            self.candidates.discard(c)
            if c < k or any(lo - 1 <= c <= hi + 1 for lo, hi, _ in [*self.fades, *self.dissolves]):
                continue
            first = max(self.shot_start, c - self.dissolve_ahead)
            window = [(i, t) for i, t in self.thumbs if i >= first] + [(k, frame.thumb)] + [
                (f.index, f.thumb) for f in self.pending if f.index <= c + self.dissolve_ahead]
            base = window[0][0]
            found = dissolve_at(np.stack([t for _, t in window]).astype(np.float32), c - base, self.dissolve_frames)
            if found is None:
                continue
            lo, hi, cut = found.lo + base, found.hi + base, found.cut + base
            if lo < k:  # its first frames went to the clip already (a source whose lag_s is too short)
                log.debug("dissolve at frames %d-%d: frames %d-%d already assigned", lo, hi, lo, k - 1)
                lo = k
            log.debug("cuts %s in the dissolve at frames %d-%d: its span cut out, one cut at %d",
                      sorted(d for d in self.cuts if lo - 1 <= d <= hi + 1), lo, hi, cut)
            self.merger.join(lo - 1, hi + 1, cut)
            self.dissolve_checked.add(cut)
            self.fade_checked.add(cut)
            self.dissolves.append((lo, hi, cut))
            self.gaps[lo] = (lo, hi, cut)
        self.dissolve_checked = {c for c in self.dissolve_checked if c >= k}

    def _cut_dissolve(self, frame: _Frame):
        """The first frame of a dissolve's span: the clip before ends here, the span's frames
        go to no clip, and each clip counts the frames it lost (before the dissolve's cut the
        clip before, from it on the clip after)."""
        lo, hi, cut = self.gaps.pop(frame.index)
        self.cuts.discard(cut)
        self.stats.setdefault("cuts", []).append(cut)
        if self.clip is not None:
            self.clip.dissolve_trimmed += max(0, cut - lo)
            yield from self._emit(drop_tail=True, next_t=frame.t)
        self.dissolve_after = hi + 1 - max(cut, lo)
        self.skip_until = hi + 1 + self.settings.trim_frames
        self.shot_start = hi + 1

    def _assign(self, frame: _Frame):
        if self.fade_frames:
            self._join_fade_cuts(frame)
        if self.dissolve_frames:
            self._join_dissolve_cuts(frame)
            self.thumbs.append((frame.index, frame.thumb))
            if frame.index in self.gaps:
                yield from self._cut_dissolve(frame)
        cut_here = [c for c in self.cuts if c <= frame.index]
        self.cuts.difference_update(cut_here)
        if cut_here and self._is_flash(frame):
            log.debug("cut at frame %d is a flash: the shot goes on after it", frame.index)
            self.merger.flashes.append(frame.index)
            cut_here = []
        self.recent.append(frame.bgr)
        self.history.append((frame.index, frame.level, frame.contrast))
        if cut_here:
            late = [c for c in cut_here if c < frame.index]
            if late:
                log.warning("cut at frame %s reported after frame %d was assigned; "
                            "raise split.lag_s", late, frame.index - 1)
            self.stats.setdefault("cuts", []).append(frame.index)
            if self.clip is not None:
                yield from self._emit(drop_tail=True, next_t=frame.t)
            # trim the new shot's first frames (not fewer than a dissolve's span being cut out)
            self.skip_until = max(self.skip_until, frame.index + self.settings.trim_frames)
            self.shot_start = max(self.shot_start, frame.index)
            self.dissolve_after = 0
        if frame.index < self.skip_until:
            return
        if self.clip is not None and self.clip.length >= self.max_frames:
            yield from self._emit(drop_tail=False, next_t=frame.t, fade_end=False)  # chunk boundary, not a cut
            self.clip = _ClipBuilder(self.rate, self.scaler, self.settings, fade_start=False)
        if self.clip is None:
            self.clip = _ClipBuilder(self.rate, self.scaler, self.settings)
            self.clip.dissolve_trimmed, self.dissolve_after = self.dissolve_after, 0
        self.clip.add(frame)

    def _emit(self, drop_tail: bool, next_t: float | None, fade_end: bool = True):
        clip, self.clip = self.clip, None
        try:
            row = clip.finish(drop_tail=drop_tail, next_t=next_t, fade_end=fade_end)
        finally:
            self.stats["longest_frames"] = max(self.stats.get("longest_frames", 0), clip.count)
        if row is not None:
            yield row

    def abort(self) -> None:
        """An error or an abandoned generator must not leave an encoder thread waiting."""
        if self.clip is not None:
            self.clip.abort()
