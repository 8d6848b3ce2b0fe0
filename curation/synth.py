"""Deterministic synthetic footage with known ground truth.

Used by the test suite, the benchmark and ``make demo``. Every video is built from
"shots": a seed picks a distinct look (hue, saturation and brightness fields), and the
shot is static, a panning textured background, a square moving over a static
background, or a static street with passers-by (traffic), with an optional text box and
fades to/from black or white, linear or eased; a shot may also dissolve in from the one
before it (a cross-fade, linear or eased). ``make_video`` returns where the cuts, fades and
dissolves are, so detectors and filters can be checked against it.

All randomness comes from ``numpy.random.default_rng(seed)``, so the same call encodes the
same frames (x264 may still differ by a few bytes between runs; the decoded video does not
change visibly).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

log = logging.getLogger(__name__)

MOTIONS = ("static", "pan", "square", "traffic")
FADE_CURVES = ("linear", "ease")  # ease: smoothstep, slow at both ends (fades and dissolves)
FADE_TO = ("black", "white")
# A cut must score well above ContentDetector's default threshold (27) to be a safe ground truth.
MIN_CUT_SCORE = 35.0
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Shot:
    """One shot of a synthetic video; ``frames`` includes its own fade frames."""

    frames: int
    seed: int
    motion: str = "static"
    speed_px_per_frame: float = 0.0
    text: str | None = None
    text_height_frac: float = 0.12  # text box height as a fraction of frame height
    square_frac: float = 0.25  # moving square side as a fraction of frame height
    fade_in: int = 0
    fade_out: int = 0
    fade_curve: str = "linear"  # the gain over a fade: "linear", or "ease" (smoothstep)
    fade_to: str = "black"  # what the fades go to and come from: "black" or "white"
    # traffic: the seed of the passers-by (None: the shot's seed), so one street (one `seed`)
    # can be filmed at other times (another objects_seed).
    objects_seed: int | None = None
    # A cross-fade from the shot before: this shot's first `dissolve_in` frames are blended
    # with that shot's last ones (make_video), the weight of this one going from 0 to 1.
    dissolve_in: int = 0
    dissolve_curve: str = "linear"  # "linear" or "ease" (smoothstep), as fade_curve

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        if self.speed_px_per_frame < 0 or (self.motion == "static") != (self.speed_px_per_frame == 0):
            raise ValueError(f"speed_px_per_frame must be 0 for static shots and > 0 otherwise, got "
                             f"{self.speed_px_per_frame} for {self.motion!r}")
        if not 0 < self.square_frac <= 1 or not 0 < self.text_height_frac <= 1:
            raise ValueError("square_frac and text_height_frac must be in (0, 1]")
        if self.fade_in < 0 or self.fade_out < 0 or self.fade_in + self.fade_out > self.frames:
            raise ValueError(f"fade_in + fade_out must fit in frames={self.frames}")
        if self.fade_curve not in FADE_CURVES or self.fade_to not in FADE_TO:
            raise ValueError(f"fade_curve must be one of {FADE_CURVES} and fade_to one of {FADE_TO}, "
                             f"got {self.fade_curve!r}, {self.fade_to!r}")
        if not 0 <= self.dissolve_in <= self.frames - self.fade_out or self.dissolve_curve not in FADE_CURVES:
            raise ValueError(f"dissolve_in must be in 0..frames - fade_out and dissolve_curve one of {FADE_CURVES}, "
                             f"got {self.dissolve_in}, {self.dissolve_curve!r}")
        if self.dissolve_in and self.fade_in:
            raise ValueError("a shot dissolves in or fades in, not both")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Shot:
        """Build from a spec dict; an unknown key (a typo) is an error, not silently ignored."""
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown shot keys: {sorted(unknown)}")
        return cls(**spec)


def as_fraction(fps: float | Fraction) -> Fraction:
    """Frame rate as an exact Fraction; 29.97 -> 30000/1001 (the NTSC rates are x/1.001)."""
    if isinstance(fps, Fraction):
        return fps
    if float(fps).is_integer():
        return Fraction(int(fps))
    ntsc = fps * 1.001
    if abs(ntsc - round(ntsc)) < 1e-3:
        return Fraction(round(ntsc) * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    crf: int = 18,
    codec: str = "libx264",
    preset: str = "veryfast",
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    sample_aspect_ratio: Fraction | None = None,
) -> int:
    """Encode RGB uint8 frames (H, W, 3), H and W even, to an mp4; returns the frame count.

    Frames are consumed one at a time, so a generator never has to fit in memory. Options for
    odd real-world files: `pix_fmt` "yuv420p10le" (10-bit), `rotation` (a display matrix,
    degrees counterclockwise, as phones write) and `sample_aspect_ratio` (non-square pixels).
    """
    rate = as_fraction(fps)
    count = 0
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[:2]
                if frame.ndim != 3 or frame.shape[2] != 3 or height % 2 or width % 2:
                    raise ValueError(f"frames must be (H, W, 3) with even H, W; got {frame.shape}")
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                if rotation:
                    stream.set_display_rotation(rotation)
                if sample_aspect_ratio is not None:
                    stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
                # One encoder thread: reproducible up to x264's small run-to-run variations.
                stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
                stream.codec_context.thread_count = 1
                stream.codec_context.time_base = 1 / rate
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, np.uint8), format="rgb24")
            video_frame.pts = count
            container.mux(stream.encode(video_frame))
            count += 1
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))  # flush delayed (B-)frames
    return count


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell_px: float) -> np.ndarray:
    """Random field in [0, 1] that varies over about ``cell_px`` pixels, float32 (H, W)."""
    grid = rng.random((math.ceil(height / cell_px) + 2, math.ceil(width / cell_px) + 2), np.float32)
    field = cv2.resize(grid, (width + 2 * round(cell_px), height + 2 * round(cell_px)), interpolation=cv2.INTER_CUBIC)
    field = field[round(cell_px) : round(cell_px) + height, round(cell_px) : round(cell_px) + width]
    return (field - field.min()) / max(float(field.max() - field.min()), 1e-6)


def background(seed: int, size: tuple[int, int], extra_width_px: int = 0) -> np.ndarray:
    """The seed's look: RGB uint8 (H, W + extra_width_px, 3).

    Saturation and brightness are independent random fields pushed towards two levels
    (a steep tanh), so two seeds differ pixel by pixel by about half the range whatever
    their mean colours: of all pairs of seeds 0-59 only one scores below MIN_CUT_SCORE (35)
    and consecutive seeds 0-150 score >= 43 (make_video refuses a weak hard cut).
    The fields vary over ~1/4 frame width, so a pan changes little per frame; a finer
    layer gives optical flow something to track.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    total_w = width + extra_width_px

    def two_tone(cell_px: float) -> np.ndarray:
        return 0.5 + 0.5 * np.tanh(8 * (_smooth_noise(rng, height, total_w, cell_px) - 0.5)) / math.tanh(4)

    hue = rng.uniform(0, 180) + 10 * (_smooth_noise(rng, height, total_w, width / 4) - 0.5)
    sat = 60 + 195 * two_tone(width / 4)
    # The fine layer is what optical flow tracks: strong and small enough (~width/40) that
    # Farneback measures pans close to their true speed, yet a pan's frame-to-frame content
    # score stays far below a cut's.
    val = 30 + 155 * two_tone(width / 4) + 60 * _smooth_noise(rng, height, total_w, width / 40)
    hsv = np.stack([np.clip(hue, 0, 179), np.clip(sat, 0, 255), np.clip(val, 0, 255)], axis=-1)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _triangle(position: float, span: float) -> float:
    """Bounce ``position`` between 0 and ``span`` (constant speed, reversing at the ends)."""
    if span <= 0:
        return 0.0
    phase = position % (2 * span)
    return phase if phase <= span else 2 * span - phase


