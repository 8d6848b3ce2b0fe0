"""split: one decode pass per source -> single-shot clips with their encoded video and frames.

For each source row (source_path, source_id, unit_id) this stage opens the file with PyAV,
decodes it once, runs PySceneDetect detectors on small copies of the frames, and cuts the
stream into clips. In the same pass it produces, per clip:
  video          H.264 mp4 bytes at `short_side_px` (aspect kept), at the source frame rate
  keyframes      JPEG bytes of the first, middle and last frame
  sample_frames  JPEG frames sampled at `sample_fps` (2 fps), read by the motion stage
and the identity columns of curation/schema.py. Every source ends as at least one row: a
source that cannot be opened or decoded becomes one row with `split_error` set and
`source_status` "unreadable"; one that decodes but has no shot of at least `min_duration_s`
becomes one "no_clips" row saying so (e.g. "no shot of at least 2.0 s (longest 1.4 s)"); one
that breaks part-way keeps the clips finished before the break and adds a "decode_error" row.

Memory is bounded regardless of video length: only the last `lag_s` seconds of small frames
are held (the detectors' decision latency), clips are encoded as frames arrive, and a scene
longer than `max_duration_s` is cut into chunks.

Frame accuracy: detectors report a cut at the first frame of the new shot. Frames are
assigned to a clip only once they are `lag_s` behind the decoder, so every cut a detector
reports (ContentDetector at once, AdaptiveDetector `window_width` frames late, the fade
detector at the end of a fade) is known before the frames around it are assigned.
Cuts that two detectors place within `merge_cuts_within_frames` of each other are one cut
(CutMerger), so the cascade makes no one-frame fragments.
The middle keyframe is the sample frame nearest the middle of the clip (at most
1/(2*sample_fps) s away), which keeps the pass single and the memory bounded.

Fades: a clip never starts or ends on a near-black frame (mean level below
`trim_dark_below`, the fade detector's own threshold), unless the whole shot is dark; the
dark frames of a fade are cut from both neighbours and counted in `dark_frames_trimmed`.

Timing follows the frames' timestamps, so variable-frame-rate sources keep theirs:
`start_s` is the first frame's time, `duration_s` the time to the frame after the clip's
last one, motion samples are taken every 1/sample_fps seconds (not every n frames), and
the clip is encoded with its frames' own times. `fps` is the source's average rate.
A stream whose timestamps jump back (a splice) is cut there.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, NamedTuple

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np

from stages import instrument
from stages.base import Batch, Stage, clip_id_for
from stages.dissolve import DissolveDetector, thumbnail

log = logging.getLogger(__name__)

DetectorName = Literal["content", "adaptive", "threshold", "cascade"]


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


def even(n: float) -> int:
    return max(2, int(round(n / 2.0)) * 2)


def output_size(width: int, height: int, short_side_px: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is short_side_px (never upscaled), both even."""
    short = min(width, height)
    scale = min(1.0, short_side_px / short)
    return even(width * scale), even(height * scale)


def encode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def source_frame_rate(stream) -> Fraction | None:
    """The stream's frame rate, or None when the container gives no usable one."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0 and 0.5 <= float(rate) <= 1000:
            return Fraction(rate).limit_denominator(100000)
    return None


def probe(path: str) -> dict[str, Any]:
    """Container facts without decoding: duration, fps, size, codec. Raises on unreadable files."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = source_frame_rate(stream)
        duration_s = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000
        return {
            "duration_s": duration_s,
            "fps": float(rate) if rate else None,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "codec": stream.codec_context.name,
            "frames": stream.frames or None,
        }


HD_MIN_HEIGHT = 720  # untagged sources at least this tall are BT.709, smaller ones BT.601 (as players assume)


