"""Benchmarks of near-duplicate removal (curation/dedup/): candidate grouping at scale, the
whole out-of-core pass over a corpus full of exact copies, and the calibration of the temporal
match (stages/signature.py) on generated footage.

    python bench/dedup_bench.py                      # 100k clips, 143 dims (the perceptual vector)
    python bench/dedup_bench.py --clips 1000000
    python bench/dedup_bench.py --clips 200000 --dim 512 --eps 0.05   # CLIP ViT-B/32 sized
    python bench/dedup_bench.py --copies 100 --clips 10000000         # the whole pass, 10^7 clips
    python bench/dedup_bench.py --signatures [--families 12]          # match score distributions

--copies K: the whole pass of curation/dedup/groups.py (exact copies, candidates, verification,
components, the groups cache, the choice of the kept clips, duplicates.parquet) over `--clips`
rows of which a share `--copied` (0.5) are exact copies in classes of K (the same vector and the
same signature bytes, rows spread over the corpus), the rest distinct clips, every 100th of
those a near copy of the one before (cosine ~0.98, its signature with +-3 grey levels of noise).
Vectors and signatures are made from each row's identity on the fly (a block at a time; random
signatures of 2-10 s at the real 64 bytes a sample), so the process holds no corpus: its peak
RSS (resource.getrusage, this process and, apart, the verification processes) is dedup's. Prints
wall and peak RSS, each phase's seconds, and checks: every class of copies keeps one clip, the
best by priority, all its other copies naming it; the planted near pairs found.

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
import math
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


# ---- the whole pass over a corpus of exact copies (--copies) ----------------------------------

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of x + salt (uint64, vectorised): a hash per value."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class CopiesCorpus:
    """`n` rows: a share `copied` in classes of `k` exact copies, the rest distinct clips, every
    `near_every`-th of them a near copy of the one before. A row's identity comes from an affine
    permutation of the rows (copies spread evenly, no table of n); vectors, signatures, clip ids
    and priorities are functions of the row or its identity."""

    NOISE_ROWS, BLOB_BYTES = 65536, 1 << 22
    SAMPLE = 64  # stages/signature.py: bytes a sample, 4 samples a second

    def __init__(self, n: int, k: int, copied: float, dim: int, near_every: int, seed: int):
        self.n, self.k, self.near_every = n, k, near_every
        self.classes = int(n * copied) // k
        self.copy_rows = self.classes * k
        self.mult = next(m for m in range(2654435761, 2654435761 + 10**6, 2) if math.gcd(m, n) == 1) % n or 1
        rng = np.random.default_rng(seed)
        self.noise = rng.standard_normal((self.NOISE_ROWS, dim)).astype(np.float32)
        self.blob = rng.integers(0, 256, self.BLOB_BYTES, dtype=np.uint8).tobytes()

    def identity(self, rows: np.ndarray) -> np.ndarray:
        """< classes: a class of copies; above: a distinct clip."""
        p = (np.asarray(rows, np.int64) * self.mult + 12345) % self.n
        return np.where(p < self.copy_rows, p // self.k, self.classes + p - self.copy_rows)

    def near(self, ident: np.ndarray) -> np.ndarray:
        """Distinct clips that are near copies of the identity before them."""
        d = ident - self.classes
        return (d >= 1) & (d % self.near_every == self.near_every - 1)

    def planted(self) -> int:
        distinct = self.n - self.copy_rows
        return (distinct + 1) // self.near_every if distinct else 0

    def vectors(self, ident: np.ndarray) -> np.ndarray:
        """Around n / 50 centres (structure for k-means at every size, as in `corpus`), a clip at
        cosine ~0.5 +- 0.06 from the others of its centre (few candidates at eps 0.3)."""
        near = self.near(ident)
        base = np.where(near, ident - 1, ident).astype(np.uint64)
        rows = np.uint64(self.NOISE_ROWS)
        centre = mix64(base, 1) % np.uint64(max(2, self.n // 50))
        v = sum(self.noise[mix64(centre, 20 + j) % rows] for j in range(3)) / np.sqrt(3)
        v = v + (self.noise[mix64(base, 2) % rows] + self.noise[mix64(base, 3) % rows]) / np.sqrt(2)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        if near.any():  # cosine ~0.98 with the clip before
            bump = self.noise[mix64(ident[near], 4) % np.uint64(self.NOISE_ROWS)]
            v[near] += 0.2 * bump / np.linalg.norm(bump, axis=1, keepdims=True)
            v[near] /= np.linalg.norm(v[near], axis=1, keepdims=True)
        return v.astype(np.float16)

    def signatures(self, ident: np.ndarray) -> list[bytes]:
        near = self.near(ident)
        base = np.where(near, ident - 1, ident).astype(np.uint64)
        samples = 8 + (mix64(base, 5) % np.uint64(33)).astype(np.int64)  # 2-10 s
        # Any byte offset: two clips' windows overlap at a whole-sample shift (a match) about
        # once in 10^5 pairs of candidates, and a near copy uses its original's.
        start = (mix64(base, 6) % np.uint64(self.BLOB_BYTES - self.SAMPLE * 41)).astype(np.int64)
        out = [self.blob[a:a + self.SAMPLE * m] for a, m in zip(start.tolist(), samples.tolist())]
        for i in np.flatnonzero(near):  # re-encoded: +-3 grey levels
            rng = np.random.default_rng(int(ident[i]))
            a = np.frombuffer(out[i], np.uint8).astype(np.int16) + rng.integers(-3, 4, len(out[i]))
            out[i] = np.clip(a, 0, 255).astype(np.uint8).tobytes()
        return out

    @staticmethod
    def clip_ids(rows: np.ndarray) -> np.ndarray:
        """20 characters (numpy bytes): the row in 12 digits (the bench reads it back), 8 hex."""
        rows = np.asarray(rows, np.int64)
        digits = (rows[:, None] // 10 ** np.arange(11, -1, -1, dtype=np.int64)) % 10 + ord("0")
        nibbles = (mix64(rows, 7)[:, None] >> np.arange(28, -4, -4, dtype=np.uint64)) & np.uint64(15)
        hexes = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles.astype(np.int64)]
        return np.concatenate([digits.astype(np.uint8), hexes], axis=1).view("S20").ravel()

    @staticmethod
    def priorities(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keep (80%) and two keep_by values (ties, 5% missing) per row."""
        rows = np.asarray(rows, np.int64)
        keep = mix64(rows, 8) % np.uint64(10) < np.uint64(8)
        values = np.stack([(mix64(rows, 9) % np.uint64(1000)).astype(np.float64) / 100,
                           (mix64(rows, 10) % np.uint64(5)).astype(np.float64)], axis=1)
        values[mix64(rows, 11) % np.uint64(20) == np.uint64(0), 0] = np.nan
        return keep, values


