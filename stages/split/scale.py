"""Source frames to the clip size, in the source's own colour: output_size() (the clip's
size), SourceColour (how the source's YUV is read and what the clips are tagged with) and
FrameScaler (BGR for detectors, keyframes and samples, and yuv420p for the encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np


def even(n: float) -> int:
    return max(2, int(round(n / 2.0)) * 2)


def output_size(width: int, height: int, short_side_px: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is short_side_px (never upscaled), both even."""
    short = min(width, height)
    scale = min(1.0, short_side_px / short)
    return even(width * scale), even(height * scale)


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
