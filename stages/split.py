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
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np

from curation.schema import clip_id_for
from stages.base import Batch, Stage

log = logging.getLogger(__name__)

DetectorName = Literal["content", "adaptive", "threshold", "cascade"]

# Decode passes opened per source path in this process (read by bench/spine_bench.py).
DECODE_PASSES: collections.Counter[str] = collections.Counter()

# The SVD-style cascade: the union of the cuts of several detectors, so that hard cuts
# (content), cuts during camera motion (adaptive) and fades through black (threshold)
# are all caught.
DEFAULT_CASCADE: list[dict[str, Any]] = [
    {"detector": "content", "threshold": 27.0},
    {"detector": "adaptive", "adaptive_threshold": 3.0},
    {"detector": "threshold", "threshold": 12.0},
]

_DETECTOR_ARGS = {
    "content": {"threshold", "min_scene_len"},
    "adaptive": {"adaptive_threshold", "min_scene_len", "window_width", "min_content_val"},
    "threshold": {"threshold", "min_scene_len", "fade_bias"},
}


def make_detector(spec: dict[str, Any]):
    """A PySceneDetect detector from {"detector": name, **its keyword arguments}."""
    from scenedetect import AdaptiveDetector, ContentDetector, ThresholdDetector

    spec = dict(spec)
    kind = spec.pop("detector", None)
    if kind not in _DETECTOR_ARGS:
        raise ValueError(f"cascade entry detector={kind!r}; allowed: {sorted(_DETECTOR_ARGS)}")
    unknown = sorted(set(spec) - _DETECTOR_ARGS[kind])
    if unknown:
        raise ValueError(f"cascade entry for {kind!r} has unknown keys {unknown}; "
                         f"allowed: {sorted(_DETECTOR_ARGS[kind])}")
    cls = {"content": ContentDetector, "adaptive": AdaptiveDetector, "threshold": ThresholdDetector}[kind]
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

    def add(self, cut: int, detector: int, pending: collections.deque) -> None:
        for c in [c for c in self.by if c not in self.cuts]:
            del self.by[c]  # applied since
        near = sorted(c for c in self.cuts if abs(c - cut) <= self.within and self.by.get(c) != detector)
        if not near or cut in self.cuts:
            self.cuts.add(cut)
            self.by.setdefault(cut, detector)
            return
        lo, hi = min(near[0], cut), max(near[-1], cut)
        frames = {idx: pair[0] for idx, _, pair in pending if lo - 1 <= idx <= hi}
        scores = {k: float(cv2.absdiff(frames[k - 1], frames[k]).mean())
                  for k in range(lo, hi + 1) if k in frames and k - 1 in frames}
        owner = self.by[near[0]]
        self.cuts.difference_update(near)
        best = max(scores, key=lambda k: (scores[k], -k)) if scores else lo
        self.cuts.add(best)
        self.by[best] = owner


class _BackgroundEncoder:
    """An H.264 mp4 built in memory on a worker thread.

    PyAV releases the GIL while x264 encodes, so encoding on its own thread overlaps the
    decoder's threads and the detectors instead of adding to them. At most `max_pending`
    frames wait in the queue, so memory stays bounded when the encoder is the slow part.
    """

    def __init__(self, rate: Fraction, size: tuple[int, int], crf: int, preset: str,
                 colour: SourceColour, max_pending: int = 16):
        self.rate, self.size, self.crf, self.preset, self.colour = rate, size, crf, preset, colour
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
                stream.options = {"crf": str(self.crf), "preset": self.preset, "threads": "1"}
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


