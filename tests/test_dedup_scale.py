"""Near-duplicate removal at corpus scale (curation/dedup/groups.py): the out-of-core search gives
the decisions of the rule applied to every pair, in bounded memory, at the cost of the distinct
clips however many exact copies there are.

The corpora are vectors and signatures drawn in memory with known structure: classes of exact
copies (the same float16 vector and signature bytes), near copies (a vector within eps, the
signature with a little noise), copies whose signatures do not even match themselves (too short
to overlap, or of low contrast: a low-contrast picture matches its high-contrast version better
than itself, stages/signature.py's floor), and clips without a signature.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import dedup
from curation.dedup.budget import Budget
from curation.dedup.candidates import FANOUT, Search, candidate_search, fanout, leaf_pairs
from curation.dedup.choosing import Prioritised, choose_duplicates, choose_group
from curation.dedup.copies import KEY, row_keys
from curation.dedup.groups import Corpus, Writers, find_groups
from curation.dedup.matching import Matching
from curation.dedup.spill import BytesFile, Parts, RowFile
from stages import signature

SAMPLE = signature.SAMPLE_BYTES


def random_signature(rng: np.random.Generator, samples: int) -> bytes:
    """Moving content: each sample a random 8x8 picture."""
    return rng.integers(0, 256, samples * SAMPLE, dtype=np.uint8).tobytes()


def noisy(sig: bytes, rng: np.random.Generator, level: int = 3) -> bytes:
    """The same footage re-encoded: each grey level moved by up to `level`."""
    a = np.frombuffer(sig, np.uint8).astype(np.int16) + rng.integers(-level, level + 1, len(sig))
    return np.clip(a, 0, 255).astype(np.uint8).tobytes()


def smooth_signature(rng: np.random.Generator, samples: int) -> np.ndarray:
    """(samples + 1, 64) float grey levels changing smoothly (a random walk around 128): a copy
    started a fraction of a sample later differs from it, and matching it interpolates."""
    walk = np.cumsum(rng.standard_normal((samples + 1, SAMPLE)), axis=0)
    return walk - walk.mean(axis=1, keepdims=True)


def later(walk: np.ndarray, offset: float, samples: int) -> np.ndarray:
    """The walk's samples taken `offset` of a sample later (linear interpolation)."""
    t = np.arange(samples) + offset
    i = np.floor(t).astype(int)
    w = (t - i)[:, None]
    return walk[i] * (1 - w) + walk[np.minimum(i + 1, len(walk) - 1)] * w


def grey(values: np.ndarray) -> bytes:
    return np.clip(np.round(128 + values), 0, 255).astype(np.uint8).tobytes()


