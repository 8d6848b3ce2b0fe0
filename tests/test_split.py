"""The split stage on synthetic footage with known cuts."""

from __future__ import annotations

import collections
import io

import av
import cv2
import numpy as np
import pytest
from scenedetect import ContentDetector, FrameTimecode

from curation import synth
from stages.split import SplitStage, output_size


def decode(video: bytes) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(io.BytesIO(video)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(stream)]
        return frames, stream


def clips_of(stage: SplitStage, path, source_id="s") -> list[dict]:
    rows = stage.split_source(str(path), source_id)
    assert all(r["split_error"] is None for r in rows), rows
    return rows


def test_cuts_within_one_frame_of_ground_truth(footage):
    root, truth = footage
    rows = clips_of(SplitStage(detector="content", min_duration_s=0.5), root / "cuts.mp4")
    cuts = truth["cuts.mp4"]["cut_frames"]
    total = truth["cuts.mp4"]["frames"]
    starts = [r["start_frame"] for r in rows]
    ends = [r["end_frame"] for r in rows]
    assert len(rows) == len(cuts) + 1
    assert starts[0] == 0 and ends[-1] == total
    for found, expected in zip(starts[1:], cuts):
        assert abs(found - expected) <= 1
    # Consecutive clips tile the source: no frame lost or shared when nothing is trimmed.
    assert starts[1:] == ends[:-1]


def test_no_cut_inside_any_output_clip(footage):
    root, _ = footage
    for name in ("cuts.mp4", "pan.mp4", "ntsc.mp4"):
        for row in clips_of(SplitStage(detector="cascade", min_duration_s=0.5), root / name):
            frames, _ = decode(row["video"])
            det = ContentDetector()
            found = []
            for i, frame in enumerate(frames):
                found += det.process_frame(FrameTimecode(i, fps=row["fps"]), frame)
            assert found == [], f"{name} clip {row['start_frame']}-{row['end_frame']} has cuts {found}"


