"""Statistics: each arm's mean held-out loss, bootstrap intervals and paired differences."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.study.arms import Arm
from training.study.spec import StudyError

MIN_SOURCE_UNITS = 5  # bootstrap whole sources when a held-out set has at least this many


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

