"""Dissolves (issue 36): the span measurement of stages/split/dissolves.py on small arrays, and
the split stage on generated footage whose blend weights are known (curation/synth.py,
Shot.dissolve_in): every blended frame in which both shots weigh at least 5% goes to no clip."""

from __future__ import annotations

import io
import math

import av
import cv2
import numpy as np
import pytest

from curation import synth
from stages.split import SplitStage
from stages.split.dissolves import DISSOLVE_MIN_WEIGHT, LongDissolves, dissolve_at

THUMB = (64, 36)  # (width, height) of the thumbnails the split measures on
MAX_FRAMES = 50  # the longest dissolve measured in the array tests (2 s at 25 fps, the default)
EDGE = 40  # frames of each shot outside a dissolve


def decode(video: bytes) -> list[np.ndarray]:
    """A clip's frames, BGR."""
    with av.open(io.BytesIO(video)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(c.streams.video[0])]


def _split_with_cuts(stage: SplitStage, path) -> tuple[list[dict], list[int]]:
    """The clip rows of `path` and the cuts split applied (merged, flashes left out)."""
    stats: dict = {}
    rows = list(stage.iter_clips(str(path), stats))
    return rows, stats.get("cuts", [])


def _true_span(weights: np.ndarray) -> tuple[int, int]:
    """First and last frame in which both shots weigh at least DISSOLVE_MIN_WEIGHT."""
    inside = np.flatnonzero((weights >= DISSOLVE_MIN_WEIGHT) & (weights <= 1 - DISSOLVE_MIN_WEIGHT))
    return int(inside[0]), int(inside[-1])


def _moving(seed: int, frames: int, velocity: tuple[float, float]) -> np.ndarray:
    """A picture like synth.background on a thumbnail (colour areas with edges between them:
    smooth random fields over a quarter of its width pushed towards two levels, 40 and 215,
    and finer ones over a tenth adding a fifth of the contrast) moving `velocity` thumbnail px a
    frame, sub-pixel, with Gaussian noise of one level (as a codec leaves): (frames, 36, 64, 3)
    float32. 0.2 px a frame is a pan of 1.5 px a frame at 480 px."""
    rng = np.random.default_rng(seed)
    w, h = THUMB
    pad = math.ceil(max(abs(v) for v in velocity) * frames) + 2
    size = (w + 2 * pad, h + 2 * pad)

    def layer(cell_px: float) -> np.ndarray:
        grid = rng.random((math.ceil(size[1] / cell_px) + 1, math.ceil(size[0] / cell_px) + 1, 3), dtype=np.float32)
        return cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC)

    areas = 0.5 + 0.5 * np.tanh(8 * (layer(w / 4) - 0.5)) / math.tanh(4)
    field = np.clip(0.8 * areas + 0.2 * layer(w / 10), 0, 1) * 175 + 40
    out = []
    for t in range(frames):
        m = np.float32([[1, 0, -pad - velocity[0] * t], [0, 1, -pad - velocity[1] * t]])
        out.append(cv2.warpAffine(field, m, (w, h), flags=cv2.INTER_LINEAR))
    return np.stack(out) + rng.normal(0, 1.0, (frames, h, w, 3)).astype(np.float32)