def test_clip_payload_matches_its_frame_range(footage):
    root, truth = footage
    stage = SplitStage(detector="content", min_duration_s=0.5, short_side_px=90)
    moving = 0
    for row in clips_of(stage, root / "ntsc.mp4"):
        frames, stream = decode(row["video"])
        n = row["end_frame"] - row["start_frame"]
        assert len(frames) == n
        assert stream.codec_context.name == "h264"
        assert abs(float(stream.average_rate) - 29.97) < 0.01 and row["fps"] == pytest.approx(29.97, abs=0.01)
        assert (row["width"], row["height"]) == (160, 90) == (frames[0].shape[1], frames[0].shape[0])
        assert row["duration_s"] == pytest.approx(n / row["fps"])
        assert row["start_s"] == pytest.approx(row["start_frame"] / row["fps"], abs=0.02)
        # 2 fps samples: the frames nearest 0, 0.5, 1.0 ... s into the clip.
        expected = sum(1 for k in range(100) if round(k * row["fps"] / 2) < n)
        assert len(row["sample_frames"]) == expected
        first, middle, last = (cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
                               for j in row["keyframes"])
        # Keyframes are the clip's own frames (JPEG and 4:2:0 chroma round trips aside).
        assert np.abs(first.astype(int) - frames[0]).mean() < 12
        assert np.abs(last.astype(int) - frames[-1]).mean() < 12
        diffs = [np.abs(middle.astype(int) - f).mean() for f in frames]
        if max(diffs) - min(diffs) > 2:  # a moving shot: the middle keyframe is locatable
            moving += 1
            assert abs(int(np.argmin(diffs)) - n // 2) <= row["fps"] / 4 + 1
    assert moving == 1


def test_fades_are_cut_by_the_cascade(tmp_path):
    spec = [
        {"frames": 60, "seed": 31, "motion": "pan", "speed_px_per_frame": 2.0, "fade_out": 15},
        {"frames": 60, "seed": 32, "fade_in": 15},
    ]
    truth = synth.make_video(tmp_path / "fade.mp4", spec, 24, (320, 180))
    lo, hi = truth["fade_spans"][0]
    fade_only = clips_of(SplitStage(detector="threshold", min_duration_s=0.5), tmp_path / "fade.mp4")
    cascade = clips_of(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "fade.mp4")
    for rows in (fade_only, cascade):
        assert len(rows) == 2
        assert lo <= rows[1]["start_frame"] <= hi + 1
        assert rows[0]["end_frame"] <= rows[1]["start_frame"]


def test_long_scenes_are_chunked_and_short_pieces_dropped(footage):
    root, truth = footage
    stage = SplitStage(detector="content", min_duration_s=1.0, max_duration_s=1.5)
    rows = clips_of(stage, root / "pan.mp4")
    fps = truth["pan.mp4"]["fps"]
    assert all(1.0 - 1e-9 <= r["duration_s"] <= 1.5 + 1e-9 for r in rows)
    # Two 75-frame shots at 25 fps: chunks of 37 frames (1.48 s), leftover 1 frame dropped.
    assert [r["end_frame"] - r["start_frame"] for r in rows] == [37, 37, 37, 37]
    assert [r["start_frame"] for r in rows] == [0, 37, 75, 112]
    assert fps == 25


def test_trim_drops_frames_on_both_sides_of_a_cut(footage):
    root, truth = footage
    rows = clips_of(SplitStage(detector="content", min_duration_s=0.5, trim_frames=4), root / "cuts.mp4")
    cuts = truth["cuts.mp4"]["cut_frames"]
    assert rows[0]["start_frame"] == 0  # the source start is not a cut
    for cut, before, after in zip(cuts, rows, rows[1:]):
        assert abs(before["end_frame"] - (cut - 4)) <= 1
        assert abs(after["start_frame"] - (cut + 4)) <= 1


def test_output_size_keeps_aspect_never_upscales():
    assert output_size(1920, 1080, 320) == (568, 320)
    assert output_size(1080, 1920, 320) == (320, 568)
    assert output_size(320, 180, 320) == (320, 180)


@pytest.mark.parametrize("name, reason", [
    ("empty.mp4", "empty file"),
    ("notes.mp4", "InvalidData"),
    ("truncated.mp4", "InvalidData"),  # cut at 40% of its bytes: the index at the end is lost
])
def test_bad_sources_become_error_rows(footage, name, reason):
    root, _ = footage
    rows = SplitStage(min_duration_s=0.5).split_source(str(root / name), "bad")
    errors = [r for r in rows if r["split_error"] is not None]
    assert len(errors) == 1 and errors[0]["start_frame"] is None
    assert reason in errors[0]["split_error"] and errors[0]["source_status"] == "unreadable"
    # Clips decoded before a break are kept and are whole clips.
    for r in rows:
        if r["start_frame"] is not None:
            assert len(decode(r["video"])[0]) == r["end_frame"] - r["start_frame"]


def test_fan_out_batch_carries_source_columns(footage):
    root, _ = footage
    stage = SplitStage(min_duration_s=0.5)
    out = stage({"source_path": [str(root / "cuts.mp4"), str(root / "empty.mp4")],
                 "source_id": ["a", "b"], "unit_id": ["u1", "u1"]})
    assert out["source_id"].count("a") == 3
    assert out["source_id"].count("b") == 1
    assert set(out["unit_id"]) == {"u1"}
    assert len(set(out["clip_id"])) == len(out["clip_id"])


@pytest.mark.parametrize("kwargs, key", [
    ({"detector": "magic"}, "detector"),
    ({"min_duration_s": 5, "max_duration_s": 2}, "max_duration_s"),
    ({"detector": "cascade", "cascade": [{"detector": "content", "thresh": 3}]}, "thresh"),
    ({"crf": 99}, "crf"),
    ({"preset": "veryfst"}, "preset='veryfst'"),  # x264 itself refuses these: checked at construction
    ({"x264_params": "me=diamond"}, "x264_params='me=diamond': libx264 says Error parsing option 'me = diamond'"),
    ({"x264_params": "nosuch=1"}, "nosuch = 1"),
    ({"max_dissolve_s": -1.0}, "max_dissolve_s"),
])
def test_bad_arguments_name_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SplitStage(**kwargs)


@pytest.mark.parametrize("rotation, portrait, bar", [
    (90, True, "bottom"),    # counterclockwise, like a phone held on its side
    (-90, True, "top"),      # clockwise: most phone video
    (180, False, "right"),   # upside down
])
def test_display_rotation_is_applied(tmp_path, rotation, portrait, bar):
    """A landscape-coded stream with a display matrix gives clips in display orientation."""
    from fractions import Fraction

    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(24))
        s.width, s.height, s.pix_fmt = 320, 180, "yuv420p"
        s.set_display_rotation(rotation)
        for i in range(36):
            img = np.zeros((180, 320, 3), np.uint8)
            img[:, :40] = 255  # a white bar on the coded frame's left edge
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    (row,) = clips_of(SplitStage(min_duration_s=0.5), path)
    size = (180, 320) if portrait else (320, 180)
    assert (row["width"], row["height"]) == size
    first = cv2.imdecode(np.frombuffer(row["keyframes"][0], np.uint8), cv2.IMREAD_GRAYSCALE)
    edges = {"bottom": first[-20:], "top": first[:20], "right": first[:, -20:], "left": first[:, :20]}
    opposite = {"bottom": "top", "top": "bottom", "right": "left"}[bar]
    assert edges[bar].mean() > 200 and edges[opposite].mean() < 50
    assert decode(row["video"])[0][0].shape[:2] == size[::-1]