def low_and_high_contrast(rng: np.random.Generator, samples: int) -> tuple[bytes, bytes]:
    """A picture of low contrast (4 grey levels of spread) and the same at 10x the contrast,
    0.35 of a sample later: the low one matches itself at ~0.8 (the floor of the layout cosine)
    and the pair at ~0.83-0.89, a little better one way round than the other."""
    walk = smooth_signature(rng, samples)
    low = later(walk, 0.0, samples)
    scale = 4.0 / low.std()
    return grey(scale * low), grey(10 * scale * later(walk, 0.35, samples))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_corpus(distinct: int, copies: tuple[int, ...], dim: int = 16, seed: int = 0,
                near_share: float = 0.1, contrast_pairs: int = 3, short: int = 3, unsigned: int = 3,
                reps_first: bool = False) -> tuple[np.ndarray, list[bytes | None], np.ndarray]:
    """(float16 vectors, signatures, identity of the distinct clip each row copies) of `distinct`
    clips, each in a class of a number of exact copies drawn from `copies`, in shuffled rows
    (reps_first: the distinct clips first, in order, then the copies shuffled)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((distinct, dim)))
    lengths = rng.integers(8, 40, distinct)
    walks = {j: smooth_signature(rng, int(lengths[j])) for j in range(0, distinct, 3)}  # every third: smooth
    sigs: list[bytes | None] = [grey(3 * walks[j][:-1]) if j in walks else random_signature(rng, int(lengths[j]))
                                for j in range(distinct)]
    near = int(near_share * distinct)
    for j in range(distinct - near, distinct):  # near copies of the clips before them
        src = j - near
        base[j] = unit(base[src] + 0.04 * rng.standard_normal(dim))
        # A smooth one starts 0.3 of a sample later (its match depends on which way round).
        sigs[j] = noisy(grey(3 * later(walks[src], 0.3, int(lengths[src]))) if src in walks else sigs[src], rng)
    for p in range(contrast_pairs):  # clips 2p (low contrast) and 2p + 1 (high): a near pair
        low, high = low_and_high_contrast(rng, 24)
        sigs[2 * p], sigs[2 * p + 1] = low, high
        base[2 * p + 1] = unit(base[2 * p] + 0.04 * rng.standard_normal(dim))
    k = 2 * contrast_pairs
    for j in range(k, k + short):  # too short to match anything, themselves included
        sigs[j] = random_signature(rng, 3)
    for j in range(k + short, k + short + unsigned):  # no signature: never a duplicate
        sigs[j] = None
    count = rng.choice(copies, size=distinct)
    count[:k] = np.maximum(count[:k], 4)  # copies of both contrasts, in rows either side of each other
    count[k:k + short + unsigned] = np.maximum(count[k:k + short + unsigned], 3)
    ident = np.repeat(np.arange(distinct), count)
    if reps_first:
        rest = np.repeat(np.arange(distinct), count - 1)
        rng.shuffle(rest)
        ident = np.concatenate([np.arange(distinct), rest])
    else:
        rng.shuffle(ident)
        for p in range(contrast_pairs):  # the high contrast's first copy before the low one's
            lo, hi = np.flatnonzero(ident == 2 * p)[0], np.flatnonzero(ident == 2 * p + 1)[0]
            if lo < hi:
                ident[lo], ident[hi] = ident[hi], ident[lo]
    return base[ident].astype(np.float16), [sigs[i] for i in ident], ident


def clip_ids(n: int, seed: int = 1) -> list[str]:
    """Ids in another order than the rows (ties of priority go by id)."""
    rng = np.random.default_rng(seed)
    return [f"{v:012x}" for v in rng.choice(16**12, size=n, replace=False)]


def priorities(n: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """keep under the rules and two keep_by columns with ties and missing values."""
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < 0.7
    values = rng.choice([1.0, 2.0, 3.0, np.nan], size=(n, 2))
    return keep, values


def run_engine(x: np.ndarray, sigs: list[bytes | None], ids: list[str], keep: np.ndarray, values: np.ndarray,
               work: Path, search: Search, matching: Matching, budget: Budget, collapse: bool = True) -> dict:
    """find_groups then choose_duplicates over an in-memory corpus; the tables they write."""
    work.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    vectors = RowFile(work / "vectors", np.dtype((np.float16, (d,))), 0, budget)
    keys = RowFile(work / "keys", KEY, 0, budget)
    for s in range(0, n, 500):
        vectors.append(x[s:s + 500])
        keys.append(row_keys(x[s:s + 500], sigs[s:s + 500], s))

    def fetch(chunks):
        for rows in chunks:
            yield rows, [sigs[r] for r in rows.tolist()]

    def id_of(rows):
        return pa.array([ids[r] for r in np.asarray(rows).tolist()], pa.string())

    out: dict[str, list[pa.Table]] = {"groups": [], "pairs": [], "classes": []}
    writers = Writers(*(out[k].append for k in ("groups", "pairs", "classes")))
    stats = find_groups(Corpus(vectors, keys, fetch, id_of), search, matching, work, budget, writers,
                        collapse=collapse)

    def prioritised():
        for t in out["groups"]:
            rows = t.column("row").to_numpy()
            yield Prioritised(t, keep[rows], values[rows])

    written: list[pa.Table] = []
    sizes = {"rows": n, "clips_in_groups": stats.clips_in_groups, "id_bytes": stats.id_bytes,
             "signature_bytes": stats.signature_bytes}
    chosen = choose_duplicates(prioritised(), out["classes"], out["pairs"], sizes, values.shape[1],
                               matching, work, budget, written.append)
    tables = {k: pa.concat_tables(v) if v else None for k, v in out.items()}
    dups = pa.concat_tables(written) if written else pa.table({"clip_id": pa.array([], pa.string())})
    return {"stats": stats, "chosen": chosen, **tables, "duplicates": dups}


def decisions_of(result: dict) -> dict[str, tuple[str, float, float]]:
    d = result["duplicates"]
    if not d.num_rows:
        return {}
    return {c: (k, s, h) for c, k, s, h in zip(*(d.column(n).to_pylist()
                                                  for n in ("clip_id", "duplicate_of", "similarity", "shift_s")))}


def brute_force(x: np.ndarray, sigs: list[bytes | None], ids: list[str], keep: np.ndarray, values: np.ndarray,
                eps: float, matching: Matching) -> dict[str, tuple[str, float, float]]:
    """dedup's rule on every pair: each pair at cosine >= 1 - eps matched by signature, groups the
    components of the matching pairs, dedup.choose in each; with dedup.record's shift sign."""
    xf = x.astype(np.float32)
    a, b = np.nonzero(np.triu(xf @ xf.T >= 1 - eps, k=1))
    uf = dedup.UnionFind(len(x))
    matched = {}
    for i, j in zip(a.tolist(), b.tolist()):
        if sigs[i] and sigs[j]:
            score, shift = signature.match(sigs[i], sigs[j], matching.max_shift_s)
            if score >= matching.min_match:
                matched[(i, j)] = (score, shift)
                uf.union(i, j)
    labels = uf.roots(np.arange(len(x)))
    grouped = np.flatnonzero(np.bincount(labels, minlength=len(x))[labels] > 1)
    local = {int(r): k for k, r in enumerate(grouped)}
    groups = dedup.Groups("perceptual", eps, matching.min_match, len(x), [ids[i] for i in grouped],
                          labels[grouped], {(local[i], local[j]): v for (i, j), v in matched.items()}, 0,
                          [sigs[i] for i in grouped], matching.max_shift_s)
    priority = {ids[i]: dedup.priority_of(bool(keep[i]), [None if np.isnan(v) else float(v) for v in values[i]],
                                          ids[i]) for i in grouped.tolist()}
    chosen = dedup.choose(groups, priority)
    row = {c: k for k, c in enumerate(groups.ids)}
    out = {}
    for dup, (kept, score) in chosen.items():
        i, k = row[dup], row[kept]
        shift = groups.score(i, k)[1]
        out[dup] = (kept, score, shift if k > i else -shift)
    return out