def _blend(weights: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (1 - weights[:, None, None, None]) * a + weights[:, None, None, None] * b


def _dissolve_weights(frames: int, curve: str) -> np.ndarray:
    return np.concatenate([np.zeros(EDGE), synth.dissolve_weights(frames, curve), np.ones(EDGE)])


@pytest.mark.parametrize("curve", ["linear", "ease"])
@pytest.mark.parametrize("frames", [6, 12, 24, 48])
def test_the_span_of_a_dissolve_is_measured_to_a_frame(frames, curve):
    """Two moving pictures cross-faded: from any cut near the middle (where the detectors put
    one), the span is the frames in which both weigh at least 5%, within one frame, and the
    one cut is the first frame the new picture weighs more than half."""
    weights = _dissolve_weights(frames, curve)
    n = len(weights)
    thumbs = _blend(weights, _moving(1, n, (0.2, 0.05)), _moving(2, n, (-0.15, 0.1)))
    lo, hi = _true_span(weights)
    half = int(np.flatnonzero(weights > 0.5)[0])
    for c in range(half - 2, half + 3):
        found = dissolve_at(thumbs, c, MAX_FRAMES)
        assert found is not None, c
        assert abs(found.lo - lo) <= 1 and abs(found.hi - hi) <= 1 and abs(found.cut - half) <= 1, (c, found, lo, hi)
    # Longer than the longest trimmed: not measured (split keeps the detector's one cut).
    assert dissolve_at(thumbs, half, hi - lo - 2) is None


def _not_dissolves() -> dict[str, np.ndarray]:
    """Sequences with a change that is not a cross-fade of two pictures."""
    n = 100
    a, b = _moving(3, n, (0.2, 0.0)), _moving(4, n, (0.0, 0.2))
    step = (np.arange(n) >= 50).astype(np.float32)
    gain = np.ones(n, np.float32)
    gain[35:50], gain[50:65] = np.linspace(1, 0, 16)[1:], np.linspace(0, 1, 16)[:-1]
    through_black = _blend(step, a, b) * gain[:, None, None, None]
    flash = np.zeros(n, np.float32)
    flash[50:53] = (1.0, 0.7, 0.4)
    w, h = THUMB
    still = _moving(5, 1, (0.0, 0.0))[0]
    zoom = np.stack([cv2.warpAffine(still, cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, 1 + 0.3 * t / n), (w, h),
                                    borderMode=cv2.BORDER_REFLECT) for t in range(n)])
    return {
        "hard cut": _blend(step, a, b),
        "fade through black": through_black,
        "fade through white": through_black + 255 * (1 - gain[:, None, None, None]),
        "light switched on": a * (0.3 + 0.7 * step[:, None, None, None]),
        "slow change of exposure": a * np.clip(np.linspace(0.5, 1.2, n), 0, 1)[:, None, None, None],
        "flash": a * (1 - flash[:, None, None, None]) + 255 * flash[:, None, None, None],
        "fast pan": _moving(6, n, (4.0, 0.5)),
        "whip": np.concatenate([_moving(7, 40, (0.2, 0.0)), _moving(7, 20, (9.0, 0.0))[1:],
                                _moving(8, 41, (0.2, 0.0))]),
        "zoom": zoom,
    }


def test_long_dissolves_are_found_by_their_ends():
    """LongDissolves: windows as long as the longest dissolve trimmed whose ends are two
    pictures and whose middle has a blend's contrast: one candidate about the middle of a
    48-frame dissolve (which the dissolve detector's 12-frame windows miss), none at a hard
    cut or in motion (a picture's middle keeps its contrast)."""
    weights = _dissolve_weights(48, "linear")
    n = len(weights)
    thumbs = _blend(weights, _moving(1, n, (0.2, 0.05)), _moving(2, n, (-0.15, 0.1)))
    half = int(np.flatnonzero(weights > 0.5)[0])
    cases = {"dissolve": thumbs, **{k: v for k, v in _not_dissolves().items() if k in ("hard cut", "fast pan", "zoom")}}
    for name, frames in cases.items():
        screen = LongDissolves(MAX_FRAMES)
        found = [screen.push(i, t) for i, t in enumerate(frames)] + [screen.end()]
        found = [c for c in found if c is not None]
        if name == "dissolve":
            assert len(found) == 1 and abs(found[0] - half) <= 2, found
        else:
            assert found == [], (name, found)


@pytest.mark.parametrize("name", list(_not_dissolves()))
def test_no_span_where_nothing_is_blended(name):
    """A cut anywhere in a hard cut, a fade, a light switched on, a change of exposure, a flash
    or motion: no dissolve is measured, so nothing is trimmed there."""
    thumbs = _not_dissolves()[name]
    found = {c: dissolve_at(thumbs, c, MAX_FRAMES) for c in range(1, len(thumbs) - 1)}
    assert all(f is None for f in found.values()), {c: f for c, f in found.items() if f is not None}


# ---- the split stage on generated footage ----------------------------------------------------------

SIZE = (320, 180)


def _dissolve_video(path, frames: int, curve: str, fps: float, moving_first: str = "pan"):
    """Shot A (a pan, or a moving square) dissolving into shot B (the other), EDGE frames of
    each alone; returns the ground truth, the weights of B per frame and both shots' frames."""
    pan = {"motion": "pan", "speed_px_per_frame": 1.0}
    square = {"motion": "square", "speed_px_per_frame": 2.0}
    first, second = (pan, square) if moving_first == "pan" else (square, pan)
    spec = [{"frames": EDGE + frames, "seed": 61, **first},
            {"frames": frames + EDGE, "seed": 62, **second, "dissolve_in": frames, "dissolve_curve": curve}]
    truth = synth.make_video(path, spec, fps, SIZE)
    shots = [np.stack(list(synth.shot_frames(synth.Shot.from_dict(s), SIZE))).astype(np.float32) for s in spec]
    start = truth["shots"][1]["start"]
    weights = np.concatenate([np.zeros(start), truth["dissolves"][0]["weights"], np.ones(EDGE)])
    assert len(weights) == truth["frames"]
    return truth, weights, shots, start