def test_near_coincident_cuts_of_two_detectors_make_one_cut(footage, monkeypatch):
    """Content finds a cut at N, adaptive one frame later: one cut, at the true frame, and
    no one-frame fragment between them silently dropped."""
    import types

    import stages.split.segment as segment  # where _Segmenter looks make_detector up

    root, truth = footage
    true_cuts = truth["cuts.mp4"]["cut_frames"]

    class Reporter:  # reports `cuts` shifted by `offset`, `delay` frames after they happen
        event_buffer_length = 0

        def __init__(self, offset, delay):
            self.offset, self.delay = offset, delay

        def process_frame(self, timecode, _img):
            return [types.SimpleNamespace(frame_num=c + self.offset) for c in true_cuts
                    if timecode.frame_num == c + self.offset + self.delay]

    def fake_detector(spec):
        return Reporter(0, 0) if spec["detector"] == "content" else Reporter(1, 3)

    def cut_clips(**kwargs):
        stage = SplitStage(detector="cascade", min_duration_s=0.5, cascade=[
            {"detector": "content"}, {"detector": "adaptive"}], **kwargs)
        monkeypatch.setattr(segment, "make_detector", fake_detector)
        try:
            return clips_of(stage, root / "cuts.mp4")
        finally:
            monkeypatch.undo()

    rows = cut_clips()
    assert [r["start_frame"] for r in rows] == [0, *true_cuts]
    assert [r["start_frame"] for r in rows[1:]] == [r["end_frame"] for r in rows[:-1]]
    # Unmerged, the frame between the two reports is a fragment that disappears.
    unmerged = cut_clips(merge_cuts_within_frames=0)
    assert [r["start_frame"] for r in unmerged] == [0, *(c + 1 for c in true_cuts)]
    assert [r["end_frame"] for r in unmerged[:-1]] == true_cuts


def test_variable_frame_rate_source(tmp_path):
    """Irregular timestamps: clips still tile the decoded frames, at the average rate."""
    from fractions import Fraction

    path = tmp_path / "vfr.mp4"
    shots = [synth.Shot(frames=40, seed=1), synth.Shot(frames=40, seed=2)]
    frames = [f for shot in shots for f in synth.shot_frames(shot, (320, 180))]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = 320, 180, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t_ms = 0
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = t_ms, Fraction(1, 1000)
            t_ms += 30 if i % 2 else 50  # alternating 30 and 50 ms: 25 fps on average
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    rows = clips_of(SplitStage(detector="content", min_duration_s=0.5), path)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 40), (40, 80)]
    assert 20 <= rows[0]["fps"] <= 30
    # start_s follows the stream's timestamps (40 frames of 30/50 ms = 1.6 s).
    assert rows[1]["start_s"] == pytest.approx(1.6, abs=0.05)


def test_corruption_part_way_keeps_the_clips_before_it(footage, tmp_path):
    root, truth = footage
    bad = tmp_path / "garbage.mp4"
    synth.write_corrupt_video(bad, root / "cuts.mp4", mode="garbage")
    rows = SplitStage(detector="content", min_duration_s=0.5).split_source(str(bad), "g")
    errors = [r for r in rows if r["split_error"] is not None]
    clips = [r for r in rows if r["start_frame"] is not None]
    assert len(errors) == 1 and "decoding stopped after" in errors[0]["split_error"]
    assert clips and clips[0]["start_frame"] == 0
    # Clips end at a true cut or at the break, never inside a later shot.
    first_cut = truth["cuts.mp4"]["cut_frames"][0]
    assert clips[0]["end_frame"] <= first_cut + 1


def test_every_source_without_a_clip_is_one_row_saying_why(tmp_path):
    expected = synth.write_no_clip_sources(tmp_path)
    stage = SplitStage(detector="cascade", min_duration_s=2.0)
    for name, (status, reason) in expected.items():
        rows = stage.split_source(str(tmp_path / name), name)
        assert len(rows) == 1, (name, rows)
        row = rows[0]
        assert row["start_frame"] is None and row["source_status"] == status, (name, row)
        assert reason in row["split_error"], (name, row["split_error"])
    # The same files with a shorter minimum give clips (the reason is the length, not the file).
    ok = SplitStage(detector="content", min_duration_s=0.5).split_source(str(tmp_path / "short.mp4"), "s")
    assert ok[0]["start_frame"] == 0 and ok[0]["source_status"] is None


def test_failed_sources_leave_no_thread_or_file_open(footage, tmp_path):
    import os
    import threading

    root, _ = footage
    bad = tmp_path / "garbage.mp4"
    synth.write_corrupt_video(bad, root / "cuts.mp4", mode="garbage")
    stage = SplitStage(detector="content", min_duration_s=0.5)
    stage.split_source(str(bad), "warm-up")  # imports and lazy set-up happen once
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for i in range(50):
        path = [bad, root / "truncated.mp4", root / "notes.mp4"][i % 3]
        rows = stage.split_source(str(path), f"bad{i}")
        assert rows[-1]["split_error"] is not None
    # An error that is not a decode error (here MemoryError) in the middle of a clip also
    # stops that clip's encoder thread.
    def frames_then_fail(n):
        with av.open(str(root / "pan.mp4")) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i == n:
                    raise MemoryError("decoder ran out of memory")
                yield frame

    from fractions import Fraction
    for _ in range(5):
        with pytest.raises(MemoryError):
            list(stage._segment(frames_then_fail(100), Fraction(25), {}))  # 50 frames encoded
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


PATCHES_RGB = [(200, 40, 40), (40, 180, 60), (50, 60, 200), (230, 220, 60), (128, 128, 128), (20, 200, 210)]