MATCHING = Matching(0.85, 2.0, workers=1)


@pytest.mark.parametrize("collapse", [True, False])
def test_decisions_are_the_rule_applied_to_every_pair(tmp_path, collapse):
    """Exhaustive search (one bucket), with classes of copies, near copies, copies that do not
    match themselves (short, low contrast) and clips without signature: the same duplicates,
    kept clips, scores and shifts as dedup.choose over every pair; also with every row its own
    class (collapse=False): the collapse of exact copies changes no decision."""
    x, sigs, ident = make_corpus(120, (1, 1, 2, 3, 6), contrast_pairs=8)
    ids = clip_ids(len(x))
    keep, values = priorities(len(x))
    eps = 0.3
    result = run_engine(x, sigs, ids, keep, values, tmp_path, Search(eps, bucket_size=1000), MATCHING, Budget(),
                        collapse)
    expected = brute_force(x, sigs, ids, keep, values, eps, MATCHING)
    got = decisions_of(result)
    assert set(got) == set(expected)
    for dup, (kept, score, shift) in expected.items():
        assert got[dup][0] == kept and got[dup][1] == pytest.approx(score, abs=1e-9)
        assert got[dup][2] == pytest.approx(shift, abs=1e-9)
    # The corpus has what it is meant to: groups of copies, near copies joining classes, a
    # low-contrast class whose copies are all kept apart from each other, yet duplicates of
    # the high-contrast clip when that ranks first.
    stats = result["stats"]
    assert stats.edges >= 10 and stats.without_signature >= 3 and stats.copy_classes >= 30 * collapse
    assert len(expected) >= 150
    grouped = set(result["groups"].column("clip_id").to_pylist())
    assert {ids[r] for r in np.flatnonzero(ident <= 1)} <= grouped  # low contrast with high
    if collapse:  # the low-contrast copies do not match one another
        classes = result["classes"].to_pylist()
        low = [c for c in classes if ident[c["row"]] == 0]
        assert len(low) == 1 and low[0]["copies"] >= 3 and low[0]["self_score"] < MATCHING.min_match
    unsigned = {ids[r] for r, s in enumerate(sigs) if s is None}
    assert not unsigned & set(got) and not unsigned & set(result["groups"].column("clip_id").to_pylist())
    if collapse:
        # Classes: one per distinct clip, but a clip without signature is never a copy.
        assert stats.distinct == 120 - 3 + len(unsigned) and stats.clips_in_groups < len(x)


