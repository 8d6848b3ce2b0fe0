"""Generated footage with the bitrate and decoding cost of ordinary web video, for benchmarks.

The test generator's shots (curation/synth.py) are smooth fields that x264 compresses to
60-300 kbit/s, so decoding them costs a fraction of what decoding real footage of the same
size does, and a benchmark that compares work with decoding flatters decoding. These shots
add what camera footage has: detail at every scale (noise octaves down to 1.5 px, a 1/f-like
spectrum), sub-pixel pans and sensor grain, encoded the way an upload is (x264 `medium`,
crf 20). On this machine that gives about 430 kbit/s at 640x360 and 1.6 Mbit/s at 1280x720,
the range of web video at those sizes, and 3x the decoding cost per frame of the smooth shots.

    python bench/web_footage.py DIR --count 8      # writes DIR/web_0000.mp4 ... and prints bitrates
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import synth  # noqa: E402

SIZES = [(640, 360), (960, 540), (1280, 720)]
GRAIN_SIGMA = 2.5  # sensor noise, 0-255 levels
CRF, PRESET = 20, "medium"


def texture(seed: int, height: int, width: int) -> np.ndarray:
    """The seed's look (synth.background) modulated by detail at every scale, float32 RGB."""
    rng = np.random.default_rng(seed)
    detail = np.zeros((height, width), np.float32)
    for k, cell in enumerate((width / 4, width / 16, width / 64, 6.0, 3.0, 1.5)):
        detail += (synth._smooth_noise(rng, height, width, cell) - 0.5) / (1 + 0.6 * k)
    detail = (detail - detail.min()) / max(float(detail.max() - detail.min()), 1e-6)
    base = synth.background(seed, (width, height)).astype(np.float32)
    return np.clip(base * (0.55 + 0.9 * detail[..., None]), 0, 255)


def shot_frames(seed: int, size: tuple[int, int], frames: int, speed_px: float):
    """One shot: the texture panned by `speed_px` per frame (0: static), with fresh grain each frame."""
    width, height = size
    field = texture(seed, height, width + int(speed_px * frames) + 2)
    rng = np.random.default_rng(seed + 1)
    for t in range(frames):
        x = t * speed_px
        i, frac = int(x), x - int(x)
        frame = (1 - frac) * field[:, i:i + width] + frac * field[:, i + 1:i + 1 + width]
        frame += rng.normal(0.0, GRAIN_SIGMA, frame.shape).astype(np.float32)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def make_source(path: Path, rng: random.Random, size: tuple[int, int]) -> None:
    """A source of 1-4 shots joined by hard cuts, 50-110 frames each, at a common frame rate."""
    fps = rng.choice([24, 25, 30, 29.97])
    shots = [(rng.randint(0, 10**6), rng.randint(50, 110), rng.choice([0.0, 0.7, 2.3, 5.0]))
             for _ in range(rng.randint(1, 4))]

    def frames():
        for seed, count, speed in shots:
            yield from shot_frames(seed, size, count, speed)

    synth.write_video(path, frames(), fps, crf=CRF, preset=PRESET)


def make_footage(root: Path, count: int, seed: int = 1) -> list[Path]:
    """`count` sources, cycling through 360p, 540p and 720p; kept if already there."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"web_{i:04d}.mp4"
        if not path.exists():
            tmp = path.with_name(f".tmp-{path.name}")
            make_source(tmp, random.Random(f"{seed}-{i}"), SIZES[i % len(SIZES)])
            tmp.rename(path)
        paths.append(path)
    return paths


def bitrate_kbps(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        seconds = float(container.duration or 0) / 1e6
    return os.path.getsize(path) * 8 / 1000 / max(seconds, 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    for path in make_footage(Path(args.dir), args.count):
        print(f"{path.name}: {bitrate_kbps(path):.0f} kbit/s")


if __name__ == "__main__":
    main()