def copies_bench(args: argparse.Namespace) -> None:
    """--copies: the whole out-of-core pass (module docstring)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation import dedup
    from curation.dedup.budget import Budget, Progress
    from curation.dedup.candidates import Search
    from curation.dedup.choosing import Prioritised, choose_duplicates
    from curation.dedup.copies import KEY, row_keys
    from curation.dedup.groups import Corpus, find_groups
    from curation.dedup.matching import Matching
    from curation.dedup.spill import RowFile
    from curation.writer import OutputStore

    corpus = CopiesCorpus(args.clips, args.copies, args.copied, args.dim, 100, args.seed)
    budget = Budget(args.memory_mb)
    eps = args.eps if args.eps_given else dedup.DEFAULT_EPS["perceptual"]
    matching = Matching(dedup.DEFAULT_MIN_MATCH, dedup.DEFAULT_MAX_SHIFT_S, workers=args.workers)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    # The best clip of each class of copies by priority (to check the kept ones): (key, row).
    best = np.full(corpus.classes, -1, np.int64)
    best_key: list[tuple | None] = [None] * corpus.classes
    with tempfile.TemporaryDirectory(prefix="dedup_bench_", dir=args.tmp) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        cache = dedup.GroupsCache(OutputStore(Path(tmp) / "out"))
        n, block = args.clips, 8192
        vectors = RowFile(work / "vectors", np.dtype((np.float16, (args.dim,))), 0, budget)
        keys = RowFile(work / "keys", KEY, 0, budget)
        progress = Progress("bench corpus")
        for start in range(0, n, block):
            rows = np.arange(start, min(n, start + block))
            ident = corpus.identity(rows)
            vecs = corpus.vectors(ident)
            vectors.append(vecs)
            keys.append(row_keys(vecs, corpus.signatures(ident), start))
            copied = np.flatnonzero(ident < corpus.classes)
            if copied.size:
                keep, values = corpus.priorities(rows[copied])
                ids = [v.decode() for v in corpus.clip_ids(rows[copied]).tolist()]
                for j, c in enumerate(ident[copied].tolist()):
                    key = dedup.priority_of(bool(keep[j]), [None if np.isnan(v) else float(v) for v in values[j]],
                                            ids[j])
                    if best_key[c] is None or key < best_key[c]:
                        best_key[c], best[c] = key, int(rows[copied[j]])
            progress("%d/%d rows", start + len(rows), n)
        seconds["vectors and keys"] = time.monotonic() - started
        best_key = []

        def fetch(chunks):
            for rows in chunks:
                yield rows, corpus.signatures(corpus.identity(rows))

        def ids(rows: np.ndarray) -> pa.Array:
            return pa.array(corpus.clip_ids(rows), pa.binary()).cast(pa.string())

        t = time.monotonic()
        with cache.writers() as out:
            stats = find_groups(Corpus(vectors, keys, fetch, ids),
                                Search(eps, args.bucket_size), matching, work, budget, out)
        seconds.update(stats.seconds)
        seconds["find_groups"] = time.monotonic() - t

        def prioritised():
            for table in cache.tables("groups"):
                keep, values = corpus.priorities(table.column("row").to_numpy())
                yield Prioritised(table, keep, values)

        t = time.monotonic()
        path = cache.folder / "duplicates.parquet"
        schema = pa.schema([("clip_id", pa.string()), ("duplicate_of", pa.string()), ("similarity", pa.float64()),
                            ("shift_s", pa.float64()), ("group", pa.int64())])
        sizes = {"rows": stats.clips_embedded, "clips_in_groups": stats.clips_in_groups, "id_bytes": stats.id_bytes,
                 "signature_bytes": stats.signature_bytes}
        with pq.ParquetWriter(path, schema) as writer:
            chosen = choose_duplicates(prioritised(), cache.tables("classes"), cache.tables("pairs"),
                                       sizes, 2, matching, work, budget, writer.write_table)
        seconds["choose_duplicates"] = time.monotonic() - t
        wall = time.monotonic() - started
        peak_self, peak_children = rss_mb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        # Checks, streamed over duplicates.parquet: every copy of a class names the class's best clip.
        kept_of = np.full(corpus.classes, -1, np.int64)
        near_found = wrong = 0
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["clip_id", "duplicate_of"])
            dup = np.array([int(c[:12]) for c in t.column("clip_id").to_pylist()], np.int64)
            kept = np.array([int(c[:12]) for c in t.column("duplicate_of").to_pylist()], np.int64)
            di, ki = corpus.identity(dup), corpus.identity(kept)
            same = (di == ki) & (di < corpus.classes)
            kept_of[di[same]] = kept[same]
            wrong += int((same & (kept != best[np.minimum(di, corpus.classes - 1)])).sum())
            pair = (np.maximum(di, ki) - np.minimum(di, ki) == 1) & corpus.near(np.maximum(di, ki))
            near_found += int(pair.sum())
            wrong += int((~same & ~pair).sum())
        classes_ok = int((kept_of == best).sum())
    print(f"clips {n:,} ({corpus.copy_rows:,} in {corpus.classes:,} classes of {args.copies} exact copies, "
          f"{n - corpus.copy_rows:,} distinct of which {corpus.planted():,} near copies), dim {args.dim}, "
          f"eps {eps}, bucket_size {args.bucket_size}, memory_mb {args.memory_mb}")
    print(f"wall {wall:.1f} s = {1e6 * wall / n:.1f} us/clip; peak RSS {peak_self:.0f} MB "
          f"(verification processes: {peak_children:.0f} MB)")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"distinct {stats.distinct:,}, classes of copies {stats.copy_classes:,}, cosines compared "
          f"{stats.compared:,}, candidate pairs {stats.candidate_pairs:,}, matched in time {stats.verified:,}, "
          f"edges {stats.edges:,}, clips in groups {stats.clips_in_groups:,}, groups {stats.groups:,}, "
          f"duplicates {chosen['duplicates']:,} (pairs matched late {chosen['late_matches']:,})")
    print(f"check: classes keeping their best clip by priority {classes_ok:,}/{corpus.classes:,}; duplicates "
          f"naming another identity than their own or their near copy's {wrong}; planted near pairs found "
          f"{near_found:,}/{corpus.planted():,} ({near_found / max(1, corpus.planted()):.4f})")


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
    p.add_argument("--copies", type=int, default=0, help="the whole pass over a corpus with classes of this many "
                                                         "exact copies (module docstring)")
    p.add_argument("--copied", type=float, default=0.5, help="--copies: share of the clips that are copies")
    p.add_argument("--memory-mb", type=float, default=256, help="--copies: dedup.memory_mb")
    p.add_argument("--workers", type=int, default=None, help="--copies: verification processes (default: CPUs)")
    p.add_argument("--tmp", default=None, help="--copies: the temporary folder's parent (default: TMPDIR)")
    args = p.parse_args(argv)
    args.eps_given = any(a.startswith("--eps") for a in (argv if argv is not None else sys.argv[1:]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.signatures:
        signatures_bench(args)
        return
    if args.copies:
        copies_bench(args)
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