def write_patches(path, height: int, colorspace: int | None, full_range: bool, tag: bool = True) -> None:
    """A source of flat colour patches whose YUV was made with `colorspace`'s matrix (FFmpeg
    numbers: 1 BT.709, 5 BT.601) and range, tagged as such when `tag`."""
    from fractions import Fraction

    width = height * 16 // 9 // 2 * 2
    img = np.zeros((height, width, 3), np.uint8)
    for k, rgb in enumerate(PATCHES_RGB):
        img[:, k * width // len(PATCHES_RGB):(k + 1) * width // len(PATCHES_RGB)] = rgb
    pix_fmt = "yuvj420p" if full_range else "yuv420p"
    rng = "JPEG" if full_range else "MPEG"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(24))
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.options = {"crf": "12"}
        if tag:
            s.codec_context.colorspace = colorspace
            s.codec_context.color_range = 2 if full_range else 1
        for i in range(36):
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=colorspace, dst_color_range=rng)
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def patch_colours(bgr: np.ndarray) -> list[tuple[int, ...]]:
    h, w = bgr.shape[:2]
    n = len(PATCHES_RGB)
    return [tuple(int(v) for v in bgr[h // 4:3 * h // 4, (k * w // n) + w // (4 * n):((k + 1) * w // n) - w // (4 * n)]
                  .reshape(-1, 3).mean(axis=0)[::-1]) for k in range(n)]


@pytest.mark.parametrize("height, colorspace, full_range, tag", [
    (360, 1, False, True),    # BT.709 tagged, limited range (an HD camera's, at a small size)
    (360, 5, True, True),     # BT.601 full range (yuvj420p, many phones and webcams)
    (720, 1, False, False),   # untagged HD: read as BT.709, as players do
])
def test_colours_of_the_source_survive_in_keyframes_and_clips(tmp_path, height, colorspace, full_range, tag):
    path = tmp_path / "patches.mp4"
    write_patches(path, height, colorspace, full_range, tag)
    (row,) = clips_of(SplitStage(min_duration_s=0.5), path)
    keyframe = cv2.imdecode(np.frombuffer(row["keyframes"][0], np.uint8), cv2.IMREAD_COLOR)
    for got, want in zip(patch_colours(keyframe), PATCHES_RGB):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 8, (got, want)
    # The clip is tagged with the matrix its YUV is in, limited range, and decodes right.
    with av.open(io.BytesIO(row["video"])) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.colorspace == colorspace and stream.codec_context.color_range == 1
        frame = next(c.decode(stream))
        bgr = frame.reformat(format="bgr24", src_colorspace=colorspace, src_color_range="MPEG",
                             dst_color_range="JPEG").to_ndarray()
    for got, want in zip(patch_colours(bgr), PATCHES_RGB):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 8, (got, want)


def _mean_level(jpeg: bytes) -> float:
    return float(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).mean())


@pytest.mark.parametrize("detector", ["threshold", "cascade"])
def test_no_clip_starts_or_ends_on_the_black_of_a_fade(tmp_path, detector):
    spec = [
        {"frames": 60, "seed": 31, "motion": "pan", "speed_px_per_frame": 2.0, "fade_out": 15},
        {"frames": 60, "seed": 32, "fade_in": 15},
    ]
    synth.make_video(tmp_path / "fade.mp4", spec, 24, (320, 180))
    rows = clips_of(SplitStage(detector=detector, min_duration_s=0.5), tmp_path / "fade.mp4")
    assert len(rows) == 2
    for row in rows:
        first, _, last = row["keyframes"]
        assert _mean_level(first) >= 12 and _mean_level(last) >= 12, row["dark_frames_trimmed"]
        frames, _ = decode(row["video"])
        assert len(frames) == row["end_frame"] - row["start_frame"]
        assert frames[0].mean() >= 10 and frames[-1].mean() >= 10  # the clip itself, not only its keyframes
    # The dark frames were cut from the end of the first clip and the start of the second.
    assert rows[0]["dark_frames_trimmed"] > 0 and rows[1]["dark_frames_trimmed"] > 0
    assert rows[0]["end_frame"] < rows[1]["start_frame"]


def test_a_shot_that_is_dark_throughout_is_kept_whole(tmp_path):
    path = tmp_path / "night.mp4"
    rng = np.random.default_rng(3)
    base = rng.integers(0, 16, (90, 160, 3), dtype=np.uint8)
    synth.write_video(path, (np.roll(base, i, axis=1) for i in range(50)), 25)
    (row,) = clips_of(SplitStage(detector="cascade", min_duration_s=0.5), path)
    assert (row["start_frame"], row["end_frame"], row["dark_frames_trimmed"]) == (0, 50, 0)


def test_a_dark_moment_inside_a_shot_stays(tmp_path):
    path = tmp_path / "blink.mp4"
    frames = list(synth.shot_frames(synth.Shot(frames=60, seed=5), (160, 90)))
    for i in range(20, 24):
        frames[i] = (frames[i] * 0.02).astype(np.uint8)  # four near-black frames mid-shot
    synth.write_video(path, iter(frames), 25)
    # No detector cut here (threshold out of reach): only the trimming of dark ends could act.
    (row,) = clips_of(SplitStage(detector="content", threshold=255, min_duration_s=0.5), path)
    assert (row["start_frame"], row["end_frame"], row["dark_frames_trimmed"]) == (0, 60, 0)


