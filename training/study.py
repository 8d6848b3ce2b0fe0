"""Does curation help? Proxy-model studies on one curated output (`curate ablate`).

The Stable Video Diffusion paper's data claim (Fig. 4) is that a curated set beats an
uncurated set of the same size, and its way of choosing thresholds (App. E) is to train small
proxy models on subsets filtered at different thresholds and compare them. This module does
both on top of the trainer (training/loop.py), from one finished curation output OUT_DIR:

Data (`load_corpus`): the clip rows of scores/ (at most about `max_clips`: whole sources drawn
by a hash of their id when the output has more), their payload from clips/
(run.store_all_clips), and whether each video decodes (decoded here, in full). Only decodable
clips take part.

Split (`split_sources`): held-out *sources* (not clips: the clips of one source share shots,
looks and motion, so a clip split would leak), drawn by a seeded hash of the source id,
stratified so that both sources with kept clips and sources without lose the same share.
No arm trains on a held-out source.

Arms (`plan_arms`), all built from the training sources' decodable clips:
- curated: the clips the output keeps (scores/keep);
- uncurated: a random sample of all decodable clips with the same number of clips and the same
  total frames as curated (within 0.5%), drawn again for every seed (`matched_sample`);
- leave-one-out (optional): the clips kept by the rules with one rule left out;
- sweep (optional): the clips kept with one rule set to several percentiles (App. E);
  (both re-evaluate the rules of run.json on the stored scores, as `curate refilter` does; a
  clip rejected for a reason that is no rule's, a near-duplicate say, stays out of every arm
  but uncurated);
- curated, no image pretraining: the curated clips, the video stage from a fresh network
  instead of from the image stage (SVD Fig. 3a).
Each arm's clips are written as shard files in the trainer's schema under
OUT_DIR/study/<name>/data/, and each (arm, seed) trains the same stage plan (default image
then video, the tiny preset) with the same fixed seed. Arms whose clips equal another arm's
for every seed (and whose stage plan is the same) are not trained twice: they take its numbers.

Evaluation (`evaluate_checkpoint`): the EMA network of the last stage on held-out clips, two
sets: heldout_all (every decodable clip of the held-out sources) and heldout_kept (those the
run's rules keep). Each clip gives `eval_windows` samples (frame windows drawn by a generator
seeded by (eval seed, clip id, window), exactly as the trainer builds samples), and each sample
is noised at a fixed grid of noise levels (the quantiles (k + 0.5) / K of the last stage's
log-normal training distribution, so the average approximates the expected training loss) with
noise seeded by (eval seed, clip id, window). The metric is the EDM-weighted denoising loss
averaged over the grid: deterministic, and the same noise for every arm.

Statistics (`summarize`): an arm's number is the mean over seeds of the mean over held-out
samples. Its 95% interval is a percentile bootstrap that resamples seeds and held-out units
(whole sources when the set has at least MIN_SOURCE_UNITS sources, else whole clips) together;
a difference between two arms is bootstrapped paired (the same seeds and units in each draw).
With one seed the interval covers only the choice of held-out clips, which results.json says.

Reproducibility: OUT_DIR/study/<name>/study.json records the spec, the split, every arm's clip
ids per seed, every run's resolved configs and seeds, the noise grid and library versions;
`rerun_study` trains from that file alone (clip ids, not rules), and on the same machine and
library versions gives the same numbers bit for bit (CPU; GPU kernels are not bit-stable).
Runs resume: a run whose eval.json matches its task is not trained again.

Runners: "local" trains the runs one after another in this process; "ray" runs every
(arm, seed) as a Ray task (one CPU each by default), on an embedded cluster or a cluster's
address; the run folders must then be on storage every node sees (a shared OUT_DIR).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from curation import outdir, schema
from curation.writer import OutputStore, write_json
from stages.rules import (Rules, evaluate_rows, filter_steps, float_values, fmt, is_percentile, reason_column,
                          resolve_percentile)
from stages.rules import effective_steps as rules_effective_steps

log = logging.getLogger(__name__)

STUDY_FORMAT = 1
MIN_SOURCE_UNITS = 5  # bootstrap whole sources when a held-out set has at least this many
FRAME_TOLERANCE = 0.005  # uncurated arm: total frames within 0.5% of curated's (or one clip's worth)
EVAL_SETS = ("heldout_all", "heldout_kept")
PAYLOAD_COLUMNS = [f.name for f in schema.PAYLOAD_FIELDS]


class StudyError(ValueError):
    """The study cannot be run as asked (a message for the user, no traceback)."""


# ---- the spec -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StudySpec:
    """Everything that decides a study's numbers (saved in study.json)."""

    name: str = "default"
    preset_size: str = "tiny"
    stages: tuple[str, ...] = ("image", "video")
    overrides: tuple[str, ...] = ()  # trainer --set items; STAGE.key=value for one stage
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout_fraction: float = 0.25
    holdout_sources: tuple[str, ...] = ()  # explicit held-out source ids or paths (overrides the fraction)
    split_seed: int = 0
    sample_seed: int = 0  # the uncurated arm of training seed s is drawn with (sample_seed, s)
    pretrain_compare: bool = True
    leave_one_out: tuple[str, ...] = ()  # rule columns; ("all",) = every applied rule
    sweep_column: str = ""
    sweep_percentiles: tuple[float, ...] = ()  # fractions dropped, e.g. (0, 0.1, 0.25, 0.5)
    sweep_side: str = "auto"  # drop_bottom, drop_top, or auto (from the rule's direction)
    sweep_metric: str = "heldout_all"  # the eval set that picks the sweep's best setting
    eval_windows: int = 4
    eval_sigmas: int = 8
    eval_seed: int = 1234
    eval_max_clips: int = 512  # per eval set; more are subsampled by a seeded hash of the clip id
    # The corpus: at most about this many clips, whole sources drawn by a hash of their id
    # (a proxy study trains small models; a 10^7-clip output is sampled, never loaded whole).
    max_clips: int = 20_000
    bootstrap: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        from training.config import SIZES, STAGES

        if not self.name or "/" in self.name or self.name.startswith("."):
            raise StudyError(f"study name {self.name!r}: a plain folder name, please")
        if self.preset_size not in SIZES:
            raise StudyError(f"preset size {self.preset_size!r}: choose from {sorted(SIZES)}")
        if not self.stages or any(s not in STAGES for s in self.stages) or \
                list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise StudyError(f"stages {self.stages}: a subsequence of {STAGES} in that order")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("seeds: at least one, all distinct")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise StudyError(f"holdout fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.sweep_side not in ("auto", "drop_bottom", "drop_top"):
            raise StudyError(f"sweep side must be auto, drop_bottom or drop_top, got {self.sweep_side!r}")
        if any(not 0.0 <= q < 1.0 for q in self.sweep_percentiles):
            raise StudyError(f"sweep percentiles are fractions dropped in [0, 1), got {self.sweep_percentiles}")
        if bool(self.sweep_column) != bool(self.sweep_percentiles):
            raise StudyError("a sweep needs both a column and percentiles")
        if self.sweep_metric not in EVAL_SETS:
            raise StudyError(f"sweep metric must be one of {EVAL_SETS}")
        if self.eval_windows < 1 or self.eval_sigmas < 1 or self.bootstrap < 100:
            raise StudyError("eval windows and sigmas must be >= 1, bootstrap draws >= 100")
        if self.max_clips < 1:
            raise StudyError(f"max clips must be >= 1, got {self.max_clips}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudySpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---- the corpus -------------------------------------------------------------------------

@dataclass
class Corpus:
    """The clip rows of a finished output, with decodability and the run's rules."""

    out_dir: str
    clips: pa.Table  # scores rows with a frame range, in scores order
    decodable: np.ndarray  # bool per row
    decode_errors: dict[str, str]  # clip_id -> why it is left out
    steps: list[tuple[str, Rules]]  # the applied filter rules, pipeline order
    resolved: dict[str, dict[str, Any]]  # run.json's resolved_rules
    run: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        return self.clips.column("clip_id").to_pylist()

    def column(self, name: str) -> np.ndarray:
        if name not in self.clips.column_names:
            return np.full(self.clips.num_rows, np.nan)
        return float_values(self.clips.column(name))

    @property
    def frames(self) -> np.ndarray:
        return (np.asarray(self.clips.column("end_frame").to_pylist(), dtype=np.int64)
                - np.asarray(self.clips.column("start_frame").to_pylist(), dtype=np.int64))

    @property
    def sources(self) -> np.ndarray:
        return np.asarray(self.clips.column("source_id").to_pylist(), dtype=object)

    @property
    def stored_keep(self) -> np.ndarray:
        return np.asarray([bool(k) for k in self.clips.column("keep").to_pylist()])


def load_corpus(out_dir: str, max_clips: int | None = None) -> Corpus:
    """The clips of a finished output (all of them, or with `max_clips` a sample of whole
    sources of about that many clips, drawn by a hash of the source id: the same sample every
    time), streamed from scores/, each video decoded from clips/ once to know it decodes;
    and the rules from run.json."""
    from curation import columns
    from training.data import decode_video

    store = OutputStore(out_dir)
    problem = store.not_ready_reason()
    if problem:
        raise StudyError(problem)
    run = store.read_run()
    ledger = store.ledger()
    total = int(ledger.totals().get("clips", 0))
    share = 1.0 if not max_clips or total <= max_clips else max_clips / total
    parts = []
    for table in columns.scan(ledger.files("scores")):
        table = schema.conform(table, schema.SCORES_SCHEMA).filter(pa.array(columns.is_clip(table)))
        if share < 1.0:
            table = table.filter(_sampled(table.column("source_id"), share))
        if table.num_rows:
            parts.append(table)
    if not parts:
        raise StudyError(f"{out_dir} has no clips")
    clips = pa.concat_tables(parts)
    if share < 1.0:
        log.info("study corpus: %d of the output's %d clips (whole sources, a %.3g share)", clips.num_rows,
                 total, share)
    clip_files = [p for p in ledger.files("clips") if p.exists()]
    if not clip_files:
        raise StudyError(f"{out_dir} has no clips/ files: the study needs every clip's video, kept or not "
                         "(run.store_all_clips: true, the default); rerun `curate run` with it")
    index = {cid: i for i, cid in enumerate(clips.column("clip_id").to_pylist())}
    wanted = clips.column("clip_id").combine_chunks()
    decodable = np.zeros(clips.num_rows, dtype=bool)
    errors: dict[str, str] = {}
    for part in columns.scan(clip_files, ["clip_id", "video"]):
        if share < 1.0:
            part = part.filter(pa.compute.is_in(part.column("clip_id"), value_set=wanted))
        for cid, video in zip(part.column("clip_id").to_pylist(), part.column("video").to_pylist()):
            if cid not in index:
                continue
            if video is None:
                errors[cid] = "no video stored"
                continue
            try:
                decode_video(video)
                decodable[index[cid]] = True
            except Exception as exc:  # noqa: BLE001  (any decoder failure leaves the clip out)
                errors[cid] = f"{type(exc).__name__}: {exc}"
    for cid, i in index.items():
        if not decodable[i] and cid not in errors:
            errors[cid] = "no payload in clips/"
    return Corpus(str(out_dir), clips, decodable, errors, filter_steps(run.get("config") or {}),
                  run.get("resolved_rules") or {}, run)


def _sampled(source_ids: pa.ChunkedArray, share: float) -> pa.Array:
    """Rows whose source is in the sample: a hash of the source id below `share`."""
    encoded = source_ids.combine_chunks().dictionary_encode()
    inside = np.array([int(_rank(0, sid)[:13], 16) < share * 16**13 for sid in encoded.dictionary.to_pylist()],
                      dtype=bool)
    return pa.array(inside[encoded.indices.to_numpy(zero_copy_only=False)]) if len(inside) else \
        pa.array(np.zeros(len(source_ids), bool))


# ---- rules -> keep ----------------------------------------------------------------------

def effective_steps(corpus: Corpus) -> list[tuple[str, Rules]]:
    """The run's rules with percentile rules replaced by their resolved min/max."""
    resolved = {name: r or {} for name, r in (corpus.resolved or {}).items()}
    return [(name, rules) for (name, _), rules in zip(corpus.steps, rules_effective_steps(corpus.steps, resolved))]


def keep_under(corpus: Corpus, steps: list[tuple[str, Rules]]) -> np.ndarray:
    """keep per clip row under (absolute) rules, evaluated as the filter stage does.

    A clip rejected for a reason that is no rule's column (a near-duplicate, say) stays
    rejected under any rules: only rule rejections are re-evaluated.
    """
    columns = {c for _, rules in steps for c in rules}
    keep, _ = evaluate_rows(np.zeros(corpus.clips.num_rows, dtype=bool),
                            {c: corpus.column(c) for c in columns}, [r for _, r in steps])
    return np.asarray(keep, dtype=bool) & ~other_rejections(corpus)


def other_rejections(corpus: Corpus) -> np.ndarray:
    """Clips the stored reject_reasons reject for something other than a rule of the run."""
    ruled = set(ruled_columns(corpus))
    return np.asarray([any(reason_column(r) not in ruled for r in (reasons or []))
                       for reasons in corpus.clips.column("reject_reasons").to_pylist()], dtype=bool)


def without_rule(steps: list[tuple[str, Rules]], column: str) -> list[tuple[str, Rules]]:
    return [(name, {c: b for c, b in rules.items() if c != column}) for name, rules in steps]


def ruled_columns(corpus: Corpus) -> list[str]:
    return list(dict.fromkeys(c for _, rules in corpus.steps for c in rules))


def sweep_side(corpus: Corpus, column: str, side: str) -> str:
    """drop_bottom for a rule with a minimum, drop_top for one with a maximum (or as given)."""
    if side != "auto":
        return side
    for _, rules in corpus.steps:
        b = rules.get(column)
        if b is not None:
            if "min" in b or "drop_bottom" in b:
                return "drop_bottom"
            if "max" in b or "drop_top" in b:
                return "drop_top"
    return "drop_bottom"


def rule_step(corpus: Corpus, column: str) -> str:
    """The filter step that holds a rule on `column` (the first filter step if none does)."""
    for name, rules in corpus.steps:
        if column in rules:
            return name
    if not corpus.steps:
        raise StudyError("the run has no filter step to write a rule into")
    return corpus.steps[0][0]


def with_percentile(corpus: Corpus, column: str, side: str, q: float) -> tuple[list[tuple[str, Rules]], Any]:
    """The rules with `column`'s rule set to drop the `q` share at `side` (q = 0: no rule on it).

    The threshold is resolved over every clip row, as the run's end-of-run pass would resolve
    {side: q} (stages/rules.py), so writing it back gives exactly this arm's rule.
    """
    steps = without_rule(effective_steps(corpus), column)
    if q == 0:
        return steps, None
    resolved = resolve_percentile(corpus.column(column), {side: q})
    bound = {"min": resolved["min"]} if side == "drop_bottom" else {"max": resolved["max"]}
    target = rule_step(corpus, column)
    return [(name, {**rules, column: bound} if name == target else rules) for name, rules in steps], resolved


# ---- the split --------------------------------------------------------------------------

def _rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def split_sources(sources: list[str], has_kept: dict[str, bool], fraction: float, seed: int,
                  explicit: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(training sources, held-out sources): a seeded hash order, stratified by has_kept."""
    sources = sorted(set(sources))
    if len(sources) < 2:
        raise StudyError(f"a source split needs at least 2 sources with decodable clips, found {len(sources)}")
    if explicit:
        held = sorted(set(explicit))
        unknown = [s for s in held if s not in sources]
        if unknown:
            raise StudyError(f"held-out source {unknown[0]!r} has no decodable clip in this output")
    else:
        held = []
        for group in (True, False):
            members = sorted((s for s in sources if has_kept.get(s, False) == group), key=lambda s: _rank(seed, s))
            k = int(math.floor(fraction * len(members) + 0.5))
            if group and len(members) >= 2:
                k = max(k, 1)
            held += members[:min(k, len(members) - (1 if group else 0))]
        if not held:  # too few sources for the stratified rule: one held out by the hash
            held = [min(sources, key=lambda s: _rank(seed, s))]
    train = [s for s in sources if s not in set(held)]
    if not train:
        raise StudyError("every source is held out: nothing to train on")
    return train, sorted(held)


# ---- arms -------------------------------------------------------------------------------

@dataclass
class Arm:
    name: str
    kind: str  # curated, uncurated, leave_one_out, sweep, no_image_pretraining, custom
    description: str
    stages: tuple[str, ...]
    clip_ids: dict[int, list[str]]  # seed -> clip ids (the same list for a deterministic arm)
    meta: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None  # trained once: takes that arm's numbers

    def key(self) -> str:
        h = hashlib.sha1(json.dumps([list(self.stages), {str(s): v for s, v in sorted(self.clip_ids.items())}],
                                    sort_keys=True).encode())
        return h.hexdigest()


def matched_sample(ids: list[str], frames: np.ndarray, n: int, target_frames: int, seed: list[int],
                   tolerance: float = FRAME_TOLERANCE) -> list[str]:
    """n of `ids` at random whose frames sum to target_frames (within tolerance), seeded.

    A seeded random draw of n clips, then random one-for-one swaps that bring the total
    closer, until it is within max(tolerance x target, the smallest clip) or no swap helps.
    """
    if n > len(ids):
        raise StudyError(f"cannot draw {n} clips from {len(ids)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    chosen, rest = list(order[:n]), list(order[n:])
    total = int(frames[chosen].sum())
    tol = max(tolerance * target_frames, float(frames.min()) / 2 if len(frames) else 0.0)
    for _ in range(200 * max(1, len(ids))):
        gap = total - target_frames
        if abs(gap) <= tol or not rest or not chosen:
            break
        i, j = int(rng.integers(len(chosen))), int(rng.integers(len(rest)))
        new_gap = gap - int(frames[chosen[i]]) + int(frames[rest[j]])
        if abs(new_gap) < abs(gap):
            chosen[i], rest[j] = rest[j], chosen[i]
            total = target_frames + new_gap
    return [ids[k] for k in sorted(chosen)]


def plan_arms(corpus: Corpus, spec: StudySpec, train_sources: list[str]) -> list[Arm]:
    """The arms of a study (see the module docstring), each with its clip ids per seed."""
    ids = corpus.ids
    frames = corpus.frames
    pool = corpus.decodable & np.isin(corpus.sources, train_sources)
    eff = effective_steps(corpus)
    keep = corpus.stored_keep  # curated: what the output keeps
    drift = int((keep_under(corpus, eff) != keep).sum())
    if drift:
        log.warning("the run's rules re-evaluated keep %d clips differently from scores/keep (the "
                    "leave-one-out and sweep arms use the re-evaluated rules)", drift)
    stages = tuple(spec.stages)

    def fixed(mask: np.ndarray) -> dict[int, list[str]]:
        chosen = [ids[i] for i in np.flatnonzero(mask & pool)]
        return {s: chosen for s in spec.seeds}

    def stats(mask: np.ndarray) -> dict[str, int]:
        m = mask & pool
        return {"clips": int(m.sum()), "frames": int(frames[m].sum()),
                "sources": len(set(corpus.sources[m]))}

    curated_mask = keep & pool
    if not curated_mask.any():
        raise StudyError("the rules keep no decodable clip of the training sources: nothing to train the "
                         "curated arm on (hold out fewer sources, or loosen the rules)")
    arms = [Arm("curated", "curated", "the clips the output keeps", stages, fixed(keep),
                {**stats(keep), "rules": {n: r for n, r in eff}})]
    n, target = int(curated_mask.sum()), int(frames[curated_mask].sum())
    pool_ids = [ids[i] for i in np.flatnonzero(pool)]
    pool_frames = frames[pool]
    uncurated = {s: matched_sample(pool_ids, pool_frames, n, target, [spec.sample_seed, s]) for s in spec.seeds}
    index = {cid: i for i, cid in enumerate(ids)}
    arms.append(Arm("uncurated", "uncurated",
                    f"a random sample of all decodable clips: {n} clips, about {target} frames (redrawn per seed)",
                    stages, uncurated,
                    {"clips": n, "frames": target, "pool_clips": len(pool_ids), "pool_frames": int(pool_frames.sum()),
                     "frames_per_seed": {str(s): int(sum(frames[index[c]] for c in v)) for s, v in uncurated.items()},
                     "kept_share_per_seed": {str(s): float(np.mean([keep[index[c]] for c in v]))
                                             for s, v in uncurated.items()}}))
    columns = ruled_columns(corpus) if "all" in spec.leave_one_out else list(spec.leave_one_out)
    for column in columns:
        if column not in ruled_columns(corpus):
            raise StudyError(f"leave-one-out: {column!r} is not a rule of this run "
                             f"(rules: {', '.join(ruled_columns(corpus)) or 'none'})")
        mask = keep_under(corpus, without_rule(eff, column))
        arms.append(Arm(f"without_{column}", "leave_one_out", f"the rules without the {column} rule",
                        stages, fixed(mask), {**stats(mask), "column": column}))
    if spec.sweep_column:
        column = spec.sweep_column
        if column not in corpus.clips.column_names or np.isnan(corpus.column(column)).all():
            raise StudyError(f"sweep: no clip has a value for {column!r}")
        side = sweep_side(corpus, column, spec.sweep_side)
        for q in sorted(set(spec.sweep_percentiles)):
            steps, resolved = with_percentile(corpus, column, side, q)
            mask = keep_under(corpus, steps)
            threshold = None if resolved is None else resolved["min" if side == "drop_bottom" else "max"]
            label = f"{column} no rule" if q == 0 else f"{column} {side} {q:g}"
            arms.append(Arm(f"sweep_{column}_{q:g}", "sweep", label, stages, fixed(mask),
                            {**stats(mask), "column": column, "side": side, "percentile": q,
                             "threshold": threshold, "step": rule_step(corpus, column)}))
    if spec.pretrain_compare and "image" in stages and len(stages) > 1:
        arms.append(Arm("curated_no_image_pretraining", "no_image_pretraining",
                        "the curated clips; the video stage starts from a fresh network (SVD Fig. 3a)",
                        tuple(s for s in stages if s != "image"), fixed(keep), stats(keep)))
    mark_duplicates(arms)
    return arms


def mark_duplicates(arms: list[Arm]) -> None:
    """An arm whose clips (every seed) and stage plan equal an earlier arm's takes its numbers."""
    seen: dict[str, str] = {}
    for arm in arms:
        if not arm.clip_ids or not any(arm.clip_ids.values()):
            continue
        k = arm.key()
        if k in seen:
            arm.same_as = seen[k]
        else:
            seen[k] = arm.name


# ---- data files -------------------------------------------------------------------------

def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha1(",".join(ids).encode()).hexdigest()[:10]


def write_clip_files(corpus: Corpus, wanted: dict[str, list[str]]) -> None:
    """Write each file of `wanted` ({path: clip ids}) as a shard file of those clips.

    Rows are the scores rows joined with the payload of clips/, with fps_id and
    motion_bucket_id derived as the writer derives them, in the shards schema. One pass over
    clips/ (a file at a time); an existing file (its name holds its clip ids' hash) is kept.
    """
    from curation.writer import add_derived_columns, tmp_name

    todo = {p: ids for p, ids in wanted.items() if not os.path.exists(p)}
    if not todo:
        return
    need: dict[str, list[str]] = {}
    for path, ids in todo.items():
        if not ids:
            raise StudyError(f"{path}: an arm without clips")
        for cid in ids:
            need.setdefault(cid, []).append(path)
    scores = corpus.clips
    row_of = {cid: i for i, cid in enumerate(scores.column("clip_id").to_pylist())}
    writers: dict[str, tuple[pq.ParquetWriter, Path]] = {}
    got: dict[str, int] = {p: 0 for p in todo}
    try:
        for path in todo:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_name(Path(path))
            writers[path] = (pq.ParquetWriter(tmp, schema.SHARDS_SCHEMA, compression="zstd",
                                              write_statistics=schema.statistics_columns(schema.SHARDS_SCHEMA)), tmp)
        store = OutputStore(corpus.out_dir)
        for clips_file in store.committed_files("clips"):
            if not clips_file.exists():
                continue
            payload = outdir.read_table(clips_file, columns=["clip_id"] + PAYLOAD_COLUMNS)
            pids = payload.column("clip_id").to_pylist()
            for path in todo:
                take = [k for k, cid in enumerate(pids) if path in need.get(cid, ())]
                if not take:
                    continue
                part = payload.take(pa.array(take, pa.int64()))
                rows = scores.take(pa.array([row_of[cid] for cid in part.column("clip_id").to_pylist()], pa.int64()))
                rows = rows.drop_columns([c for c in ("fps_id", "motion_bucket_id") if c in rows.column_names])
                for name in PAYLOAD_COLUMNS:
                    rows = rows.append_column(name, part.column(name))
                rows = schema.conform(add_derived_columns(rows), schema.SHARDS_SCHEMA)
                writers[path][0].write_table(rows, row_group_size=64)
                got[path] += rows.num_rows
        for path, (writer, tmp) in writers.items():
            writer.close()
            if got[path] != len(todo[path]):
                raise StudyError(f"{path}: found {got[path]} of its {len(todo[path])} clips in clips/")
            os.replace(tmp, path)
        writers = {}
    finally:
        for writer, tmp in writers.values():
            writer.close()
            Path(tmp).unlink(missing_ok=True)


# ---- runs -------------------------------------------------------------------------------

def stage_configs(spec: StudySpec, stages: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
    """The resolved trainer config (to_dict) of each stage of one run."""
    from training.cli import _stage_overrides
    from training.config import apply_overrides, preset, to_dict

    out = []
    for k, stage in enumerate(stages):
        cfg = apply_overrides(preset(stage, spec.preset_size), _stage_overrides(list(spec.overrides), stage))
        cfg = replace(cfg, seed=seed, init_from="auto" if k > 0 else "none")
        out.append(to_dict(cfg))
    return out


def sigma_grid(cfg: dict[str, Any], k: int) -> list[float]:
    """Noise levels at the quantiles (i + 0.5) / k of the stage's ln sigma ~ N(p_mean, p_std^2)."""
    from statistics import NormalDist

    z = [NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)]
    return [float(math.exp(cfg["p_mean"] + cfg["p_std"] * zi)) for zi in z]


def task_hash(task: dict[str, Any]) -> str:
    keep = {k: v for k, v in task.items() if k not in ("run_dir", "threads", "eval_paths")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) through its stages, then evaluate the last stage on the held-out sets.

    Resumes: a stage with checkpoints continues, and a run whose eval.json has this task's
    hash returns it unread-again. Runs in this process or as a Ray task (plain dicts only).
    """
    import curation  # noqa: F401  (torchvision shim first, in a Ray worker too)
    import torch

    from training.config import from_dict
    from training.loop import latest_good_checkpoint, train

    run_dir = task["run_dir"]
    done = os.path.join(run_dir, "eval.json")
    digest = task_hash(task)
    if os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved.get("task_hash") == digest:
            return saved
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    t0 = time.perf_counter()
    init, stages = None, {}
    for d in task["configs"]:
        cfg = from_dict(d)
        stage_dir = os.path.join(run_dir, cfg.stage)
        t_stage = time.perf_counter()
        result = train(cfg, [task["data"]], stage_dir, init_checkpoint=init)
        losses = [result.losses[k] for k in sorted(result.losses)]
        init, _ = latest_good_checkpoint(stage_dir)
        stages[cfg.stage] = {"steps": cfg.total_steps, "seconds": time.perf_counter() - t_stage,
                             "last_losses_mean": float(np.mean(losses[-10:])) if losses else None,
                             "checkpoint": init}
    evals = {name: evaluate_checkpoint(init, path, task["eval"]) for name, path in task["eval_paths"].items()}
    out = {"task_hash": digest, "arm": task["arm"], "seed": task["seed"], "stages": stages,
           "seconds": time.perf_counter() - t0, "eval": evals}
    write_json(Path(done), out)
    _prune_checkpoints(run_dir, [d["stage"] for d in task["configs"]])
    return out


def _prune_checkpoints(run_dir: str, stages: list[str]) -> None:
    """Keep only each stage's last checkpoint once the run is evaluated (a study has many runs)."""
    from training.loop import checkpoint_paths

    for stage in stages:
        for path in checkpoint_paths(os.path.join(run_dir, stage))[:-1]:
            os.remove(path)


def evaluate_checkpoint(checkpoint: str, eval_path: str, ev: dict[str, Any]) -> dict[str, Any]:
    """Per-sample EDM losses of a checkpoint's EMA network on the clips of one shard file.

    ev: {"sigmas": [...], "windows": k, "seed": s, "batch": b}. Returns {"clip_ids", "source_ids",
    "losses": [[loss at each sigma] per sample]} with samples in (clip, window) order.
    """
    import torch

    from training import diffusion
    from training.data import FrameCache, columns_for, read_shards, row_sample
    from training.loop import resolve_device
    from training.sample import load_for_sampling

    model, cfg, _ = load_for_sampling(checkpoint)
    device = resolve_device(cfg)
    model = model.to(device)
    table = read_shards([eval_path], list(dict.fromkeys(columns_for(cfg) + ["source_id"])))
    sigmas = [float(s) for s in ev["sigmas"]]
    cache = FrameCache(cfg.frame_cache_mb)
    rows = table.to_pylist()
    items = [(r, w) for r in rows for w in range(int(ev["windows"]))]
    out_losses: list[list[float]] = []
    batch_size = int(ev.get("batch", 32))
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            samples, noises = [], []
            for row, w in chunk:
                seed = _sample_seed(ev["seed"], row["clip_id"], w)
                rng = np.random.default_rng(seed)
                samples.append(row_sample(row, cfg, cfg.caption_dim, rng, cache, row["clip_id"]))
                gen = torch.Generator().manual_seed(seed)
                noises.append(torch.randn((len(sigmas), *samples[-1]["x"].shape), generator=gen))
            x = torch.stack([s["x"] for s in samples]).to(device)
            noise = torch.stack(noises).to(device)  # (B, K, ...)
            cond = {"caption": torch.stack([s["caption"] for s in samples]).to(device),
                    "caption_valid": torch.stack([s["caption_valid"] for s in samples]).to(device),
                    "fps_id": torch.stack([s["fps_id"] for s in samples]).to(device),
                    "motion_bucket_id": torch.stack([s["motion_bucket_id"] for s in samples]).to(device)}
            per = []
            for k, sigma in enumerate(sigmas):
                s = torch.full((len(x),), sigma, device=device)
                per.append(diffusion.edm_loss(model, x, s, noise[:, k], cfg.sigma_data, **cond).double().cpu())
            out_losses += torch.stack(per, 1).tolist()
    return {"clip_ids": [r["clip_id"] for r, _ in items], "source_ids": [r["source_id"] for r, _ in items],
            "windows": [w for _, w in items], "losses": out_losses}


def _sample_seed(eval_seed: int, clip_id: str, window: int) -> int:
    return int(hashlib.sha1(f"{eval_seed}:{clip_id}:{window}".encode()).hexdigest()[:15], 16)


def run_tasks(tasks: list[dict[str, Any]], runner: str = "local", ray_address: str | None = None,
              num_cpus: int | None = None, cpus_per_task: float = 1.0,
              progress: Callable[[int, int, dict], None] | None = None) -> list[dict[str, Any]]:
    """Every task's result, in task order: one after another here, or as parallel Ray tasks."""
    if runner == "local":
        out = []
        for k, task in enumerate(tasks):
            out.append(run_task(task))
            if progress:
                progress(k + 1, len(tasks), out[-1])
        return out
    if runner != "ray":
        raise StudyError(f"runner must be local or ray, got {runner!r}")
    import ray

    from curation.pipeline import init_ray

    init_ray(ray_address, num_cpus=num_cpus)
    remote = ray.remote(run_task).options(num_cpus=cpus_per_task, max_retries=1)
    refs = [remote.remote(t) for t in tasks]
    order = {ref: k for k, ref in enumerate(refs)}
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            results[order[ref]] = ray.get(ref)
            done += 1
            if progress:
                progress(done, len(tasks), results[order[ref]])
    return results  # type: ignore[return-value]


# ---- statistics -------------------------------------------------------------------------

def _units(clip_ids: list[str], source_ids: list[str]) -> tuple[np.ndarray, str]:
    """Bootstrap unit of each sample: its source when there are enough sources, else its clip."""
    by_source = len(set(source_ids)) >= MIN_SOURCE_UNITS
    keys = source_ids if by_source else clip_ids
    names = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return np.asarray([names[k] for k in keys]), "source" if by_source else "clip"


def summarize(per_run: dict[str, dict[int, dict[str, Any]]], arms: list[str], seeds: list[int],
              comparisons: list[tuple[str, str, str]], draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Means, 95% bootstrap intervals and paired differences for one eval set.

    per_run[arm][seed] = evaluate_checkpoint's result on this set (the same samples for every run).
    """
    first = per_run[arms[0]][seeds[0]]
    units, unit_kind = _units(first["clip_ids"], first["source_ids"])
    n_units = int(units.max()) + 1
    counts = np.bincount(units, minlength=n_units).astype(np.float64)
    sums, per_sigma = {}, {}
    for arm in arms:
        rows = []
        for s in seeds:
            ev = per_run[arm][s]
            if ev["clip_ids"] != first["clip_ids"] or ev["windows"] != first["windows"]:
                raise StudyError(f"arm {arm} seed {s} was evaluated on other samples than the first run")
            rows.append(np.asarray(ev["losses"], dtype=np.float64))
        mat = np.stack(rows)  # (S, N, K)
        per_sample = mat.mean(2)  # grid average
        sums[arm] = np.stack([np.bincount(units, weights=p, minlength=n_units) for p in per_sample])  # (S, U)
        per_sigma[arm] = mat.mean((0, 1)).tolist()
    rng = np.random.default_rng([seed, 17])
    w = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=draws).astype(np.float64)  # (B, U)
    pick = rng.integers(len(seeds), size=(draws, len(seeds)))  # (B, S)
    den = w @ counts  # (B,)

    def boot(arm: str) -> np.ndarray:
        per_seed = (w @ sums[arm].T) / den[:, None]  # (B, S)
        return np.take_along_axis(per_seed, pick, 1).mean(1)

    boots = {arm: boot(arm) for arm in arms}
    out_arms = {}
    for arm in arms:
        per_seed = (sums[arm].sum(1) / counts.sum()).tolist()
        lo, hi = np.percentile(boots[arm], [2.5, 97.5])
        out_arms[arm] = {"mean": float(np.mean(per_seed)), "ci95": [float(lo), float(hi)],
                         "per_seed": per_seed, "per_sigma": per_sigma[arm]}
    out_cmp = []
    for a, b, label in comparisons:
        if a not in boots or b not in boots:
            continue
        d = boots[a] - boots[b]
        lo, hi = np.percentile(d, [2.5, 97.5])
        diff = out_arms[a]["mean"] - out_arms[b]["mean"]
        out_cmp.append({"a": a, "b": b, "label": label, "difference": float(diff), "ci95": [float(lo), float(hi)],
                        "share_a_lower": float((d < 0).mean()),
                        "verdict": ("a lower" if hi < 0 else "b lower" if lo > 0 else "interval includes 0")})
    covers = [f"{len(seeds)} seeds"] if len(seeds) > 1 else []
    covers += [f"{n_units} held-out {unit_kind}s"] if n_units > 1 else []
    notes = []
    if len(seeds) == 1:
        notes.append("one seed: training-seed variance is not in the intervals")
    if n_units == 1:
        notes.append(f"one held-out {unit_kind}: the choice of held-out clips is not in the intervals")
    if len(seeds) < 5 or n_units < 10:
        notes.append("few seeds or held-out units: a percentile bootstrap this small is too narrow; "
                     "read the intervals as optimistic")
    return {"samples": len(first["clip_ids"]), "clips": len(set(first["clip_ids"])),
            "sources": len(set(first["source_ids"])), "bootstrap_unit": unit_kind, "units": n_units,
            "seeds": len(seeds), "interval_covers": " x ".join(covers) or "nothing (one seed, one clip)",
            "notes": notes, "arms": out_arms, "comparisons": out_cmp}


def comparisons_of(arms: list[Arm]) -> list[tuple[str, str, str]]:
    names = {a.name for a in arms}
    out = [("curated", "uncurated", "curated - uncurated (SVD Fig. 4)")]
    out += [(a.name, "curated", f"{a.name} - curated (leave one rule out)") for a in arms if a.kind == "leave_one_out"]
    if "curated_no_image_pretraining" in names:
        out.append(("curated_no_image_pretraining", "curated",
                    "no image pretraining - image pretraining (SVD Fig. 3a)"))
    out += [(a.name, "curated", f"{a.description} - curated (sweep)") for a in arms if a.kind == "sweep"]
    return out


# ---- the study --------------------------------------------------------------------------

def study_dir(out_dir: str, name: str) -> Path:
    """OUT_DIR/study/NAME; for an object-store OUT_DIR, under its local work folder (outdir.work_dir)."""
    return outdir.work_dir(out_dir) / "study" / name


def _versions() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pa.__version__, "machine": platform.machine()}


def prepare_study(out_dir: str, spec: StudySpec, corpus: Corpus | None = None) -> dict[str, Any]:
    """Split, arms, data files and tasks of a study; returns the study record (study.json)."""
    corpus = corpus or load_corpus(out_dir, spec.max_clips)
    root = study_dir(out_dir, spec.name)
    dec = corpus.decodable
    sources = corpus.sources
    keep = corpus.stored_keep
    has_kept = {s: bool((keep & dec)[sources == s].any()) for s in set(sources[dec])}
    explicit = tuple(_source_ids(corpus, spec.holdout_sources))
    train_sources, held = split_sources(list(sources[dec]), has_kept, spec.holdout_fraction, spec.split_seed, explicit)
    arms = plan_arms(corpus, spec, train_sources)
    ids = corpus.ids
    heldout = dec & np.isin(sources, held)
    eval_ids = {"heldout_all": [ids[i] for i in np.flatnonzero(heldout)],
                "heldout_kept": [ids[i] for i in np.flatnonzero(heldout & keep)]}
    for name, chosen in eval_ids.items():
        if len(chosen) > spec.eval_max_clips:
            keep_ids = set(sorted(chosen, key=lambda c: _rank(spec.eval_seed, c))[:spec.eval_max_clips])
            eval_ids[name] = [c for c in chosen if c in keep_ids]
    if not eval_ids["heldout_all"]:
        raise StudyError("the held-out sources have no decodable clip")
    record = _record(out_dir, spec, corpus, train_sources, held, arms, eval_ids)
    return record


def _source_ids(corpus: Corpus, given: tuple[str, ...]) -> list[str]:
    """Held-out sources given as ids or paths (a path's file name is enough when unique)."""
    ids = corpus.clips.column("source_id").to_pylist()
    paths = corpus.clips.column("source_path").to_pylist()
    out = []
    for g in given:
        match = {i for i, p in zip(ids, paths) if g in (i, p) or os.path.basename(p) == g}
        if len(match) != 1:
            raise StudyError(f"held-out source {g!r} matches {len(match)} sources of this output")
        out.append(match.pop())
    return out


def _record(out_dir: str, spec: StudySpec, corpus: Corpus, train_sources: list[str], held: list[str],
            arms: list[Arm], eval_ids: dict[str, list[str]]) -> dict[str, Any]:
    root = study_dir(out_dir, spec.name)
    final_cfg = stage_configs(spec, tuple(spec.stages), spec.seeds[0])[-1]
    source_paths = dict(zip(corpus.clips.column("source_id").to_pylist(),
                            corpus.clips.column("source_path").to_pylist()))
    eval_sets = {name: {"clip_ids": chosen, "file": f"eval/{name}-{_ids_hash(chosen)}.parquet"}
                 for name, chosen in eval_ids.items() if chosen}
    arm_records, tasks = [], []
    for arm in arms:
        data = {}
        for s in spec.seeds:
            chosen = arm.clip_ids[s]
            data[str(s)] = {"clip_ids": chosen, "file": f"data/{arm.name}-{_ids_hash(chosen)}.parquet"}
        arm_records.append({"name": arm.name, "kind": arm.kind, "description": arm.description,
                            "stages": list(arm.stages), "meta": arm.meta, "same_as": arm.same_as, "data": data})
        if arm.same_as or not any(arm.clip_ids.values()):
            continue
        for s in spec.seeds:
            configs = stage_configs(spec, arm.stages, s)
            tasks.append({"arm": arm.name, "seed": s, "data_file": data[str(s)]["file"], "configs": configs,
                          "run": f"runs/{arm.name}/seed{s}"})
    return {
        "format": STUDY_FORMAT, "spec": spec.to_dict(), "out_dir": outdir.absolute(str(out_dir)),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(),
        "corpus": {"config_fingerprint": corpus.run.get("config_fingerprint"), "clips": corpus.clips.num_rows,
                   "decodable": int(corpus.decodable.sum()), "stored_kept": int(corpus.stored_keep.sum()),
                   "not_decodable": corpus.decode_errors,
                   "rules": {n: r for n, r in corpus.steps}, "resolved_rules": corpus.resolved,
                   "rules_not_applied": corpus.run.get("rules_not_applied") or []},
        "split": {"train_sources": train_sources, "heldout_sources": held,
                  "heldout_source_paths": {s: source_paths.get(s) for s in held}},
        "eval": {"sets": eval_sets, "sigmas": sigma_grid(final_cfg, spec.eval_sigmas),
                 "windows": spec.eval_windows, "seed": spec.eval_seed, "batch": 32,
                 "stage": final_cfg["stage"]},
        "arms": arm_records, "tasks": tasks, "root": str(root),
    }


def materialize(record: dict[str, Any], corpus: Corpus, threads: int = 1) -> list[dict[str, Any]]:
    """Write the record's data files and return its runnable tasks (absolute paths)."""
    root = Path(record["root"])
    wanted = {str(root / d["file"]): d["clip_ids"] for arm in record["arms"] for d in arm["data"].values()
              if d["clip_ids"] and not arm["same_as"]}
    wanted.update({str(root / e["file"]): e["clip_ids"] for e in record["eval"]["sets"].values()})
    write_clip_files(corpus, wanted)
    ev = {k: record["eval"][k] for k in ("sigmas", "windows", "seed", "batch")}
    eval_paths = {name: str(root / e["file"]) for name, e in record["eval"]["sets"].items()}
    out = []
    for t in record["tasks"]:
        out.append({"arm": t["arm"], "seed": t["seed"], "data": str(root / t["data_file"]),
                    "configs": t["configs"], "run_dir": str(root / t["run"]), "eval": ev,
                    "eval_paths": eval_paths, "threads": threads,
                    "eval_files": {n: e["file"] for n, e in record["eval"]["sets"].items()},
                    "data_file": t["data_file"]})
    return out


def _check_same_record(root: Path, record: dict[str, Any], overwrite: bool) -> None:
    path = root / "study.json"
    if not path.exists() or overwrite:
        return
    old = json.loads(path.read_text())

    def substance(r: dict[str, Any]) -> Any:  # what decides the numbers (not wording, paths or dates)
        return ([r.get(k) for k in ("spec", "split", "eval", "tasks")],
                [(a["name"], a["stages"], a["same_as"], a["data"]) for a in r.get("arms", [])])

    if substance(old) != substance(record):
        raise StudyError(f"{root} holds a study with another spec or data; choose another --name, or "
                         "pass --overwrite to replace it")


def run_study(out_dir: str, spec: StudySpec, runner: str = "local", ray_address: str | None = None,
              num_cpus: int | None = None, cpus_per_task: float = 1.0, threads: int = 1,
              overwrite: bool = False, corpus: Corpus | None = None,
              record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan (or take `record`), train and evaluate every arm, write results.json and the page."""
    import shutil

    corpus = corpus or load_corpus(out_dir, spec.max_clips)
    record = record or prepare_study(out_dir, spec, corpus)
    root = Path(record["root"])
    if overwrite and root.exists():
        shutil.rmtree(root)
    _check_same_record(root, record, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "study.json", record)
    tasks = materialize(record, corpus, threads)
    t0 = time.perf_counter()
    log.info("study %s: %d arms, %d runs (%s), held-out %d sources; writing %s", spec.name,
             len(record["arms"]), len(tasks), runner, len(record["split"]["heldout_sources"]), root)

    def progress(k: int, n: int, r: dict[str, Any]) -> None:
        log.info("study %s: run %d/%d done (%s seed %s, %.0fs)", spec.name, k, n, r["arm"], r["seed"],
                 r.get("seconds", 0.0))

    results = run_tasks(tasks, runner, ray_address, num_cpus, cpus_per_task, progress)
    out = analyze(record, results)
    out["wall_seconds"] = time.perf_counter() - t0
    write_json(root / "results.json", out)
    from training.study_report import write_page

    write_page(root, record, out)
    return out


def rerun_study(study_json: str, name: str, out_dir: str | None = None, **kwargs) -> dict[str, Any]:
    """Run a recorded study again under a new name: the same clip ids, configs, seeds and noise."""
    record = json.loads(Path(study_json).read_text())
    if record.get("format") != STUDY_FORMAT:
        raise StudyError(f"{study_json}: study format {record.get('format')}, this version reads {STUDY_FORMAT}")
    out_dir = out_dir or record["out_dir"]
    spec = replace(StudySpec.from_dict(record["spec"]), name=name)
    record = {**record, "spec": spec.to_dict(), "root": str(study_dir(out_dir, name)),
              "out_dir": outdir.absolute(str(out_dir)), "rerun_of": os.path.abspath(study_json)}
    return run_study(out_dir, spec, record=record, **kwargs)


def analyze(record: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json: per eval set, each arm's mean and interval and the differences; the sweep."""
    spec = StudySpec.from_dict(record["spec"])
    seeds = list(spec.seeds)
    arms = [a for a in record["arms"] if any(d["clip_ids"] for d in a["data"].values())]
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
    for a in arms:
        if a["same_as"]:
            by_arm[a["name"]] = by_arm[a["same_as"]]
    names = [a["name"] for a in arms]
    arm_objs = [Arm(a["name"], a["kind"], a["description"], tuple(a["stages"]), {}, a["meta"], a["same_as"])
                for a in arms]
    cmps = comparisons_of(arm_objs)
    sets = {}
    for set_name in record["eval"]["sets"]:
        per_run = {n: {s: by_arm[n][s]["eval"][set_name] for s in seeds} for n in names}
        sets[set_name] = summarize(per_run, names, seeds, cmps, spec.bootstrap, spec.bootstrap_seed)
    out = {"study": spec.name, "out_dir": record["out_dir"], "spec": record["spec"],
           "eval": {k: v for k, v in record["eval"].items() if k != "sets"},
           "eval_sets": sets,
           "arms": [{k: a[k] for k in ("name", "kind", "description", "stages", "meta", "same_as")}
                    | {"clips_per_seed": {s: len(d["clip_ids"]) for s, d in a["data"].items()}}
                    for a in record["arms"]],
           "split": {"train_sources": len(record["split"]["train_sources"]),
                     "heldout_sources": len(record["split"]["heldout_sources"]),
                     "heldout_source_paths": record["split"]["heldout_source_paths"]},
           "runs": [{"arm": r["arm"], "seed": r["seed"], "seconds": r["seconds"],
                     "stages": r["stages"]} for r in results],
           "versions": record["versions"]}
    sweep = [a for a in arms if a["kind"] == "sweep"]
    if sweep and spec.sweep_metric not in sets:
        log.warning("sweep: no %s clips (the held-out sources have none), so no setting is chosen",
                    spec.sweep_metric)
    if sweep and spec.sweep_metric in sets:
        table = sets[spec.sweep_metric]["arms"]
        best = min(sweep, key=lambda a: (table[a["name"]]["mean"], a["meta"]["percentile"]))
        m = best["meta"]
        side, q = m["side"], m["percentile"]
        override = (f"{m['step']}.rules.{m['column']}=null" if q == 0
                    else f"{m['step']}.rules.{m['column']}={{{side}: {q:g}}}")
        out["sweep"] = {"column": m["column"], "side": side, "metric": spec.sweep_metric,
                        "settings": [{"arm": a["name"], "percentile": a["meta"]["percentile"],
                                      "threshold": a["meta"]["threshold"], "clips": a["meta"]["clips"],
                                      **{k: sets[s]["arms"][a["name"]][k] for s in [spec.sweep_metric]
                                         for k in ("mean", "ci95")}} for a in sweep],
                        "best": {"arm": best["name"], "percentile": q, "threshold": m["threshold"],
                                 "refilter": f"curate refilter {record['out_dir']} --set '{override}'",
                                 "override": override}}
    return out


def write_back(out_dir: str, name: str) -> dict[str, Any]:
    """Apply the sweep's best setting to the output as its rule (`curate refilter`)."""
    from curation.refilter import refilter

    path = study_dir(out_dir, name) / "results.json"
    if not path.exists():
        raise StudyError(f"{path} does not exist: run the study first")
    results = json.loads(path.read_text())
    if "sweep" not in results:
        raise StudyError(f"study {name} has no sweep to write back")
    best = results["sweep"]["best"]
    log.info("writing back %s (held-out loss %.4f) with refilter", best["override"],
             next(s["mean"] for s in results["sweep"]["settings"] if s["arm"] == best["arm"]))
    return refilter(out_dir, [best["override"]])


def format_results(results: dict[str, Any]) -> str:
    """The headline table for the terminal."""
    lines = []
    for set_name, s in results["eval_sets"].items():
        lines.append(f"{set_name}: {s['clips']} clips from {s['sources']} held-out sources, {s['samples']} samples; "
                     f"95% intervals over {s['interval_covers']}")
        lines += [f"  note: {n}" for n in s.get("notes", [])]
        for arm, a in s["arms"].items():
            lines.append(f"  {arm:<34} {a['mean']:.4f}  [{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]")
        for c in s["comparisons"]:
            lines.append(f"  {c['label']:<60} {c['difference']:+.4f}  [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                         f"  {c['verdict']}")
    if "sweep" in results:
        b = results["sweep"]["best"]
        thr = "no rule" if b["threshold"] is None else fmt(b["threshold"])
        lines.append(f"sweep {results['sweep']['column']}: lowest {results['sweep']['metric']} loss at "
                     f"{results['sweep']['side']} {b['percentile']:g} ({thr}); apply with: {b['refilter']}")
    return "\n".join(lines)


# ---- the command ------------------------------------------------------------------------

def _floats(text: str) -> tuple[float, ...]:
    """'0,10,25,50' (percent) or '0,0.1,0.25' (fractions) -> fractions."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(v >= 1 for v in values):
        values = [v / 100 for v in values]
    return tuple(values)


def _seeds(text: str) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
    if "," in text:
        return tuple(int(v) for v in text.split(",") if v.strip())
    return tuple(range(int(text)))


def ablate_command(argv: list[str]) -> int:
    """`curate ablate`: the proxy-model study. Returns a process exit code."""
    import argparse

    from training.config import SIZES

    p = argparse.ArgumentParser(
        prog="curate ablate",
        description="Does curation help? Train small proxy models on curated, uncurated (same size and "
                    "frames), leave-one-rule-out and threshold-sweep subsets of one curated output and "
                    "compare their denoising loss on held-out sources. Writes OUT_DIR/study/NAME/"
                    "{index.html,results.json,study.json}.")
    p.add_argument("out_dir", help="a finished curation output (with clips/: run.store_all_clips true)")
    p.add_argument("--name", default="default", help="study name: OUT_DIR/study/NAME (default: default)")
    p.add_argument("--preset-size", default="tiny", choices=list(SIZES),
                   help="tiny (default), small; base, large on GPUs (latent space: --set latent_autoencoder=PATH)")
    p.add_argument("--stages", default="image,video", help="stage plan of every arm (default image,video)")
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a list 0,5,7 (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for every arm (STAGE.KEY=VALUE for one stage), as curate train")
    p.add_argument("--holdout-fraction", type=float, default=0.25, help="share of sources held out (default 0.25)")
    p.add_argument("--holdout-source", action="append", default=[], metavar="ID_OR_PATH",
                   help="hold out this source (repeatable; replaces the fraction)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--leave-one-out", default="", metavar="COLUMNS",
                   help="also train with each of these rules left out (comma list, or all)")
    p.add_argument("--sweep", default="", metavar="COLUMN", help="threshold sweep on this rule's column")
    p.add_argument("--percentiles", default="0,10,25,50",
                   help="sweep: shares dropped, percent or fractions (default 0,10,25,50; 0 = no rule)")
    p.add_argument("--sweep-side", default="auto", choices=["auto", "drop_bottom", "drop_top"])
    p.add_argument("--sweep-metric", default="heldout_all", choices=list(EVAL_SETS))
    p.add_argument("--no-pretrain-compare", action="store_true",
                   help="skip the curated arm's video stage without image pretraining (SVD Fig. 3a)")
    p.add_argument("--eval-windows", type=int, default=4, help="frame windows per held-out clip (default 4)")
    p.add_argument("--eval-sigmas", type=int, default=8, help="noise levels in the fixed grid (default 8)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default 2000)")
    p.add_argument("--max-clips", type=int, default=20_000,
                   help="the study's corpus: at most about this many clips, whole sources sampled by a hash "
                        "of their id (default 20000)")
    p.add_argument("--runner", default="local", choices=["local", "ray"],
                   help="local: runs one after another here; ray: every (arm, seed) as a Ray task")
    p.add_argument("--ray-address", default=None, help="ray runner: a cluster (e.g. auto); default embedded")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="ray runner: CPUs per run (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--rerun", default=None, metavar="STUDY_JSON",
                   help="train a recorded study again (its clips, configs, seeds) under --name")
    p.add_argument("--write-back", action="store_true",
                   help="after the study, write the sweep's best setting back as the rule (curate refilter)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study of this name")
    args = p.parse_args(argv)
    try:
        kwargs = dict(runner=args.runner, ray_address=args.ray_address, num_cpus=args.num_cpus,
                      cpus_per_task=args.cpus_per_run, threads=args.threads, overwrite=args.overwrite)
        if args.rerun:
            results = rerun_study(args.rerun, args.name, args.out_dir, **kwargs)
        else:
            spec = StudySpec(
                name=args.name, preset_size=args.preset_size,
                stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
                overrides=tuple(args.overrides), seeds=_seeds(args.seeds),
                holdout_fraction=args.holdout_fraction, holdout_sources=tuple(args.holdout_source),
                split_seed=args.split_seed,
                pretrain_compare=not args.no_pretrain_compare,
                leave_one_out=tuple(c.strip() for c in args.leave_one_out.split(",") if c.strip()),
                sweep_column=args.sweep, sweep_percentiles=_floats(args.percentiles) if args.sweep else (),
                sweep_side=args.sweep_side, sweep_metric=args.sweep_metric, eval_windows=args.eval_windows,
                eval_sigmas=args.eval_sigmas, bootstrap=args.bootstrap, max_clips=args.max_clips)
            results = run_study(args.out_dir, spec, **kwargs)
        print(format_results(results))
        print(f"page: {study_dir(args.out_dir, args.name) / 'index.html'}")
        if args.write_back:
            r = write_back(args.out_dir, args.name)
            print(f"wrote back {results['sweep']['best']['override']}: kept {r['kept_before']} -> {r['kept']} clips")
    except (StudyError, ValueError, FileNotFoundError) as exc:
        print(f"curate ablate: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ablate_command", "StudySpec", "StudyError", "Corpus", "Arm", "load_corpus", "split_sources", "plan_arms",
           "matched_sample", "prepare_study", "run_study", "rerun_study", "run_tasks", "run_task",
           "evaluate_checkpoint", "summarize", "analyze", "write_back", "format_results", "sigma_grid",
           "keep_under", "effective_steps", "write_clip_files", "is_percentile"]
