"""Near-duplicate removal: planted re-uploads in generated footage are found, distinct clips kept.

The corpus: distinct sources (two shots each, own seeds, panning or moving-square content, some
static) and modified copies of them, re-encoded at another quality, resized, cropped by 3-5%,
started 0.5-1 s later, or several of these at once (PyAV, the bundled FFmpeg). A clip's true
identity is (source family, shot of the original it shows), so a duplicate is any other clip
of the same identity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import dedup, synth
from curation.cli import main as curate
from curation.config import ConfigError, load_config
from curation.finalize import finalize
from curation.refilter import refilter
from curation.report import funnel, write_report
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore
from stages import signature

REPO = Path(__file__).resolve().parents[1]
FPS = 24
SIZE = (192, 108)
BASE = ["split.min_duration_s=1.0", "split.short_side_px=96", "run.sources_per_unit=4",
        "dedup.embedding=auto"]  # a dedup section with its defaults (perceptual, eps 0.2)
MOTIONS = [("pan", 1.5), ("square", 3.0), ("pan", 1.0), ("square", 4.0), ("static", 0.0), ("pan", 2.5)]
VARIANTS = {  # name: (scale, crop fraction, skip seconds, crf)
    "reencode": (1.0, 0.0, 0.0, 34),
    "resize": (0.75, 0.0, 0.0, 23),
    "crop": (1.0, 0.04, 0.0, 23),
    "shift": (1.0, 0.0, 0.75, 23),
    "crop5_shift1": (1.0, 0.05, 1.0, 23),
    "all": (0.8, 0.03, 0.5, 30),
}
FAMILIES = 12


def write_variant(src: Path, dst: Path, scale: float, crop: float, skip_s: float, crf: int) -> None:
    synth.write_reupload(src, dst, FPS, scale, crop, skip_s, crf)


def make_corpus(root: Path) -> dict[str, dict]:
    """{file stem: {family, skip_s, shots: [(start_s, end_s)]}} of the sources and their copies."""
    truth = {}
    names = list(VARIANTS)
    for f in range(FAMILIES):
        spec = []
        for k in range(2):
            motion, speed = MOTIONS[(2 * f + k) % len(MOTIONS)]
            spec.append({"frames": 84 + 12 * ((f + k) % 3), "seed": 2 * f + k + 1, "motion": motion,
                         "speed_px_per_frame": speed})
        info = synth.make_video(root / f"src{f:02d}.mp4", spec, FPS, SIZE)
        shots = [(s["start"] / FPS, (s["end"] + 1) / FPS) for s in info["shots"]]
        truth[f"src{f:02d}"] = {"family": f, "skip_s": 0.0, "shots": shots}
        for name in (names[f % len(names)], names[(f + 3) % len(names)]):
            scale, crop, skip_s, crf = VARIANTS[name]
            write_variant(root / f"src{f:02d}.mp4", root / f"dup{f:02d}_{name}.mp4", scale, crop, skip_s, crf)
            truth[f"dup{f:02d}_{name}"] = {"family": f, "skip_s": skip_s, "shots": shots}
    return truth


def identity(row: dict, truth: dict[str, dict]) -> tuple[int, int]:
    """(family, shot of the original) a clip shows: the shot holding its middle in original time."""
    t = truth[Path(row["source_path"]).stem]
    middle = row["start_s"] + t["skip_s"] + row["duration_s"] / 2
    shot = next(k for k, (a, b) in enumerate(t["shots"]) if a <= middle < b)
    return t["family"], shot


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup_raw")
    truth = make_corpus(root)
    out = tmp_path_factory.mktemp("dedup") / "out"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", BASE), [str(root)], out, run_local)
    return out, truth


def read(out: Path, folder: str) -> dict[str, dict]:
    files = sorted((out / folder).glob("*.parquet"))
    return {r["clip_id"]: r for f in files for r in pq.read_table(f).to_pylist()}


def duplicate_of(row: dict) -> str | None:
    found = [r[len(dedup.REASON_PREFIX):] for r in row["reject_reasons"] if r.startswith(dedup.REASON_PREFIX)]
    assert len(found) <= 1
    return found[0] if found else None


def rule_reasons(row: dict) -> list[str]:
    return [r for r in row["reject_reasons"] if not r.startswith(dedup.REASON_PREFIX)]


def measure(out: Path, truth: dict[str, dict]) -> dict[str, float]:
    clips = {k: r for k, r in read(out, "scores").items() if r["start_frame"] is not None}
    ident = {k: identity(r, truth) for k, r in clips.items()}
    flagged = {k: duplicate_of(r) for k, r in clips.items() if duplicate_of(r)}
    correct = sum(ident[k] == ident[v] for k, v in flagged.items())
    members: dict[tuple, list[str]] = {}
    for k, i in ident.items():
        members.setdefault(i, []).append(k)
    expected = sum(len(m) - 1 for m in members.values())
    one_left = sum(sum(c not in flagged for c in m) == 1 for m in members.values())
    return {"recall": correct / expected, "precision": correct / max(1, len(flagged)),
            "distinct_kept": one_left / len(members), "expected": expected, "flagged": len(flagged),
            "identities": len(members)}


def test_planted_duplicates_are_found_and_distinct_clips_kept(corpus):
    out, truth = corpus
    m = measure(out, truth)
    # Every family has copies and every copy has clips: the measurement has something to find.
    assert m["identities"] >= 2 * FAMILIES - 2 and m["expected"] >= 3 * FAMILIES
    assert m["recall"] >= 0.95, m
    assert m["precision"] >= 0.98, m
    assert m["distinct_kept"] >= 0.95, m
    scores, shards = read(out, "scores"), read(out, "shards")
    # Shards hold no duplicate; every kept clip is in them.
    assert set(shards) == {k for k, r in scores.items() if r["keep"]}
    assert not any(duplicate_of(r) for r in shards.values())
    # The match score is recorded per duplicate, at or above min_match, naming the same clip.
    table = {r["clip_id"]: r for r in pq.read_table(out / "dedup" / "duplicates.parquet").to_pylist()}
    assert set(table) == {k for k, r in scores.items() if duplicate_of(r)}
    for cid, r in table.items():
        assert r["duplicate_of"] == duplicate_of(scores[cid]) and 0.85 <= r["similarity"] <= 1.0 + 1e-6
        assert abs(r["shift_s"]) <= 2.0
        assert duplicate_of(scores[r["duplicate_of"]]) is None  # the clip named is the one kept
    recorded = json.loads((out / "dedup" / "dedup.json").read_text())
    assert recorded["embedding"] == "perceptual" and recorded["eps"] == 0.3  # the defaults
    assert recorded["min_match"] == 0.85 and recorded["max_shift_s"] == 2.0
    assert recorded["duplicates"] == len(table)
    assert json.loads((out / "run.json").read_text())["kept"] == len(shards)
    # The margin, on every pair of clips: temporal match scores of same-shot pairs against the
    # closest pair of distinct shots, and the cosines of the candidates' vectors.
    payload = read(out, "clips")
    ids = sorted(payload)
    assert all(payload[k]["temporal_signature"] for k in ids)  # written by the split stage
    same_scores, distinct_scores = [], []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            score, _ = signature.match(payload[a]["temporal_signature"], payload[b]["temporal_signature"])
            (same_scores if identity(scores[a], truth) == identity(scores[b], truth) else distinct_scores).append(score)
    assert max(distinct_scores) < recorded["min_match"] <= min(same_scores)
    vecs = np.stack([dedup.perceptual_embedding(payload[k]["keyframes"]) for k in ids])
    same = np.array([[identity(scores[a], truth) == identity(scores[b], truth) for b in ids] for a in ids])
    off = ~np.eye(len(ids), dtype=bool)
    assert float((vecs @ vecs.T)[same & off].min()) >= 1 - recorded["eps"]  # every copy is a candidate
    print(f"dedup on planted re-uploads: {m}; same-shot match min {min(same_scores):.3f}, "
          f"distinct max {max(distinct_scores):.3f}")


STREET = {"motion": "traffic", "speed_px_per_frame": 2.5, "seed": 5}
CHUNK_S = 4.0


@pytest.fixture(scope="module")
def streets(tmp_path_factory):
    """Static cameras cut into chunks by split.max_duration_s (4 s): a street filmed for 16 s,
    two uploads of it (re-encoded at crf 30 and resized to 75%; cropped 3% and started 0.5 s
    later), the same street filmed at another time (same background and palette, other
    passers-by), and a 4 s loop played twice (footage that really repeats)."""
    root = tmp_path_factory.mktemp("streets_raw")
    synth.make_video(root / "street.mp4", [{**STREET, "frames": 16 * FPS, "objects_seed": 1}], FPS, SIZE)
    write_variant(root / "street.mp4", root / "street_reupload.mp4", 0.75, 0.0, 0.0, 30)
    write_variant(root / "street.mp4", root / "street_cropped_late.mp4", 1.0, 0.03, 0.5, 23)
    synth.make_video(root / "street_other_time.mp4", [{**STREET, "frames": 16 * FPS, "objects_seed": 2}],
                     FPS, SIZE)
    loop = list(synth.shot_frames(synth.Shot(**{**STREET, "seed": 9}, frames=round(CHUNK_S * FPS)), SIZE))
    synth.write_video(root / "loop.mp4", loop + loop, FPS)
    out = tmp_path_factory.mktemp("streets") / "out"
    config = load_config(REPO / "configs" / "spine.yaml",
                         BASE + [f"split.max_duration_s={CHUNK_S}"])
    run_pipeline(config, [str(root)], out, run_local)
    return out


def test_chunks_of_a_static_camera_are_told_apart_and_matched_to_their_own_copies(streets):
    scores = {k: r for k, r in read(streets, "scores").items() if r["start_frame"] is not None}
    by_source: dict[str, list[dict]] = {}
    for r in scores.values():
        by_source.setdefault(Path(r["source_path"]).stem, []).append(r)
    for rows in by_source.values():
        rows.sort(key=lambda r: r["start_s"])
    assert len(by_source["street"]) == len(by_source["street_other_time"]) == 4  # 4 s chunks of 16 s
    assert len(by_source["loop"]) == 2
    skip = {"street": 0.0, "street_reupload": 0.0, "street_cropped_late": 0.5}

    def chunk(r: dict) -> int:  # the chunk of the original street that holds the clip's middle
        return int((r["start_s"] + skip[Path(r["source_path"]).stem] + r["duration_s"] / 2) // CHUNK_S)

    pairs = pq.read_table(streets / "dedup" / "pairs.parquet").to_pylist()
    matched = {frozenset((p["clip_a"], p["clip_b"])) for p in pairs}
    street_family = [r for s in skip for r in by_source[s]]
    for i, a in enumerate(street_family):
        for b in street_family[i + 1:]:
            same_span = chunk(a) == chunk(b)
            # Copies of chunk k match chunk k (and only it); chunks of one upload never match.
            assert (frozenset((a["clip_id"], b["clip_id"])) in matched) == same_span, (a, b)
    # The same street at another time matches nothing, nor does anything match it.
    other = {r["clip_id"] for r in by_source["street_other_time"]}
    assert not any(other & pair for pair in matched)
    assert not any(duplicate_of(scores[c]) for c in other)
    # The loop really repeats: its two chunks are duplicates of each other.
    first, second = (r["clip_id"] for r in by_source["loop"])
    assert frozenset((first, second)) in matched
    assert {duplicate_of(scores[first]), duplicate_of(scores[second])} - {None} in ({first}, {second})
    # One clip is kept per chunk of the street over its three uploads.
    kept_chunks = [chunk(r) for r in street_family if not duplicate_of(r)]
    assert sorted(kept_chunks) == [0, 1, 2, 3]


def test_signature_match_on_frames_in_memory():
    """stages/signature.py on frames drawn in memory: a static street's two time spans do not
    match, a copy matches at its true shift, a frozen picture matches its re-encode."""
    def sig(frames, rate=FPS):
        builder = signature.SignatureBuilder()
        for k, f in enumerate(frames):
            builder.add(cv2.cvtColor(f, cv2.COLOR_RGB2BGR), k / rate, 1 / rate)
        return builder.value()

    frames = list(synth.shot_frames(synth.Shot(**STREET, frames=12 * FPS, objects_seed=3), SIZE))
    early, late = sig(frames[:4 * FPS]), sig(frames[6 * FPS:10 * FPS])
    assert len(early) == 16 * signature.SAMPLE_BYTES  # 4 s at 4 samples a second
    assert signature.match(early, late)[0] < 0.6
    shifted = sig([cv2.resize(cv2.resize(f, (144, 80), interpolation=cv2.INTER_AREA), SIZE)
                   for f in frames[FPS:5 * FPS]])  # starts 1 s later, resized down and back
    score, shift = signature.match(early, shifted)
    # b's sample at t + shift shows a's sample at t: the copy's time runs 1 s behind.
    assert score >= 0.9 and abs(shift + 1.0) <= 1 / FPS + 1 / 16  # quarter-sample search
    assert signature.match(early, shifted, max_shift_s=0.5)[0] < 0.8  # beyond the search: no match
    frozen = [synth.background(11, SIZE)] * (3 * FPS)
    noisy = [np.clip(f.astype(np.int16) + np.random.default_rng(k).integers(-3, 4, f.shape), 0, 255).astype(np.uint8)
             for k, f in enumerate(frozen)]
    assert signature.match(sig(frozen), sig(noisy))[0] >= 0.95
    other = [synth.background(12, SIZE)] * (3 * FPS)
    assert signature.match(sig(frozen), sig(other))[0] < 0.5
    # A clip too short to overlap half of the other cannot match.
    assert signature.match(sig(frames[:FPS // 2]), early)[0] == -1.0


def test_kept_clip_is_chosen_among_those_passing_the_rules(corpus):
    out, _ = corpus
    scores = read(out, "scores")
    groups: dict[str, list[str]] = {}
    for k, r in scores.items():
        if duplicate_of(r):
            groups.setdefault(duplicate_of(r), []).append(k)
    static_groups = passing_groups = 0
    for kept, dups in groups.items():
        passing = [d for d in dups if not rule_reasons(scores[d])]
        if passing:  # a duplicate passed the rules: so did the kept clip, and it ranks first
            assert not rule_reasons(scores[kept])
            assert all(scores[kept]["motion_score"] >= scores[d]["motion_score"] for d in passing)
            passing_groups += 1
        static_groups += bool(rule_reasons(scores[kept]))
    # The corpus's moving shots pass the rules in every copy: the choice among passing clips was made.
    assert passing_groups >= 1
    # Static shots fail the motion rule in every copy: still grouped, one of them named.
    assert static_groups >= 1


def test_choose_keeps_leaders_by_priority_and_never_chains():
    # Matching pairs a~b (0.9) and b~c (0.85); a and c do not match: c is no duplicate of a and
    # is kept too (no chaining through b).
    pairs = {(0, 1): (0.9, 0.0), (1, 2): (0.85, 0.5)}
    groups = dedup.Groups("perceptual", 0.3, 0.8, 3, ["a", "b", "c"], np.zeros(3, np.int64), pairs)
    prio = {"a": dedup.priority_of(True, [5.0], "a"), "b": dedup.priority_of(True, [4.0], "b"),
            "c": dedup.priority_of(True, [3.0], "c")}
    out = dedup.choose(groups, prio)
    assert out == {"b": ("a", 0.9)}
    # A clip failing the rules is never kept over a passing duplicate, whatever its score.
    prio["a"] = dedup.priority_of(False, [9.0], "a")
    out = dedup.choose(groups, prio)
    assert out == {"a": ("b", 0.9), "c": ("b", 0.85)}
    # Missing keep_by values rank last.
    prio = {k: dedup.priority_of(True, [v], k) for k, v in (("a", float("nan")), ("b", 1.0), ("c", 0.5))}
    assert dedup.choose(groups, prio)["a"][0] == "b"
    # A pair below min_match (a looser cache) is not a duplicate.
    groups.min_match = 0.88
    assert dedup.choose(groups, prio) == {"a": ("b", 0.9)}
    # A pair that was no candidate (a clip's candidate limit in a large group) is matched when
    # needed: c's signature is a's, so c is a's duplicate although only b~c was verified.
    rng = np.random.default_rng(0)
    sig_a, sig_b = (rng.integers(0, 256, (12, signature.SAMPLE_BYTES), dtype=np.uint8).tobytes() for _ in "ab")
    groups = dedup.Groups("perceptual", 0.3, 0.85, 3, ["a", "b", "c"], np.zeros(3, np.int64),
                          {(0, 1): (0.9, 0.0), (1, 2): (0.86, 0.0)}, 0, [sig_a, sig_b, sig_a])
    prio = {k: dedup.priority_of(True, [v], k) for k, v in (("a", 3.0), ("b", 2.0), ("c", 1.0))}
    out = dedup.choose(groups, prio)
    assert out["b"] == ("a", 0.9) and out["c"][0] == "a" and out["c"][1] > 0.99


def test_bucketed_components_match_brute_force():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32))
    x = centres[rng.integers(0, 40, 3000)] + 0.35 * rng.standard_normal((3000, 32))
    x[2500:] = x[:500] + 0.06 * rng.standard_normal((500, 32))  # planted near-copies
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    eps = 0.1
    labels = dedup.near_duplicate_components(x, eps, bucket_size=100)  # 30 buckets, split again
    xf = x.astype(np.float32)
    i, j = np.nonzero(np.triu(xf @ xf.T >= 1 - eps, k=1))
    assert i.size >= 450
    assert np.mean(labels[i] == labels[j]) >= 0.99  # pairs split by bucket boundaries are rare
    uf = dedup.UnionFind(len(x))
    for a, b in zip(i, j):
        uf.union(int(a), int(b))
    brute = np.array([uf.find(k) for k in range(len(x))])
    assert np.all(brute[labels] == brute)  # nothing joined that brute force keeps apart


def test_candidate_pairs_are_the_close_pairs_at_most_top_k_a_clip():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1500, 16))
    x[1000:] = x[:500] + 0.05 * rng.standard_normal((500, 16))  # planted near-copies
    x[1400:] = x[1399] + 0.01 * rng.standard_normal((100, 16))  # 101 copies of one clip
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    xf = x.astype(np.float32)
    cos = xf @ xf.T
    a, b = dedup.candidate_pairs(x, 0.3, bucket_size=100, top_k=None)
    assert np.all(a < b) and np.all(cos[a, b] >= 0.7 - 1e-3)  # only close pairs, each once
    assert len(set(zip(a.tolist(), b.tolist()))) == a.size
    i, j = np.nonzero(np.triu(cos >= 0.7, k=1))
    assert a.size >= 0.95 * i.size  # nearly all of brute force's (bucket boundaries split a few)
    a, b = dedup.candidate_pairs(x, 0.3, bucket_size=100, top_k=4)
    # Each clip chooses at most top_k partners per bucket it sits in (up to 2 buckets x 2
    # rounds): the 101 copies of one clip give at most 101 x 4 x 4 pairs, not 101 x 100 / 2.
    assert a.size <= len(x) * 4 * 4
    in_group = int(((a >= 1399) & (b >= 1399)).sum())
    assert 100 <= in_group <= 101 * 4 * 4 < 101 * 100 // 2  # still connected: a star at least
    planted = {(k, k + 1000) for k in range(400)}
    assert len(planted & set(zip(a.tolist(), b.tolist()))) >= 0.95 * len(planted)


def test_perceptual_embedding_is_robust_and_discriminative():
    def jpeg(rgb, quality=90):
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    frames = [synth.background(s, (192, 108)) for s in (5, 6, 7)]
    v = dedup.perceptual_embedding([jpeg(f) for f in frames])
    h, w = frames[0].shape[:2]
    crop = [cv2.resize(f[3:h - 3, 5:w - 5], (160, 90)) for f in frames]  # ~5% crop, resized
    assert float(v @ dedup.perceptual_embedding([jpeg(f, 40) for f in crop])) >= 0.9
    others = [dedup.perceptual_embedding([jpeg(synth.background(s, (192, 108)))]) for s in range(20, 40)]
    assert max(float(v @ o) for o in others) < 0.8
    assert dedup.perceptual_embedding([b"not a jpeg"]) is None


def test_refilter_keeps_the_dedup_decisions(corpus, tmp_path):
    out = shutil.copytree(corpus[0], tmp_path / "out")
    groups_file = out / "dedup" / "groups.parquet"
    before = groups_file.stat().st_mtime_ns
    refilter(out, ["filter.rules.motion_score.min=3"])
    assert groups_file.stat().st_mtime_ns == before  # groups reused, not recomputed
    scores = read(out, "scores")
    assert any("motion_score<3" in r["reject_reasons"] for r in scores.values())
    flagged = {k: duplicate_of(r) for k, r in scores.items() if duplicate_of(r)}
    assert len(flagged) >= 3 * FAMILIES * 0.9
    for dup, kept in flagged.items():  # still chosen among the clips passing the new rules
        if not rule_reasons(scores[dup]):
            assert not rule_reasons(scores[kept])
    assert set(read(out, "shards")) == {k for k, r in scores.items() if r["keep"]}
    # The same as computing the groups from scratch with the new rules.
    fresh = shutil.copytree(out, tmp_path / "fresh")
    shutil.rmtree(fresh / "dedup")
    config = load_config(REPO / "configs" / "spine.yaml", BASE + ["filter.rules.motion_score.min=3"])
    finalize(fresh, config)
    again = read(fresh, "scores")
    assert {k: r["reject_reasons"] for k, r in again.items()} == {k: r["reject_reasons"] for k, r in scores.items()}


def test_curate_dedup_command_changes_and_removes_dedup(corpus, tmp_path):
    out = shutil.copytree(corpus[0], tmp_path / "out")
    n_default = len(pq.read_table(out / "dedup" / "duplicates.parquet"))
    assert curate(["dedup", str(out), "--min-match", "0.985"]) == 0  # only near-identical copies
    strict = pq.read_table(out / "dedup" / "duplicates.parquet")
    assert 0 < strict.num_rows < n_default and min(strict.column("similarity").to_pylist()) >= 0.985
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dedup"]["min_match"] == 0.985 and run["refilters"][-1]["finished"] is True
    assert curate(["dedup", str(out), "--eps", "0.002"]) == 0  # candidates: near-identical vectors only
    assert 0 < len(pq.read_table(out / "dedup" / "duplicates.parquet")) < n_default
    assert OutputStore(out).not_ready_reason() is None
    assert curate(["dedup", str(out), "--off"]) == 0
    scores = read(out, "scores")
    assert not any(duplicate_of(r) for r in scores.values())
    assert not (out / "dedup" / "dedup.json").exists()
    assert set(read(out, "shards")) == {k for k, r in scores.items() if not r["reject_reasons"]}
    assert curate(["dedup", str(out), "--eps", "1.5"]) == 2  # bad value: exit 2, nothing changed
    assert "dedup" not in json.loads((out / "run.json").read_text())["config"]


def test_an_interrupted_dedup_pass_is_finished_by_running_it_again(corpus, tmp_path, monkeypatch):
    """A dedup pass (here: --off, then the dedup section back) killed after writing its files and
    before the checkpoint that commits them: readers see the tables as before, and the same
    pass run again gives the uninterrupted result and leaves no file the ledger does not list."""
    from curation import compact
    from curation.writer import OutputStore

    out = shutil.copytree(corpus[0], tmp_path / "out")
    expected = read(out, "scores")
    config = load_config(REPO / "configs" / "spine.yaml", BASE)
    assert curate(["dedup", str(out), "--off"]) == 0
    without = read(out, "scores")
    assert without != expected

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(compact, "commit", killed)
        with pytest.raises(KeyboardInterrupt):
            finalize(out, config)
    listed = OutputStore(out).ledger()
    on_disk = {p.name for p in (out / "scores").glob("*.parquet")}
    assert on_disk - set(listed.file_names("scores"))  # the killed pass's files, unlisted
    rows = pq.read_table(out / "scores" / listed.file_names("scores")[0]).to_pylist()
    assert {r["clip_id"]: r["reject_reasons"] for r in rows} == \
           {k: r["reject_reasons"] for k, r in without.items()}  # readers: the tables as before
    finalize(out, config)
    assert {k: r["reject_reasons"] for k, r in read(out, "scores").items()} == \
           {k: r["reject_reasons"] for k, r in expected.items()}
    assert set(read(out, "shards")) == {k for k, r in expected.items() if r["keep"]}


def test_report_has_a_dedup_section_with_example_pairs(corpus, tmp_path):
    out = shutil.copytree(corpus[0], tmp_path / "out")
    summary = write_report(out)
    section = summary["dedup"]
    recorded = json.loads((out / "dedup" / "dedup.json").read_text())
    assert section["duplicates"] == recorded["duplicates"] > 0
    assert 0 < len(section["pairs"]) <= 8
    sims = [p["similarity"] for p in section["pairs"]]
    assert sims[0] == section["similarity"]["min"] and sims[-1] == section["similarity"]["max"]
    page = (out / "report" / "index.html").read_text()
    assert 'id="dedup"' in page
    for p in section["pairs"]:
        assert f'alt="keyframes of {p["duplicate"]}"' in page and f'alt="keyframes of {p["kept"]}"' in page
    # In the funnel and rule table duplicates are one rule, not one line per kept clip.
    dedup_rules = [r for r in summary["rules"] if r["step"] == "dedup"]
    assert len(dedup_rules) == 1 and dedup_rules[0]["rejected"] == recorded["duplicates"]
    assert list(summary["reasons"]).count("duplicate_of") == 1
    assert funnel(out)["rejections"]["duplicate_of"]["total"] == recorded["duplicates"]


@pytest.mark.parametrize("override, key", [
    ("dedup.eps=1.5", "dedup.eps"),
    ("dedup.keep_by=[no_such_column]", "dedup.keep_by"),
    ("dedup.embedding=sift", "dedup.embedding"),
    ("dedup.bucket=10", "dedup.bucket"),
])
def test_bad_dedup_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs" / "spine.yaml", [override])


def test_image_embeddings_are_used_where_clip_ran(corpus, tmp_path):
    """auto takes the clips' image_embedding when they have one (the aesthetics stage's CLIP
    vectors) for the candidates, and the temporal test decides, as for perceptual vectors. Here
    the vectors are random per identity (every copy a candidate at eps 0.1) and identities are
    paired up to share one vector (distinct footage that CLIP sees as the same): none of those
    becomes a duplicate."""
    out, truth = corpus
    out = shutil.copytree(out, tmp_path / "out")
    rng = np.random.default_rng(7)
    scores = read(out, "scores")
    idents = sorted({identity(r, truth) for r in scores.values() if r["start_frame"] is not None})
    base = {i: rng.standard_normal(64).astype(np.float32) for i in idents}
    for a, b in zip(idents[::2], idents[1::2]):
        base[b] = base[a]  # two distinct shots with one CLIP vector
    for path in sorted((out / "clips").glob("*.parquet")):
        table = pq.read_table(path)
        vecs = [base[identity(scores[c], truth)] + 0.02 * rng.standard_normal(64).astype(np.float32)
                for c in table.column("clip_id").to_pylist()]
        column = pa.array([v.tolist() for v in vecs], pa.list_(pa.float32()))
        pq.write_table(table.set_column(table.column_names.index("image_embedding"), "image_embedding", column),
                       path, row_group_size=64)
    assert curate(["dedup", str(out)]) == 0  # the section is there: applied again
    recorded = json.loads((out / "dedup" / "dedup.json").read_text())
    assert recorded["embedding"] == "image_embedding" and recorded["eps"] == 0.1
    m = measure(out, truth)
    assert m["precision"] == 1.0 and m["recall"] >= 0.95, m  # the shared vectors joined nothing
    pairs = pq.read_table(out / "dedup" / "pairs.parquet").to_pylist()
    assert all(identity(scores[p["clip_a"]], truth) == identity(scores[p["clip_b"]], truth) for p in pairs)
    assert not {k for k, r in read(out, "scores").items() if duplicate_of(r)} & set(read(out, "shards"))
