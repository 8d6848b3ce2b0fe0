"""The `perceptual` embedding (no weights): a clip's unit vector from its keyframes' layout and colours."""

from __future__ import annotations

import cv2
import numpy as np

PERCEPTUAL_VERSION = "dct8-crcb4-hs12x4-v1"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (float(np.linalg.norm(v)) + 1e-6)


def keyframe_features(jpeg: bytes) -> np.ndarray | None:
    """Luma DCT layout, Cr/Cb at 4x4 and a hue/saturation histogram of one JPEG; None if unreadable."""
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) if jpeg else None
    if bgr is None:
        return None
    ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb).astype(np.float32)
    luma = cv2.dct(cv2.resize(ycc[..., 0], (32, 32), interpolation=cv2.INTER_AREA))[:8, :8].ravel()[1:]
    chroma = np.concatenate([cv2.resize(ycc[..., c] - 128.0, (4, 4), interpolation=cv2.INTER_AREA).ravel()
                             for c in (1, 2)])
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [12, 4], [0, 180, 0, 256]).ravel()
    hist = np.sqrt(hist / max(float(hist.sum()), 1.0))
    # Weights chosen on generated re-uploads: layout first, colour as a tie-breaker.
    return np.concatenate([_unit(luma), 0.25 * _unit(chroma), 0.5 * _unit(hist - hist.mean())])


def perceptual_embedding(keyframes: list[bytes] | None) -> np.ndarray | None:
    """The clip's unit vector (float32, 143 dims) from its keyframes; None when none decodes."""
    feats = [f for f in (keyframe_features(b) for b in keyframes or []) if f is not None]
    if not feats:
        return None
    return _unit(np.mean(feats, axis=0)).astype(np.float32)
