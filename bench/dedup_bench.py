"""Benchmarks of near-duplicate removal (curation/dedup.py): candidate grouping at scale, and the
calibration of the temporal match (stages/signature.py) on generated footage.

    python bench/dedup_bench.py                      # 100k clips, 143 dims (the perceptual vector)
    python bench/dedup_bench.py --clips 1000000
    python bench/dedup_bench.py --clips 200000 --dim 512 --eps 0.05   # CLIP ViT-B/32 sized
    python bench/dedup_bench.py --signatures [--families 12]          # match score distributions

--signatures: generated sources cut into clips by the real split stage (4 s chunks), copies of
them (re-encoded at crf 34, resized to 75%, cropped 3-5%, started 0.5-1 s later, or all of these)
and hard negatives: chunks of one static street with people passing, the same street at another
time, a similar street (same palette and layout, 25% of another picture blended in), the next
chunk of a slow pan, and distinct shots; the other chunks of a frozen picture or of a square
bouncing back and forth are repeats (the same footage again), shown apart. Prints the match score of every pair per kind, the
perceptual cosine of the true copies (the candidate cut must let them all through), and recall
and precision at several cuts, with the default (dedup.DEFAULT_MIN_MATCH) marked.

The corpus: `--clips` unit vectors (float16, as dedup holds them) drawn around clips/50 random
centres (so k-means has structure to find, as real embeddings do), of which `--planted` are
near-copies of other vectors (cosines spread from 1 - eps to 1). Prints the grouping's time
and clips/s, the peak RSS of the process and what grouping added to it, the recall of the
planted pairs (found in one component) and, on a sample of the components, how many joined
clips are below the threshold with every member (must be 0: a component only joins pairs above it).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.dedup import near_duplicate_components  # noqa: E402

log = logging.getLogger("bench")


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus(n: int, dim: int, planted: int, eps: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors float16 (n, dim), planted copy rows, their original rows); built in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 50), dim)).astype(np.float32)
    x = np.empty((n, dim), np.float16)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        block = centres[rng.integers(0, len(centres), m)] + 0.8 * rng.standard_normal((m, dim), np.float32)
        x[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    copies = rng.choice(n, size=planted, replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), size=planted, replace=False)
    # A copy at angle theta from its original: cosine uniform in [1 - 0.9 eps, 1].
    cos = 1 - rng.uniform(0, 0.9 * eps, planted)
    noise = rng.standard_normal((planted, dim)).astype(np.float32)
    orig = x[originals].astype(np.float32)
    noise -= (noise * orig).sum(1, keepdims=True) * orig
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[copies] = cos[:, None] * orig + np.sqrt(1 - cos ** 2)[:, None] * noise
    return x, copies, originals


COPIES = {  # name: (scale, crop fraction, skip seconds, crf)
    "reencode": (1.0, 0.0, 0.0, 34), "resize": (0.75, 0.0, 0.0, 23), "crop5": (1.0, 0.05, 0.0, 23),
    "shift1": (1.0, 0.0, 1.0, 23), "crop3_shift05": (1.0, 0.03, 0.5, 23), "all": (0.8, 0.03, 0.5, 30),
}
FPS, SIZE, CHUNK_S = 24, (192, 108), 4.0


def _copy(src: Path, dst: Path, scale: float, crop: float, skip_s: float, crf: int) -> None:
    from curation import synth
    synth.write_reupload(src, dst, FPS, scale, crop, skip_s, crf)


def signature_corpus(root: Path, families: int) -> dict[str, dict]:
    """Write the sources; {stem: {"family", "skip_s", "kind"}} (kind: original, copy, street_*)."""
    from curation import synth
    motions = [("pan", 1.5), ("square", 3.0), ("traffic", 2.5), ("pan", 0.5), ("static", 0.0), ("square", 5.0)]
    truth: dict[str, dict] = {}
    names = list(COPIES)
    for f in range(families):
        motion, speed = motions[f % len(motions)]
        spec = [{"frames": 12 * FPS, "seed": 40 + f, "motion": motion, "speed_px_per_frame": speed}]
        synth.make_video(root / f"src{f:02d}.mp4", spec, FPS, SIZE)
        truth[f"src{f:02d}"] = {"family": f, "skip_s": 0.0, "kind": "original", "motion": motion}
        for name in (names[f % len(names)], names[(f + 2) % len(names)]):
            _copy(root / f"src{f:02d}.mp4", root / f"src{f:02d}_{name}.mp4", *COPIES[name])
            truth[f"src{f:02d}_{name}"] = {"family": f, "skip_s": COPIES[name][2], "kind": "copy", "motion": motion}
    street = {"motion": "traffic", "speed_px_per_frame": 2.5, "seed": 7, "frames": 16 * FPS}
    synth.make_video(root / "street.mp4", [{**street, "objects_seed": 1}], FPS, SIZE)
    synth.make_video(root / "street_later.mp4", [{**street, "objects_seed": 2}], FPS, SIZE)
    other = synth.background(8, SIZE).astype(np.float32)
    similar = (np.clip(0.75 * f.astype(np.float32) + 0.25 * other, 0, 255).astype(np.uint8)
               for f in synth.shot_frames(synth.Shot(**street, objects_seed=3), SIZE))
    synth.write_video(root / "street_similar.mp4", similar, FPS)
    for stem in ("street", "street_later", "street_similar"):
        truth[stem] = {"family": stem, "skip_s": 0.0, "kind": stem, "motion": "traffic"}
    return truth


def signatures_bench(args: argparse.Namespace) -> None:
    import tempfile

    from curation import dedup
    from stages import signature
    from stages.split import SplitStage

    with tempfile.TemporaryDirectory(prefix="dedup_bench_") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        truth = signature_corpus(root, args.families)
        split = SplitStage(detector="cascade", min_duration_s=1.0, max_duration_s=CHUNK_S, short_side_px=96)
        clips = []
        for stem, t in truth.items():
            for row in split.split_source(str(root / f"{stem}.mp4"), stem):
                if row.get("temporal_signature"):
                    middle = row["start_s"] + t["skip_s"] + row["duration_s"] / 2
                    clips.append({**t, "stem": stem, "chunk": int(middle // CHUNK_S), "start_s": row["start_s"],
                                  "sig": row["temporal_signature"],
                                  "vec": dedup.perceptual_embedding(row["keyframes"])})
        log.info("%d sources, %d clips in %.1fs", len(truth), len(clips), time.monotonic() - started)
    started = time.monotonic()
    kinds: dict[str, list[float]] = {}
    copy_cos: list[float] = []
    for i, a in enumerate(clips):
        for b in clips[i + 1:]:
            score, _ = signature.match(a["sig"], b["sig"], args.max_shift_s)
            if a["family"] == b["family"]:
                if a["chunk"] == b["chunk"]:
                    kind = "true copy" if a["stem"] != b["stem"] else "same clip?"
                    copy_cos.append(float(a["vec"] @ b["vec"]))
                elif a["motion"] in ("static", "square"):  # the footage repeats: matching is right
                    kind = "repeat: other chunk, " + ("frozen picture" if a["motion"] == "static"
                                                      else "periodic bounce")
                else:
                    kind = f"other chunk, {a['motion']}"
            elif {a["kind"], b["kind"]} == {"street", "street_later"}:
                kind = "same street, other time"
            elif {a["kind"], b["kind"]} == {"street", "street_similar"}:
                kind = "similar street"
            else:
                kind = "distinct shots"
            kinds.setdefault(kind, []).append(score)
    pairs = sum(len(v) for v in kinds.values())
    seconds = time.monotonic() - started
    print(f"signature match: {len(clips)} clips, {pairs:,} pairs in {seconds:.1f} s "
          f"({1000 * seconds / max(1, pairs):.2f} ms a pair), max shift {args.max_shift_s} s")
    print(f"{'pairs':38s} {'n':>6s} {'min':>7s} {'p5':>7s} {'median':>7s} {'p95':>7s} {'max':>7s}")
    for kind, v in sorted(kinds.items(), key=lambda kv: (kv[0] != "true copy", kv[0].startswith("repeat"))):
        q = np.percentile(v, [0, 5, 50, 95, 100])
        print(f"{kind:38s} {len(v):6d} " + " ".join(f"{x:7.3f}" for x in q))
    positives = np.array(kinds.get("true copy", []))
    negatives = np.concatenate([np.array(v) for k, v in kinds.items()
                                if k != "true copy" and not k.startswith("repeat")])
    print(f"perceptual cosine of the true copies: min {min(copy_cos):.3f}, p5 {np.percentile(copy_cos, 5):.3f} "
          f"(candidates at cosine >= {1 - dedup.DEFAULT_EPS['perceptual']:.2f})")
    for cut in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        tp, fp = int((positives >= cut).sum()), int((negatives >= cut).sum())
        mark = "  <- default min_match" if abs(cut - dedup.DEFAULT_MIN_MATCH) < 1e-9 else ""
        print(f"cut {cut:.2f}: recall {tp / max(1, len(positives)):.3f}, precision {tp / max(1, tp + fp):.3f} "
              f"({fp} false pairs){mark}")
    print(f"margin: hardest negative {negatives.max():.3f}, weakest copy {positives.min():.3f} "
          f"(repeats are neither: the same footage again, whose match is right)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=143)
    p.add_argument("--planted", type=float, default=0.1, help="fraction of clips that are near-copies")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--bucket-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signatures", action="store_true", help="the temporal match calibration instead")
    p.add_argument("--families", type=int, default=12, help="--signatures: generated sources (2 copies each)")
    p.add_argument("--max-shift-s", type=float, default=2.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.signatures:
        signatures_bench(args)
        return

    started = time.monotonic()
    x, copies, originals = corpus(args.clips, args.dim, int(args.planted * args.clips), args.eps, args.seed)
    before = rss_mb()
    log.info("corpus: %d x %d float16 (%.0f MB) with %d planted copies in %.1fs; peak RSS %.0f MB",
             *x.shape, x.nbytes / 2**20, len(copies), time.monotonic() - started, before)

    started = time.monotonic()
    labels = near_duplicate_components(x, args.eps, bucket_size=args.bucket_size)
    seconds = time.monotonic() - started
    after = rss_mb()

    found = labels[copies] == labels[originals]
    cos = (x[copies].astype(np.float32) * x[originals].astype(np.float32)).sum(axis=1)
    close = cos >= 1 - args.eps / 4
    sizes = np.bincount(labels, minlength=len(labels))
    grouped = np.flatnonzero(sizes[labels] > 1)
    rng = np.random.default_rng(1)
    sample = rng.choice(np.unique(labels[grouped]), size=min(200, len(np.unique(labels[grouped]))), replace=False)
    lonely = 0
    for g in sample:  # a member with no partner at or above the threshold would be a false join
        members = np.flatnonzero(labels == g)
        v = x[members].astype(np.float32)
        c = v @ v.T
        np.fill_diagonal(c, -1)
        lonely += int((c.max(axis=1) < 1 - args.eps - 1e-3).sum())
    print(f"clips {args.clips:,}  dim {args.dim}  eps {args.eps}  bucket_size {args.bucket_size}")
    print(f"grouping: {seconds:.1f} s = {args.clips / seconds:,.0f} clips/s")
    print(f"peak RSS: {after:.0f} MB (vectors {x.nbytes / 2**20:.0f} MB; grouping added {after - before:.0f} MB)")
    print(f"planted pairs found: {found.mean():.4f} of {len(copies):,} (cosine {cos.min():.3f}-1); "
          f"{found[close].mean():.4f} of the {close.sum():,} at cosine >= {1 - args.eps / 4:.3f}; "
          f"clips in groups {len(grouped):,}")
    print(f"sampled components: {len(sample)}, members with no partner >= 1 - eps: {lonely}")


if __name__ == "__main__":
    main()
