"""Cut-accuracy benchmark of the split stage on generated footage with known transitions.

    python bench/cut_bench.py                       # split args of pipeline.yaml (cascade)
    python bench/cut_bench.py --detector content    # one detector alone (content|adaptive|threshold|cascade)
    python bench/cut_bench.py --detector all        # each of the four in turn, one summary table
    python bench/cut_bench.py --json out.json --set split.trim_frames=2 --errors 20

The footage is generated once into bench_out/cut_footage (--footage) and reused while its
FOOTAGE_VERSION matches (about 1.5 minutes to generate on 2 cores; each detector's pass ~40 s).
--files N splits only the first N files (the 6 of mixed transitions come first), to iterate.

Footage (deterministic, generated here, then encoded with libx264 through PyAV): 6 files of
480x270 at 25 or 30 fps, each 9 distinct textured shots of 2.5-6 s (slow pans of multi-scale
noise textures, moving shapes on gradients, slow zoom-rotations, near-static scenes, and
fast motion: fast pans, a big object crossing fast, whip pans with motion blur), joined by
48 transitions with known ground truth:
  hard      cut frame = the first frame of the new shot.
  fade      fade-out (6-15 frames), 0-6 black frames, fade-in (6-15 frames). Dark span = the
            frames at most half as bright as the shot; cut frame = its middle. A cut anywhere
            in the dark span (+-1) counts as correct in the "span" columns.
  dissolve  cross-fade of 10-20 frames (linear); cut frame = the first frame the new shot
            weighs more than half; "span" columns accept a cut anywhere in the cross-fade (+-1).
and, inside shots, things that are NOT cuts: white flashes of 1-3 frames, fast motion, slow
near-static scenes. Any cut there is a false positive. Then 2 files of dissolves alone (issue
36), one at 25 fps and one at 30, the same kinds of shots (4-7 s of each alone) joined by 8
dissolves each: linear and eased (smoothstep), of 6, 12, 24 and 48 frames. The hard cuts
and fades, and their figures, are those of the first 6 files.

The split stage is run in-process, with the `split` args of pipeline.yaml (loaded with
curation/config.py, --set overrides as in `curate run`), on each file. The cuts it applies are
recorded by a CutMerger subclass (after merging across detectors and within one fade, before
min/max duration, so cuts that only make a dropped fragment are counted too); the clip rows
give the rest.

Prints, per transition kind and overall: true cuts, detected, recall and precision of cut
frames at +-1 frame (each true cut matched to at most one detected cut), and in the span;
transition spans (issue 36): a fade's frames (ramps and black) and a dissolve's frames in
which both shots weigh at least 5% (stages/split/dissolves.py, DISSOLVE_MIN_WEIGHT) are the
true spans; the gaps between consecutive clips are the spans split cut out, read on a second
pass with min_duration_s at one frame (so that a shot made too short by its transitions does
not join two gaps into one); recall and precision at +-1 frame on both ends (a hard cut has
no span: a gap there is a false span);
clip edges holding a blend (a clip's first or last frame in which two shots weigh 5% or more);
false positives on flashes, fast motion, slow scenes; clips spanning a true cut (a clip
holding frames t-1 and t of a hard cut, frames mid-2..mid+1 of a dissolve, or the frames
just outside a fade's dark span: must be 0); clips whose first or last frame is near-black
(mean level below 12, the fade detector's threshold, and below 32); the footage's frame scores
(ContentDetector's HSV delta) at hard cuts, inside dissolves, on flashes and fast motion; then
every error with the detectors that reported near it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import synth  # noqa: E402
from stages.split.dissolves import DISSOLVE_MIN_WEIGHT  # noqa: E402
from curation.config import load_config  # noqa: E402
import stages.split as split  # noqa: E402
import stages.split.segment as split_segment  # noqa: E402  (where _Segmenter builds its CutMerger)

SIZE = (480, 270)  # (width, height)
FILE_FPS = (25, 25, 30, 25, 30, 25)
SHOTS_PER_FILE = 9
# A clip's first or last frame is dark below these mean levels (of R, G, B in 0..255): 12 is
# the fade detector's threshold (and split's trim_dark_below), 32 is still nearly black.
DARK_LEVELS = (12.0, 32.0)
DETECTORS = ("content", "adaptive", "threshold", "cascade")
TRANSITIONS = ("hard", "fade", "dissolve")
SPANNED = ("fade", "dissolve")  # transitions with frames of their own, cut out of the clips
# Files of dissolves alone: their rate, and each dissolve's (frames, curve), shuffled per file.
DISSOLVE_FILE_FPS = (25, 30)
DISSOLVE_KINDS = [(n, curve) for n in (6, 12, 24, 48) for curve in ("linear", "ease")]
NO_CUT = ("flash", "fast", "slow")

Scene = Callable[[int], np.ndarray]  # local frame index -> RGB float32 (H, W, 3)


# ---- scenes ---------------------------------------------------------------------------------

def _field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth random field in [0, 1] varying over about `cell` pixels, float32 (h, w)."""
    cell = max(2, cell)
    grid = rng.random((h // cell + 3, w // cell + 3), dtype=np.float32)
    big = cv2.resize(grid, (grid.shape[1] * cell, grid.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
    out = big[cell:cell + h, cell:cell + w]
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _palette(hue: float, rng: np.random.Generator) -> np.ndarray:
    """Four RGB colours (4, 3) around `hue` (OpenCV 0..180), dark to bright."""
    hues = (hue + np.array([-12, 0, 12, 24]) + rng.uniform(-4, 4, 4)) % 180
    sats = rng.uniform(110, 255, 4)
    vals = np.array([70, 125, 185, 240]) + rng.uniform(-10, 10, 4)
    hsv = np.stack([hues, sats, np.clip(vals, 0, 255)], -1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def texture(rng: np.random.Generator, h: int, w: int, hue: float, busy: bool = False) -> np.ndarray:
    """A multi-scale noise texture through a palette, with a gradient: RGB float32 (h, w, 3).

    `busy`: most of the contrast in fine detail (foliage, crowds), the hard case for fast motion.
    """
    weights = (0.15, 0.35, 0.5) if busy else (0.55, 0.3, 0.15)
    t = weights[0] * _field(rng, h, w, SIZE[0] // 5) + weights[1] * _field(rng, h, w, SIZE[0] // 24) \
        + weights[2] * _field(rng, h, w, SIZE[0] // 90)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = np.cos(angle) * xx / SIZE[0] + np.sin(angle) * yy / SIZE[1]
    grad = (grad - grad.min()) / max(float(grad.max() - grad.min()), 1e-6)
    t = np.clip(0.8 * t + 0.2 * grad, 0, 1) * 2.999
    pal = _palette(hue, rng)
    lo = np.clip(np.floor(t).astype(int), 0, 2)
    frac = (t - lo)[..., None]
    return pal[lo] * (1 - frac) + pal[lo + 1] * frac


def _grain(rng: np.random.Generator, n: int = 7) -> list[np.ndarray]:
    w, h = SIZE
    return [rng.normal(0, 2.0, (h, w, 1)).astype(np.float32) for _ in range(n)]


def _blur(frame: np.ndarray, vx: float, vy: float) -> np.ndarray:
    """Motion blur along (vx, vy) px/frame over half the displacement (a 180-degree shutter)."""
    length = int(math.hypot(vx, vy) / 2)
    if length < 3:
        return frame
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    ux, uy = vx / math.hypot(vx, vy), vy / math.hypot(vx, vy)
    cv2.line(kernel, (round(c - ux * c), round(c - uy * c)), (round(c + ux * c), round(c + uy * c)), 1.0)
    return cv2.filter2D(frame, -1, kernel / kernel.sum())


def pan_scene(rng: np.random.Generator, frames: int, hue: float, speed: float,
              blur: bool = False, profile: np.ndarray | None = None, busy: bool = False) -> Scene:
    """A camera pan over a texture: constant `speed` px/frame, or the offsets in `profile`."""
    w, h = SIZE
    angle = rng.uniform(-0.35, 0.35) + (math.pi if rng.random() < 0.5 else 0.0)
    dx, dy = math.cos(angle), math.sin(angle)
    offsets = profile if profile is not None else np.arange(frames + 1) * speed
    reach = float(offsets.max()) + 2
    canvas = texture(rng, h + math.ceil(abs(dy) * reach) + 2, w + math.ceil(abs(dx) * reach) + 2, hue, busy)
    x0 = canvas.shape[1] - w - 1 if dx < 0 else 0
    y0 = canvas.shape[0] - h - 1 if dy < 0 else 0
    grain = _grain(rng)

    def frame(i: int) -> np.ndarray:
        x, y = round(x0 + dx * offsets[i]), round(y0 + dy * offsets[i])
        out = canvas[y:y + h, x:x + w]
        if blur:
            step = offsets[i + 1] - offsets[i] if i + 1 < len(offsets) else offsets[i] - offsets[i - 1]
            out = _blur(out, dx * step, dy * step)
        return out + grain[i % len(grain)]
    return frame


def whip_scene(rng: np.random.Generator, frames: int, hue: float) -> Scene:
    """A slow pan over busy detail with a whip in the middle: up to 70-120 px/frame, blurred."""
    peak, ramp = rng.uniform(70, 120), int(rng.integers(8, 14))
    speed = np.full(frames, 1.0)
    mid = frames // 2
    speed[mid - ramp // 2: mid - ramp // 2 + ramp] += peak * np.sin(np.linspace(0, math.pi, ramp))
    offsets = np.concatenate([[0.0], np.cumsum(speed)])
    return pan_scene(rng, frames, hue, 0.0, blur=True, profile=offsets, busy=True)


def zoom_scene(rng: np.random.Generator, frames: int, hue: float) -> Scene:
    """A slow zoom (up to 25 %) with a slight rotation about the centre."""
    w, h = SIZE
    canvas = texture(rng, h, w, hue)
    zoom, turn = rng.uniform(0.12, 0.25), rng.uniform(-4, 4)
    grain = _grain(rng)

    def frame(i: int) -> np.ndarray:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), turn * i / frames, 1 + zoom * i / frames)
        return cv2.warpAffine(canvas, m, (w, h), borderMode=cv2.BORDER_REFLECT) + grain[i % len(grain)]
    return frame


def _bounce(position: float, span: float) -> float:
    """`position` bounced between 0 and `span` (constant speed, reversing at the ends)."""
    phase = position % (2 * span)
    return phase if phase <= span else 2 * span - phase


def shapes_scene(rng: np.random.Generator, frames: int, hue: float, fast: bool = False) -> Scene:
    """Bouncing shapes on a textured gradient; `fast`: a big object (0.8-1.2 frame heights)
    close to the camera, crossing at 40-140 px/frame (the frame's width in 3.5-12 frames)."""
    w, h = SIZE
    back = texture(rng, h, w, hue, busy=fast) * 0.8 + 20
    grain = _grain(rng)
    n = 1 if fast else int(rng.integers(4, 8))
    size = rng.uniform(0.8, 1.2, n) * h if fast else rng.uniform(15, 45, n)
    speed = rng.uniform(40, 140, n) if fast else rng.uniform(1, 4, n)
    angle = rng.uniform(-0.3, 0.3, n) if fast else rng.uniform(0, 2 * math.pi, n)
    start = rng.uniform(0, 1, (n, 2)) * (w, h)
    colours = _palette((hue + 90) % 180, rng)[rng.integers(0, 4, n)]
    square = rng.random(n) < 0.5

    def frame(i: int) -> np.ndarray:
        out = back.copy()
        for k in range(n):
            x = _bounce(start[k, 0] + i * speed[k] * math.cos(angle[k]), w)
            y = _bounce(start[k, 1] + i * speed[k] * math.sin(angle[k]), h)
            r = int(size[k] / 2)
            colour = tuple(float(c) for c in colours[k])
            if square[k]:
                cv2.rectangle(out, (int(x) - r, int(y) - r), (int(x) + r, int(y) + r), colour, -1, cv2.LINE_AA)
                cv2.rectangle(out, (int(x) - r, int(y) - r), (int(x) + r, int(y) + r), (15, 15, 15), 2, cv2.LINE_AA)
            else:
                cv2.circle(out, (int(x), int(y)), r, colour, -1, cv2.LINE_AA)
                cv2.circle(out, (int(x), int(y)), r, (15, 15, 15), 2, cv2.LINE_AA)
        return out + grain[i % len(grain)]
    return frame


def make_scene(kind: str, seed: int, frames: int, hue: float) -> Scene:
    rng = np.random.default_rng(seed)
    return {
        "pan": lambda: pan_scene(rng, frames, hue, rng.uniform(0.7, 3.0)),
        "shapes": lambda: shapes_scene(rng, frames, hue),
        "zoom": lambda: zoom_scene(rng, frames, hue),
        "slow": lambda: pan_scene(rng, frames, hue, rng.uniform(0.05, 0.2)),
        "fast_pan": lambda: pan_scene(rng, frames, hue, rng.uniform(25, 50), blur=rng.random() < 0.5, busy=True),
        "fast_object": lambda: shapes_scene(rng, frames, hue, fast=True),
        "whip": lambda: whip_scene(rng, frames, hue),
    }[kind]()


# ---- footage with ground truth --------------------------------------------------------------

@dataclass
class Transition:
    kind: str   # hard | fade | dissolve
    cut: int    # the true cut frame (first frame of the new shot; the middle of a soft transition)
    lo: int     # a detected cut in lo..hi is correct in the "span" columns
    hi: int
    keep: tuple[int, int]  # a clip holding both these frames spans the cut
    params: dict[str, Any] = field(default_factory=dict)
    # first and last frame that are the transition's own (a fade's ramps and black, a
    # dissolve's frames with both shots at DISSOLVE_MIN_WEIGHT or more); None: a hard cut
    span: tuple[int, int] | None = None


@dataclass
class Stretch:
    kind: str  # flash | fast | slow | other: a cut in lo..hi is a false positive of this kind
    lo: int
    hi: int
    scene: str = ""


@dataclass
class FileTruth:
    name: str
    fps: int
    frames: int
    transitions: list[Transition]
    stretches: list[Stretch]
    level: list[float]  # mean of R, G, B (0..255) of every frame as generated
    score: list[float]  # its HSV delta with the frame before (ContentDetector's score), at full size
    blend: list[float] = field(default_factory=list)  # the lesser shot's share of every frame (0: one shot)


@dataclass
class _Shot:
    scene: str
    frames: int
    start: int = 0
    weight: np.ndarray | None = None  # per local frame: fade / dissolve gain


SCENE_KIND = {"pan": "other", "shapes": "other", "zoom": "other", "slow": "slow",
              "fast_pan": "fast", "fast_object": "fast", "whip": "fast"}
FAST_SCENES = ("fast_pan", "fast_object", "whip")


def plan_file(index: int, fps: int, kinds: list[str]) -> tuple[list[_Shot], list[tuple[str, dict]]]:
    """Shots (scene, length) and the transitions between them, for file `index`."""
    rng = np.random.default_rng(1000 + index)
    scenes = ["pan", "shapes", "zoom", "pan", "shapes", "zoom", FAST_SCENES[index % 3],
              FAST_SCENES[(index + 1) % 3], "slow"]
    rng.shuffle(scenes)
    shots = [_Shot(s, int(rng.uniform(2.5, 6.0) * fps)) for s in scenes]
    if kinds and all(isinstance(k, tuple) for k in kinds):
        # A file of dissolves alone (DISSOLVE_KINDS): each shot 4-7 s alone besides the
        # frames it shares with its neighbours, so that every shot keeps a clip.
        joins = [("dissolve", {"frames": n, "curve": curve}) for n, curve in kinds]
        for k, shot in enumerate(shots):
            shared = (joins[k - 1][1]["frames"] if k else 0) + (joins[k][1]["frames"] if k < len(joins) else 0)
            shot.frames = shared + int(rng.uniform(4.0, 7.0) * fps)
        return shots, joins
    joins = []
    for kind in kinds:
        params = {"hard": lambda: {},
                  "fade": lambda: {"out": int(rng.integers(6, 16)), "black": int(rng.integers(0, 7)),
                                   "in": int(rng.integers(6, 16))},
                  "dissolve": lambda: {"frames": int(rng.integers(10, 21))}}[kind]()
        joins.append((kind, params))
    return shots, joins


def lay_out(shots: list[_Shot], joins: list[tuple[str, dict]]) -> tuple[int, list[Transition]]:
    """Place the shots on the timeline (start, weights); return total frames and the truth."""
    for s in shots:
        s.weight = np.ones(s.frames, np.float32)
    truth = []
    for k, (kind, p) in enumerate(joins):
        a, b = shots[k], shots[k + 1]
        if kind == "hard":
            b.start = a.start + a.frames
            t = b.start
            truth.append(Transition(kind, t, t - 1, t + 1, (t - 1, t), p))
        elif kind == "dissolve":
            d = p["frames"]
            b.start = a.start + a.frames - d
            alpha = synth.dissolve_weights(d, p.get("curve", "linear")).astype(np.float32)
            a.weight[-d:] *= 1 - alpha
            b.weight[:d] *= alpha
            cut = b.start + (d + 1) // 2  # the first frame b weighs more than half (the curves are symmetric)
            blended = np.flatnonzero(np.minimum(alpha, 1 - alpha) >= DISSOLVE_MIN_WEIGHT) + b.start
            span = (int(blended[0]), int(blended[-1])) if len(blended) else None
            truth.append(Transition(kind, cut, b.start - 1, b.start + d, (cut - 2, cut + 1), p, span))
        else:
            n, black, m = p["out"], p["black"], p["in"]
            b.start = a.start + a.frames + black
            out_gain = (n - np.arange(n, dtype=np.float32)) / (n + 1)
            in_gain = np.arange(1, m + 1, dtype=np.float32) / (m + 1)
            a.weight[-n:] *= out_gain
            b.weight[:m] *= in_gain
            gains = np.concatenate([out_gain, np.zeros(black, np.float32), in_gain])
            dark = np.flatnonzero(gains <= 0.5) + a.start + a.frames - n
            lo, hi = int(dark[0]), int(dark[-1])
            span = (a.start + a.frames - n, b.start + m - 1)  # every gain of a fade is under 1 - 5%
            truth.append(Transition(kind, (lo + hi + 1) // 2, lo - 1, hi + 1, (lo - 1, hi + 1), p, span))
    return shots[-1].start + shots[-1].frames, truth


def add_flashes(shots: list[_Shot], rng: np.random.Generator, total: int) -> tuple[np.ndarray, list[Stretch]]:
    """White flashes of 1-3 frames in the middle of two ordinary shots: per-frame white gain."""
    white = np.zeros(total, np.float32)
    ordinary = [s for s in shots if SCENE_KIND[s.scene] == "other"]
    stretches = []
    for s in [ordinary[i] for i in sorted(rng.choice(len(ordinary), 2, replace=False))]:
        length = int(rng.integers(1, 4))
        lo = s.start + int(rng.uniform(0.35, 0.6) * s.frames)
        strength = rng.uniform(0.75, 1.0)
        white[lo:lo + length] = strength * np.array([1.0, 0.7, 0.4][:length] if length > 1 else [1.0])
        stretches.append(Stretch("flash", lo - 1, lo + length + 1, s.scene))
    return white, stretches


def render_file(path: Path, index: int, fps: int, kinds: list[str]) -> FileTruth:
    """Generate, encode (libx264 via PyAV) and describe one benchmark file."""
    shots, joins = plan_file(index, fps, kinds)
    total, transitions = lay_out(shots, joins)
    rng = np.random.default_rng(2000 + index)
    white, stretches = add_flashes(shots, rng, total)
    hue = rng.uniform(0, 180)
    scenes = []
    for k, s in enumerate(shots):
        hue = (hue + rng.uniform(55, 125)) % 180  # consecutive shots differ in hue by 55-125 of 180
        scenes.append(make_scene(s.scene, 10_000 * index + k, s.frames, hue))
        stretches.append(Stretch(SCENE_KIND[s.scene], s.start, s.start + s.frames - 1, s.scene))
    level: list[float] = []
    score: list[float] = []
    blend: list[float] = []

    def frames():
        for f in range(total):
            acc = np.zeros((SIZE[1], SIZE[0], 3), np.float32)
            shares = []
            for s, scene in zip(shots, scenes):
                if s.start <= f < s.start + s.frames:
                    acc += s.weight[f - s.start] * scene(f - s.start)
                    shares.append(float(s.weight[f - s.start]))
            blend.append(min(shares) / sum(shares) if len(shares) > 1 and sum(shares) > 0 else 0.0)
            acc = acc * (1 - white[f]) + 255 * white[f]
            rgb = np.clip(acc, 0, 255).astype(np.uint8)
            hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
            # ContentDetector's score, as synth.content_score computes it (uint8 |a - b| is exact).
            score.append(float(np.mean(cv2.mean(cv2.absdiff(previous[0], hsv))[:3])) if previous else 0.0)
            level.append(float(np.mean(cv2.mean(rgb)[:3])))
            previous[:] = [hsv]
            yield rgb

    previous: list[np.ndarray] = []

    synth.write_video(path, frames(), fps, crf=20, preset="superfast")
    return FileTruth(path.name, fps, total, transitions, stretches, level, score, blend)


def make_footage(root: Path) -> list[FileTruth]:
    """The benchmark's files: 6 x 9 shots, 48 transitions (16 of each kind, shuffled), then
    2 x 9 shots joined by dissolves alone (DISSOLVE_KINDS, shuffled per file)."""
    kinds = [k for k in TRANSITIONS for _ in range(16)]
    np.random.default_rng(7).shuffle(kinds)
    per = SHOTS_PER_FILE - 1
    files = [render_file(root / f"cuts_{i}.mp4", i, fps, kinds[i * per:(i + 1) * per])
             for i, fps in enumerate(FILE_FPS)]
    for j, fps in enumerate(DISSOLVE_FILE_FPS):
        index = len(FILE_FPS) + j
        order = list(DISSOLVE_KINDS)
        np.random.default_rng(3000 + index).shuffle(order)
        files.append(render_file(root / f"dissolves_{j}.mp4", index, fps, order))
    return files


# ---- running split --------------------------------------------------------------------------

class _RecordingMerger(split.CutMerger):
    """split's CutMerger, also keeping what each detector reported and which cuts it applied."""

    live: list["_RecordingMerger"] = []

    def __init__(self, cuts: set[int], within_frames: int, rate) -> None:
        super().__init__(cuts, within_frames, rate)
        self.reports: list[tuple[int, int]] = []  # (frame, detector index) as reported
        self.ever: set[int] = set()
        self.merged: set[int] = set()
        _RecordingMerger.live.append(self)

    def add(self, cut: int, detector: int, pending) -> None:
        before = set(self.cuts) | {int(cut)}
        super().add(cut, detector, pending)
        self.reports.append((int(cut), int(detector)))
        self.merged = (self.merged | (before - self.cuts)) - self.cuts
        self.ever |= self.cuts

    def join(self, lo: int, hi: int, target) -> None:
        before = set(self.cuts)
        super().join(lo, hi, target)
        self.merged = (self.merged | (before - self.cuts)) - self.cuts
        self.ever |= self.cuts

    def applied(self) -> list[int]:
        return sorted(self.ever - self.merged - set(self.flashes))


@contextlib.contextmanager
def recording_merger():
    saved = split_segment.CutMerger
    split_segment.CutMerger = _RecordingMerger
    try:
        yield
    finally:
        split_segment.CutMerger = saved


def split_args(config: Path, overrides: list[str], detector: str | None) -> dict[str, Any]:
    """The split step's args of the pipeline config; `detector` replaces its detector."""
    args = dict(load_config(config, overrides).step("split").args)
    if detector is not None:
        args["detector"] = detector
        if detector != "cascade":
            args.pop("cascade", None)
    return args


def run_split(args: dict[str, Any], path: Path) -> dict[str, Any]:
    """Split one file in-process: its clip rows, applied cuts and raw detector reports."""
    stage = split.SplitStage(**args)
    names = [spec["detector"] for spec in stage.detector_specs]
    _RecordingMerger.live = []
    with recording_merger():
        rows = stage.split_source(str(path), path.stem)
    if len(_RecordingMerger.live) != 1:
        raise RuntimeError("stages/split/segment.py no longer builds one CutMerger per source; update bench/cut_bench.py")
    merger = _RecordingMerger.live[0]
    errors = [r["split_error"] for r in rows if r["split_error"]]
    if errors:
        raise RuntimeError(f"split failed on {path}: {errors}")
    return {"clips": [(r["start_frame"], r["end_frame"]) for r in rows],
            "cuts": merger.applied(),
            "reports": [(f, names[d]) for f, d in merger.reports]}


# ---- scoring --------------------------------------------------------------------------------

def match(transitions: list[Transition], cuts: list[int], strict: bool) -> dict[int, int]:
    """Transition index -> the detected cut matched to it (each cut used at most once).

    strict: within +-1 frame of the true cut frame; else anywhere in its span (lo..hi).
    Among candidates the one nearest the true cut frame wins.
    """
    free, out = set(cuts), {}
    for i, tr in enumerate(transitions):
        lo, hi = (tr.cut - 1, tr.cut + 1) if strict else (tr.lo, tr.hi)
        near = [c for c in free if lo <= c <= hi]
        if near:
            out[i] = min(near, key=lambda c: (abs(c - tr.cut), c))
            free.discard(out[i])
    return out


NEAR_TRANSITION = 8  # an extra cut this close to a transition's span is charged to that kind


def blame(cut: int, truth: FileTruth) -> str:
    """The kind a false cut is charged to: a flash, a transition nearby, else its shot's kind."""
    for s in truth.stretches:
        if s.kind == "flash" and s.lo <= cut <= s.hi:
            return "flash"
    for tr in truth.transitions:
        if tr.lo - NEAR_TRANSITION <= cut <= tr.hi + NEAR_TRANSITION:
            return tr.kind
    for s in truth.stretches:
        if s.kind != "flash" and s.lo <= cut <= s.hi:
            return s.kind
    return "other"


def spans(clip: tuple[int, int], tr: Transition) -> bool:
    start, end = clip
    return start <= tr.keep[0] and end - 1 >= tr.keep[1]


def nearby(reports: list[tuple[int, str]], lo: int, hi: int, margin: int = 5) -> str:
    found = sorted({f"{name}@{f}" for f, name in reports if lo - margin <= f <= hi + margin})
    return " ".join(found) or "no detector reported"


def score_file(truth: FileTruth, result: dict[str, Any],
               every_clip: list[tuple[int, int]] | None = None) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Counts per kind for one file, and one line per error. `every_clip`: the clips of the
    same split with no minimum length (the spans cut out are the gaps between them; with the
    minimum, a shorter shot between two transitions leaves one gap for both)."""
    counts = {k: zero_counts() for k in (*TRANSITIONS, *NO_CUT, "other")}
    errors = []
    cuts, reports = result["cuts"], result["reports"]
    false_cuts: list[int] = []
    for mode, strict in (("pm1", True), ("span", False)):
        matched = match(truth.transitions, cuts, strict)
        for i, tr in enumerate(truth.transitions):
            counts[tr.kind]["true"] += strict
            counts[tr.kind][f"tp_{mode}"] += i in matched
            if i not in matched:
                errors.append(f"{truth.name} {tr.kind} at {tr.cut} (span {tr.lo}-{tr.hi}) missed "
                              f"{'at +-1' if strict else 'in its span'}: {nearby(reports, tr.lo, tr.hi)}")
        false_cuts = sorted(set(cuts) - set(matched.values()))
        for c in false_cuts:
            kind = blame(c, truth)
            counts[kind][f"fp_{mode}"] += 1
            if not strict or kind in TRANSITIONS:
                errors.append(f"{truth.name} false cut at {c} charged to {kind} ({mode}): "
                              f"{nearby(reports, c, c, 2)}")
    for s in truth.stretches:  # false_cuts: those of the span matching, the last loop's
        counts[s.kind]["instances"] += 1
        counts[s.kind]["instances_cut"] += any(s.lo <= c <= s.hi and blame(c, truth) == s.kind
                                               for c in false_cuts)
    clips = [c for c in result["clips"] if c[0] is not None]
    for tr in truth.transitions:
        for clip in clips:
            if spans(clip, tr):
                counts[tr.kind]["spanning"] += 1
                errors.append(f"{truth.name} clip {clip[0]}-{clip[1]} spans the {tr.kind} at {tr.cut} "
                              f"(span {tr.lo}-{tr.hi}): {nearby(reports, tr.lo, tr.hi)}")
    edge = [min(truth.level[s], truth.level[e - 1]) for s, e in clips]
    counts["other"].update(clips=len(clips), dark_edge_12=sum(x < DARK_LEVELS[0] for x in edge),
                           dark_edge_32=sum(x < DARK_LEVELS[1] for x in edge),
                           clip_frames=sum(e - s for s, e in clips), frames=truth.frames,
                           blend_edges=sum((truth.blend[s] >= DISSOLVE_MIN_WEIGHT)
                                           + (truth.blend[e - 1] >= DISSOLVE_MIN_WEIGHT) for s, e in clips))
    for s, e in clips:
        for f in (s, e - 1):
            if truth.blend[f] >= DISSOLVE_MIN_WEIGHT:
                errors.append(f"{truth.name} clip {s}-{e} has a blend at its edge frame {f} "
                              f"({100 * truth.blend[f]:.0f}% of the other shot)")
    # Transition spans: the gaps between consecutive clips against the true spans, +-1 frame.
    every = clips if every_clip is None else [c for c in every_clip if c[0] is not None]
    gaps = [(e, s2 - 1) for (_, e), (s2, _) in zip(every, every[1:]) if s2 > e]
    used = set()
    for tr in truth.transitions:
        if tr.span is None:
            continue
        counts[tr.kind]["spans"] += 1
        hit = next((g for g in gaps if g not in used and abs(g[0] - tr.span[0]) <= 1 and abs(g[1] - tr.span[1]) <= 1),
                   None)
        if hit is not None:
            used.add(hit)
            counts[tr.kind]["spans_found"] += 1
        else:
            near = [g for g in gaps if g[0] <= tr.span[1] + NEAR_TRANSITION and g[1] >= tr.span[0] - NEAR_TRANSITION]
            errors.append(f"{truth.name} {tr.kind} span {tr.span[0]}-{tr.span[1]} ({tr.params}) not cut out at +-1: "
                          f"gaps near it {near or 'none'}")
    for g in gaps:
        if g in used:
            continue
        kind = next((tr.kind for tr in truth.transitions
                     if g[0] <= tr.hi + NEAR_TRANSITION and g[1] >= tr.lo - NEAR_TRANSITION), "other")
        counts[kind]["spans_false"] += 1
    return counts, errors


def zero_counts() -> dict[str, int]:
    keys = ("true", "tp_pm1", "tp_span", "fp_pm1", "fp_span", "spanning", "instances", "instances_cut",
            "clips", "dark_edge_12", "dark_edge_32", "clip_frames", "frames", "blend_edges",
            "spans", "spans_found", "spans_false")
    return dict.fromkeys(keys, 0)


def add_counts(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]]) -> None:
    for kind, c in part.items():
        for key, value in c.items():
            total.setdefault(kind, zero_counts())[key] += value


# ---- report ---------------------------------------------------------------------------------

def ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def summarize(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Recall and precision per transition kind and overall, false cuts per no-cut kind."""
    fp_all = {m: sum(c[f"fp_{m}"] for c in counts.values()) for m in ("pm1", "span")}
    rows = {}
    for kind in (*TRANSITIONS, "all"):
        c = counts[kind] if kind != "all" else {k: sum(counts[t][k] for t in TRANSITIONS) for k in zero_counts()}
        row = {"true": c["true"], "spanning": c["spanning"]}
        for m in ("pm1", "span"):
            fp = fp_all[m] if kind == "all" else c[f"fp_{m}"]
            row.update({f"found_{m}": c[f"tp_{m}"], f"false_{m}": fp,
                        f"recall_{m}": ratio(c[f"tp_{m}"], c["true"]),
                        f"precision_{m}": ratio(c[f"tp_{m}"], c[f"tp_{m}"] + fp)})
        rows[kind] = row
    no_cut = {k: {"instances": counts[k]["instances"], "false_cuts": counts[k]["fp_span"],
                  "instances_cut": counts[k]["instances_cut"]} for k in (*NO_CUT, "other")}
    o = counts["other"]
    clips = {"clips": o["clips"], "spanning_true_cut": rows["all"]["spanning"],
             "dark_edge_12": o["dark_edge_12"], "dark_edge_32": o["dark_edge_32"], "frames_in_clips": ratio(o["clip_frames"], o["frames"]),
             "blend_edges": o["blend_edges"]}
    spans = {}
    for kind in (*SPANNED, "all"):
        kinds = SPANNED if kind == "all" else (kind,)
        true = sum(counts[k]["spans"] for k in kinds)
        found = sum(counts[k]["spans_found"] for k in kinds)
        false = sum(counts[k]["spans_false"] for k in (counts if kind == "all" else kinds))
        spans[kind] = {"true": true, "found": found, "false": false, "recall_pm1": ratio(found, true),
                       "precision_pm1": ratio(found, found + false)}
    return {"transitions": rows, "no_cut": no_cut, "clips": clips, "spans": spans}


def _f(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.2f}"


def print_summary(name: str, s: dict[str, Any], seconds: float) -> None:
    print(f"\ndetector={name}  (split {seconds:.1f} s)")
    print(f"{'kind':<9}{'true':>5} | {'found':>5} {'recall':>6} {'prec':>5}  (+-1 frame) | "
          f"{'found':>5} {'recall':>6} {'prec':>5}  (in span) | clips spanning")
    for kind, r in s["transitions"].items():
        print(f"{kind:<9}{r['true']:>5} | {r['found_pm1']:>5} {_f(r['recall_pm1']):>6} {_f(r['precision_pm1'])}"
              f"{'':13}| {r['found_span']:>5} {_f(r['recall_span']):>6} {_f(r['precision_span'])}{'':12}| "
              f"{r['spanning']:>5}")
    parts = [f"{k} {v['false_cuts']} false cuts in {v['instances_cut']} of {v['instances']}"
             for k, v in s["no_cut"].items() if k != "other"]
    print("no cut:   " + "; ".join(parts) + f"; elsewhere in shots {s['no_cut']['other']['false_cuts']}")
    c = s["clips"]
    print(f"clips:    {c['clips']}, spanning a true cut {c['spanning_true_cut']}; first or last frame darker "
          f"than 12: {c['dark_edge_12']}, than 32: {c['dark_edge_32']}; {100 * c['frames_in_clips']:.0f}% of "
          f"frames in clips; clip edges holding a blend (both shots >= {100 * DISSOLVE_MIN_WEIGHT:.0f}%): "
          f"{c['blend_edges']}")
    parts = [f"{k} {r['found']} of {r['true']} (recall {_f(r['recall_pm1'])}), {r['false']} false "
             f"(precision {_f(r['precision_pm1'])})" for k, r in s["spans"].items()]
    print("spans cut out (+-1 frame each end): " + "; ".join(parts))


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """One line per detector (the README's table)."""
    print("\n| detector | recall +-1 | precision +-1 | recall in span | precision in span | "
          "cuts on flashes | on fast motion | clips spanning a cut | clips with an edge frame < 12 / < 32 | "
          "spans cut out: recall / precision +-1 | clip edges holding a blend |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        a, n, c = r["summary"]["transitions"]["all"], r["summary"]["no_cut"], r["summary"]["clips"]
        sp = r["summary"]["spans"]["all"]
        print(f"| {name} | {_f(a['recall_pm1'])} | {_f(a['precision_pm1'])} | {_f(a['recall_span'])} | "
              f"{_f(a['precision_span'])} | {n['flash']['false_cuts']} | {n['fast']['false_cuts']} | "
              f"{c['spanning_true_cut']} | {c['dark_edge_12']} / {c['dark_edge_32']} of {c['clips']} | "
              f"{_f(sp['recall_pm1'])} / {_f(sp['precision_pm1'])} | {c['blend_edges']} |")


def difficulty(truths: list[FileTruth]) -> dict[str, float]:
    """ContentDetector's frame score (HSV delta, threshold 27) where it matters, as generated."""
    out: dict[str, list[float]] = {"hard cut min": [], "dissolve max": [], "flash onset min": [],
                                   "fast motion max": [], "slow max": []}
    for t in truths:
        near = set()
        for tr in t.transitions:
            near |= set(range(tr.lo - 1, tr.hi + 2))
            if tr.kind == "hard":
                out["hard cut min"].append(t.score[tr.cut])
            elif tr.kind == "dissolve":
                out["dissolve max"].append(max(t.score[tr.lo + 1:tr.hi + 1]))
        for s in t.stretches:
            if s.kind == "flash":
                out["flash onset min"].append(t.score[s.lo + 1])
                near |= set(range(s.lo, s.hi + 1))
        for s in t.stretches:
            if s.kind in ("fast", "slow"):
                inside = [t.score[f] for f in range(s.lo + 1, s.hi + 1) if f not in near]
                out[f"{s.kind} max" if s.kind == "slow" else "fast motion max"].append(max(inside))
    return {k: round(min(v) if k.endswith("min") else max(v), 1) for k, v in out.items()}


def describe(truths: list[FileTruth]) -> str:
    kinds = [tr.kind for t in truths for tr in t.transitions]
    stretches = [s.kind for t in truths for s in t.stretches]
    return (f"{len(truths)} files {SIZE[0]}x{SIZE[1]} at {sorted(set(FILE_FPS))} fps, "
            f"{sum(t.frames for t in truths)} frames; transitions: "
            + ", ".join(f"{kinds.count(k)} {k}" for k in TRANSITIONS)
            + "; no cut: " + ", ".join(f"{stretches.count(k)} {k}" for k in NO_CUT)
            + "\nframe scores (HSV delta, as ContentDetector, threshold 27): "
            + ", ".join(f"{k} {v}" for k, v in difficulty(truths).items()))


# ---- main -----------------------------------------------------------------------------------

FOOTAGE_VERSION = 4


def load_or_make_footage(root: Path) -> list[FileTruth]:
    """The footage under `root`, generated unless root/truth.json says it is this version."""
    index = root / "truth.json"
    if index.is_file():
        saved = json.loads(index.read_text())
        if saved.get("version") == FOOTAGE_VERSION and all((root / t["name"]).is_file() for t in saved["files"]):
            return [FileTruth(**{**t, "transitions": [Transition(**{**x, "keep": tuple(x["keep"]),
                                                                   "span": tuple(x["span"]) if x["span"] else None})
                                                      for x in t["transitions"]],
                                 "stretches": [Stretch(**x) for x in t["stretches"]]})
                    for t in saved["files"]]
    root.mkdir(parents=True, exist_ok=True)
    truths = make_footage(root)
    index.write_text(json.dumps({"version": FOOTAGE_VERSION, "files": [asdict(t) for t in truths]}))
    return truths


def evaluate(args: dict[str, Any], root: Path, truths: list[FileTruth]) -> dict[str, Any]:
    """Split every file with `args`; summary, per-kind counts, error lines, split seconds."""
    total: dict[str, dict[str, int]] = {}
    errors: list[str] = []
    started = time.perf_counter()
    # The spans cut out are read on a second pass keeping clips of any length (one frame).
    every_args = {**args, "min_duration_s": 1.0 / max(max(FILE_FPS), max(DISSOLVE_FILE_FPS))}
    for truth in truths:
        every = run_split(every_args, root / truth.name)["clips"]
        counts, errs = score_file(truth, run_split(args, root / truth.name), every)
        add_counts(total, counts)
        errors += errs
    seconds = time.perf_counter() - started
    return {"args": args, "seconds": seconds, "counts": total, "summary": summarize(total), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as `curate run --set` (e.g. split.trim_frames=2)")
    p.add_argument("--detector", choices=(*DETECTORS, "all"), default=None,
                   help="replace the config's split detector; 'all': each of the four")
    p.add_argument("--footage", type=Path, default=REPO / "bench_out" / "cut_footage",
                   help="where the footage is generated, and reused when it is of this version")
    p.add_argument("--errors", type=int, default=None,
                   help="error lines to print per detector (default: all for one detector, none for all)")
    p.add_argument("--json", type=Path, default=None, help="write every figure and error here")
    p.add_argument("--files", type=int, default=None, help="split only the first N files (to iterate)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = list(DETECTORS) if a.detector == "all" else [a.detector]
    started = time.perf_counter()
    truths = load_or_make_footage(a.footage)[:a.files]
    print(f"footage in {a.footage} ({time.perf_counter() - started:.1f} s): {describe(truths)}")
    results = {}
    for name in names:
        args = split_args(a.config, a.set, name)
        label = args["detector"] if name is None else name
        print(f"split args ({a.config.name}{' ' + ' '.join(a.set) if a.set else ''}): {args}")
        results[label] = result = evaluate(args, a.footage, truths)
        print_summary(label, result["summary"], result["seconds"])
        limit = a.errors if a.errors is not None else (0 if len(names) > 1 else len(result["errors"]))
        for line in result["errors"][:limit]:
            print("  " + line)
    if len(results) > 1:
        print_table(results)
    if a.json:
        a.json.write_text(json.dumps({"footage": describe(truths), "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
