"""Benchmark of near-duplicate grouping (curation/dedup.py) on random vectors with planted copies.

    python bench/dedup_bench.py                      # 100k clips, 143 dims (the perceptual vector)
    python bench/dedup_bench.py --clips 1000000
    python bench/dedup_bench.py --clips 200000 --dim 512 --eps 0.05   # CLIP ViT-B/32 sized

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=143)
    p.add_argument("--planted", type=float, default=0.1, help="fraction of clips that are near-copies")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--bucket-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

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
