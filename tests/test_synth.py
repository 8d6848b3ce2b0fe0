"""Tests for curation.synth: the synthetic footage must match the ground truth it reports."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scenedetect import ContentDetector, FrameTimecode, ThresholdDetector

from curation import synth

SIZE = (160, 90)  # (width, height): small keeps encoding and detection fast
HARD_CUTS = [
    {"frames": 30, "seed": 1},
    {"frames": 30, "seed": 2, "motion": "pan", "speed_px_per_frame": 4.0},
    {"frames": 30, "seed": 3, "motion": "square", "speed_px_per_frame": 6.0, "text": "NEWS"},
    {"frames": 30, "seed": 4, "motion": "pan", "speed_px_per_frame": 1.5, "text": "BIG", "text_height_frac": 0.3},
]
FADE = [
    {"frames": 40, "seed": 5, "motion": "pan", "speed_px_per_frame": 2.0, "fade_out": 12},
    {"frames": 40, "seed": 6, "fade_in": 12},
]


def decode_bgr(path: Path):
    """Yield every decoded frame as BGR uint8, as scenedetect expects."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="bgr24")


def count_frames(path: Path) -> int:
    return sum(1 for _ in decode_bgr(path))


def detect_cuts(detector, path: Path, fps: float) -> list[int]:
    """Run a scenedetect detector frame by frame (0.7.2 API) and return its cut frame numbers."""
    cuts, index = [], 0
    for index, frame in enumerate(decode_bgr(path)):
        cuts += [tc.frame_num for tc in detector.process_frame(FrameTimecode(index, fps=fps), frame)]
    cuts += [tc.frame_num for tc in detector.post_process(FrameTimecode(index, fps=fps))]
    return cuts


def test_decoded_frames_and_rate_match_spec(tmp_path):
    truth = synth.make_video(tmp_path / "a.mp4", HARD_CUTS, 29.97, SIZE)
    assert truth["frames"] == sum(s["frames"] for s in HARD_CUTS) == count_frames(tmp_path / "a.mp4")
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(30000, 1001)
        assert (stream.codec_context.width, stream.codec_context.height) == SIZE


def test_write_video_streams_a_generator_and_rejects_odd_sizes(tmp_path):
    frames = (np.full((32, 48, 3), i * 10, np.uint8) for i in range(7))
    assert synth.write_video(tmp_path / "g.mp4", frames, Fraction(25)) == 7 == count_frames(tmp_path / "g.mp4")
    with pytest.raises(ValueError, match="even"):
        synth.write_video(tmp_path / "odd.mp4", [np.zeros((31, 48, 3), np.uint8)], 25)


def test_same_call_gives_the_same_video(tmp_path):
    # The frames fed to the encoder are identical; x264 itself was seen to vary its bit
    # allocation by a few bytes between runs under load, so compare what decodes.
    truth_a = synth.make_video(tmp_path / "a.mp4", HARD_CUTS, 24, SIZE)
    truth_b = synth.make_video(tmp_path / "b.mp4", HARD_CUTS, 24, SIZE)
    assert truth_a["cut_frames"] == truth_b["cut_frames"]
    with av.open(str(tmp_path / "a.mp4")) as a, av.open(str(tmp_path / "b.mp4")) as b:
        frames_a = [f.to_ndarray(format="rgb24").astype(int) for f in a.decode(video=0)]
        frames_b = [f.to_ndarray(format="rgb24").astype(int) for f in b.decode(video=0)]
    assert len(frames_a) == len(frames_b) == truth_a["frames"]
    assert max(np.abs(x - y).mean() for x, y in zip(frames_a, frames_b)) < 1.0


# min_scene_len=1 reports every frame scoring over the threshold: with the default (15),
# the flash filter merges a run of high scores into one cut, hiding a shot that is too busy.
@pytest.mark.parametrize("min_scene_len", [15, 1])
def test_content_detector_finds_exactly_the_hard_cuts(tmp_path, min_scene_len):
    truth = synth.make_video(tmp_path / "a.mp4", HARD_CUTS, 25, SIZE)
    assert truth["cut_frames"] == [30, 60, 90]
    found = detect_cuts(ContentDetector(min_scene_len=min_scene_len), tmp_path / "a.mp4", 25.0)
    assert len(found) == len(truth["cut_frames"])
    assert all(abs(f - t) <= 1 for f, t in zip(found, truth["cut_frames"]))


def test_threshold_detector_finds_the_fade_and_content_detector_only_inside_it(tmp_path):
    truth = synth.make_video(tmp_path / "f.mp4", FADE, 25, SIZE)
    assert truth["cut_frames"] == [] and truth["fade_spans"] == [[28, 51]]
    first, last = truth["fade_spans"][0]
    fades = detect_cuts(ThresholdDetector(), tmp_path / "f.mp4", 25.0)
    assert len(fades) == 1 and first <= fades[0] <= last
    # ContentDetector sees the jump into pure black as a cut: it must fall inside the fade.
    cuts = detect_cuts(ContentDetector(min_scene_len=1), tmp_path / "f.mp4", 25.0)
    assert cuts and all(first <= c <= last for c in cuts)


