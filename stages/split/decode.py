"""Opening a source: its container facts without decoding (probe), its frame rate, and the
decoding and per-frame scaling run ahead of the detectors in a thread (_DecodeAhead)."""

from __future__ import annotations

import queue
import threading
from fractions import Fraction
from typing import Any

import av


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