@dataclass(frozen=True)
class SourceColour:
    """How a source's YUV is to be read, and what its clips are tagged with.

    `matrix` is the YUV matrix as an FFmpeg colorspace number that swscale converts with
    (1 BT.709, 5 BT.601, 7 SMPTE 240M, 9 BT.2020, 4 FCC); `tag` the number written on the
    clips. An untagged source is read the way players read it: BT.709 from 720 lines up,
    BT.601 below. `full_range` (JPEG range, yuvj formats) is converted to the limited range
    the clips are encoded in. Primaries and transfer are copied (or, untagged, those of the
    assumed standard): frames are not re-mastered, only read and labelled correctly.
    """

    matrix: int
    tag: int
    full_range: bool
    primaries: int
    trc: int

    @classmethod
    def of(cls, frame: av.VideoFrame) -> "SourceColour":
        spc = int(frame.colorspace or 2)
        matrix = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}.get(spc)
        hd = min(frame.width, frame.height) >= HD_MIN_HEIGHT
        if matrix is None:
            matrix, spc = (1, 1) if hd else (5, 6)
        full = int(frame.color_range or 0) == 2 or frame.format.name.startswith("yuvj")
        default = 1 if matrix == 1 else 6 if matrix == 5 else 2
        primaries = int(frame.color_primaries or 2)
        trc = int(frame.color_trc or 2)
        return cls(matrix, spc, full, primaries if primaries != 2 else default, trc if trc != 2 else default)

    def label(self, codec_context) -> None:
        """Tag an encoder's output with this colour (limited range: what the clips hold)."""
        codec_context.colorspace = self.tag
        codec_context.color_range = 1
        codec_context.color_primaries = self.primaries
        codec_context.color_trc = self.trc


class FrameScaler:
    """Source frames to the clip size: BGR (detectors, keyframes, samples) and, when it can be
    passed on as is, a yuv420p frame for the encoder, both in the source's own colour.

    The common path scales once in swscale straight to limited-range yuv420p in the source's
    matrix (what the H.264 encoder wants, no matrix change) and converts that small frame to
    BGR with the source's matrix: cheaper than scaling to BGR and back. Each conversion keeps
    its own swscale context for the whole source (a frame's own reformat() builds a new one
    every time, which costs as much as the scaling). Rotated sources are turned upright in BGR
    first (clips show the display orientation); their encoder converts BGR back (to_yuv).
    """

    def __init__(self, size: tuple[int, int], rotation: int, colour: SourceColour):
        self.size, self.rotation, self.colour = size, rotation, colour
        self._scale, self._bgr, self._yuv = VideoReformatter(), VideoReformatter(), VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> tuple[np.ndarray, av.VideoFrame | None]:
        c = self.colour
        src_range = "JPEG" if c.full_range else "MPEG"
        if self.rotation in (90, 270):
            # The display matrix rotates counterclockwise by `rotation` (np.rot90's k=1 direction).
            full = self._bgr.reformat(frame, format="bgr24", src_colorspace=c.matrix, src_color_range=src_range,
                                      dst_color_range="JPEG").to_ndarray()
            full = np.rot90(full, k=1 if self.rotation == 90 else -1)
            return cv2.resize(np.ascontiguousarray(full), self.size, interpolation=cv2.INTER_AREA), None
        small = self._scale.reformat(frame, width=self.size[0], height=self.size[1], format="yuv420p",
                                     src_colorspace=c.matrix, dst_colorspace=c.matrix, src_color_range=src_range,
                                     dst_color_range="MPEG", interpolation="AREA")
        bgr = self._bgr.reformat(small, format="bgr24", src_colorspace=c.matrix, src_color_range="MPEG",
                                 dst_color_range="JPEG").to_ndarray()
        if self.rotation == 180:
            return np.ascontiguousarray(bgr[::-1, ::-1]), None
        return bgr, small

    def to_yuv(self, bgr: np.ndarray) -> av.VideoFrame:
        """A BGR clip frame as the encoder's yuv420p, in the matrix the clip is tagged with."""
        return self._yuv.reformat(av.VideoFrame.from_ndarray(bgr, format="bgr24"), format="yuv420p",
                                  dst_colorspace=self.colour.matrix, src_color_range="JPEG",
                                  dst_color_range="MPEG")


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


# x264 options on top of the preset: veryfast's rate control (mb-tree over a 10-frame
# lookahead), superfast's analysis (diamond motion search, intra partitions only, SAD mode
# decision). Measured on bench/spine_bench.py's footage at 569x320, crf 21-25: 35% less encoder
# CPU than veryfast alone (x264 is about a quarter of the spine's CPU), for 6% more bytes at
# the same SSIM on web-like footage and 21% on smooth generated shots (5-9% larger files at
# the same crf). "me=dia:partitions=i8x8,i4x4" alone: 10-15% less CPU for 0-2.5% more bytes;
# "" is plain veryfast.
DEFAULT_X264_PARAMS = "me=dia:partitions=i8x8,i4x4:subme=1"