def _split_with_cuts(stage: SplitStage, path) -> tuple[list[dict], list[int]]:
    """The clip rows of `path` and the cuts split applied (merged, flashes left out)."""
    stats: dict = {}
    rows = list(stage.iter_clips(str(path), stats))
    return rows, stats.get("cuts", [])


def _edge_levels(row: dict) -> tuple[float, float]:
    frames, _ = decode(row["video"])
    assert len(frames) == row["end_frame"] - row["start_frame"]
    return float(frames[0].mean()), float(frames[-1].mean())


def _at_steady_level(level: float, median: float, to: str) -> bool:
    """At least half way from the fade's black (white) to the shot's median level."""
    return level >= median / 2 if to == "black" else level <= median + (255 - median) / 2


@pytest.mark.parametrize("to", ["black", "white"])
@pytest.mark.parametrize("curve", ["linear", "ease"])
@pytest.mark.parametrize("n", [6, 12, 24])
def test_fade_ramps_are_trimmed_and_a_fade_is_cut_once(tmp_path, to, curve, n):
    """Fades of several lengths and curves, to black and to white, at the source's start and
    end and between two shots: one cut, in the middle of the fade, and every clip starts and
    ends at its shot's steady level, none of the fade's ramp left (issue 25)."""
    fade = {"fade_curve": curve, "fade_to": to}
    spec = [{"frames": 2 * n + 40, "seed": 31, "motion": "pan", "speed_px_per_frame": 2.0,
             "fade_in": n, "fade_out": n, **fade},
            {"frames": 2 * n + 40, "seed": 32, "fade_in": n, "fade_out": n, **fade}]
    truth = synth.make_video(tmp_path / "fade.mp4", spec, 24, (320, 180))
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "fade.mp4")
    boundary = truth["shots"][1]["start"]  # the fade's two black (white) frames: boundary - 1, boundary
    assert len(cuts) == 1 and abs(cuts[0] - boundary) <= 1, cuts
    assert len(rows) == 2
    for row, shot, shot_spec in zip(rows, truth["shots"], spec):
        levels = [float(f.mean()) for f in synth.shot_frames(synth.Shot.from_dict(shot_spec), (320, 180))]
        median = float(np.median(levels))
        assert shot["start"] <= row["start_frame"] < row["end_frame"] <= shot["end"] + 1
        first, last = _edge_levels(row)
        assert _at_steady_level(first, median, to) and _at_steady_level(last, median, to), (first, last, median)
        # The whole ramp, not only its darkest (brightest) frames: within 15% of the steady level.
        steady = levels[len(levels) // 2]
        for level in (first, last):
            assert abs(level - steady) <= 0.15 * abs(steady - (0 if to == "black" else 255)) + 2, (level, steady)
        assert row["dark_frames_trimmed"] >= n - 2


def test_an_uneven_fade_is_cut_in_the_middle_of_its_dark_part(tmp_path):
    """A short fade-out into a long fade-in: the one cut is in the middle of the frames under
    half their shot's steady level (the darkest frame is not the middle of the fade)."""
    spec = [{"frames": 60, "seed": 31, "motion": "pan", "speed_px_per_frame": 2.0, "fade_out": 6},
            {"frames": 70, "seed": 32, "fade_in": 20}]
    synth.make_video(tmp_path / "fade.mp4", spec, 25, (320, 180))
    levels = []
    for s in spec:
        shot = [float(f.mean()) for f in synth.shot_frames(synth.Shot.from_dict(s), (320, 180))]
        levels += [v <= np.median(shot) / 2 for v in shot]
    dark = np.flatnonzero(levels)
    middle = (int(dark[0]) + int(dark[-1]) + 1) // 2
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "fade.mp4")
    assert len(cuts) == 1 and abs(cuts[0] - middle) <= 1, (cuts, middle)
    assert len(rows) == 2 and rows[0]["end_frame"] <= 54 and rows[1]["start_frame"] >= 60 + 18


@pytest.mark.parametrize("fade_out", [False, True])
def test_a_fade_with_a_hard_cut_on_one_side_is_cut_once_at_the_hard_cut(tmp_path, fade_out):
    """A hard cut to black, then a fade-in (or a fade-out, then a hard cut out of the black):
    one cut, at the hard cut; the fade's ramp and black are trimmed from the faded clip."""
    size = (320, 180)
    a = list(synth.shot_frames(synth.Shot(frames=50, seed=1, fade_out=12 if fade_out else 0), size))
    b = list(synth.shot_frames(synth.Shot(frames=60, seed=2, motion="pan", speed_px_per_frame=1.0,
                                          fade_in=0 if fade_out else 12), size))
    black = [np.zeros_like(a[0])] * 6
    synth.write_video(tmp_path / "cut_fade.mp4", iter(a + black + b), 25)
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "cut_fade.mp4")
    hard = 56 if fade_out else 50
    assert len(cuts) == 1 and abs(cuts[0] - hard) <= 1, cuts
    assert len(rows) == 2
    if fade_out:
        assert rows[0]["end_frame"] <= 50 - 10 and rows[1]["start_frame"] == cuts[0]
    else:
        assert rows[0]["end_frame"] == cuts[0] and rows[1]["start_frame"] >= 56 + 10


