"""SplitStage: the stage's options, checked when it is built, and one source decoded once
into its rows (clips, or the one row saying why there is none)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from fractions import Fraction
from typing import Any, Literal

import av

from stages import instrument, storage
from stages.base import Batch, Stage, clip_id_for
from stages.split.cuts import DEFAULT_CASCADE, make_detector
from stages.split.decode import _DecodeAhead, source_frame_rate
from stages.split.encode import DEFAULT_X264_PARAMS, check_encoder
from stages.split.segment import _Segmenter
from stages.split.settings import SplitSettings

log = logging.getLogger(__name__)


DetectorName = Literal["content", "adaptive", "threshold", "cascade"]


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
    """Cut sources into single-shot clips (see stages/split/__init__.py)."""

    name = "split"
    fan_out = True
    outputs = ("clip_id", "source_id", "source_path", "unit_id", "start_frame",
               "end_frame", "start_s", "duration_s", "fps", "width", "height", "dark_frames_trimmed",
               "dissolve_frames_trimmed", "split_error",
               "source_status",
               "video", "keyframes", "sample_frames", "sample_fps", "temporal_signature")

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
        max_fade_s: float = 1.0,
        max_dissolve_s: float = 2.0,
    ):
        if detector not in ("content", "adaptive", "threshold", "cascade"):
            raise ValueError(f"detector={detector!r}; allowed: content, adaptive, threshold, cascade")
        for key, value in (("min_duration_s", min_duration_s), ("max_duration_s", max_duration_s),
                           ("sample_fps", sample_fps), ("lag_s", lag_s)):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        if not max_fade_s >= 0:
            raise ValueError(f"max_fade_s must be >= 0, got {max_fade_s}")
        if not 0 <= max_dissolve_s < math.inf:
            raise ValueError(f"max_dissolve_s must be >= 0 and finite, got {max_dissolve_s}")
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
        self.max_fade_s = max_fade_s
        self.max_dissolve_s = max_dissolve_s

    @property
    def settings(self) -> SplitSettings:
        """What the segmenter and the clip builder read (built anew: tests may change an option)."""
        return SplitSettings(tuple(self.detector_specs), self.min_duration_s, self.max_duration_s,
                             self.trim_frames, self.short_side_px, self.detect_width_px, self.sample_fps,
                             self.jpeg_quality, self.crf, self.preset, self.x264_params, self.lag_s,
                             self.merge_cuts_within_frames, self.trim_dark_below, self.max_fade_s,
                             self.max_dissolve_s)

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
        """All clip rows of one source; never empty (see stages/split/__init__.py for the statuses)."""
        clips: list[dict[str, Any]] = []
        stats: dict[str, Any] = {"frames": 0, "longest_frames": 0, "rate": None}
        started = time.perf_counter()
        local = path
        try:
            # An object in storage is read from a local copy (fetched ahead, deleted after).
            with storage.local_copy(path) as local:
                for clip in self.iter_clips(local, stats):
                    clips.append(clip)
        except storage.StoreUnavailable:
            raise  # the store is down, not the source bad: the unit fails and the run stops
        except Exception as exc:  # noqa: BLE001 - any decode failure is recorded per source
            reason = f"{type(exc).__name__}: {exc}".strip().replace(local, path)  # the object, not its copy
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
        `stats` (if given) receives frames decoded, the longest shot in frames, the rate and
        the cuts applied ("cuts": the first frame of each new shot, merged, flashes left out).
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
        segmenter = _Segmenter(self.settings, rate, stats)
        ahead = _DecodeAhead(frames, segmenter.prepare, self.decode_ahead_frames)
        try:
            for frame in ahead:
                yield from segmenter.push(frame)
            yield from segmenter.end()
        finally:
            ahead.close()  # before the caller closes the container: the thread may be decoding
            segmenter.abort()


def no_clip_row(reason: str, status: str) -> dict[str, Any]:
    """The one row of a source (or the last row of a broken one) that is not a clip."""
    return {"start_frame": None, "end_frame": None, "split_error": reason, "source_status": status}
