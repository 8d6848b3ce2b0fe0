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

if TYPE_CHECKING:
    from stages.split.scale import FrameScaler
    from stages.split.stage import SplitStage


class _Frame(NamedTuple):
    """One decoded frame on its way to a clip."""

    index: int  # in the source's decoding order
    t: float  # seconds since the source's first frame (its timestamp)
    bgr: np.ndarray  # at the clip size, display orientation
    encodable: av.VideoFrame | None  # the same frame ready for the encoder, when it can be passed as is
    dark: bool  # near black (a fade's dark frames): never the first or last frame of a clip


class _ClipBuilder:
    """Accumulates one clip: encodes frames as they come, keeps keyframes and 2 fps samples.

    Frames are held back, not yet encoded, while they may still be dropped: the last
    `trim_frames` (dropped if the clip ends at a real cut) and a run of dark frames, which
    stays in the clip only if a frame that is not dark follows it. Dark frames at the start
    are held until the shot brightens, then dropped (a fade-in's black); if the shot never
    does, it is a dark shot and is kept whole. Timing comes from the frames' timestamps:
    the clip is encoded with them (a variable-rate source stays variable), its duration is
    the time to the frame after its last one, and samples are taken every 1/sample_fps s.
    """

    def __init__(self, rate: Fraction, scaler: FrameScaler, stage: "SplitStage"):
        self.rate, self.scaler, self.size, self.stage = rate, scaler, scaler.size, stage
        self.start_frame: int | None = None
        self.start_s = 0.0
        self.lead: list[_Frame] = []  # dark frames before the first bright one
        self.bright = False
        self.tail: collections.deque[_Frame] = collections.deque()
        self.count = 0  # frames committed to the encoder
        self.dark_trimmed = 0
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
        if not self.bright:
            if frame.dark:
                self.lead.append(frame)
                return
            self.bright = True
            self.dark_trimmed += len(self.lead)
            self.lead.clear()
        self.tail.append(frame)
        while len(self.tail) > self.stage.trim_frames and self._front_stays():
            self._commit(self.tail.popleft())

    def _front_stays(self) -> bool:
        """Whether the oldest held frame is in the clip whatever comes next: it is not dark,
        or a frame that is not dark follows it outside the last trim_frames."""
        if not self.tail[0].dark:
            return True
        return any(not self.tail[i].dark for i in range(1, len(self.tail) - self.stage.trim_frames))

    def _clip_time(self, frame: _Frame) -> float:
        # A timestamp that does not advance counts as a quarter of a mean frame interval later.
        return max(frame.t - self.start_s, self.last_ct + 0.25 / float(self.rate))

    def _commit(self, frame: _Frame) -> None:
        if self._encoder is None:
            self.start_frame, self.start_s = frame.index, frame.t
            self._encoder = _BackgroundEncoder(self.rate, self.size, self.stage.crf, self.stage.preset,
                                               self.stage.x264_params, self.scaler.colour)
        ct = self._clip_time(frame)
        out = frame.encodable if frame.encodable is not None else self.scaler.to_yuv(frame.bgr)
        # A decoded frame keeps the source's time base and picture type: set both, or the
        # encoder rescales our pts and obeys the source's I/P/B decisions.
        out.pts = round(ct / CLIP_TIME_BASE)
        out.time_base = CLIP_TIME_BASE
        out.pict_type = av.video.frame.PictureType.NONE
        self._encoder.put(out)
        if self.count == 0:
            self.first_jpeg = encode_jpeg(frame.bgr, self.stage.jpeg_quality)
        self.signature.add(frame.bgr, ct, 1.0 / float(self.rate))
        # Sample k is the first frame at least k / sample_fps s into the clip (half a frame early is on time).
        if ct + 0.5 / float(self.rate) >= self._next_sample / self.stage.sample_fps:
            self.samples.append((ct, encode_jpeg(frame.bgr, self.stage.jpeg_quality)))
            self._next_sample = math.floor((ct + 0.5 / float(self.rate)) * self.stage.sample_fps) + 1
        self.last_bgr, self.last_ct = frame.bgr, ct
        self.count += 1

    def sample_rate(self) -> float:
        """The rate the samples were taken at, from their real spacing in seconds: sample_fps,
        or the source's rate when slower (each frame is then a sample)."""
        if len(self.samples) < 2:
            return min(self.stage.sample_fps, float(self.rate))
        return (len(self.samples) - 1) / (self.samples[-1][0] - self.samples[0][0])

    def finish(self, drop_tail: bool, next_t: float | None) -> dict[str, Any] | None:
        """Close the clip; None when it is shorter than the minimum (nothing is returned).

        `drop_tail`: the clip ends at a real cut (its last trim_frames go); `next_t`: the
        timestamp of the frame after the clip's frames in the source (None at its end).
        """
        held = list(self.tail) if self.bright else self.lead  # a dark shot is kept as it is
        keep = len(held)
        if self.bright:
            keep = max(0, keep - (self.stage.trim_frames if drop_tail else 0))
            before_dark = keep
            while keep > 0 and held[keep - 1].dark:
                keep -= 1
            self.dark_trimmed += before_dark - keep
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
        if self.count < self.stage.min_frames(self.rate):
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
            "video": video,
            "keyframes": [self.first_jpeg, nearest[1], encode_jpeg(self.last_bgr, self.stage.jpeg_quality)],
            "sample_frames": [jpeg for _, jpeg in self.samples],
            "temporal_signature": self.signature.value(),
            "sample_fps": self.sample_rate(),
        }
