"""easyocr's CRAFT text detector, run for throughput and flat memory: `TextDetector.detect` gives what
`easyocr.Reader.detect(frames, reformat=False, ...)` gives (the same pre- and post-processing,
easyocr's own functions), but runs the network differently:

- a few frames a forward pass, not every frame of one size at once: CRAFT's first layers hold
  64 channels at full resolution (47 MB a 320x576 frame in float32), so easyocr's one batch of
  24 keyframes peaked at several GB, and on CPUs a small batch is also faster (it stays in cache);
- channels-last tensors under inference mode (with one frame a pass, float32 ran at 1.10x
  easyocr's speed here, 1.14x as on a CPU without AVX-512: float32 CRAFT is compute-bound);
- frames padded up to a few working shapes (`pad_multiple_px`), so that oneDNN reuses its
  kernels instead of building and caching new ones for every frame size it meets; the padding
  extends easyocr's own (black before normalisation), and the score maps are cropped back to
  easyocr's size before boxes are read off them;
- optionally in bfloat16 (`precision`), on CPUs that compute it natively (AVX512-BF16 or AMX),
  about 2x the float32 speed there. The score head (`conv_cls`, under 2% of the work) stays in
  float32: with its outputs rounded to bfloat16's 8 bits the scores moved by ~0.004 at the 0.5
  threshold, which split a line's box in two and changed one ratio by 0.04; with the head in
  float32 the largest change on the 44 text cases of tests/test_ocr.py was 0.003 (the tests
  bound it by 0.005; bench/ocr_bench.py prints it).
"""

from __future__ import annotations

import functools
from typing import Literal

import cv2
import numpy as np

Precision = Literal["auto", "fp32", "bf16"]
CANVAS_PX = 2560  # easyocr's canvas_size: frames larger than this are scaled down first
LINK_THRESHOLD = 0.4  # easyocr's defaults, as Reader.detect passes them
SLOPE_THS, YCENTER_THS, HEIGHT_THS = 0.1, 0.5, 0.5


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume not
        return False


def validate_precision(precision: str) -> None:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")


def resolve_precision(precision: Precision, device: str) -> str:
    """"auto": bf16 on CPUs with native bf16, fp32 elsewhere (on GPUs too: CRAFT is cheap there)."""
    validate_precision(precision)
    if precision == "auto":
        return "bf16" if device == "cpu" and native_bf16() else "fp32"
    return precision