def test_fades_go_to_and_from_black():
    shot = synth.Shot(frames=20, seed=7, fade_in=5, fade_out=6)
    means = [float(f.mean()) for f in synth.shot_frames(shot, SIZE)]
    assert means[0] == 0 and means[-1] == 0
    assert means[:5] == sorted(means[:5]) and means[-6:] == sorted(means[-6:], reverse=True)
    assert means[5] == means[10] > means[4]  # static between the fades


def test_fades_to_white_and_eased():
    linear = [f for f in synth.shot_frames(synth.Shot(frames=20, seed=7, fade_in=5, fade_out=6), SIZE)]
    same = synth.shot_frames(synth.Shot(frames=20, seed=7, fade_in=5, fade_out=6, fade_curve="linear",
                                        fade_to="black"), SIZE)
    assert all(np.array_equal(a, b) for a, b in zip(linear, same))  # the defaults: today's frames
    white = [float(f.mean()) for f in synth.shot_frames(synth.Shot(frames=20, seed=7, fade_in=5, fade_out=6,
                                                                   fade_to="white"), SIZE)]
    assert white[0] == 255 and white[-1] == 255
    assert white[:6] == sorted(white[:6], reverse=True) and white[-7:] == sorted(white[-7:])
    assert white[5] == float(linear[5].mean())
    eased = [float(f.mean()) for f in synth.shot_frames(synth.Shot(frames=20, seed=7, fade_in=5, fade_out=6,
                                                                   fade_curve="ease"), SIZE)]
    lin = [float(f.mean()) for f in linear]
    assert eased[0] == 0 and eased[:5] == sorted(eased[:5])
    assert eased[1] < lin[1] and eased[4] > lin[4]  # slow at both ends of the ramp
    for bad in ({"fade_curve": "cubic"}, {"fade_to": "grey"}):
        with pytest.raises(ValueError):
            synth.Shot(frames=20, seed=7, fade_in=5, **bad)


def test_distinct_seeds_cut_hard_and_equal_seeds_are_refused(tmp_path):
    looks = [synth.background(seed, SIZE) for seed in range(12)]
    assert min(synth.content_score(a, b) for a, b in zip(looks, looks[1:])) >= synth.MIN_CUT_SCORE
    with pytest.raises(ValueError, match="cut score"):
        synth.make_video(tmp_path / "same.mp4", [{"frames": 5, "seed": 9}, {"frames": 5, "seed": 9}], 25, SIZE)
    assert not (tmp_path / "same.mp4").exists()


def test_pan_shifts_content_by_speed():
    frames = list(synth.shot_frames(synth.Shot(frames=4, seed=8, motion="pan", speed_px_per_frame=3.0), SIZE))
    for a, b in zip(frames, frames[1:]):
        assert np.array_equal(b[:, :-3], a[:, 3:]) and not np.array_equal(a, b)


def test_square_moves_at_speed_over_static_background():
    speed = 5.0
    shot = synth.Shot(frames=6, seed=9, motion="square", speed_px_per_frame=speed)
    still = synth.background(9, SIZE)
    lefts = []
    for frame in synth.shot_frames(shot, SIZE):
        columns = np.nonzero((frame != still).any(axis=(0, 2)))[0]
        lefts.append(columns[0])
        assert columns[-1] - columns[0] + 1 == round(shot.square_frac * SIZE[1])  # fixed size
    assert np.all(np.diff(lefts) == speed)


def test_text_box_area_ratio_is_the_drawn_box(tmp_path):
    text_shot = {"frames": 2, "seed": 10, "text": "HELLO", "text_height_frac": 0.25}
    truth = synth.make_video(tmp_path / "t.mp4", [text_shot], 25, SIZE)
    with_text = next(synth.shot_frames(synth.Shot(**text_shot), SIZE))
    changed = np.argwhere((with_text != synth.background(10, SIZE)).any(axis=2))
    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0) + 1
    assert truth["shots"][0]["text_box_area_ratio"] == (x1 - x0) * (y1 - y0) / (SIZE[0] * SIZE[1]) > 0.05
    # Dark text pixels inside a white box: both must be present.
    box = with_text[y0:y1, x0:x1]
    assert (box == 255).all(axis=2).mean() > 0.3 and (box < 64).all(axis=2).any()


def test_unknown_or_inconsistent_shot_keys_fail():
    with pytest.raises(ValueError, match="unknown"):
        synth.Shot.from_dict({"frames": 3, "seed": 1, "sped": 2})
    with pytest.raises(ValueError, match="speed"):
        synth.Shot(frames=3, seed=1, motion="pan")


