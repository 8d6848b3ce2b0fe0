"""The proxy-model study (training/study/, `curate ablate`): the machinery, not the sign of any result.

One curated output of the shared synthetic footage (configs/spine.yaml, --runner local) feeds
every test; runs use a very small model and a few steps.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curation.config import load_config
from stages.rules import resolve_percentile
from curation.runner import run_local, run_pipeline
from curation.writer import OutputStore
from training import study
from training.data import encode_mp4

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BASE = ["split.min_duration_s=1.0", "run.sources_per_unit=2"]
# On the CPU: the study's reruns are compared bit for bit, which CUDA's convolution backward is not.
MICRO = ("device=cpu", "resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2",
         "attention_levels=1", "num_heads=2", "log_every_steps=1000", "image.total_steps=4", "video.total_steps=3",
         "video.num_frames=2", "warmup_steps=2")


def small_spec(**kw) -> study.StudySpec:
    args = dict(name="t", overrides=MICRO, seeds=(0, 1), eval_windows=2, eval_sigmas=3, bootstrap=200,
                holdout_fraction=0.34)
    args.update(kw)
    return study.StudySpec(**args)


@pytest.fixture(scope="module")
def curated(footage, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", BASE), [str(footage[0])], out, run_local)
    return out


@pytest.fixture(scope="module")
def corpus(curated):
    return study.load_corpus(str(curated))


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("study"))
    return dst


def sources_of(corpus, ids) -> set[str]:
    by_id = dict(zip(corpus.ids, corpus.sources))
    return {by_id[c] for c in ids}


# ---- data: split, arms, matching -----------------------------------------------------------

def test_the_fixture_has_kept_and_rejected_clips_from_several_sources(corpus):
    assert corpus.decodable.sum() >= 6
    assert 0 < corpus.stored_keep.sum() < corpus.decodable.sum()
    assert len(set(corpus.sources[corpus.decodable])) >= 3
    # The rules re-evaluated from run.json give the stored keep.
    assert (study.keep_under(corpus, study.effective_steps(corpus)) == corpus.stored_keep).all()


def test_split_is_by_source_and_no_arm_trains_on_a_heldout_source(curated, corpus):
    rec = study.prepare_study(str(curated), small_spec(leave_one_out=("all",), sweep_column="motion_score",
                                                       sweep_percentiles=(0.0, 0.25)), corpus)
    held = set(rec["split"]["heldout_sources"])
    assert held and not held & set(rec["split"]["train_sources"])
    for arm in rec["arms"]:
        for d in arm["data"].values():
            assert not sources_of(corpus, d["clip_ids"]) & held, arm["name"]
    for e in rec["eval"]["sets"].values():
        assert sources_of(corpus, e["clip_ids"]) <= held
    # heldout_all: every decodable clip of those sources; heldout_kept: those the rules keep.
    all_ids = {c for c, s, d in zip(corpus.ids, corpus.sources, corpus.decodable) if s in held and d}
    assert set(rec["eval"]["sets"]["heldout_all"]["clip_ids"]) == all_ids
    kept = {c for c, k in zip(corpus.ids, corpus.stored_keep) if k}
    assert set(rec["eval"]["sets"]["heldout_kept"]["clip_ids"]) == all_ids & kept


def test_split_is_stratified_deterministic_and_honours_explicit_sources():
    sources = [f"s{i}" for i in range(8)]
    has_kept = {s: i < 4 for i, s in enumerate(sources)}
    train, held = study.split_sources(sources, has_kept, 0.25, seed=3)
    assert (train, held) == study.split_sources(sources, has_kept, 0.25, seed=3)
    assert sum(has_kept[s] for s in held) == 1 and sum(not has_kept[s] for s in held) == 1
    # The seed draws the held-out sources: with one of the 4 sources of each group held out, a seeded
    # hash order holds out any given source with probability 1/4 per seed, so that 100 seeds leave one
    # never held out has probability at most 8 x (3/4)^100 < 1e-11; a split that ignored the seed would
    # hold out the same 2 every time.
    draws = [study.split_sources(sources, has_kept, 0.25, seed=k)[1] for k in range(100)]
    assert all(sum(has_kept[s] for s in h) == 1 and len(h) == 2 for h in draws)
    assert set().union(*draws) == set(sources)
    assert study.split_sources(sources, has_kept, 0.25, 0, explicit=("s7",))[1] == ["s7"]
    with pytest.raises(study.StudyError):
        study.split_sources(["only"], {}, 0.25, 0)


def test_uncurated_arm_matches_the_curated_size_and_frames(curated, corpus):
    rec = study.prepare_study(str(curated), small_spec(seeds=(0, 1, 2)), corpus)
    arms = {a["name"]: a for a in rec["arms"]}
    frames = dict(zip(corpus.ids, corpus.frames))
    keep = dict(zip(corpus.ids, corpus.stored_keep))
    cur = arms["curated"]["data"]["0"]["clip_ids"]
    assert all(keep[c] for c in cur)
    target = sum(frames[c] for c in cur)
    draws = [arms["uncurated"]["data"][str(s)]["clip_ids"] for s in (0, 1, 2)]
    for ids in draws:
        assert len(ids) == len(cur) and len(set(ids)) == len(ids)
        assert abs(sum(frames[c] for c in ids) - target) <= max(study.FRAME_TOLERANCE * target,
                                                                 min(frames.values()) / 2)
    held = set(rec["split"]["heldout_sources"])
    pool = {c for c, s, d in zip(corpus.ids, corpus.sources, corpus.decodable) if d and s not in held}
    assert set().union(*map(set, draws)) <= pool


def test_matched_sample_hits_count_and_frames_and_is_seeded():
    rng = np.random.default_rng(0)
    frames = rng.integers(40, 300, size=200)
    ids = [f"c{i}" for i in range(200)]
    target = int(frames[:30].sum())
    a = study.matched_sample(ids, frames, 30, target, [0, 1])
    assert a == study.matched_sample(ids, frames, 30, target, [0, 1])
    assert a != study.matched_sample(ids, frames, 30, target, [0, 2])
    total = sum(frames[int(c[1:])] for c in a)
    assert len(a) == 30 and abs(total - target) <= 0.005 * target
    with pytest.raises(study.StudyError):
        study.matched_sample(ids[:5], frames[:5], 6, 100, [0])


def test_leave_one_out_and_sweep_sets(curated, corpus):
    spec = small_spec(leave_one_out=("all",), sweep_column="motion_score", sweep_percentiles=(0.0, 0.25, 0.5))
    rec = study.prepare_study(str(curated), spec, corpus)
    arms = {a["name"]: a for a in rec["arms"]}
    ids = lambda name: set(arms[name]["data"]["0"]["clip_ids"])  # noqa: E731
    assert ids("curated") <= ids("without_motion_score") and ids("curated") <= ids("without_duration_s")
    # Percentile 0 is no rule on the column: the leave-one-out set; stricter percentiles keep fewer clips.
    assert ids("sweep_motion_score_0") == ids("without_motion_score")
    assert ids("sweep_motion_score_0.5") <= ids("sweep_motion_score_0.25") <= ids("sweep_motion_score_0")
    m = arms["sweep_motion_score_0.25"]["meta"]
    assert m["side"] == "drop_bottom" and m["step"] == "filter"
    assert m["threshold"] == resolve_percentile(corpus.column("motion_score"), {"drop_bottom": 0.25})["min"]
    # An arm with another arm's clips and stages is not trained twice.
    assert arms["sweep_motion_score_0"]["same_as"] == "without_motion_score"
    assert not any(t["arm"] == "sweep_motion_score_0" for t in rec["tasks"])
    with pytest.raises(study.StudyError, match="not a rule"):
        study.prepare_study(str(curated), small_spec(leave_one_out=("aesthetic_score",)), corpus)


def test_a_rejection_that_is_no_rules_stays_under_other_rules(curated, corpus):
    # A clip the output rejects for something other than a rule (a near-duplicate) is left out
    # of the leave-one-out and sweep arms too, and drawn only by the uncurated arm.
    i = int(np.flatnonzero(corpus.stored_keep)[0])
    reasons = corpus.clips.column("reject_reasons").to_pylist()
    keep = corpus.clips.column("keep").to_pylist()
    reasons[i], keep[i] = ["duplicate_of:abc"], False
    clips = corpus.clips.set_column(corpus.clips.column_names.index("reject_reasons"), "reject_reasons",
                                    pa.array(reasons, pa.list_(pa.string())))
    clips = clips.set_column(clips.column_names.index("keep"), "keep", pa.array(keep, pa.bool_()))
    dup = replace(corpus, clips=clips)
    assert not study.keep_under(dup, study.without_rule(study.effective_steps(dup), "motion_score"))[i]
    assert (study.keep_under(dup, study.effective_steps(dup)) == dup.stored_keep).all()


def test_undecodable_clips_are_in_no_arm(curated, tmp_path):
    out = copy_of(curated, tmp_path / "out")
    store = OutputStore(out)
    path = store.committed_files("clips")[0]
    table = pq.read_table(path)
    victim = table.column("clip_id")[0].as_py()
    videos = table.column("video").to_pylist()
    videos[0] = videos[0][:60]
    table = table.set_column(table.column_names.index("video"), "video", pa.array(videos, pa.binary()))
    pq.write_table(table, path)
    corpus = study.load_corpus(str(out))
    assert victim in corpus.decode_errors
    rec = study.prepare_study(str(out), small_spec(leave_one_out=("all",)), corpus)
    for arm in rec["arms"]:
        for d in arm["data"].values():
            assert victim not in d["clip_ids"]
    assert all(victim not in e["clip_ids"] for e in rec["eval"]["sets"].values())
    assert victim in rec["corpus"]["not_decodable"]


def test_data_files_are_in_the_shard_schema_with_the_arm_clips(curated, corpus, tmp_path):
    from curation.schema import SHARDS_SCHEMA

    ids = corpus.ids[:3]
    path = str(tmp_path / "x.parquet")
    study.write_clip_files(corpus, {path: ids})
    t = pq.read_table(path)
    assert t.schema.names == SHARDS_SCHEMA.names
    assert sorted(t.column("clip_id").to_pylist()) == sorted(ids)
    assert all(v for v in t.column("video").to_pylist()) and all(t.column("fps_id").to_pylist())


# ---- runs and evaluation -------------------------------------------------------------------

def _eval_file(curated, corpus, tmp_path) -> tuple[str, dict]:
    rec = study.prepare_study(str(curated), small_spec(), corpus)
    path = str(tmp_path / "eval.parquet")
    study.write_clip_files(corpus, {path: rec["eval"]["sets"]["heldout_all"]["clip_ids"]})
    return path, rec


def _task(spec, stages, seed, data, run_dir, eval_path, sigmas) -> dict:
    return {"arm": "x", "seed": seed, "data": data, "configs": study.stage_configs(spec, stages, seed),
            "run_dir": str(run_dir), "eval": {"sigmas": sigmas, "windows": 2, "seed": 7, "batch": 8},
            "eval_paths": {"e": eval_path}, "threads": 1, "data_file": Path(data).name,
            "eval_files": {"e": Path(eval_path).name}}


def _mean(result) -> float:
    return float(np.mean(result["eval"]["e"]["losses"]))


def test_two_identical_arms_with_the_same_seed_give_identical_numbers(curated, corpus, tmp_path):
    eval_path, rec = _eval_file(curated, corpus, tmp_path)
    spec = small_spec()
    a = study.run_task(_task(spec, ("image", "video"), 0, eval_path, tmp_path / "a", eval_path, [0.2, 1.0, 5.0]))
    b = study.run_task(_task(spec, ("image", "video"), 0, eval_path, tmp_path / "b", eval_path, [0.2, 1.0, 5.0]))
    assert a["eval"]["e"]["losses"] == b["eval"]["e"]["losses"]
    c = study.run_task(_task(spec, ("image", "video"), 1, eval_path, tmp_path / "c", eval_path, [0.2, 1.0, 5.0]))
    assert c["eval"]["e"]["losses"] != a["eval"]["e"]["losses"]  # another seed trains another model
    # Evaluation alone is deterministic, and a finished run is not trained again.
    ckpt = a["stages"]["video"]["checkpoint"]
    ev = {"sigmas": [0.2, 1.0, 5.0], "windows": 2, "seed": 7, "batch": 8}  # the batch is recorded: it
    assert study.evaluate_checkpoint(ckpt, eval_path, ev) == study.evaluate_checkpoint(ckpt, eval_path, ev)
    assert study.evaluate_checkpoint(ckpt, eval_path, ev)["losses"] == a["eval"]["e"]["losses"]  # moves the last bits
    again = study.run_task(_task(spec, ("image", "video"), 0, eval_path, tmp_path / "a", eval_path, [0.2, 1.0, 5.0]))
    assert again == json.loads((tmp_path / "a" / "eval.json").read_text())


def _noise_shards(eval_path: str, out: str) -> str:
    """The eval clips with their frames replaced by uniform noise (same metadata)."""
    from io import BytesIO

    from PIL import Image

    t = pq.read_table(eval_path)
    rng = np.random.default_rng(0)
    videos, keyframes = [], []
    for _ in range(t.num_rows):
        frames = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
        videos.append(encode_mp4(frames, 24.0))
        kf = []
        for f in frames[:3]:
            buf = BytesIO()
            Image.fromarray(f).save(buf, format="JPEG")
            kf.append(buf.getvalue())
        keyframes.append(kf)
    t = t.set_column(t.column_names.index("video"), "video", pa.array(videos, pa.binary()))
    t = t.set_column(t.column_names.index("keyframes"), "keyframes", pa.array(keyframes, pa.list_(pa.binary())))
    pq.write_table(t, out)
    return out


def test_an_arm_trained_on_the_eval_clips_beats_an_arm_trained_on_noise(curated, corpus, tmp_path):
    eval_path, _ = _eval_file(curated, corpus, tmp_path)
    noise = _noise_shards(eval_path, str(tmp_path / "noise.parquet"))
    spec = small_spec(overrides=MICRO + ("image.total_steps=40", "lr=5e-3", "warmup_steps=5"))
    sigmas = study.sigma_grid(study.stage_configs(spec, ("image",), 0)[-1], 6)
    on_eval = study.run_task(_task(spec, ("image",), 0, eval_path, tmp_path / "eval", eval_path, sigmas))
    on_noise = study.run_task(_task(spec, ("image",), 0, noise, tmp_path / "noise", eval_path, sigmas))
    assert _mean(on_eval) < 0.9 * _mean(on_noise), (_mean(on_eval), _mean(on_noise))


# ---- statistics ------------------------------------------------------------------------------

def _fake_eval(losses: np.ndarray, clips: list[str], sources: list[str]) -> dict:
    return {"clip_ids": clips, "source_ids": sources, "windows": [0] * len(clips), "losses": losses.tolist()}


def test_summary_of_identical_and_shifted_arms():
    rng = np.random.default_rng(0)
    clips = [f"c{i}" for i in range(12)]
    sources = [f"s{i // 2}" for i in range(12)]
    base = {s: rng.uniform(0.5, 1.5, size=(12, 4)) for s in (0, 1, 2)}
    per_run = {"a": {s: _fake_eval(base[s], clips, sources) for s in base},
               "b": {s: _fake_eval(base[s], clips, sources) for s in base},
               "c": {s: _fake_eval(base[s] + 0.25, clips, sources) for s in base}}
    out = study.summarize(per_run, ["a", "b", "c"], [0, 1, 2], [("a", "b", "same"), ("c", "a", "shift")], 500, 0)
    same, shift = out["comparisons"]
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    assert shift["difference"] == pytest.approx(0.25) and shift["ci95"] == pytest.approx([0.25, 0.25])
    assert shift["verdict"] == "b lower"
    a = out["arms"]["a"]
    assert a["ci95"][0] <= a["mean"] <= a["ci95"][1]
    assert a["mean"] == pytest.approx(np.mean([base[s].mean() for s in base]))
    assert out["bootstrap_unit"] == "source" and out["units"] == 6  # 6 sources >= MIN_SOURCE_UNITS
    assert out == study.summarize(per_run, ["a", "b", "c"], [0, 1, 2], [("a", "b", "same"), ("c", "a", "shift")],
                                  500, 0)
    few = {k: {s: _fake_eval(base[s][:4], clips[:4], sources[:4]) for s in base} for k in ("a",)}
    assert study.summarize(few, ["a"], [0, 1, 2], [], 200, 0)["bootstrap_unit"] == "clip"


def test_sigma_grid_is_the_stage_quantiles():
    grid = study.sigma_grid({"p_mean": -0.4, "p_std": 1.4}, 8)
    assert len(grid) == 8 and grid == sorted(grid)
    assert np.exp(np.mean(np.log(grid))) == pytest.approx(np.exp(-0.4))


# ---- the whole study ---------------------------------------------------------------------------

class Killed(Exception):
    """Stands in for the process being killed part-way through a run."""


def files_of(root: Path, runs: list[str]) -> dict[str, tuple[str, int]]:
    """Every file under the run folders: its content hash and modification time (ns)."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for r in runs for p in sorted((root / r).rglob("*")) if p.is_file()}


