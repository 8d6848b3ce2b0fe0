"""The arms of a study (curated, uncurated, leave-one-out, sweep, no pretraining) and their clips per seed."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.study.corpus import Corpus
from training.study.rules import (effective_steps, keep_under, rule_step, ruled_columns, sweep_side, with_percentile,
                                 without_rule)
from training.study.spec import StudyError, StudySpec

log = logging.getLogger(__name__)

FRAME_TOLERANCE = 0.005  # uncurated arm: total frames within 0.5% of curated's (or one clip's worth)


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
    """The arms of a study (see the package docstring), each with its clip ids per seed."""
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