class _ClipBuilder:
    """Accumulates one clip: encodes frames as they come, keeps keyframes and 2 fps samples.

    `trim_end` frames are held back so they can be dropped if the clip ends at a real cut.
    """

    def __init__(self, start_frame: int, start_s: float, rate: Fraction, scaler: FrameScaler,
                 stage: "SplitStage"):
        self.start_frame = start_frame
        self.start_s = start_s
        self.rate = rate
        self.scaler = scaler
        self.size = scaler.size
        self.stage = stage
        self.tail: collections.deque = collections.deque()
        self.count = 0  # frames committed to the encoder
        self.first_jpeg: bytes | None = None
        self.last_bgr: np.ndarray | None = None
        self.samples: list[tuple[int, bytes]] = []  # (offset in clip, JPEG)
        self._time_base = Fraction(rate.denominator, rate.numerator)
        self._encoder: _BackgroundEncoder | None = None

    def abort(self) -> None:
        """Drop the clip and stop its encoder thread (an error or an early exit of the source)."""
        self.tail.clear()
        if self._encoder is not None:
            encoder, self._encoder = self._encoder, None
            encoder.abort()

    @property
    def length(self) -> int:
        return self.count + len(self.tail)

    def add(self, bgr: np.ndarray, encodable: av.VideoFrame | None) -> None:
        self.tail.append((bgr, encodable))
        while len(self.tail) > self.stage.trim_frames:
            self._commit(*self.tail.popleft())

    def _commit(self, bgr: np.ndarray, encodable: av.VideoFrame | None) -> None:
        offset = self.count
        if self._encoder is None:
            self._encoder = _BackgroundEncoder(self.rate, self.size, self.stage.crf, self.stage.preset,
                                               self.scaler.colour)
        frame = encodable if encodable is not None else self.scaler.to_yuv(bgr)
        # A decoded frame keeps the source's time base and picture type: reset both, or the
        # encoder rescales our pts and obeys the source's I/P/B decisions.
        frame.pts = offset
        frame.time_base = self._time_base
        frame.pict_type = av.video.frame.PictureType.NONE
        self._encoder.put(frame)
        if offset == 0:
            self.first_jpeg = encode_jpeg(bgr, self.stage.jpeg_quality)
        # Sample k is the frame nearest k / sample_fps seconds into the clip.
        next_k = len(self.samples)
        if offset >= round(next_k * float(self.rate) / self.stage.sample_fps):
            self.samples.append((offset, encode_jpeg(bgr, self.stage.jpeg_quality)))
        self.last_bgr = bgr
        self.count += 1

    def sample_rate(self) -> float:
        """The rate the samples were taken at: sample_fps, or the source's rate when slower
        (each frame is then a sample), from the samples' real spacing in frames."""
        if len(self.samples) < 2:
            return min(self.stage.sample_fps, float(self.rate))
        spacing = (self.samples[-1][0] - self.samples[0][0]) / (len(self.samples) - 1)
        return float(self.rate) / spacing

    def finish(self, drop_tail: bool) -> dict[str, Any] | None:
        """Close the clip; None when it is shorter than the minimum (nothing is returned)."""
        if not drop_tail:
            while self.tail:
                self._commit(*self.tail.popleft())
        self.tail.clear()
        if self._encoder is None:
            return None
        encoder, self._encoder = self._encoder, None
        video = encoder.close()
        if self.count < self.stage.min_frames(self.rate):
            return None
        middle = self.count // 2
        nearest = min(self.samples, key=lambda s: abs(s[0] - middle))
        last_jpeg = encode_jpeg(self.last_bgr, self.stage.jpeg_quality)
        fps = float(self.rate)
        return {
            "start_frame": self.start_frame,
            "end_frame": self.start_frame + self.count,
            "start_s": self.start_s,
            "duration_s": self.count / fps,
            "fps": fps,
            "width": self.size[0],
            "height": self.size[1],
            "video": video,
            "keyframes": [self.first_jpeg, nearest[1], last_jpeg],
            "sample_frames": [jpeg for _, jpeg in self.samples],
            "sample_fps": self.sample_rate(),
        }