def same_table(a: pa.Table, b: pa.Table) -> bool:
    """Equal tables, NaN equal to NaN (a class of one clip has no self-match)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns):
        if pa.types.is_floating(x.type):
            if not np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True):
                return False
        elif not x.equals(y):
            return False
    return True


def test_choose_group_takes_a_class_of_copies_as_its_clips():
    """choose_group with classes (a score per ordered pair of classes) against dedup.choose with
    every pair of clips scored, on random groups: scores that differ with the order of the rows,
    classes whose copies do not match one another (several of their clips kept), ties."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n_classes = int(rng.integers(1, 5))
        cls = rng.integers(0, n_classes, int(rng.integers(2, 12)))
        scores = rng.choice([0.8, 0.84, 0.86, 0.9, 0.95], size=(n_classes, n_classes))
        n = cls.size
        pairs = {(i, k): (float(scores[cls[i], cls[k]]), 0.25 * (i - k)) for i in range(n) for k in range(i + 1, n)}
        ids = [f"c{i:02d}" for i in range(n)]
        groups = dedup.Groups("perceptual", 0.3, 0.85, n, ids, np.zeros(n, np.int64), pairs)
        order = rng.permutation(n)
        priority = {ids[i]: (int(rank),) for rank, i in enumerate(order)}
        expected = dedup.choose(groups, priority)
        got = choose_group(order.tolist(), lambda i: int(cls[i]),
                           lambda i, k: (float(scores[cls[min(i, k)], cls[max(i, k)]]), 0.0), 0.85)
        assert {ids[i]: (ids[k], s) for i, k, s in got} == expected, trial


def test_out_of_core_gives_the_same_groups_as_in_memory(tmp_path):
    """A tree of buckets two levels deep over 3000 distinct clips with copies: with a memory
    budget of 20 kB (every sort in many partitions, every mapping a few hundred rows) the
    groups, pairs, classes and decisions are those of the 256 MB default."""
    x, sigs, _ = make_corpus(3000, (1, 1, 2, 5), seed=4, near_share=0.05)
    ids = clip_ids(len(x), seed=5)
    keep, values = priorities(len(x), seed=6)
    search = Search(0.3, bucket_size=20)
    small = Budget(0.02)
    assert small.parts(len(x) * 24 * 4) > 20  # the setting does partition this corpus
    results = [run_engine(x, sigs, ids, keep, values, tmp_path / name, search, MATCHING, budget)
               for name, budget in (("memory", Budget()), ("disk", small))]
    a, b = results
    for name in ("groups", "pairs", "classes", "duplicates"):
        assert same_table(a[name], b[name]), name
    assert a["stats"].groups >= 100 and a["duplicates"].num_rows >= 500
    assert a["stats"].seconds.keys() == b["stats"].seconds.keys()


def test_copies_cost_what_the_distinct_clips_cost(tmp_path):
    """The same distinct clips alone and with 30 exact copies each (the distinct ones first, in
    the same order): the same cosines compared and pairs matched (each at most both ways round,
    copies coming in both orders), plus one self-match per class; each class of copies has one
    kept clip and names it."""
    distinct = 400
    x1, s1, _ = make_corpus(distinct, (1,), seed=8, contrast_pairs=0, short=0, unsigned=0, reps_first=True)
    x30, s30, ident = make_corpus(distinct, (30,), seed=8, contrast_pairs=0, short=0, unsigned=0, reps_first=True)
    assert np.array_equal(x30[:distinct], x1) and s30[:distinct] == s1
    search = Search(0.3, bucket_size=50)
    one = run_engine(x1, s1, clip_ids(len(x1)), *priorities(len(x1)), tmp_path / "one", search, MATCHING, Budget())
    ids = clip_ids(len(x30))
    many = run_engine(x30, s30, ids, *priorities(len(x30)), tmp_path / "many", search, MATCHING, Budget())
    a, b = one["stats"], many["stats"]
    assert b.distinct == distinct and b.copy_classes == distinct
    assert b.compared == a.compared and b.candidate_pairs == a.candidate_pairs
    assert a.verified <= b.verified - distinct <= 2 * a.verified  # and one self-match per class
    assert a.edges <= b.edges <= 2 * a.edges
    # Choosing matches a pair of classes the other way round at most once (a copy of the larger
    # row may come first), not once per pair of copies.
    assert many["chosen"]["late_matches"] <= one["chosen"]["late_matches"] + b.edges
    # Every copy is grouped; of each class at most one clip is kept, and every duplicate names a
    # kept clip of its class or of a near copy's.
    dups = decisions_of(many)
    by_id = dict(zip(ids, ident.tolist()))
    assert len(dups) >= len(x30) - distinct
    for c in range(distinct):
        members = [ids[r] for r in np.flatnonzero(ident == c)]
        assert sum(m not in dups for m in members) <= 1
    offset = int(0.1 * distinct)  # make_corpus: the last `offset` clips are near copies of the ones before
    assert all(abs(by_id[k] - by_id[d]) in (0, offset) for d, (k, _, _) in dups.items())
    assert all(k not in dups for k, _, _ in dups.values())