def test_a_dim_shot_between_cuts_is_kept_whole(tmp_path):
    """A shot dark throughout (a night scene, mean level about 18) between two bright ones:
    nothing of it is a fade, it is kept whole."""
    size = (320, 180)
    a = list(synth.shot_frames(synth.Shot(frames=50, seed=1), size))
    b = list(synth.shot_frames(synth.Shot(frames=50, seed=2, motion="pan", speed_px_per_frame=2.0), size))
    rng = np.random.default_rng(3)
    base = rng.integers(0, 37, (size[1], size[0] + 100, 3), dtype=np.uint8)
    night = [np.ascontiguousarray(base[:, i:i + size[0]]) for i in range(50)]
    synth.write_video(tmp_path / "night.mp4", iter(a + night + b), 25)
    rows = clips_of(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "night.mp4")
    assert [(r["start_frame"], r["end_frame"], r["dark_frames_trimmed"]) for r in rows] == [
        (0, 50, 0), (50, 100, 0), (100, 150, 0)]


def test_content_changes_at_a_clip_edge_are_not_trimmed_as_fades(tmp_path):
    """A light switched on (the picture at 30% for a second, then at full) and a flash that
    fades in three frames, each at the start of a shot: content, kept, where a fade's ramp
    would be dropped. (Content cuts where the light goes on: a cut, not a fade.)"""
    size = (320, 180)
    a = list(synth.shot_frames(synth.Shot(frames=50, seed=1), size))
    b = list(synth.shot_frames(synth.Shot(frames=60, seed=2, motion="pan", speed_px_per_frame=1.0), size))
    c = list(synth.shot_frames(synth.Shot(frames=60, seed=3, motion="pan", speed_px_per_frame=1.0), size))
    lights_on = [np.round(f * 0.3).astype(np.uint8) for f in b[:25]] + b[25:]
    flash = [np.round(f * (1 - g) + 255 * g).astype(np.uint8) for f, g in zip(c[:3], (1.0, 0.7, 0.4))] + c[3:]
    synth.write_video(tmp_path / "content.mp4", iter(a + lights_on + flash), 25)
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "content.mp4")
    assert 50 in cuts and 110 in cuts
    assert [r["start_frame"] for r in rows] == [0, *cuts] and [r["end_frame"] for r in rows] == [*cuts, 170]
    assert all(r["dark_frames_trimmed"] == 0 for r in rows)


@pytest.mark.parametrize("frames", [6, 12, 24])
def test_what_is_a_fade_ramp(frames):
    """stages/split/fades.py on level series: fades through black and white, linear and eased,
    are ramps; a light switched on, a flash, a dark shot and a slow drift are not."""
    from stages.split.fades import edge_fade, fade_at

    def contrast(levels):  # a picture scaled towards black: its contrast follows its level
        return [0.15 * v for v in levels]

    u = np.arange(frames + 1) / frames
    for gain in (u, u * u * (3 - 2 * u)):
        steady = [100.0] * 10
        ramp_in = [*(100.0 * gain), *steady]
        trim = edge_fade(ramp_in, contrast(ramp_in), 12, 25)  # the whole ramp: up to 5% of steady
        assert ramp_in[trim - 1] < 95 <= ramp_in[trim]
        white_in = [255 - 155 * g for g in gain] + [100.0] * 10  # from white to level 100
        trim = edge_fade(white_in, [0.15 * (255 - v) for v in white_in], 12, 25)
        assert white_in[trim - 1] > 100 + 0.05 * 155 >= white_in[trim]
        through = ramp_in[::-1] + [0.0] * 3 + ramp_in  # out, 3 black frames, in
        middle = 10 + frames + 2  # the middle of the black: 5 frames, the ramps' ends and 3 more
        for c in [i for i, v in enumerate(through) if v < 90]:  # any cut in the fade
            fade = fade_at(through, contrast(through), c, 12, 25)
            assert fade is not None and abs(fade.cut - middle) <= 1, (c, fade)
    lights_on = [30.0] * 25 + [100.0] * 20
    flash = [255.0, 208.0, 162.0] + [100.0] * 20
    dark_shot = [8.0, 14.0, 18.0, 20.0] + [20.0] * 20
    drift = list(np.linspace(60, 100, 12)) + [100.0] * 10  # brightens, but never from black
    for levels in (lights_on, flash, dark_shot, drift):
        assert edge_fade(levels, contrast(levels), 12, 25) == 0, levels
    # A fade-in whose contrast does not follow its level is not a scaled picture.
    ramp_in = [*(100.0 * u), *([100.0] * 10)]
    assert edge_fade(ramp_in, [15.0] * len(ramp_in), 12, 25) == 0