def moving_frames(shot: Shot, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Frames of the shot's content before text and fades: static, pan, moving square or traffic."""
    width, height = size
    speed = shot.speed_px_per_frame
    if shot.motion == "pan":
        # Camera pans right: the content slides left by `speed` px per frame.
        field = background(shot.seed, size, extra_width_px=math.ceil(speed * shot.frames) + 1)
        for t in range(shot.frames):
            offset = round(t * speed)
            yield field[:, offset : offset + width].copy()
        return
    still = background(shot.seed, size)
    if shot.motion == "traffic":
        yield from traffic_frames(shot, still)
        return
    if shot.motion == "static":
        for _ in range(shot.frames):
            yield still.copy()
        return
    side = max(2, round(shot.square_frac * height))
    # A bright square in the complementary hue with a black rim stands out on any seed,
    # in colour and in luminance (what optical flow sees).
    hue = int(cv2.cvtColor(still, cv2.COLOR_RGB2HSV)[..., 0].mean() + 90) % 180
    color = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
    rim = max(1, side // 10)
    y0 = (height - side) // 2
    for t in range(shot.frames):
        x0 = round(_triangle(t * speed, width - side))
        frame = still.copy()
        frame[y0 : y0 + side, x0 : x0 + side] = 0
        frame[y0 + rim : y0 + side - rim, x0 + rim : x0 + side - rim] = color
        yield frame


def traffic_frames(shot: Shot, still: np.ndarray) -> Iterator[np.ndarray]:
    """A static camera with passers-by: boxes of random colour and size cross the frame, left to
    right or back, at `speed_px_per_frame` (+-40%), about one entering every 18 frames, at times
    drawn from `objects_seed` (a street, `seed`, filmed at another time is another objects_seed)."""
    height, width = still.shape[:2]
    rng = np.random.default_rng(10_007 + (shot.seed if shot.objects_seed is None else shot.objects_seed))
    movers = []
    span = shot.frames + round(width / shot.speed_px_per_frame)
    for _ in range(max(2, span // 18)):
        h = max(2, round(shot.square_frac * height * rng.uniform(0.5, 1.3)))
        w = max(2, round(h * rng.uniform(0.4, 1.6)))
        speed = shot.speed_px_per_frame * rng.uniform(0.6, 1.4) * rng.choice([-1, 1])
        enter = rng.uniform(-width / abs(speed), shot.frames)  # the frame it enters at
        y0 = int(rng.integers(0, max(1, height - h)))
        colour = rng.integers(0, 256, 3).tolist()
        movers.append((h, w, speed, enter, y0, colour))
    for t in range(shot.frames):
        frame = still.copy()
        for h, w, speed, enter, y0, colour in movers:
            x0 = round((t - enter) * speed) if speed > 0 else round(width + (t - enter) * speed - w)
            if x0 + w <= 0 or x0 >= width:
                continue
            frame[y0:y0 + h, max(0, x0):min(width, x0 + w)] = colour
        yield frame


def text_box(text: str, size: tuple[int, int], height_frac: float) -> tuple[int, int, int, int, float, int]:
    """Layout of a text box centred near the bottom: (x0, y0, x1, y1, font_scale, thickness).

    The box covers [x0, x1) x [y0, y1), so its area is (x1 - x0) * (y1 - y0) pixels.
    """
    width, height = size
    box_h = max(4, round(height_frac * height))
    thickness = max(1, box_h // 12)
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, 1.0, thickness)
    pad = box_h // 5
    scale = min((box_h - 2 * pad) / (text_h + baseline), (width - 4 * pad) / text_w)
    box_w = min(width - 2 * pad, math.ceil(text_w * scale) + 2 * pad)
    x0, y1 = (width - box_w) // 2, height - pad
    return x0, y1 - box_h, x0 + box_w, y1, scale, thickness


def draw_text(frame: np.ndarray, text: str, height_frac: float) -> np.ndarray:
    """Draw black text on a filled white box (in place) and return the frame."""
    x0, y0, x1, y1, scale, thickness = text_box(text, (frame.shape[1], frame.shape[0]), height_frac)
    cv2.rectangle(frame, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), thickness=cv2.FILLED)
    pad = (y1 - y0) // 5
    (_, _), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    cv2.putText(frame, text, (x0 + pad, y1 - pad - baseline), _FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return frame


def shot_frames(shot: Shot, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """All frames of one shot: content, then text box, then fades (the text fades too)."""
    for t, frame in enumerate(moving_frames(shot, size)):
        if shot.text:
            frame = draw_text(frame, shot.text, shot.text_height_frac)
        # Fade-in starts from pure black (white); fade-out ends on pure black (white).
        gain = 1.0
        if t < shot.fade_in:
            gain = t / shot.fade_in
        elif t >= shot.frames - shot.fade_out:
            gain = (shot.frames - 1 - t) / shot.fade_out
        if gain == 1.0:
            yield frame
            continue
        if shot.fade_curve == "ease":
            gain = gain * gain * (3.0 - 2.0 * gain)
        if shot.fade_to == "white":
            yield np.round(frame * gain + 255.0 * (1.0 - gain)).astype(np.uint8)
        else:
            yield np.round(frame * gain).astype(np.uint8)


def dissolve_weights(frames: int, curve: str = "linear") -> np.ndarray:
    """The incoming shot's weight in each of a dissolve's `frames` blended frames: (i + 1) /
    (frames + 1), through smoothstep when `curve` is "ease"; the outgoing shot weighs the rest."""
    u = np.arange(1, frames + 1) / (frames + 1)
    return u * u * (3.0 - 2.0 * u) if curve == "ease" else u


def content_score(rgb_a: np.ndarray, rgb_b: np.ndarray) -> float:
    """ContentDetector's default frame score: mean |delta| of the H, S and V planes."""
    hsv_a = cv2.cvtColor(rgb_a, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv_b = cv2.cvtColor(rgb_b, cv2.COLOR_RGB2HSV).astype(np.int32)
    return float(np.abs(hsv_a - hsv_b).mean())


def make_video(
    path: str | Path, spec: list[dict[str, Any]], fps: float | Fraction, size: tuple[int, int],
    **write_options: Any,
) -> dict[str, Any]:
    """Write the shots of ``spec`` (dicts of Shot fields) back to back; return the ground truth.

    Ground truth: ``frames`` (total), ``cut_frames`` (first frame of each shot entered by
    a hard cut), ``fade_spans`` ([first fade-out frame, last fade-in frame] of each
    boundary where either side fades), ``dissolves`` (per shot that dissolves in: ``start``
    and ``end``, its first and last blended frame, ``frames``, ``curve`` and ``weights``,
    the incoming shot's weight in each blended frame), ``fps``, ``size`` and ``shots`` (the
    Shot fields plus ``start``/``end`` frame, inclusive, and ``text_box_area_ratio``; a
    shot's blended frames are its own and the shot's before it). Raises ValueError, leaving
    no file, if a hard cut joins two looks too alike to be a sure cut.
    """
    shots = [Shot.from_dict(s) for s in spec]
    infos, cut_frames, fade_spans, dissolves = [], [], [], []
    start = 0
    for i, shot in enumerate(shots):
        if shot.dissolve_in:
            prev = shots[i - 1] if i > 0 else None
            if prev is None or shot.dissolve_in > prev.frames - prev.fade_in - prev.dissolve_in or prev.fade_out:
                raise ValueError(f"shot {i} dissolves in over {shot.dissolve_in} frames: the shot before must "
                                 "have that many frames past its fade-in or dissolve, and no fade-out")
            start -= shot.dissolve_in
        end = start + shot.frames - 1
        ratio = 0.0
        if shot.text:
            x0, y0, x1, y1, _, _ = text_box(shot.text, size, shot.text_height_frac)
            ratio = (x1 - x0) * (y1 - y0) / (size[0] * size[1])
        infos.append({**asdict(shot), "start": start, "end": end, "text_box_area_ratio": ratio})
        if shot.dissolve_in:
            weights = dissolve_weights(shot.dissolve_in, shot.dissolve_curve)
            dissolves.append({"start": start, "end": start + shot.dissolve_in - 1, "frames": shot.dissolve_in,
                              "curve": shot.dissolve_curve, "weights": [float(w) for w in weights]})
        elif i > 0:
            prev = shots[i - 1]
            if prev.fade_out or shot.fade_in:
                fade_spans.append([start - prev.fade_out, start + max(shot.fade_in, 1) - 1])
            else:
                cut_frames.append(start)
        start = end + 1

    def frames() -> Iterator[np.ndarray]:
        last = None
        held: list[np.ndarray] = []  # the last frames of the shot before, blended with this one's first
        for i, shot in enumerate(shots):
            blend = shots[i + 1].dissolve_in if i + 1 < len(shots) else 0
            weights = dissolve_weights(shot.dissolve_in, shot.dissolve_curve)
            coming: list[np.ndarray] = []
            for t, frame in enumerate(shot_frames(shot, size)):
                if t == 0 and infos[i]["start"] in cut_frames:
                    score = content_score(last, frame)
                    if score < MIN_CUT_SCORE:
                        raise ValueError(f"seeds {shots[i - 1].seed}->{shot.seed}: cut score {score:.1f} too low")
                if t < shot.dissolve_in:
                    frame = np.round(held[t] * (1.0 - weights[t]) + frame * weights[t]).astype(np.uint8)
                elif t >= shot.frames - blend:
                    coming.append(frame)  # blended with the next shot's first frames
                    continue
                last = frame
                yield frame
            held = coming

    try:
        total = write_video(path, frames(), fps, **write_options)
    except ValueError:
        Path(path).unlink(missing_ok=True)
        raise
    rate = as_fraction(fps)
    return {"path": str(path), "fps": float(rate), "fps_fraction": f"{rate.numerator}/{rate.denominator}",
            "size": list(size), "frames": total, "cut_frames": cut_frames, "fade_spans": fade_spans,
            "dissolves": dissolves, "shots": infos}


def write_reupload(src: str | Path, dst: str | Path, fps: float | Fraction, scale: float = 1.0,
                   crop: float = 0.0, skip_s: float = 0.0, crf: int = 23) -> int:
    """A re-upload of `src` (for near-duplicate tests and benchmarks): its frames after
    `skip_s`, centre-cropped by the fraction `crop`, scaled by `scale`, re-encoded at `crf`."""
    def frames() -> Iterator[np.ndarray]:
        with av.open(str(src)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i < round(skip_s * float(fps)):
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                h, w = rgb.shape[:2]
                dy, dx = round(h * crop / 2), round(w * crop / 2)
                rgb = rgb[dy:h - dy, dx:w - dx]
                size = (2 * round(rgb.shape[1] * scale / 2), 2 * round(rgb.shape[0] * scale / 2))
                yield cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return write_video(dst, frames(), fps, crf=crf)


def write_corrupt_video(path: str | Path, good_path: str | Path, mode: str = "truncate",
                        keep_frac: float = 0.4) -> None:
    """Damage a copy of a real mp4.

    "truncate" keeps the first ``keep_frac`` of the bytes (a broken download: ffmpeg writes
    the index at the end, so it is lost); "garbage" overwrites the middle third with
    seeded random bytes.
    """
    data = bytearray(Path(good_path).read_bytes())
    if mode == "truncate":
        data = data[: int(len(data) * keep_frac)]
    elif mode == "garbage":
        lo, hi = len(data) // 3, 2 * len(data) // 3
        data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    else:
        raise ValueError(f"mode must be 'truncate' or 'garbage', got {mode!r}")
    Path(path).write_bytes(bytes(data))


def write_zero_byte(path: str | Path) -> None:
    """An empty file with a video name."""
    Path(path).write_bytes(b"")


def write_not_a_video(path: str | Path) -> None:
    """A text file with a video name."""
    Path(path).write_text("This is not a video, whatever its name says.\n" * 20)


def write_video_without_frames(path: str | Path, size: tuple[int, int] = (160, 90), fps: float = 25) -> None:
    """An mp4 whose video stream lists frames but holds none that decode: the sample data
    (the mdat box) is zeroed, the index (moov) is intact."""
    write_video(path, (background(s, size) for s in range(10)), fps)
    data = bytearray(Path(path).read_bytes())
    start = data.index(b"mdat") + 4
    end = data.index(b"moov") - 4 if data.index(b"moov") > start else len(data)
    data[start:end] = bytes(end - start)
    Path(path).write_bytes(bytes(data))


def write_audio_only(path: str | Path, seconds: float = 2.0, rate_hz: int = 16000) -> None:
    """A media file with one audio stream (a 440 Hz tone) and no video stream."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("flac", rate=rate_hz)
        n = int(seconds * rate_hz)
        tone = (np.sin(2 * np.pi * 440 * np.arange(n) / rate_hz) * 8000).astype(np.int16)
        for start in range(0, n, 4096):
            chunk = tone[start:start + 4096].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = rate_hz
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_no_clip_sources(root: str | Path) -> dict[str, tuple[str, str]]:
    """Files that decode (or nearly) but give no clip at split.min_duration_s=2.

    Returns name -> (expected source_status, a piece of the expected split_error).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    make_video(root / "short.mp4", [{"frames": 30, "seed": 1}], 25, (160, 90))  # 1.2 s
    # Fast cuts: six shots of 0.6 s, each far from its neighbours.
    make_video(root / "fast_cuts.mp4", [{"frames": 15, "seed": s} for s in (1, 2, 3, 4, 5, 6)],
               25, (160, 90))
    make_video(root / "one_frame.mp4", [{"frames": 1, "seed": 7}], 25, (160, 90))
    # A slideshow: one new picture a second for 5 s, so every shot is a single 1 s frame.
    make_video(root / "slideshow.mp4", [{"frames": 1, "seed": s} for s in (1, 2, 3, 4, 5)], 1, (160, 90))
    write_video_without_frames(root / "no_frames.mp4")
    write_audio_only(root / "audio_only.mkv")
    return {
        "short.mp4": ("no_clips", "longest 1.20 s"),
        "fast_cuts.mp4": ("no_clips", "no shot of at least 2 s"),
        "one_frame.mp4": ("no_clips", "1 frames decoded"),
        "slideshow.mp4": ("no_clips", "longest 1.00 s"),
        "no_frames.mp4": ("unreadable", "no decodable video frames"),
        "audio_only.mkv": ("unreadable", "no video stream (only audio)"),
    }


# name -> (fps, (width, height), shots). Seeds of hard-cut neighbours are checked by make_video.
DEMO_SOURCES: dict[str, tuple[float, tuple[int, int], list[dict[str, Any]]]] = {
    "cuts_static_24fps.mp4": (24, (640, 360), [
        {"frames": 60, "seed": 1}, {"frames": 48, "seed": 2}, {"frames": 72, "seed": 3}, {"frames": 60, "seed": 4},
    ]),
    "pan_slow_fast_25fps.mp4": (25, (480, 270), [
        {"frames": 75, "seed": 11, "motion": "pan", "speed_px_per_frame": 1.0},
        {"frames": 75, "seed": 12, "motion": "pan", "speed_px_per_frame": 8.0},
        {"frames": 50, "seed": 13},
    ]),
    "square_2997fps.mp4": (29.97, (640, 360), [
        {"frames": 120, "seed": 21, "motion": "square", "speed_px_per_frame": 1.5},
        {"frames": 120, "seed": 22, "motion": "square", "speed_px_per_frame": 10.0},
    ]),
    "fade_30fps.mp4": (30, (480, 270), [
        {"frames": 120, "seed": 31, "motion": "pan", "speed_px_per_frame": 2.0, "fade_out": 15},
        {"frames": 120, "seed": 32, "fade_in": 15},
        {"frames": 60, "seed": 33, "motion": "square", "speed_px_per_frame": 4.0},
    ]),
    "text_overlay_25fps.mp4": (25, (640, 360), [
        {"frames": 100, "seed": 41, "text": "BIG TEXT OVERLAY", "text_height_frac": 0.3},
        {"frames": 75, "seed": 42, "motion": "pan", "speed_px_per_frame": 3.0},
        {"frames": 75, "seed": 43, "text": "a small subtitle line", "text_height_frac": 0.08},
    ]),
    "single_shot_24fps.mp4": (24, (320, 180), [
        {"frames": 360, "seed": 51, "motion": "pan", "speed_px_per_frame": 2.0},
    ]),
}


def make_demo_footage(out_dir: str | Path, overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Write the demo sources and three bad files to ``out_dir``; return ground truth by file name.

    Valid files get make_video's ground truth plus ``"valid": True``; bad ones get
    ``{"valid": False, "kind": ...}``. Refuses to replace existing files unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = {"corrupt_truncated.mp4": "truncated", "corrupt_garbage.mp4": "garbage",
           "empty.mp4": "zero_byte", "not_a_video.mp4": "not_a_video"}
    existing = [name for name in [*DEMO_SOURCES, *bad] if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already has {existing}; overwrite (--overwrite) replaces them")
    truth: dict[str, dict[str, Any]] = {}
    for name, (fps, size, spec) in DEMO_SOURCES.items():
        truth[name] = {"valid": True, **make_video(out / name, spec, fps, size)}
    good = out / "cuts_static_24fps.mp4"
    write_corrupt_video(out / "corrupt_truncated.mp4", good, mode="truncate")
    write_corrupt_video(out / "corrupt_garbage.mp4", good, mode="garbage")
    write_zero_byte(out / "empty.mp4")
    write_not_a_video(out / "not_a_video.mp4")
    truth.update({name: {"valid": False, "kind": kind, "path": str(out / name)} for name, kind in bad.items()})
    return truth


def main(argv: list[str] | None = None) -> None:
    """``python -m curation.synth OUT_DIR [--overwrite]``: write the demo footage and its ground truth."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace existing demo files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        truth = make_demo_footage(args.out_dir, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    (args.out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=1))
    for name, gt in truth.items():
        if gt["valid"]:
            log.info("%s: %d frames at %.3f fps, %dx%d, cuts %s, fades %s", name, gt["frames"], gt["fps"],
                     *gt["size"], gt["cut_frames"], gt["fade_spans"])
        else:
            log.info("%s: bad input (%s)", name, gt["kind"])
    log.info("ground truth written to %s", args.out_dir / "ground_truth.json")


if __name__ == "__main__":
    main()