CASES = [(n, curve, 25, first) for n, first in ((6, "pan"), (12, "square"), (24, "pan"), (48, "square"))
         for curve in ("linear", "ease")] + [(31, "linear", 29.97, "pan")]  # issue 36's example: 31 frames at 29.97 fps


@pytest.mark.parametrize("frames, curve, fps, first", CASES)
def test_a_dissolve_is_cut_out_of_both_clips(tmp_path, frames, curve, fps, first):
    """Linear and eased dissolves of 6 to 48 frames between shots with motion: one cut at the
    half-way frame; the clip before ends and the clip after starts within one frame of the span
    in which both shots weigh at least 5%; the four edge frames, decoded, hold one shot only;
    the frames cut out are counted in dissolve_frames_trimmed, each clip its side of the cut."""
    truth, weights, (a, b), b_start = _dissolve_video(tmp_path / "d.mp4", frames, curve, fps, first)
    lo, hi = _true_span(weights)
    half = int(np.flatnonzero(weights > 0.5)[0])
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "d.mp4")
    assert len(cuts) == 1 and abs(cuts[0] - half) <= 1, (cuts, half)
    assert len(rows) == 2, [(r["start_frame"], r["end_frame"]) for r in rows]
    before, after = rows
    assert (before["start_frame"], after["end_frame"]) == (0, truth["frames"])
    assert abs(before["end_frame"] - lo) <= 1 and abs(after["start_frame"] - (hi + 1)) <= 1, \
        (before["end_frame"], after["start_frame"], lo, hi)
    assert before["dissolve_frames_trimmed"] == cuts[0] - before["end_frame"]
    assert after["dissolve_frames_trimmed"] == after["start_frame"] - cuts[0]
    assert before["dark_frames_trimmed"] == after["dark_frames_trimmed"] == 0
    _check_edges(before, a, b, 0, b_start, 1 - weights)
    _check_edges(after, b, a, b_start, b_start, weights)


def _check_edges(row: dict, own: np.ndarray, other: np.ndarray, own_start: int, b_start: int,
                 own_weights: np.ndarray) -> None:
    """The clip's first and last frames, decoded, are its own shot's and hold nothing of the
    other beyond DISSOLVE_MIN_WEIGHT: their distance to the own shot's source frame is at most
    the encoder's error on the clip's frames that hold the own shot alone, plus that weight of
    the two shots' difference at that frame. (own_start, b_start: first frames of the own shot
    and of the second shot in the source; the first shot starts at 0.)"""
    frames = [f[..., ::-1].astype(np.float32) for f in decode(row["video"])]  # BGR -> RGB
    index = list(range(row["start_frame"], row["end_frame"]))
    assert len(frames) == len(index)
    other_start = 0 if own_start else b_start

    def distance(x: np.ndarray, t: int) -> float:
        return float(np.abs(x - own[t - own_start]).mean())

    alone = [distance(x, t) for x, t in zip(frames, index) if own_weights[t] == 1.0]
    assert alone, "no frame of the clip holds its shot alone"
    for x, t in ((frames[0], index[0]), (frames[-1], index[-1])):
        k = t - other_start
        spread = float(np.abs(own[t - own_start] - other[k]).mean()) if 0 <= k < len(other) else 0.0
        assert distance(x, t) <= max(alone) + DISSOLVE_MIN_WEIGHT * spread, (t, distance(x, t), max(alone), spread)


def test_a_dissolve_longer_than_max_dissolve_s_keeps_its_one_cut(tmp_path):
    """A 16-frame dissolve with max_dissolve_s 0.4 s (10 frames): the dissolve detector's single
    cut about its middle, the clips meeting there, nothing counted as trimmed."""
    truth, weights, _, _ = _dissolve_video(tmp_path / "long.mp4", 16, "linear", 25)
    half = int(np.flatnonzero(weights > 0.5)[0])
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5, max_dissolve_s=0.4),
                                  tmp_path / "long.mp4")
    assert len(cuts) == 1 and abs(cuts[0] - half) <= 2, (cuts, half)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, cuts[0]), (cuts[0], truth["frames"])]
    assert all(r["dissolve_frames_trimmed"] == 0 for r in rows)