def _write_timed(path, frames, times_ms):
    from fractions import Fraction

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for img, t_ms in zip(frames, times_ms):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = t_ms, Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def test_variable_frame_rate_clips_keep_their_timing_and_their_motion(tmp_path):
    """Frames dropped from a 25 fps source (a VFR file): durations and samples follow time."""
    from stages.motion import MotionStage

    shots = [synth.Shot(frames=100, seed=41, motion="pan", speed_px_per_frame=2.0),
             synth.Shot(frames=100, seed=42, motion="pan", speed_px_per_frame=3.0)]
    frames = [f for shot in shots for f in synth.shot_frames(shot, (320, 180))]
    times = [40 * i for i in range(len(frames))]
    _write_timed(tmp_path / "cfr.mp4", frames, times)
    # Drop 2 of every 5 frames in the first shot and 1 of 2 in the second: 15 and 12.5 fps there.
    kept = [i for i in range(len(frames)) if (i < 100 and i % 5 not in (1, 3)) or (i >= 100 and i % 2 == 0)]
    _write_timed(tmp_path / "vfr.mp4", [frames[i] for i in kept], [times[i] for i in kept])
    stage = SplitStage(detector="content", min_duration_s=1.0)
    cfr, vfr = (clips_of(stage, tmp_path / f"{n}.mp4") for n in ("cfr", "vfr"))
    assert len(vfr) == len(cfr) == 2
    for a, b in zip(vfr, vfr[1:]):
        assert a["start_s"] + a["duration_s"] == pytest.approx(b["start_s"], abs=1 / a["fps"])
    assert vfr[-1]["start_s"] + vfr[-1]["duration_s"] == pytest.approx(8.0, abs=0.1)
    for row in vfr:  # the clip is encoded with its frames' own times, not retimed
        with av.open(io.BytesIO(row["video"])) as c:
            t = [float(f.time) for f in c.decode(video=0)]
        assert t[-1] - t[0] == pytest.approx(row["duration_s"] - (t[1] - t[0]) if len(t) > 1 else 0, abs=0.1)

    def motion(rows):
        return MotionStage()({k: [r[k] for r in rows] for k in ("sample_frames", "sample_fps", "split_error")})[
            "motion_score"]

    for m_vfr, m_cfr in zip(motion(vfr), motion(cfr)):
        assert m_vfr == pytest.approx(m_cfr, rel=0.10)


def test_a_flash_inside_a_shot_is_not_a_cut_and_a_cut_after_a_flash_is(tmp_path):
    """A two-frame white flash in the middle of a shot: the detectors cut at it, the flash
    filter keeps the shot whole; a flash that leads into a new shot stays a cut."""
    size = (320, 180)
    shot = list(synth.shot_frames(synth.Shot(frames=100, seed=7, motion="pan", speed_px_per_frame=1.0), size))
    other = list(synth.shot_frames(synth.Shot(frames=60, seed=8, motion="pan", speed_px_per_frame=1.0), size))
    white = np.full_like(shot[0], 250)
    flashed = shot[:50] + [white, white] + shot[52:]
    synth.write_video(tmp_path / "flash.mp4", iter(flashed), 25)
    synth.write_video(tmp_path / "flash_cut.mp4", iter(shot[:50] + [white, white] + other), 25)
    stage = SplitStage(detector="cascade", min_duration_s=0.5)
    (row,) = clips_of(stage, tmp_path / "flash.mp4")
    assert (row["start_frame"], row["end_frame"]) == (0, 100)
    rows = clips_of(stage, tmp_path / "flash_cut.mp4")
    assert len(rows) == 2 and rows[0]["end_frame"] in (50, 51, 52) and rows[1]["start_frame"] in (50, 51, 52)


def _dissolve(a: list, b: list, frames: int) -> list:
    """a's frames, then a cross-fade of `frames` frames into b's, then the rest of b."""
    mix = [np.round(a[len(a) - frames + i] * (1 - (i + 1) / (frames + 1)) + b[i] * ((i + 1) / (frames + 1)))
           .astype(np.uint8) for i in range(frames)]
    return a[:len(a) - frames] + mix + b[frames:]


def test_a_dissolve_is_cut_once_in_its_middle_and_its_blended_frames_go_to_no_clip(tmp_path):
    """A 16-frame cross-fade (the new shot weighs 1/17 .. 16/17: every frame a blend, issue 36):
    one cut at the half-way frame, the clips end and start just outside it (tests/test_dissolves.py
    measures more); max_dissolve_s 0 gives the old single cut, the clips meeting there."""
    size = (320, 180)
    a = list(synth.shot_frames(synth.Shot(frames=80, seed=21, motion="pan", speed_px_per_frame=1.0), size))
    b = list(synth.shot_frames(synth.Shot(frames=80, seed=22, motion="pan", speed_px_per_frame=1.0), size))
    synth.write_video(tmp_path / "dissolve.mp4", iter(_dissolve(a, b, 16)), 25)
    first, last, middle = 80 - 16, 80 - 1, 80 - 16 + 8  # the blended frames; the 50/50 one
    # PySceneDetect's own detectors see no cut in a slow cross-fade (each frame changes little);
    # with dissolves trimmed, split's own search for long ones (LongDissolves) finds it too.
    plain = [{"detector": "content"}, {"detector": "adaptive"}, {"detector": "threshold"}]
    assert len(clips_of(SplitStage(detector="cascade", min_duration_s=0.5, cascade=plain, max_dissolve_s=0),
                        tmp_path / "dissolve.mp4")) == 1
    assert len(clips_of(SplitStage(detector="cascade", min_duration_s=0.5, cascade=plain),
                        tmp_path / "dissolve.mp4")) == 2
    rows, cuts = _split_with_cuts(SplitStage(detector="cascade", min_duration_s=0.5), tmp_path / "dissolve.mp4")
    assert len(cuts) == 1 and abs(cuts[0] - middle) <= 1, cuts
    assert len(rows) == 2
    assert abs(rows[0]["end_frame"] - first) <= 1 and abs(rows[1]["start_frame"] - (last + 1)) <= 1
    assert rows[0]["dissolve_frames_trimmed"] + rows[1]["dissolve_frames_trimmed"] == \
        rows[1]["start_frame"] - rows[0]["end_frame"]
    old = clips_of(SplitStage(detector="cascade", min_duration_s=0.5, max_dissolve_s=0), tmp_path / "dissolve.mp4")
    assert len(old) == 2 and abs(old[1]["start_frame"] - middle) <= 2
    assert old[0]["end_frame"] == old[1]["start_frame"] and old[1]["dissolve_frames_trimmed"] == 0


