"""Encoding: keyframes and samples as JPEG, clips as H.264 mp4 (the x264 options, checked
when the stage is built, and _BackgroundEncoder, which encodes on its own thread)."""

from __future__ import annotations

import io
import queue
import threading
from fractions import Fraction
from typing import TYPE_CHECKING

import av
import cv2
import numpy as np

if TYPE_CHECKING:
    from stages.split.scale import SourceColour


CLIP_TIME_BASE = Fraction(1, 90000)  # clips keep their frames' own timing, in MPEG ticks


def encode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


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
