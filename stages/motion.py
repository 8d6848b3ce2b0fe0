"""motion: Farneback optical flow on the 2 fps sample frames -> motion_score.

Reads `sample_frames` (JPEG, from split) and `sample_fps`; adds `motion_score` and
`motion_error`.

motion_score unit: percent of the frame's short side moved per second, i.e. the mean
(over pixels and over consecutive sample pairs) flow magnitude in working-size pixels,
divided by the working short side, times sample_fps, times 100. A shot panning by its full
height in 4 s scores 25. The unit does not depend on the working size or sample rate
(`sample_fps` is the rate the samples were really taken at: the source's own rate when it
is below split's sample_fps). Fast pans are followed up to about 150 %/s: the flow uses the
frames' global shift where it explains the pixels (see `mean_flow_magnitude`).
A clip with fewer than two sample frames has no flow pair: NaN and a reason.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from stages.base import Batch, Stage


def decode_gray(jpeg: bytes, short_side_px: int) -> np.ndarray:
    """A JPEG as a grayscale frame whose short side is short_side_px (never upscaled)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("undecodable sample frame")
    h, w = img.shape
    scale = min(1.0, short_side_px / min(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    return img


MIN_SHIFT_RESPONSE = 0.1  # phase correlation peaks below this are not a trusted global shift


def global_shift(prev: np.ndarray, nxt: np.ndarray) -> tuple[float, float, float]:
    """The dominant translation from prev to nxt (dx, dy, peak response), by phase correlation."""
    window = cv2.createHanningWindow(prev.shape[::-1], cv2.CV_32F)
    (dx, dy), response = cv2.phaseCorrelate(prev.astype(np.float32), nxt.astype(np.float32), window)
    return dx, dy, response


def farneback(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, pyr_scale=0.5, levels=3, winsize=15,
                                        iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


SHIFT_BETTER_BY = 4.0  # grey levels a pixel must match better under the global shift to take its flow


def mean_flow_magnitude(prev: np.ndarray, nxt: np.ndarray) -> float:
    """Mean Farneback flow magnitude between two grayscale frames, in pixels.

    At 2 fps a fast pan moves a frame by a large part of its size between samples, more than
    Farneback's pyramid reaches at a 128 px working size (alone it saturates near 45 %/s and
    then falls). So the frames' global shift is found first (phase correlation, when its peak
    is clear); the second frame is moved back by it and Farneback measures what is left. Each
    pixel then takes that flow (shift plus rest) only where the shifted frame matches it
    clearly better than the unshifted one, and Farneback's own flow elsewhere: a still,
    textureless background behind a moving object keeps its zero motion even when the object
    decides the phase correlation peak. The mean is over the part of the frame both samples
    show (what a pan brought into view has no flow to measure).
    """
    plain = farneback(prev, nxt)
    dx, dy, response = global_shift(prev, nxt)
    h, w = prev.shape
    if (response < MIN_SHIFT_RESPONSE or (abs(dx) < 1.0 and abs(dy) < 1.0)
            or abs(dx) >= w - 8 or abs(dy) >= h - 8):
        return float(np.linalg.norm(plain, axis=2).mean())
    shift_back = np.float32([[1, 0, -dx], [0, 1, -dy]])  # aligned(p) = nxt(p + shift)
    aligned = cv2.warpAffine(nxt, shift_back, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    shifted = farneback(prev, aligned)
    shifted[..., 0] += dx
    shifted[..., 1] += dy
    blur = [cv2.GaussianBlur(img, (5, 5), 0).astype(np.float32) for img in (prev, nxt, aligned)]
    better = np.abs(blur[0] - blur[2]) + SHIFT_BETTER_BY < np.abs(blur[0] - blur[1])
    flow = np.where(better[..., None], shifted, plain)
    x0, x1 = max(0, int(math.ceil(-dx))), min(w, int(math.floor(w - dx)))
    y0, y1 = max(0, int(math.ceil(-dy))), min(h, int(math.floor(h - dy)))
    return float(np.linalg.norm(flow[y0:y1, x0:x1], axis=2).mean())


def motion_score(frames: list[np.ndarray], sample_fps: float) -> float:
    """motion_score (see module docstring) of consecutive grayscale frames; NaN if < 2 frames."""
    if len(frames) < 2:
        return math.nan
    short_side = min(frames[0].shape)
    magnitudes = [mean_flow_magnitude(a, b) for a, b in zip(frames, frames[1:])]
    return float(np.mean(magnitudes)) / short_side * sample_fps * 100.0


class MotionStage(Stage):
    """Score each clip's motion from its sample frames."""

    name = "motion"
    outputs = ("motion_score", "motion_error")

    def __init__(self, working_short_side_px: int = 128):
        if working_short_side_px < 16:
            raise ValueError(f"working_short_side_px must be >= 16, got {working_short_side_px}")
        self.working_short_side_px = working_short_side_px

    def __call__(self, batch: Batch) -> Batch:
        scores, errors = [], []
        for samples, fps, split_error in zip(batch["sample_frames"], batch["sample_fps"],
                                             batch["split_error"]):
            if split_error is not None and not samples:
                # A source-error row is not a clip: nothing to score, nothing failed here.
                scores.append(math.nan)
                errors.append(None)
                continue
            try:
                frames = [decode_gray(j, self.working_short_side_px) for j in samples or []]
                score = motion_score(frames, fps)
                error = None if len(frames) >= 2 else (
                    f"clip too short for a flow pair ({len(frames)} sample at {fps:g} fps)")
            except Exception as exc:  # noqa: BLE001 - a bad clip is a per-clip failure
                score, error = math.nan, f"{type(exc).__name__}: {exc}"
            scores.append(score)
            errors.append(error)
        return {**batch, "motion_score": scores, "motion_error": errors}