def test_the_dissolve_detector_leaves_fades_and_fast_motion_alone(tmp_path):
    size = (320, 180)
    fade = [{"frames": 60, "seed": 23, "motion": "pan", "speed_px_per_frame": 1.0, "fade_out": 15},
            {"frames": 60, "seed": 24, "fade_in": 15}]
    synth.make_video(tmp_path / "fade.mp4", fade, 25, size)
    fast = synth.Shot(frames=90, seed=25, motion="pan", speed_px_per_frame=12.0)
    synth.write_video(tmp_path / "fast.mp4", synth.shot_frames(fast, size), 25)
    only = SplitStage(detector="cascade", min_duration_s=0.5, cascade=[{"detector": "dissolve"}])
    for name in ("fade.mp4", "fast.mp4"):
        (row,) = only.split_source(str(tmp_path / name), "s")
        assert row["split_error"] is None and row["start_frame"] is not None, name


def test_adaptive_reuses_the_content_score_and_cuts_the_same(footage, monkeypatch):
    """The cascade computes ContentDetector's frame score once for content and adaptive; the
    cuts are those of the detectors each computing its own."""
    from stages import scene_scores
    from stages.split import segment  # where _Segmenter looks share_content_scores up

    root, _ = footage
    stage = SplitStage(detector="cascade", min_duration_s=0.5)
    calls = collections.Counter()
    original = scene_scores._HSVScore._calculate_frame_score

    def counted(self, timecode, frame_img):
        calls[type(self).__name__] += 1
        return original(self, timecode, frame_img)

    monkeypatch.setattr(scene_scores._HSVScore, "_calculate_frame_score", counted)
    shared = [(r["start_frame"], r["end_frame"]) for r in clips_of(stage, root / "cuts.mp4")]
    assert calls["FastAdaptiveDetector"] == 0 and calls["FastContentDetector"] > 0
    monkeypatch.setattr(segment, "share_content_scores", lambda detectors: list(range(len(detectors))))
    calls.clear()
    separate = [(r["start_frame"], r["end_frame"]) for r in clips_of(stage, root / "cuts.mp4")]
    assert calls["FastAdaptiveDetector"] == calls["FastContentDetector"] > 0
    assert shared == separate and len(shared) > 1


def test_decoding_ahead_in_a_thread_gives_the_same_clips_and_errors(footage, tmp_path):
    """decode_ahead_frames moves decoding and scaling to a thread: the clips are the same as
    decoding inline (every column; the encoded video decodes to the same pictures, its bytes
    are not repeatable even between two inline runs), and a decode error is still recorded."""
    import threading

    root, _ = footage
    threads = threading.active_count()
    inline, ahead = (SplitStage(detector="cascade", min_duration_s=0.5, decode_ahead_frames=d) for d in (0, 4))
    for name in ("cuts.mp4", "pan.mp4"):
        a, b = clips_of(inline, root / name), clips_of(ahead, root / name)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert {k: v for k, v in x.items() if k != "video"} == {k: v for k, v in y.items() if k != "video"}
            fx, fy = decode(x["video"])[0], decode(y["video"])[0]
            assert len(fx) == len(fy) == x["end_frame"] - x["start_frame"]
            assert max(np.abs(u.astype(int) - v.astype(int)).mean() for u, v in zip(fx, fy)) < 2.0
    bad = tmp_path / "garbage.mp4"
    synth.write_corrupt_video(bad, root / "cuts.mp4", mode="garbage")
    a, b = inline.split_source(str(bad), "g"), ahead.split_source(str(bad), "g")
    assert a == b and "decoding stopped after" in b[-1]["split_error"]
    # The decoding runs on its own thread, and a consumer that stops early (here after the
    # first clip) stops it.
    clips = ahead.iter_clips(str(root / "cuts.mp4"))
    next(clips)
    assert "split-decode" in [t.name for t in threading.enumerate()]
    clips.close()
    assert threading.active_count() == threads