def network_input(frame: np.ndarray, pad_multiple_px: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """(normalised (3, H, W) float32 input, easyocr's resize ratio, easyocr's padded (h, w)).

    easyocr pads to a multiple of 32 with black (zeros before normalisation); the input is
    padded further, the same way, to a multiple of pad_multiple_px.
    """
    from easyocr.imgproc import normalizeMeanVariance, resize_aspect_ratio

    resized, ratio, _ = resize_aspect_ratio(frame, CANVAS_PX, interpolation=cv2.INTER_LINEAR, mag_ratio=1.0)
    h32, w32 = resized.shape[:2]
    h, w = (-(-s // pad_multiple_px) * pad_multiple_px for s in (h32, w32))
    if (h, w) != (h32, w32):
        canvas = np.zeros((h, w, resized.shape[2]), np.float32)
        canvas[:h32, :w32] = resized
        resized = canvas
    return np.transpose(normalizeMeanVariance(resized), (2, 0, 1)), ratio, (h32, w32)


def boxes_from_scores(score_text: np.ndarray, score_link: np.ndarray, ratio: float, text_threshold: float,
                      low_text: float, width_ths: float, add_margin: float,
                      min_size: int) -> tuple[list, list]:
    """(horizontal boxes [x_min, x_max, y_min, y_max], free quadrilaterals) of one frame's score
    maps, as easyocr's get_textbox + Reader.detect read them (poly=False)."""
    from easyocr.craft_utils import adjustResultCoordinates, getDetBoxes
    from easyocr.utils import diff, group_text_box

    boxes, polys, _ = getDetBoxes(score_text, score_link, text_threshold, LINK_THRESHOLD, low_text, False, False)
    boxes = adjustResultCoordinates(boxes, 1 / ratio, 1 / ratio)
    polys = adjustResultCoordinates(polys, 1 / ratio, 1 / ratio)
    polys = [p if p is not None else b for p, b in zip(polys, boxes)]
    text_box = [np.array(p).astype(np.int32).reshape(-1) for p in polys]
    horizontal, free = group_text_box(text_box, SLOPE_THS, YCENTER_THS, HEIGHT_THS, width_ths, add_margin, True)
    if min_size:
        horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > min_size]
        free = [q for q in free if max(diff([c[0] for c in q]), diff([c[1] for c in q])) > min_size]
    return horizontal, free


def passes(shapes: list[tuple[int, ...]], frames_per_pass: int) -> list[list[int]]:
    """Indices of the frames to run together: frames of one shape, at most frames_per_pass a pass."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    return [indices[start:start + frames_per_pass] for indices in by_shape.values()
            for start in range(0, len(indices), frames_per_pass)]


@functools.cache
def float32_module() -> type:
    """The class of a module run in float32 whatever the autocast around it (bfloat16 inputs
    are widened); made on first use, so importing this module does not import torch."""
    import torch

    class Float32(torch.nn.Module):
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return self.module(x.float())

    return Float32


class TextDetector:
    """CRAFT (easyocr's loaded network) over frames, a few at a time (module docstring)."""

    def __init__(self, net: torch.nn.Module, device: str, precision: str, frames_per_pass: int,
                 pad_multiple_px: int):
        if frames_per_pass < 1 or pad_multiple_px < 32 or pad_multiple_px % 32:
            raise ValueError(f"frames_per_pass must be >= 1 and pad_multiple_px a multiple of 32, got "
                             f"{frames_per_pass}, {pad_multiple_px}")
        import torch

        self.device, self.precision = device, precision
        self.frames_per_pass, self.pad_multiple_px = frames_per_pass, pad_multiple_px
        self.net = net.eval().to(memory_format=torch.channels_last)
        craft = getattr(net, "module", net)  # easyocr wraps it in DataParallel on GPUs
        if precision == "bf16" and not isinstance(craft.conv_cls, float32_module()):
            craft.conv_cls = float32_module()(craft.conv_cls)  # the score head in float32 (module docstring)

    def score_maps(self, frames: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Per frame: (text score map, link score map, easyocr's resize ratio), at easyocr's size."""
        import torch

        inputs = [network_input(f, self.pad_multiple_px) for f in frames]
        out: list = [None] * len(frames)
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            for part in passes([x.shape for x, _, _ in inputs], self.frames_per_pass):
                x = torch.from_numpy(np.stack([inputs[i][0] for i in part])).to(self.device)
                y, _ = self.net(x.contiguous(memory_format=torch.channels_last))  # (B, H/2, W/2, 2)
                y = y.float().cpu().numpy()
                for i, maps in zip(part, y):
                    h, w = (s // 2 for s in inputs[i][2])
                    out[i] = (maps[:h, :w, 0], maps[:h, :w, 1], inputs[i][1])
        return out

    def detect(self, frames: list[np.ndarray], text_threshold: float, low_text: float, width_ths: float,
               add_margin: float, min_size: int) -> tuple[list[list], list[list]]:
        """(horizontal boxes per frame, free quadrilaterals per frame), as Reader.detect(frames, reformat=False)."""
        horizontal, free = [], []
        for score_text, score_link, ratio in self.score_maps(frames):
            h, f = boxes_from_scores(score_text, score_link, ratio, text_threshold, low_text, width_ths,
                                     add_margin, min_size)
            horizontal.append(h)
            free.append(f)
        return horizontal, free
