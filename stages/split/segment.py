"""One source's frames into clips: _Segmenter runs the detectors on each frame, applies the
cuts (merged, flashes dropped, a backward timestamp jump cut) and assigns frames to clips
once they are `lag` frames behind the decoder."""

from __future__ import annotations

import collections
import itertools
import logging
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple

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
from stages.split.scale import FrameScaler, SourceColour, even, output_size

if TYPE_CHECKING:
    from stages.split.stage import SplitStage

log = logging.getLogger(__name__)


class _Scaled(NamedTuple):
    """A decoded frame after the work that needs no other frame (FrameScaler, detector copy)."""

    time: float | None  # the frame's timestamp in seconds, as decoded
    bgr: np.ndarray
    encodable: av.VideoFrame | None
    detect: np.ndarray  # the small copy the detectors read
    dark: bool


class _Segmenter:
    """One source's frames into clips: detectors, cut merging, and the assignment of frames
    to clips once they are `lag` frames behind the decoder (see stages/split/__init__.py)."""

    def __init__(self, stage: "SplitStage", rate: Fraction, stats: dict[str, Any]):
        self.stage, self.rate, self.stats = stage, rate, stats
        self.detectors = [make_detector(spec_at_rate(spec, rate)) for spec in stage.detector_specs]
        self.order = share_content_scores(self.detectors)
        self.lag = max(int(math.ceil(stage.lag_s * float(rate))),
                       max(getattr(d, "event_buffer_length", 0) for d in self.detectors) + 2,
                       stage.trim_frames + 1)
        self.max_frames = max(1, int(math.floor(stage.max_duration_s * float(rate) + 1e-6)))
        self.pending: collections.deque[_Frame] = collections.deque()  # decoded, not yet assigned
        self.cuts: set[int] = set()
        self.merger = CutMerger(self.cuts, stage.merge_cuts_within_frames, rate)
        self.clip: _ClipBuilder | None = None
        self.skip_until = -1
        self.index = -1
        self.scaler: FrameScaler | None = None
        self.t0: float | None = None
        self.shift = 0.0  # added to timestamps after a backward jump, so source time only advances
        self.last_t = -math.inf
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=FLASH_MAX_FRAMES)  # last assigned frames' BGR
        from scenedetect import FrameTimecode

        self._timecode = FrameTimecode

    def _start(self, frame: av.VideoFrame) -> None:
        rotation = int(getattr(frame, "rotation", 0) or 0) % 360
        w, h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        size = output_size(w, h, self.stage.short_side_px)
        self.scaler = FrameScaler(size, rotation, SourceColour.of(frame))
        small_w = min(self.stage.detect_width_px, size[0])
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
        dark = float(np.mean(cv2.mean(detect)[:3])) < self.stage.trim_dark_below
        return _Scaled(frame.time, small, encodable, detect, dark)

    def push(self, scaled: _Scaled):
        """Take the next prepared frame; yield the clips it lets finish."""
        self.index += 1
        small, encodable, detect, dark = scaled.bgr, scaled.encodable, scaled.detect, scaled.dark
        self.pending.append(_Frame(self.index, self._time(scaled.time), small, encodable, dark))
        timecode = self._timecode(self.index, fps=self.rate)
        for d in self.order:
            for cut in self.detectors[d].process_frame(timecode, detect):
                self.merger.add(int(cut.frame_num), d, self.pending)
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

    def _assign(self, frame: _Frame):
        cut_here = [c for c in self.cuts if c <= frame.index]
        self.cuts.difference_update(cut_here)
        if cut_here and self._is_flash(frame):
            log.debug("cut at frame %d is a flash: the shot goes on after it", frame.index)
            self.merger.flashes.append(frame.index)
            cut_here = []
        self.recent.append(frame.bgr)
        if cut_here:
            late = [c for c in cut_here if c < frame.index]
            if late:
                log.warning("cut at frame %s reported after frame %d was assigned; "
                            "raise split.lag_s", late, frame.index - 1)
            if self.clip is not None:
                yield from self._emit(drop_tail=True, next_t=frame.t)
            self.skip_until = frame.index + self.stage.trim_frames  # trim the new shot's first frames
        if frame.index < self.skip_until:
            return
        if self.clip is not None and self.clip.length >= self.max_frames:
            yield from self._emit(drop_tail=False, next_t=frame.t)  # chunk boundary, not a cut
        if self.clip is None:
            self.clip = _ClipBuilder(self.rate, self.scaler, self.stage)
        self.clip.add(frame)

    def _emit(self, drop_tail: bool, next_t: float | None):
        clip, self.clip = self.clip, None
        try:
            row = clip.finish(drop_tail=drop_tail, next_t=next_t)
        finally:
            self.stats["longest_frames"] = max(self.stats.get("longest_frames", 0), clip.count)
        if row is not None:
            yield row

    def abort(self) -> None:
        """An error or an abandoned generator must not leave an encoder thread waiting."""
        if self.clip is not None:
            self.clip.abort()