class SplitStage(Stage):
    """Cut sources into single-shot clips (see the module docstring)."""

    name = "split"
    fan_out = True
    outputs = ("clip_id", "source_id", "source_path", "unit_id", "start_frame",
               "end_frame", "start_s", "duration_s", "fps", "width", "height", "split_error",
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
        lag_s: float = 2.0,
        decode_threads: int = 0,
        merge_cuts_within_frames: int = 2,
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
        if trim_frames < 0 or min_scene_len_frames < 1 or decode_threads < 0 or merge_cuts_within_frames < 0:
            raise ValueError("trim_frames, decode_threads and merge_cuts_within_frames must be >= 0, "
                             "min_scene_len_frames >= 1")
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
        self.lag_s = lag_s
        self.decode_threads = decode_threads
        self.merge_cuts_within_frames = merge_cuts_within_frames

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
        DECODE_PASSES[path] += 1
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        container = av.open(path)
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
            if self.decode_threads:
                stream.thread_count = self.decode_threads
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
            container.close()

    def _segment(self, frames, rate: Fraction, stats: dict[str, Any]):
        from scenedetect import FrameTimecode

        detectors = [make_detector(spec_at_rate(spec, rate)) for spec in self.detector_specs]
        scaler: FrameScaler | None = None
        lag = max(int(math.ceil(self.lag_s * float(rate))),
                  max(getattr(d, "event_buffer_length", 0) for d in detectors) + 2,
                  self.trim_frames + 1)
        max_frames = max(1, int(math.floor(self.max_duration_s * float(rate) + 1e-6)))
        pending: collections.deque = collections.deque()  # (index, seconds, bgr) not yet assigned
        cuts: set[int] = set()
        merger = CutMerger(cuts, self.merge_cuts_within_frames, rate)
        state: dict[str, Any] = {"clip": None, "skip_until": -1, "flushed": -1}
        size = None
        t0 = None
        index = -1

        def flush(entry):
            idx, t, frame_pair = entry  # (BGR, encoder-ready frame or None)
            clip = state["clip"]
            cut_here = [c for c in cuts if c <= idx]
            if cut_here:
                late = [c for c in cut_here if c < idx]
                if late:
                    log.warning("cut at frame %s reported after frame %d was assigned; "
                                "raise split.lag_s", late, idx - 1)
                cuts.difference_update(cut_here)
                if clip is not None:
                    yield from self._emit(clip, drop_tail=True, stats=stats)
                clip = None
                state["skip_until"] = idx + self.trim_frames  # trim the new shot's first frames
            state["flushed"] = idx
            if idx < state["skip_until"]:
                state["clip"] = clip
                return
            if clip is not None and clip.length >= max_frames:
                yield from self._emit(clip, drop_tail=False, stats=stats)  # chunk boundary, not a cut
                clip = None
            if clip is None:
                clip = _ClipBuilder(idx, t, rate, scaler, self)
            clip.add(*frame_pair)
            state["clip"] = clip

        try:
            for frame in frames:
                index += 1
                if size is None:
                    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                    w, h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
                    size = output_size(w, h, self.short_side_px)
                    scaler = FrameScaler(size, rotation, SourceColour.of(frame))
                    small_w = min(self.detect_width_px, size[0])
                    detect_size = (even(small_w), even(small_w * size[1] / size[0]))
                small, encodable = scaler(frame)
                t = float(frame.time) if frame.time is not None else index / float(rate)
                if t0 is None:
                    t0 = t
                # Bilinear is 10x cheaper than area here, and detectors only compare frame statistics.
                detect = cv2.resize(small, detect_size, interpolation=cv2.INTER_LINEAR)
                timecode = FrameTimecode(index, fps=rate)
                pending.append((index, t - t0, (small, encodable)))
                for d, det in enumerate(detectors):
                    for cut in det.process_frame(timecode, detect):
                        merger.add(int(cut.frame_num), d, pending)
                while pending and pending[0][0] <= index - lag:
                    yield from flush(pending.popleft())
            if index >= 0:
                end = FrameTimecode(index, fps=rate)
                for d, det in enumerate(detectors):
                    post = getattr(det, "post_process", None)
                    for cut in (post(end) if post else []) or []:
                        merger.add(int(cut.frame_num), d, pending)
            while pending:
                yield from flush(pending.popleft())
            if state["clip"] is not None:
                yield from self._emit(state["clip"], drop_tail=False, stats=stats)
            if index < 0:
                raise ValueError("no decodable video frames")
        finally:
            # An error or an abandoned generator must not leave an encoder thread waiting.
            if state["clip"] is not None:
                state["clip"].abort()

    def _emit(self, clip: _ClipBuilder, drop_tail: bool, stats: dict[str, Any]):
        try:
            row = clip.finish(drop_tail=drop_tail)
        finally:
            stats["longest_frames"] = max(stats.get("longest_frames", 0), clip.count)
        if row is not None:
            yield row


def no_clip_row(reason: str, status: str) -> dict[str, Any]:
    """The one row of a source (or the last row of a broken one) that is not a clip."""
    return {"start_frame": None, "end_frame": None, "split_error": reason, "source_status": status}