def test_memory_is_bounded_whatever_the_number_of_clips(tmp_path):
    """Python and numpy allocations (tracemalloc) of a whole search and choice over 5,000 and
    20,000 distinct clips (with copies) under a 1 MB budget: the peak does not grow with n.
    (Both are past the fixed sizes: a k-means sample of 64 x 64 rows, leaves of 4 x 50 rows.)"""
    peaks = []
    for n in (300, 5000, 20000):  # the first run warms up (lazy imports and caches)
        x, sigs, _ = make_corpus(n, (1, 1, 1, 2), seed=10, near_share=0.02, dim=32)
        ids = clip_ids(len(x))
        keep, values = priorities(len(x))
        tracemalloc.start()
        run_engine(x, sigs, ids, keep, values, tmp_path / str(n), Search(0.3, bucket_size=50), MATCHING, Budget(1))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del x, sigs
    # The corpus itself (vectors, signatures, ids) is the caller's, allocated before tracing.
    peaks = peaks[1:]
    print(f"peak allocations {peaks[0] / 2**20:.1f} MB, then {peaks[1] / 2**20:.1f} MB")
    assert peaks[1] <= 1.25 * peaks[0] + 2**20, peaks


def test_a_leaf_too_large_for_one_pass_gives_the_same_pairs(tmp_path):
    """leaf_pairs' two ways: each cosine once over the whole leaf, or (a leaf past triangle_max)
    a block of rows against every column at a time; each row's top_k partners either way."""
    rng = np.random.default_rng(12)
    x = unit(rng.standard_normal((2500, 8)))
    x[2000:] = unit(x[:500] + 0.05 * rng.standard_normal((500, 8)))
    vectors = RowFile(tmp_path / "v", np.dtype((np.float16, (8,))), 0, Budget())
    vectors.append(x)
    found = []
    for triangle_max in (10**6, 100):
        pairs: list[np.ndarray] = []
        leaf_pairs(vectors, np.arange(len(x)), 0.9, 4, Budget(),
                   lambda a, b: pairs.append(a * len(x) + b), triangle_max=triangle_max)
        found.append(np.unique(np.concatenate(pairs)))
    assert np.array_equal(found[0], found[1]) and found[0].size >= 2000
    xf = vectors.take(np.arange(len(x))).astype(np.float32)
    a, b = found[0] // len(x), found[0] % len(x)
    assert np.all((xf[a] * xf[b]).sum(1) >= 0.9)


def test_row_keys_tell_exact_copies_only():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((6, 143))).astype(np.float16)
    x[1] = x[0]
    x[2] = x[0]
    x[2, 5] = np.float16(x[2, 5] + np.float16(0.001))  # one value's last bits
    sig = random_signature(rng, 10)
    sigs = [sig, sig, sig, sig, noisy(sig, rng, 1), None]
    x[3], x[4], x[5] = x[0], x[0], x[0]
    sigs[3] = sig[:-SAMPLE]  # one sample shorter
    keys = row_keys(x, sigs, 100)
    pairs = {(int(k["k0"]), int(k["k1"])) for k in keys}
    assert keys[0] == keys[1] and len(pairs) == 5  # only rows 0 and 1 are copies
    assert row_keys(x[5:], [None], 7)[0] != row_keys(x[5:], [None], 8)[0]