def changed(before: dict, after: dict) -> list[str]:
    return sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))


def test_study_end_to_end_resumes_and_reruns_bit_for_bit(curated, tmp_path, monkeypatch):
    from training import loop
    from training.checkpoint import checkpoint_paths

    out = copy_of(curated, tmp_path / "out")
    # A checkpoint every 2 steps: the image stage (4 steps) writes two, the video stage (3) two.
    spec = small_spec(sweep_column="motion_score", sweep_percentiles=(0.0, 0.5), seeds=(0, 1),
                      overrides=MICRO + ("checkpoint_every_steps=2",))
    corpus = study.load_corpus(str(out))
    root = out / "study" / "t"
    runs = [t["run"] for t in study.prepare_study(str(out), spec, corpus)["tasks"]]
    # The local runner trains the tasks in record order: curated seeds 0 and 1, then uncurated seed 0.
    assert runs[:3] == ["runs/curated/seed0", "runs/curated/seed1", "runs/uncurated/seed0"]
    finished, victim, later = runs[:2], runs[2], runs[3:]
    real_train = loop.train
    trained: list[str] = []
    resumed_from: dict[str, int] = {}

    def killed_in_the_third_run(cfg, shards, run_dir, init_checkpoint=None, stop_after_step=None):
        trained.append(run_dir)
        if run_dir == str(root / victim / "image"):  # 3 of its 4 steps, the checkpoint of step 2 written
            real_train(cfg, shards, run_dir, init_checkpoint, stop_after_step=3)
            raise Killed(run_dir)
        return real_train(cfg, shards, run_dir, init_checkpoint, stop_after_step)

    monkeypatch.setattr(loop, "train", killed_in_the_third_run)
    with pytest.raises(Killed):
        study.run_study(str(out), spec, corpus=corpus)
    assert trained == [str(root / r / s) for r in finished for s in ("image", "video")] + [str(root / victim / "image")]
    assert all((root / r / "eval.json").exists() for r in finished)
    assert not (root / victim / "eval.json").exists() and not (root / victim / "video").exists()
    assert [Path(p).name for p in checkpoint_paths(str(root / victim / "image"))] == ["checkpoint-0000002.pt"]
    assert not any((root / r).exists() for r in later) and not (root / "results.json").exists()
    before = files_of(root, finished)
    assert before

    # The same command again: the finished runs are not trained again (training them raises) and not
    # touched; the killed run resumes from its step-2 checkpoint; the rest train from scratch.
    def unfinished_only(cfg, shards, run_dir, init_checkpoint=None, stop_after_step=None):
        if str(Path(run_dir).parent.relative_to(root)) in finished:
            raise AssertionError(f"a finished run is trained again: {run_dir}")
        result = real_train(cfg, shards, run_dir, init_checkpoint, stop_after_step)
        resumed_from[str(Path(run_dir).relative_to(root))] = result.resumed_from_step
        return result

    monkeypatch.setattr(loop, "train", unfinished_only)
    res = study.run_study(str(out), spec)
    assert not changed(before, files_of(root, finished))
    stages = {r: [c["stage"] for c in t["configs"]] for r, t in
              zip(runs, json.loads((root / "study.json").read_text())["tasks"])}
    assert resumed_from == {f"{victim}/image": 2, f"{victim}/video": 0} | {
        f"{r}/{s}": 0 for r in later for s in stages[r]}
    assert all((root / r / "eval.json").exists() for r in runs)

    for name in ("index.html", "results.json", "study.json", "plots/arms_heldout_all.png", "plots/sweep.png"):
        assert (root / name).exists(), name
    page = (root / "index.html").read_text()
    assert "curated - uncurated" in page and "Threshold sweep" in page
    s = res["eval_sets"]["heldout_all"]
    assert set(s["arms"]) >= {"curated", "uncurated", "curated_no_image_pretraining"}
    for a in s["arms"].values():
        assert a["ci95"][0] <= a["mean"] <= a["ci95"][1] and len(a["per_seed"]) == 2
    assert res["sweep"]["best"]["override"].startswith("filter.rules.motion_score=")
    record = json.loads((root / "study.json").read_text())
    assert all(len(t["configs"]) >= 1 and "seed" in t for t in record["tasks"])
    assert {c["seed"] for t in record["tasks"] for c in t["configs"]} == {0, 1}
    # Only each stage's last checkpoint is kept (each stage wrote two), the killed run's too.
    for r in (finished[0], victim):
        for stage, last in (("image", 4), ("video", 3)):
            assert [Path(p).name for p in checkpoint_paths(str(root / r / stage))] == [f"checkpoint-{last:07d}.pt"]

    # The main report links the study page.
    from curation.report import write_report

    write_report(str(out))
    assert "../study/t/index.html" in (out / "report" / "index.html").read_text()

    # And again, now finished: nothing is trained (any training raises), no run is touched, the same numbers.
    def no_training(cfg, shards, run_dir, init_checkpoint=None, stop_after_step=None):
        raise AssertionError(f"a finished study trains {run_dir}")

    every_run = files_of(root, runs)
    monkeypatch.setattr(loop, "train", no_training)
    again = study.run_study(str(out), spec)
    assert again["eval_sets"] == res["eval_sets"]
    assert not changed(every_run, files_of(root, runs))
    # Another spec under the same name is refused.
    with pytest.raises(study.StudyError, match="another spec"):
        study.run_study(str(out), replace(spec, seeds=(0,)))
    # A rerun from study.json alone trains everything again, uninterrupted, and gives the numbers of the
    # interrupted and resumed study, bit for bit, run by run.
    monkeypatch.setattr(loop, "train", real_train)
    rerun = study.rerun_study(str(root / "study.json"), "t2")
    assert rerun["eval_sets"] == res["eval_sets"]
    for r in runs:
        assert (json.loads((out / "study" / "t2" / r / "eval.json").read_text())["eval"]
                == json.loads((root / r / "eval.json").read_text())["eval"]), r

    # Write-back: the sweep's best setting becomes the rule (a refilter of the output).
    study.write_back(str(out), "t")
    run = OutputStore(out).read_run()
    rules = run["config"]["steps"][[s["stage"] for s in run["config"]["steps"]].index("filter")]["args"]["rules"]
    best = res["sweep"]["best"]
    if best["percentile"] == 0:
        assert "motion_score" not in rules
    else:
        assert rules["motion_score"] == {"drop_bottom": best["percentile"]}
    assert run["refilters"][-1]["finished"]


