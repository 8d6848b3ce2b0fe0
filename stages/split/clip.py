"""One clip as it is built: _ClipBuilder holds, trims, encodes and samples the frames the
segmenter assigns to it (_Frame), and returns the clip's row."""

from __future__ import annotations

import collections
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple

import av
import numpy as np

from stages.signature import SignatureBuilder
from stages.split.encode import CLIP_TIME_BASE, _BackgroundEncoder, encode_jpeg
from stages.split.fades import FADE_SETTLE_FRAMES, edge_fade

from stages.split.settings import SplitSettings

if TYPE_CHECKING:
    from stages.split.scale import FrameScaler


class _Frame(NamedTuple):
    """One decoded frame on its way to a clip."""

    index: int  # in the source's decoding order
    t: float  # seconds since the source's first frame (its timestamp)
    bgr: np.ndarray  # at the clip size, display orientation
    encodable: av.VideoFrame | None  # the same frame ready for the encoder, when it can be passed as is
    dark: bool  # near black (a fade's dark frames): never the first or last frame of a clip
    level: float  # mean level (0-255) of the detectors' copy (stages/split/fades.py, measure)
    contrast: float  # standard deviation of its small grey copy
    thumb: np.ndarray | None = None  # 64 px colour thumbnail (stages/dissolve.thumbnail) when dissolves are trimmed