def test_row_files_and_partitions_round_trip(tmp_path):
    budget = Budget(0.001)  # a mapping of 256 rows at a time
    vecs = RowFile(tmp_path / "v", np.dtype((np.float16, (3,))), 0, budget)
    data = np.arange(3000, dtype=np.float16).reshape(1000, 3)
    vecs.append(data[:400])
    vecs.append(data[400:])
    rows = np.array([999, 0, 500, 500, 3])
    assert np.array_equal(vecs.take(rows), data[rows]) and np.array_equal(vecs.read(10, 12), data[10:12])
    flags = RowFile(tmp_path / "f", np.int64, 1000, budget)
    flags.put(np.array([7, 999, 3]), np.array([1, 2, 3]))
    assert flags.take(np.array([3, 7, 999, 0])).tolist() == [3, 1, 2, 0]
    parts = Parts(tmp_path, "p", np.int64, 3, budget)
    values = np.arange(5000)
    parts.add(values, values % 3)
    parts.add(values + 5000, (values + 5000) % 3)
    for p in range(3):
        got = parts.read(p)
        assert np.array_equal(got, np.arange(p, 10000, 3))  # in the order added
    blobs = BytesFile(tmp_path, "b", 0, budget)
    blobs.append([b"abc", None, b""])
    blobs.append([b"xyz"])
    assert blobs.take(np.array([3, 1, 0, 2])) == [b"xyz", None, b"abc", b""]


def test_decisions_are_looked_up_in_the_order_of_scores(tmp_path):
    path = tmp_path / "duplicates.parquet"
    pq.write_table(pa.table({"clip_id": ["b", "d", "e"], "duplicate_of": ["a", "c", "a"],
                             "similarity": [0.9, 0.95, 0.99], "shift_s": [0.0, 0.0, 0.0], "group": [0, 1, 0]}),
                   path, row_group_size=2)
    decisions = dedup.Decisions(path, 3)
    assert decisions.lookup(pa.array(["a", "b", "c"]))[0].tolist() == [False, True, False]
    hit, kept = decisions.lookup(pa.array(["x", "d", "y", "e"]))
    assert hit.tolist() == [False, True, False, True] and kept == [None, "c", None, "a"]
    assert decisions.unmatched() == 0
    assert dict(decisions) == {"b": ("a", 0.9), "d": ("c", 0.95), "e": ("a", 0.99)}
    scrambled = dedup.Decisions(path, 3)
    with pytest.raises(dedup.OutputError, match="order"):
        scrambled.lookup(pa.array(["d", "b"]))  # d before b: not the order they were written in


def test_the_tree_stays_two_levels_deep_as_the_corpus_grows(tmp_path):
    """A row joins its two nearest cells at a level when they are about as near, so every level
    more multiplies its leaves (and the cosines compared). With bucket_size 4, 30,000 rows are
    what 7.5 x 10^6 are with the default 1000: FANOUT children of the top cell would need two
    more splits each. The top split is widened instead (fanout), so the rows sit in fewer
    leaves, and the planted near copies are still found. (Measured on this data: 1.9 leaves a
    row with the wide top split, 2.5 with FANOUT children split twice; the bound lies between.)"""
    assert fanout(2_000_000, 1000) == FANOUT and fanout(5_050_000, 1000) > 2 * FANOUT
    assert fanout(3000, 1000) == 3  # small cells: one child per bucket, as before
    rng = np.random.default_rng(5)
    n, d = 30_000, 143
    x = unit(rng.standard_normal((n, d)))
    near = np.arange(0, n, 100)  # every 100th row copied with a little noise at the end
    x = np.concatenate([x, unit(x[near] + 0.01 * rng.standard_normal((near.size, d)))])
    budget = Budget()
    vectors = RowFile(tmp_path / "v", np.dtype((np.float16, (d,))), 0, budget)
    vectors.append(x)
    rows = RowFile(tmp_path / "rows", np.int64, 0, budget)
    rows.append(np.arange(len(x)))
    found: list[np.ndarray] = []
    (tmp_path / "w").mkdir()
    stats = candidate_search(vectors, rows, Search(0.05, bucket_size=4, rounds=1), tmp_path / "w", budget,
                             lambda a, b: found.append(a * len(x) + b))
    assert stats["leaf_rows"] <= 2.2 * len(x), stats
    pairs = np.unique(np.concatenate(found))
    planted = near * len(x) + n + np.arange(near.size)
    assert np.isin(planted, pairs).mean() >= 0.95