def encoder_options(crf: int, preset: str, x264_params: str) -> dict[str, str]:
    """libx264's options for the clip encoder: one thread (the encoder has its own thread, and
    sources run in parallel), the preset and crf, and extra x264 options ("key=value:...")."""
    options = {"crf": str(crf), "preset": preset, "threads": "1"}
    if x264_params:
        options["x264-params"] = x264_params
    return options


def check_encoder(crf: int, preset: str, x264_params: str) -> None:
    """Open a libx264 encoder with these options and encode one frame; ValueError if x264
    refuses them (a misspelt preset or option would otherwise fail every source)."""
    import av.logging

    level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)  # FFmpeg only warns of an x264 option it cannot parse
    try:
        with av.logging.Capture() as logs, av.open(io.BytesIO(), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            stream.options = encoder_options(crf, preset, x264_params)
            container.mux(stream.encode(av.VideoFrame(64, 64, "yuv420p")))
            container.mux(stream.encode(None))
    except av.error.FFmpegError as exc:
        raise ValueError(f"libx264 refused preset={preset!r} x264_params={x264_params!r}: {exc}") from None
    finally:
        av.logging.set_level(level)
    refused = [message.strip() for _, name, message in logs if name == "libx264" and "Error parsing" in message]
    if refused:
        raise ValueError(f"split.x264_params={x264_params!r}: libx264 says {'; '.join(refused)}")


class _BackgroundEncoder:
    """An H.264 mp4 built in memory on a worker thread.

    PyAV releases the GIL while x264 encodes, so encoding on its own thread overlaps the
    decoder's threads and the detectors instead of adding to them. At most `max_pending`
    frames wait in the queue, so memory stays bounded when the encoder is the slow part.
    """

    def __init__(self, rate: Fraction, size: tuple[int, int], crf: int, preset: str, x264_params: str,
                 colour: SourceColour, max_pending: int = 16):
        self.rate, self.size, self.colour = rate, size, colour
        self.options = encoder_options(crf, preset, x264_params)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._buf = io.BytesIO()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clip-encoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with av.open(self._buf, mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=self.rate)
                stream.width, stream.height = self.size
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = CLIP_TIME_BASE
                stream.options = self.options
                self.colour.label(stream.codec_context)
                while (frame := self._queue.get()) is not None:
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by close()
            self._error = exc
            while self._queue.get() is not None:  # keep draining so put() never blocks
                pass

    def put(self, frame: av.VideoFrame) -> None:
        self._queue.put(frame)

    def close(self) -> bytes:
        """Flush, wait for the worker, and return the mp4 bytes (or raise its error)."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self._buf.getvalue()

    def abort(self) -> None:
        """Stop the worker thread and drop what it encoded (idempotent)."""
        self._stop()
        self._buf = io.BytesIO()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Frame(NamedTuple):
    """One decoded frame on its way to a clip."""

    index: int  # in the source's decoding order
    t: float  # seconds since the source's first frame (its timestamp)
    bgr: np.ndarray  # at the clip size, display orientation
    encodable: av.VideoFrame | None  # the same frame ready for the encoder, when it can be passed as is
    dark: bool  # near black (a fade's dark frames): never the first or last frame of a clip


class _Scaled(NamedTuple):
    """A decoded frame after the work that needs no other frame (FrameScaler, detector copy)."""

    time: float | None  # the frame's timestamp in seconds, as decoded
    bgr: np.ndarray
    encodable: av.VideoFrame | None
    detect: np.ndarray  # the small copy the detectors read
    dark: bool


class _DecodeAhead:
    """Decode and scale up to `depth` frames ahead in a thread, while the caller runs the
    detectors and cuts clips: decoding, swscale and cv2 release the GIL, so on a second core
    they overlap the detectors' Python. Frames come out in order; an exception in the thread
    is raised in the caller, at the point the stream reached. depth 0 does it all inline."""

    _END = object()

    def __init__(self, frames, prepare, depth: int):
        self._frames, self._prepare = frames, prepare
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="split-decode", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self._frames:
                if self._stop.is_set():
                    return
                self._queue.put(self._prepare(frame))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, raised there)
            self._queue.put(exc)
        finally:
            self._queue.put(self._END)

    def __iter__(self):
        if self._thread is None:
            yield from map(self._prepare, self._frames)
            return
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread and wait for it (it must not touch the container once it closes)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()  # unblock a put()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.01)


CLIP_TIME_BASE = Fraction(1, 90000)  # clips keep their frames' own timing, in MPEG ticks


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
            "sample_fps": self.sample_rate(),
        }


class _Splitting:
    """How many sources this process is decoding at once (the in-process runner splits one
    per core on threads; a Ray worker one at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = 0

    def enter(self) -> None:
        with self._lock:
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def threads_each(self) -> int:
        """Decoder threads for a source opened now (split.decode_threads 0): FFmpeg's choice
        (0, about one per core) when it is the only one, else the cores shared between the
        sources. Frame threading costs about 12% more CPU per frame (bench/spine_bench.py's
        decode pass on 360p-720p H.264: 4.2 s against 3.7 s on one thread), which buys
        nothing when the other cores are decoding other sources."""
        with self._lock:
            active = self.active
        return 0 if active <= 1 else max(1, (os.cpu_count() or 1) // active)


_SPLITTING = _Splitting()


class SplitStage(Stage):
    """Cut sources into single-shot clips (see the module docstring)."""

    name = "split"
    fan_out = True
    outputs = ("clip_id", "source_id", "source_path", "unit_id", "start_frame",
               "end_frame", "start_s", "duration_s", "fps", "width", "height", "dark_frames_trimmed", "split_error",
               "source_status",
               "video", "keyframes", "sample_frames", "sample_fps")

    def __init__(
        self,
        detector: DetectorName = "content",
        threshold: float = 27.0,
        adaptive_threshold: float = 3.0,
        fade_threshold: float = 12.0,
        cascade: list[dict[str, Any]] | None = None,
        min_scene_len_frames: int = 15,
        min_duration_s: float = 2.0,
        max_duration_s: float = 10.0,
        trim_frames: int = 0,
        short_side_px: int = 320,
        detect_width_px: int = 256,
        sample_fps: float = 2.0,
        jpeg_quality: int = 90,
        crf: int = 23,
        preset: str = "veryfast",
        x264_params: str = DEFAULT_X264_PARAMS,
        lag_s: float = 2.0,
        decode_threads: int = 0,
        merge_cuts_within_frames: int = 2,
        trim_dark_below: float = 12.0,
        decode_ahead_frames: int = 8,
    ):
        if detector not in ("content", "adaptive", "threshold", "cascade"):
            raise ValueError(f"detector={detector!r}; allowed: content, adaptive, threshold, cascade")
        for key, value in (("min_duration_s", min_duration_s), ("max_duration_s", max_duration_s),
                           ("sample_fps", sample_fps), ("lag_s", lag_s)):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        if max_duration_s < min_duration_s:
            raise ValueError(f"max_duration_s ({max_duration_s}) < min_duration_s ({min_duration_s})")
        if short_side_px < 16 or detect_width_px < 32:
            raise ValueError("short_side_px must be >= 16 and detect_width_px >= 32")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        if min(trim_frames, decode_threads, merge_cuts_within_frames, decode_ahead_frames) < 0 \
                or min_scene_len_frames < 1:
            raise ValueError("trim_frames, decode_threads, merge_cuts_within_frames and decode_ahead_frames "
                             "must be >= 0, min_scene_len_frames >= 1")
        if detector == "cascade":
            specs = cascade if cascade is not None else DEFAULT_CASCADE
            if not specs:
                raise ValueError("cascade must list at least one detector")
        else:
            if cascade is not None:
                raise ValueError("cascade is only read when detector is 'cascade'")
            specs = [{"detector": detector, **{
                "content": {"threshold": threshold},
                "adaptive": {"adaptive_threshold": adaptive_threshold},
                "threshold": {"threshold": fade_threshold},
            }[detector]}]
        specs = [{"min_scene_len": min_scene_len_frames, **s} for s in specs]
        for spec in specs:
            make_detector(spec)  # validate now, not on a worker
        self.detector_specs = specs
        self.min_duration_s = min_duration_s
        self.max_duration_s = max_duration_s
        self.trim_frames = trim_frames
        self.short_side_px = short_side_px
        self.detect_width_px = detect_width_px
        self.sample_fps = sample_fps
        self.jpeg_quality = jpeg_quality
        self.crf = crf
        self.preset = preset
        self.x264_params = x264_params
        check_encoder(crf, preset, x264_params)  # a bad preset or x264 option fails now, not per source
        self.lag_s = lag_s
        self.decode_threads = decode_threads
        self.merge_cuts_within_frames = merge_cuts_within_frames
        self.trim_dark_below = trim_dark_below
        self.decode_ahead_frames = decode_ahead_frames

    def min_frames(self, rate: Fraction) -> int:
        return max(1, math.ceil(self.min_duration_s * float(rate) - 1e-6))

    def __call__(self, batch: Batch) -> Batch:
        rows: list[dict[str, Any]] = []
        for i in range(len(batch["source_path"])):
            source = {k: batch[k][i] for k in ("source_path", "source_id", "unit_id")}
            produced = self.split_source(source["source_path"], source["source_id"])
            for row in produced:
                row.update(source)
            rows.extend(produced)
        return {name: [row.get(name) for row in rows] for name in self.outputs}

    def split_source(self, path: str, source_id: str) -> list[dict[str, Any]]:
        """All clip rows of one source; never empty (see the module docstring for the statuses)."""
        clips: list[dict[str, Any]] = []
        stats: dict[str, Any] = {"frames": 0, "longest_frames": 0, "rate": None}
        started = time.perf_counter()
        try:
            for clip in self.iter_clips(path, stats):
                clips.append(clip)
        except Exception as exc:  # noqa: BLE001 - any decode failure is recorded per source
            reason = f"{type(exc).__name__}: {exc}".strip()
            log.warning("split failed for %s: %s", path, reason)
            status = "decode_error" if stats["frames"] else "unreadable"
            clips.append(no_clip_row(reason, status))
        if not clips:
            clips.append(no_clip_row(self.no_clip_reason(stats), "no_clips"))
        for clip in clips:
            clip["clip_id"] = clip_id_for(source_id, clip["start_frame"], clip["end_frame"])
            clip.setdefault("split_error", None)
            clip.setdefault("source_status", None)
        log.debug("split %s: %d rows in %.2fs", path, len(clips), time.perf_counter() - started)
        return clips

    def no_clip_reason(self, stats: dict[str, Any]) -> str:
        """Why a source that decoded gave no clip, with the numbers that decided it."""
        rate = stats["rate"]
        longest_s = stats["longest_frames"] / float(rate) if rate else 0.0
        return (f"no shot of at least {self.min_duration_s:g} s (longest {longest_s:.2f} s, "
                f"{stats['frames']} frames decoded)")

    def iter_clips(self, path: str, stats: dict[str, Any] | None = None):
        """Decode `path` once and yield finished clip dicts in order.

        A decoding error part-way ends the stream there: the frames decoded before it are
        cut into clips as usual, then the error is raised for split_source to record.
        `stats` (if given) receives frames decoded, the longest shot in frames and the rate.
        """
        stats = {} if stats is None else stats
        instrument.count("decode_pass", path)
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        container = av.open(path)
        _SPLITTING.enter()
        try:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                raise ValueError("no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
            stream = container.streams.video[0]
            rate = source_frame_rate(stream)
            if rate is None:
                raise ValueError("no usable frame rate in the container")
            stats["rate"] = rate
            stream.thread_type = "AUTO"
            stream.thread_count = self.decode_threads or _SPLITTING.threads_each()
            failure: list[Exception] = []
            decoded = [0]

            def frames():
                try:
                    for frame in container.decode(stream):
                        decoded[0] += 1
                        stats["frames"] = decoded[0]
                        yield frame
                except av.error.FFmpegError as exc:
                    failure.append(exc)

            yield from self._segment(frames(), rate, stats)
            if failure:
                raise RuntimeError(f"decoding stopped after {decoded[0]} frames: "
                                   f"{type(failure[0]).__name__}: {failure[0]}")
        finally:
            _SPLITTING.leave()
            container.close()

    def _segment(self, frames, rate: Fraction, stats: dict[str, Any]):
        segmenter = _Segmenter(self, rate, stats)
        ahead = _DecodeAhead(frames, segmenter.prepare, self.decode_ahead_frames)
        try:
            for frame in ahead:
                yield from segmenter.push(frame)
            yield from segmenter.end()
        finally:
            ahead.close()  # before the caller closes the container: the thread may be decoding
            segmenter.abort()


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


class _Segmenter:
    """One source's frames into clips: detectors, cut merging, and the assignment of frames
    to clips once they are `lag` frames behind the decoder (see the module docstring)."""

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


def no_clip_row(reason: str, status: str) -> dict[str, Any]:
    """The one row of a source (or the last row of a broken one) that is not a clip."""
    return {"start_frame": None, "end_frame": None, "split_error": reason, "source_status": status}
