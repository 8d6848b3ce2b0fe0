"""Temporal signatures: what a clip shows over its length, for near-duplicate decisions.

A re-upload is the same footage over the same time, not the same scene: two chunks of one
static camera share their layout and colours, so a vector of a few keyframes cannot tell them
apart, but the people or cars moving through them differ. So a clip's signature is a sequence:
a GRID x GRID grey thumbnail (area average of the luma, uint8) every 1/SIGNATURE_FPS s of the
clip, sample k being the first frame at least k / SIGNATURE_FPS s in (a frame held over the
slots it covers when the source is slower). 64 bytes a sample, 2.5 kB for a 10 s clip.

Two signatures `match` when, at some time shift of at most `max_shift_s` (searched in quarter
samples, linearly interpolated), over an overlap of at least half the shorter clip:
- `layout`: the mean over the overlap of the per-sample cosine of the mean-removed thumbnails
  (the picture: robust to re-encoding, resizing and small crops; blind to brightness gain), and
- `change`: the cosine of the two clips' residuals (each sample minus the clip's mean picture
  over the overlap), which is what moved and when. A copy moves the same way at the same times;
  another chunk of the same camera does not, whatever its background.
The score is `min(layout, change)`; when neither clip changes by more than STATIC_LEVEL grey
levels (rms over the overlap: a frozen picture, only coding noise) it is `layout` alone.
"""

from __future__ import annotations

import io
import math

import av
import cv2
import numpy as np

COLUMN = "temporal_signature"  # the payload column (curation/schema.py) the split stage fills
SIGNATURE_VERSION = "grey8-4hz-v1"
SIGNATURE_FPS = 4.0
GRID = 8
SAMPLE_BYTES = GRID * GRID
# rms residual (0-255 grey levels of the 8x8 area means) below which a clip counts as frozen:
# x264 at crf 23-34 moves these means by 0.1-0.4 levels, a car or person crossing by several.
STATIC_LEVEL = 1.0
MIN_OVERLAP_S = 1.0


def thumbnail(bgr: np.ndarray) -> np.ndarray:
    """The GRID x GRID grey area average of a BGR frame, uint8."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
    return cv2.resize(grey, (GRID, GRID), interpolation=cv2.INTER_AREA)


class SignatureBuilder:
    """Collects a clip's signature from its frames as they are committed (clip times in s)."""

    def __init__(self, fps: float = SIGNATURE_FPS):
        self.fps = fps
        self.samples: list[bytes] = []

    def add(self, bgr: np.ndarray, clip_time: float, frame_interval: float) -> None:
        # Slot k takes the first frame at least k / fps s in (half a frame early is on time);
        # a frame covers every slot up to its own time (a slow source repeats frames).
        due = clip_time + 0.5 * frame_interval
        if len(self.samples) / self.fps > due:
            return
        thumb = thumbnail(bgr).tobytes()
        while len(self.samples) / self.fps <= due:
            self.samples.append(thumb)

    def value(self) -> bytes:
        return b"".join(self.samples)


def from_video(video: bytes) -> bytes | None:
    """The signature of an encoded clip (the `video` column's mp4), decoded; None if unreadable."""
    builder = SignatureBuilder()
    try:
        with av.open(io.BytesIO(video)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 25)
            first = None
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(builder.samples) / rate
                first = t if first is None else first
                builder.add(frame.to_ndarray(format="bgr24"), t - first, 1.0 / rate)
    except (av.error.FFmpegError, IndexError, ValueError):
        return None
    return builder.value() or None


def as_array(signature: bytes) -> np.ndarray:
    """(samples, GRID * GRID) float32 of a signature's bytes."""
    return np.frombuffer(signature, np.uint8).reshape(-1, SAMPLE_BYTES).astype(np.float32)


def _scores(a: np.ndarray, b: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, overlap samples) per shift, with b's sample t + shift (linearly interpolated)
    against a's sample t; all shifts at once, masked where b has no sample."""
    ta = np.arange(a.shape[0], dtype=np.float64)
    tb = ta[None, :] + shifts[:, None]  # (S, Ta)
    valid = (tb >= -1e-9) & (tb <= b.shape[0] - 1 + 1e-9)
    tb = np.clip(tb, 0, b.shape[0] - 1)
    lo = np.floor(tb).astype(np.int64)
    hi = np.minimum(lo + 1, b.shape[0] - 1)
    w = (tb - lo)[..., None].astype(np.float32)
    xb = b[lo] * (1 - w) + b[hi] * w  # (S, Ta, D)
    xa = np.broadcast_to(a, xb.shape)
    m = valid[..., None].astype(np.float32)
    n = valid.sum(axis=1)  # (S,)
    nz = np.maximum(n, 1)[:, None]
    # layout: per-sample cosine of the mean-removed thumbnails; a flat sample (a black frame)
    # has no layout, and 2 grey levels of spread in the floor keep it near 0
    ca = xa - xa.mean(axis=2, keepdims=True)
    cb = xb - xb.mean(axis=2, keepdims=True)
    floor = 4.0 * a.shape[1]
    cos = (ca * cb).sum(2) / np.sqrt(((ca * ca).sum(2) + floor) * ((cb * cb).sum(2) + floor))
    layout = (cos * valid).sum(axis=1) / nz[:, 0]
    # change: cosine of the residuals from each clip's mean picture over the overlap
    ra = (xa - (xa * m).sum(axis=1, keepdims=True) / nz[..., None]) * m
    rb = (xb - (xb * m).sum(axis=1, keepdims=True) / nz[..., None]) * m
    ea, eb = (ra * ra).sum(axis=(1, 2)), (rb * rb).sum(axis=(1, 2))
    change = (ra * rb).sum(axis=(1, 2)) / (np.sqrt(ea * eb) + 1e-6)
    cells = nz[:, 0] * a.shape[1]
    frozen = np.maximum(ea, eb) / cells < STATIC_LEVEL ** 2  # rms residual below STATIC_LEVEL
    score = np.where(frozen, layout, np.minimum(layout, change))
    return np.where(n > 0, score, -1.0), n


def match(sig_a: bytes, sig_b: bytes, max_shift_s: float = 2.0,
          fps: float = SIGNATURE_FPS) -> tuple[float, float]:
    """(score, shift in seconds of b against a) of the best alignment; score -1 when the clips
    cannot overlap by half the shorter one (and MIN_OVERLAP_S)."""
    a, b = as_array(sig_a), as_array(sig_b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return -1.0, 0.0
    need = max(math.ceil(0.5 * min(a.shape[0], b.shape[0])), math.ceil(MIN_OVERLAP_S * fps), 2)
    reach = int(round(max_shift_s * fps))
    whole = np.arange(-reach, reach + 1, dtype=np.float64)  # whole samples, then quarters around the best
    score, n = _scores(a, b, whole)
    score = np.where(n >= need, score, -1.0)
    k = int(np.argmax(score))
    if score[k] <= -1.0:
        return -1.0, 0.0
    quarters = whole[k] + np.array([-0.75, -0.5, -0.25, 0.25, 0.5, 0.75])
    quarters = quarters[np.abs(quarters) <= reach]
    fine, fn = _scores(a, b, quarters)
    fine = np.where(fn >= need, fine, -1.0)
    if fine.size and fine.max() > score[k]:
        j = int(np.argmax(fine))
        return float(fine[j]), float(quarters[j]) / fps
    return float(score[k]), float(whole[k]) / fps