def test_no_trim_on_motion_flashes_lights_or_exposure(tmp_path):
    """Shots joined by hard cuts: a fast pan, a zoom, a light switched on, a flash, a slow change
    of exposure. A content detector set low (threshold 5, shots of a frame) cuts inside them
    too, so the span is measured at many cuts: none is a dissolve, and the clips are those of
    split with dissolve trimming off."""
    size = SIZE
    fast = list(synth.shot_frames(synth.Shot(frames=50, seed=71, motion="pan", speed_px_per_frame=12.0), size))
    still = synth.background(72, size)
    zoom = [cv2.warpAffine(still, cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), 0.0, 1 + 0.6 * t / 50),
                           size, borderMode=cv2.BORDER_REFLECT) for t in range(50)]
    lit = list(synth.shot_frames(synth.Shot(frames=50, seed=73, motion="pan", speed_px_per_frame=1.0), size))
    lit = [np.round(f * 0.3).astype(np.uint8) for f in lit[:25]] + lit[25:]
    flash = list(synth.shot_frames(synth.Shot(frames=50, seed=74, motion="pan", speed_px_per_frame=1.0), size))
    for i, g in zip(range(25, 28), (1.0, 0.7, 0.4)):
        flash[i] = np.round(flash[i] * (1 - g) + 255 * g).astype(np.uint8)
    exposure = list(synth.shot_frames(synth.Shot(frames=60, seed=75, motion="square", speed_px_per_frame=2.0), size))
    gain = np.clip(np.linspace(0.45, 1.15, 60), 0, 1)
    exposure = [np.round(f * g).astype(np.uint8) for f, g in zip(exposure, gain)]
    synth.write_video(tmp_path / "changes.mp4", iter(fast + zoom + lit + flash + exposure), 25)
    for cascade, shot_frames in ((None, 15), ([{"detector": "content", "threshold": 5.0}], 1)):
        args = {"detector": "cascade", "cascade": cascade, "min_duration_s": 0.2, "min_scene_len_frames": shot_frames}
        rows, cuts = _split_with_cuts(SplitStage(**args), tmp_path / "changes.mp4")
        off, off_cuts = _split_with_cuts(SplitStage(**args, max_dissolve_s=0), tmp_path / "changes.mp4")
        assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(r["start_frame"], r["end_frame"]) for r in off]
        assert cuts == off_cuts and all(r["dissolve_frames_trimmed"] == 0 for r in rows)
        assert len(cuts) >= 4  # the hard cuts at least: the span was measured there
    assert len([c for c in cuts if c % 50]) > 20, cuts  # and with the low threshold, inside the shots too


def test_dissolves_between_several_shots_and_a_hard_cut(tmp_path):
    """Three shots dissolving into one another (12 and 24 frames, eased), then a hard cut: each
    span cut out once (the measurement does not reach across another cut or span), the hard cut
    as it is."""
    spec = [{"frames": 52, "seed": 81, "motion": "pan", "speed_px_per_frame": 2.0},
            {"frames": 76, "seed": 82, "motion": "square", "speed_px_per_frame": 3.0, "dissolve_in": 12,
             "dissolve_curve": "ease"},
            {"frames": 64, "seed": 83, "motion": "pan", "speed_px_per_frame": 1.0, "dissolve_in": 24,
             "dissolve_curve": "ease"},
            {"frames": 40, "seed": 84}]
    truth = synth.make_video(tmp_path / "chain.mp4", spec, 25, SIZE)
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "chain.mp4")
    spans = []
    for d in truth["dissolves"]:
        lo, hi = _true_span(np.asarray(d["weights"]))
        spans.append((d["start"] + lo, d["start"] + hi))
    hard = truth["cut_frames"][0]
    assert len(rows) == 4 and len(cuts) == 3, ([(r["start_frame"], r["end_frame"]) for r in rows], cuts)
    for (lo, hi), before, after in zip(spans, rows, rows[1:]):
        assert abs(before["end_frame"] - lo) <= 1 and abs(after["start_frame"] - (hi + 1)) <= 1, (lo, hi)
    assert rows[2]["end_frame"] == rows[3]["start_frame"] == hard and cuts[2] == hard
