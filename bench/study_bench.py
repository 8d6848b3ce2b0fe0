"""A proxy-model study on a generated corpus: synthetic sources -> `curate run` -> `curate ablate`.

    python bench/study_bench.py [--sources 40] [--out bench_out/study] [--config pipeline.yaml]
                                [--seeds 3] [--runner ray --num-cpus 2] [-- extra curate ablate args]

The corpus (`make_corpus`): `--sources` deterministic synthetic videos (curation/synth.py),
each 2-4 shots of 2-5 s at 24 fps, 256x144: about a third static shots (which the motion rule
rejects), the rest pans and moving squares at random speeds, a fifth of the shots with a text
box of random size (which the OCR rule rejects above 7% of the frame). It is curated with the
given config (default pipeline.yaml, model stages without weights skipped, clips encoded at a
short side of 144), then `curate ablate` runs the study (default: 3 seeds, every rule left out
once, a motion_score sweep at 0/10/25/50%) and prints the table; the page is
OUT/curated/study/<name>/index.html. Nothing here is tuned to make curation win.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from curation import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ["BREAKING NEWS", "subscribe now", "LIVE", "chapter one", "sale 50% off", "the end"]


def shot_specs(rng: np.random.Generator, source: int, attempt: int) -> list[dict]:
    shots = []
    for k in range(int(rng.integers(2, 5))):
        kind = rng.choice(["static", "pan", "square"], p=[0.35, 0.35, 0.30])
        shot: dict = {"frames": int(rng.integers(50, 121)), "seed": 10_000 * attempt + 100 * source + k}
        if kind != "static":
            shot.update(motion=str(kind), speed_px_per_frame=float(np.round(rng.uniform(0.5, 6.0), 2)))
        if rng.random() < 0.2:
            shot.update(text=str(rng.choice(WORDS)), text_height_frac=float(np.round(rng.uniform(0.06, 0.3), 2)))
        shots.append(shot)
    return shots


def make_corpus(root: Path, n_sources: int, seed: int = 0, size: tuple[int, int] = (256, 144)) -> list[Path]:
    """Write n_sources synthetic videos to root (kept if already there); returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_sources):
        path = root / f"gen_{i:03d}.mp4"
        paths.append(path)
        if path.exists():
            continue
        for attempt in range(20):  # a hard cut between two looks too alike is redrawn
            rng = np.random.default_rng([seed, i, attempt])
            try:
                synth.make_video(path, shot_specs(rng, i, attempt), 24, size)
                break
            except ValueError:
                continue
        else:
            raise RuntimeError(f"could not draw source {i}")
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=40)
    p.add_argument("--out", default="bench_out/study")
    p.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--seeds", default="3", help="training seeds (curate ablate --seeds)")
    p.add_argument("--name", default="bench")
    p.add_argument("--runner", default="local", choices=["local", "ray"])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("extra", nargs="*", help="more curate ablate arguments (after --)")
    args = p.parse_args()
    out = Path(args.out)
    curate = str(Path(sys.executable).with_name("curate"))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

    t0 = time.perf_counter()
    make_corpus(out / "footage", args.sources, args.seed)
    t1 = time.perf_counter()
    print(f"corpus: {args.sources} sources in {t1 - t0:.0f}s -> {out / 'footage'}", flush=True)
    if not (out / "curated" / "run.json").exists() or '"complete"' not in (out / "curated" / "run.json").read_text():
        subprocess.run([curate, "run", args.config, "--input", str(out / "footage"), "--output", str(out / "curated"),
                        "--num-cpus", str(args.num_cpus), "--skip-unavailable-models",
                        "--set", "split.short_side_px=144"], check=True, env=env)
    t2 = time.perf_counter()
    print(f"curated in {t2 - t1:.0f}s -> {out / 'curated'}", flush=True)
    cmd = [curate, "ablate", str(out / "curated"), "--name", args.name, "--seeds", args.seeds,
           "--leave-one-out", "all", "--sweep", "motion_score", "--percentiles", "0,10,25,50",
           "--runner", args.runner, "--num-cpus", str(args.num_cpus), *args.extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    print(f"study in {time.perf_counter() - t2:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