def test_curate_ablate_command(curated, tmp_path, capsys):
    from curation.cli import main

    out = copy_of(curated, tmp_path / "out")
    args = ["ablate", str(out), "--name", "cli", "--seeds", "1", "--eval-windows", "1", "--eval-sigmas", "2",
            "--bootstrap", "100", "--holdout-fraction", "0.34", "--no-pretrain-compare", "--stages", "image"]
    for item in MICRO:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "curated - uncurated" in printed and "index.html" in printed
    assert main(["ablate", str(out), "--name", "bad", "--leave-one-out", "aesthetic_score"]) == 2
    assert "not a rule" in capsys.readouterr().err


def test_ray_runner_gives_the_local_numbers(curated, corpus, tmp_path, ray_tmp):
    import ray

    from curation.pipeline import init_ray

    eval_path, _ = _eval_file(curated, corpus, tmp_path)
    spec = small_spec()
    tasks = [_task(spec, ("image",), s, eval_path, tmp_path / f"ray{s}", eval_path, [0.5, 2.0]) for s in (0, 1)]
    local = [study.run_task({**t, "run_dir": str(tmp_path / f"local{t['seed']}")}) for t in tasks]
    init_ray(None, num_cpus=2, temp_dir=ray_tmp)
    try:
        remote = study.run_tasks(tasks, "ray", cpus_per_task=1)
    finally:
        ray.shutdown()
    assert [r["eval"] for r in remote] == [r["eval"] for r in local]