@pytest.mark.parametrize("make_bad", [
    lambda path, good: synth.write_corrupt_video(path, good, mode="truncate"),
    lambda path, good: synth.write_corrupt_video(path, good, mode="garbage"),
    lambda path, good: synth.write_zero_byte(path),
    lambda path, good: synth.write_not_a_video(path),
], ids=["truncated", "garbage", "zero_byte", "not_a_video"])
def test_bad_files_do_not_decode_fully(tmp_path, make_bad):
    good = tmp_path / "good.mp4"
    n_good = synth.make_video(good, [{"frames": 40, "seed": 1}, {"frames": 40, "seed": 2}], 25, SIZE)["frames"]
    make_bad(tmp_path / "bad.mp4", good)
    decoded = 0
    with pytest.raises(av.error.FFmpegError):
        with av.open(str(tmp_path / "bad.mp4")) as container:
            for _ in container.decode(video=0):
                decoded += 1
    assert decoded < n_good


def test_demo_footage_cli(tmp_path):
    synth.main([str(tmp_path)])
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    valid = {name: gt for name, gt in truth.items() if gt["valid"]}
    assert len(valid) >= 5 and len(truth) - len(valid) >= 3
    assert {gt["kind"] for gt in truth.values() if not gt["valid"]} >= {"zero_byte", "not_a_video"}
    assert len({gt["fps"] for gt in valid.values()}) >= 3
    assert any(gt["fade_spans"] for gt in valid.values())
    assert {s["motion"] for gt in valid.values() for s in gt["shots"]} == {"static", "pan", "square"}
    assert max(s["text_box_area_ratio"] for gt in valid.values() for s in gt["shots"]) > 0.1
    for name, gt in valid.items():
        assert 6 <= gt["frames"] / gt["fps"] <= 15, name
        assert gt["size"][0] <= 640 and gt["size"][1] <= 360
    assert count_frames(tmp_path / "fade_30fps.mp4") == valid["fade_30fps.mp4"]["frames"]
    with pytest.raises(SystemExit):  # refuses to overwrite without --overwrite
        synth.main([str(tmp_path)])


@pytest.mark.parametrize("curve", ["linear", "ease"])
def test_a_shot_dissolves_in_over_the_frames_it_says(tmp_path, curve):
    """dissolve_in: the shot's first frames are blended with the last ones of the shot before,
    its weight (i + 1) / (n + 1) (through smoothstep when eased); the boundary is neither a cut
    nor a fade, and the shots overlap by those frames."""
    a = {"frames": 30, "seed": 11, "motion": "pan", "speed_px_per_frame": 2.0}
    b = {"frames": 30, "seed": 12, "motion": "square", "speed_px_per_frame": 3.0, "dissolve_in": 8,
         "dissolve_curve": curve}
    truth = synth.make_video(tmp_path / "d.mp4", [a, b, {"frames": 20, "seed": 13}], 25, SIZE)
    assert truth["frames"] == 30 + 30 + 20 - 8 == count_frames(tmp_path / "d.mp4")
    assert truth["cut_frames"] == [52] and truth["fade_spans"] == []
    (d,) = truth["dissolves"]
    assert (d["start"], d["end"], d["frames"], d["curve"]) == (22, 29, 8, curve)
    assert [(s["start"], s["end"]) for s in truth["shots"]] == [(0, 29), (22, 51), (52, 71)]
    u = np.arange(1, 9) / 9
    assert np.allclose(d["weights"], u if curve == "linear" else u * u * (3 - 2 * u))
    assert all(0 < x < y < 1 for x, y in zip(d["weights"], d["weights"][1:]))
    # The frames fed to the encoder are the mix; decoded, within the codec's error of it.
    first = list(synth.shot_frames(synth.Shot(**a), SIZE))
    second = list(synth.shot_frames(synth.Shot(**b), SIZE))
    with av.open(str(tmp_path / "d.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24").astype(float) for f in container.decode(video=0)]
    for i, w in enumerate(d["weights"]):
        mix = (1 - w) * first[22 + i] + w * second[i]
        err = np.abs(decoded[22 + i] - mix).mean()
        assert err < np.abs(decoded[22 + i] - first[22 + i]).mean() or w < 0.1, i
        assert err < np.abs(decoded[22 + i] - second[i]).mean() or w > 0.9, i
    with pytest.raises(ValueError, match="dissolve"):
        synth.make_video(tmp_path / "x.mp4", [{"frames": 5, "seed": 1, "dissolve_in": 2}], 25, SIZE)
    with pytest.raises(ValueError, match="dissolve"):
        synth.make_video(tmp_path / "x.mp4", [a, {**b, "dissolve_in": 31}], 25, SIZE)
    with pytest.raises(ValueError):
        synth.Shot(frames=10, seed=1, dissolve_in=3, fade_in=2)