class _ClipBuilder:
    """Accumulates one clip: encodes frames as they come, keeps keyframes and 2 fps samples.

    Frames are held back, not yet encoded, while they may still be dropped. At the start:
    dark frames until the shot brightens, then `hold` more (the longest fade ramp and a few
    frames to see the steady level past it); the dark ones are dropped (a fade-in's black),
    and so is a fade-in's ramp (stages/split/fades.py, edge_fade: levels climbing smoothly
    from black or white to the shot's steady level, the picture kept). A shot that never
    brightens is a dark shot and is kept whole. At the end: the last `trim_frames` (dropped
    if the clip ends at a real cut), before them a run of black (or white) frames, which
    stays in the clip only if other frames follow it (held until they do, at most a chunk),
    and the `hold` frames before that run, where a fade-out's ramp would be. When the clip
    ends, its dark frames there are dropped, and a fade-out's ramp with its black (white)
    frames. A clip that starts or ends at a chunk boundary (`fade_start`,
    `finish(fade_end=False)`: the shot goes on) only loses its dark frames there. Dropped
    frames are counted in `dark_trimmed`.
    Timing comes from the frames' timestamps: the clip is encoded with them (a variable-rate
    source stays variable), its duration is the time to the frame after its last one, and
    samples are taken every 1/sample_fps s.
    """

    def __init__(self, rate: Fraction, scaler: FrameScaler, settings: SplitSettings, fade_start: bool = True):
        self.rate, self.scaler, self.size, self.settings = rate, scaler, scaler.size, settings
        self.start_frame: int | None = None
        self.start_s = 0.0
        self.fade_frames = settings.fade_frames(rate)  # the longest fade ramp trimmed (0: none)
        self.hold = self.fade_frames + FADE_SETTLE_FRAMES if self.fade_frames else 0
        self.fade_start = fade_start and self.fade_frames > 0
        self.lead: list[_Frame] = []  # the start, until it is known what of it is a fade's
        self.first_lit: int | None = None  # index in lead of the first frame that is not dark
        self.started = False  # the start is decided: frames go to tail
        self.tail: collections.deque[_Frame] = collections.deque()
        self.count = 0  # frames committed to the encoder
        self.dark_trimmed = 0
        self.dissolve_trimmed = 0  # a dissolve's blended frames cut at the clip's ends (the segmenter counts them)
        self.last_ct = -math.inf  # clip time of the last committed frame
        self.first_jpeg: bytes | None = None
        self.last_bgr: np.ndarray | None = None
        self.samples: list[tuple[float, bytes]] = []  # (clip time, JPEG)
        self.signature = SignatureBuilder()  # 8x8 grey thumbnails at 4 Hz (stages/signature.py)
        self._next_sample = 0  # index of the next sample slot (k / sample_fps seconds)
        self._encoder: _BackgroundEncoder | None = None

    def abort(self) -> None:
        """Drop the clip and stop its encoder thread (an error or an early exit of the source)."""
        self.tail.clear()
        self.lead.clear()
        if self._encoder is not None:
            encoder, self._encoder = self._encoder, None
            encoder.abort()

    @property
    def length(self) -> int:
        return self.count + len(self.lead) + len(self.tail)

    def add(self, frame: _Frame) -> None:
        if self.started:
            self._hold(frame)
            return
        self.lead.append(frame)
        if self.first_lit is None and not frame.dark:
            self.first_lit = len(self.lead) - 1
        if self.first_lit is not None and len(self.lead) - self.first_lit > self.hold:
            self._start()

    def _start(self) -> None:
        """Drop the start's dark frames, and its fade ramp if it is one; hold the rest."""
        lead, self.lead = self.lead, []
        self.started = True
        drop = self.first_lit
        if self.fade_start:
            drop = max(drop, edge_fade([f.level for f in lead], [f.contrast for f in lead],
                                       self.settings.trim_dark_below, self.fade_frames))
        self.dark_trimmed += drop
        for frame in lead[drop:]:
            self._hold(frame)

    def _hold(self, frame: _Frame) -> None:
        self.tail.append(frame)
        while len(self.tail) > self.settings.trim_frames and self._front_stays():
            self._commit(self.tail.popleft())

    def _extreme(self, frame: _Frame) -> bool:
        """Black (or, when fades are trimmed, white): a fade's frames past its ramp."""
        black = self.settings.trim_dark_below
        return frame.dark or (self.fade_frames > 0 and frame.level > 255.0 - black)

    def _front_stays(self) -> bool:
        """Whether the oldest held frame is in the clip whatever comes next: more than `hold`
        frames that are not black (white) follow it outside the last trim_frames, or it is
        not dark and nothing is held for fades."""
        last = len(self.tail) - self.settings.trim_frames - 1
        while last >= 0 and self._extreme(self.tail[last]):
            last -= 1
        return last >= self.hold

    def _clip_time(self, frame: _Frame) -> float:
        # A timestamp that does not advance counts as a quarter of a mean frame interval later.
        return max(frame.t - self.start_s, self.last_ct + 0.25 / float(self.rate))

    def _commit(self, frame: _Frame) -> None:
        if self._encoder is None:
            self.start_frame, self.start_s = frame.index, frame.t
            self._encoder = _BackgroundEncoder(self.rate, self.size, self.settings.crf, self.settings.preset,
                                               self.settings.x264_params, self.scaler.colour)
        ct = self._clip_time(frame)
        out = frame.encodable if frame.encodable is not None else self.scaler.to_yuv(frame.bgr)
        # A decoded frame keeps the source's time base and picture type: set both, or the
        # encoder rescales our pts and obeys the source's I/P/B decisions.
        out.pts = round(ct / CLIP_TIME_BASE)
        out.time_base = CLIP_TIME_BASE
        out.pict_type = av.video.frame.PictureType.NONE
        self._encoder.put(out)
        if self.count == 0:
            self.first_jpeg = encode_jpeg(frame.bgr, self.settings.jpeg_quality)
        self.signature.add(frame.bgr, ct, 1.0 / float(self.rate))
        # Sample k is the first frame at least k / sample_fps s into the clip (half a frame early is on time).
        if ct + 0.5 / float(self.rate) >= self._next_sample / self.settings.sample_fps:
            self.samples.append((ct, encode_jpeg(frame.bgr, self.settings.jpeg_quality)))
            self._next_sample = math.floor((ct + 0.5 / float(self.rate)) * self.settings.sample_fps) + 1
        self.last_bgr, self.last_ct = frame.bgr, ct
        self.count += 1

    def sample_rate(self) -> float:
        """The rate the samples were taken at, from their real spacing in seconds: sample_fps,
        or the source's rate when slower (each frame is then a sample)."""
        if len(self.samples) < 2:
            return min(self.settings.sample_fps, float(self.rate))
        return (len(self.samples) - 1) / (self.samples[-1][0] - self.samples[0][0])

    def finish(self, drop_tail: bool, next_t: float | None, fade_end: bool = True) -> dict[str, Any] | None:
        """Close the clip; None when it is shorter than the minimum (nothing is returned).

        `drop_tail`: the clip ends at a real cut (its last trim_frames go); `next_t`: the
        timestamp of the frame after the clip's frames in the source (None at its end);
        `fade_end`: a fade-out's ramp at the end is dropped (not at a chunk boundary).
        """
        if not self.started and self.first_lit is not None:
            self._start()
        held = list(self.tail) if self.started else self.lead  # a dark shot is kept as it is
        keep = len(held)
        if self.started:
            keep = max(0, keep - (self.settings.trim_frames if drop_tail else 0))
            drop = 0
            while drop < keep and held[keep - 1 - drop].dark:
                drop += 1
            if fade_end and self.fade_frames:
                end = held[keep - 1::-1] if keep else []
                drop = max(drop, edge_fade([f.level for f in end], [f.contrast for f in end],
                                           self.settings.trim_dark_below, self.fade_frames))
            self.dark_trimmed += drop
            keep -= drop
        for frame in held[:keep]:
            self._commit(frame)
        if keep < len(held):
            next_t = held[keep].t
        self.tail.clear()
        self.lead = []
        if self._encoder is None:
            return None
        encoder, self._encoder = self._encoder, None
        video = encoder.close()
        if self.count < self.settings.min_frames(self.rate):
            return None
        end_ct = self.last_ct + 1.0 / float(self.rate)
        if next_t is not None and next_t - self.start_s > self.last_ct:
            end_ct = next_t - self.start_s
        middle = end_ct / 2
        nearest = min(self.samples, key=lambda s: abs(s[0] - middle))
        return {
            "start_frame": self.start_frame,
            "end_frame": self.start_frame + self.count,
            "start_s": self.start_s,
            "duration_s": end_ct,
            "fps": float(self.rate),
            "width": self.size[0],
            "height": self.size[1],
            "dark_frames_trimmed": self.dark_trimmed,
            "dissolve_frames_trimmed": self.dissolve_trimmed,
            "video": video,
            "keyframes": [self.first_jpeg, nearest[1], encode_jpeg(self.last_bgr, self.settings.jpeg_quality)],
            "sample_frames": [jpeg for _, jpeg in self.samples],
            "temporal_signature": self.signature.value(),
            "sample_fps": self.sample_rate(),
        }