def test_a_large_output_is_sampled_by_whole_sources(curated, corpus):
    """With more clips than max_clips the corpus is a sample of whole sources (a hash of the
    source id below the share), the same sample each time; every clip of a sampled source
    comes, no clip of another."""
    import pyarrow as pa

    n = corpus.clips.num_rows
    assert n >= 4
    share = (n // 2) / n
    expected = study.corpus._sampled(pa.chunked_array([corpus.clips.column("source_id").combine_chunks()]), share)
    expected_ids = sorted(c for c, k in zip(corpus.ids, expected.to_pylist()) if k)
    if not expected_ids:  # the hash of this run's (temporary) paths drew no source
        with pytest.raises(study.StudyError, match="has no clips"):
            study.load_corpus(str(curated), max_clips=n // 2)
        return
    sample = study.load_corpus(str(curated), max_clips=n // 2)
    again = study.load_corpus(str(curated), max_clips=n // 2)
    assert sample.ids == again.ids and sorted(sample.ids) == expected_ids
    chosen = set(sample.sources)
    assert sorted(sample.ids) == sorted(c for c, s in zip(corpus.ids, corpus.sources) if s in chosen)
    assert study.load_corpus(str(curated), max_clips=n).ids == corpus.ids  # all fit: all taken


def test_the_sample_takes_the_share_of_sources_a_hash_gives():
    import pyarrow as pa

    ids = [f"{i:016x}" for i in range(0, 4000, 2)] * 3  # 2000 sources, 3 rows each
    inside = study.corpus._sampled(pa.chunked_array([pa.array(ids)]), 0.3).to_numpy(zero_copy_only=False)
    per_source = {}
    for sid, k in zip(ids, inside):
        per_source.setdefault(sid, set()).add(bool(k))
    assert all(len(v) == 1 for v in per_source.values())  # a source is in or out whole
    taken = sum(v == {True} for v in per_source.values())
    # Binomial(2000, 0.3): mean 600, sd 20.5; 5 sd either side.
    assert 600 - 103 <= taken <= 600 + 103
