"""Reviewers' labels: "keep" or "drop" on clips they watched, kept in OUT_DIR/review/labels.json
and measured against the rules.

The file is small (one entry a labelled clip) and rewritten whole, atomically, at each change
(one PUT on an object store), under a lock: labels from two tabs land one after the other,
none lost. A restarted server reads it back.

Against the rules as they stand (`agreement`): the labelled clips the rules drop though
labelled keep, and keep though labelled drop; per rule, the clips labelled keep it rejects
and those labelled drop it passes. `propose`: per ruled score, the threshold that agrees best
with the labels on that score alone (labelled keep at or past it, labelled drop short of it),
ties going to the looser threshold, and the clips the rules would keep with it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir
from curation.review.data import Evaluation, ReviewData
from curation.writer import OutputStore
from stages.rules import Rules

LABELS = ("keep", "drop")


class Labels:
    def __init__(self, store: OutputStore, data: ReviewData):
        self.path = store.root / "review" / "labels.json"
        self.data = data
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.entries = json.loads(self.path.read_text()).get("labels", {})

    def set(self, clip_id: str, label: str | None, who: str = "") -> int:
        """Label a clip (None removes its label); returns how many clips are labelled."""
        if label is not None and label not in LABELS:
            raise ValueError(f"a label is one of {', '.join(LABELS)} (or null to remove it), got {label!r}")
        found = self.data.row_of(clip_id)
        if found is None or not self.data.is_clip[found]:
            raise ValueError(f"no clip {clip_id!r} in this output")
        with self._lock:
            if label is None:
                self.entries.pop(clip_id, None)
            else:
                self.entries[clip_id] = {"label": label, "at": round(time.time(), 3), **({"by": who} if who else {})}
            if isinstance(self.path, Path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            outdir.write_json(self.path, {"labels": self.entries})
            return len(self.entries)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(the rows of the labelled clips in this output, True where labelled keep)."""
        with self._lock:
            items = [(c, e["label"] == "keep") for c, e in self.entries.items()]
        if not items:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        ids = pa.array([c for c, _ in items], pa.string())
        at = pc.index_in(ids, value_set=self.data.clip_ids).to_numpy(zero_copy_only=False)
        keep = np.array([k for _, k in items], bool)
        present = ~np.isnan(at.astype(np.float64))
        return at[present].astype(np.int64), keep[present]

    def label_of(self, clip_id: str) -> str | None:
        entry = self.entries.get(clip_id)
        return entry["label"] if entry else None

    def agreement(self, evaluation: Evaluation) -> dict[str, Any]:
        rows, keep = self.rows()
        kept = evaluation.keep[rows]
        masks = evaluation.masks
        return {
            "labelled": int(rows.size), "labelled_keep": int(keep.sum()), "labelled_drop": int((~keep).sum()),
            "dropped_but_keep": int((keep & ~kept).sum()), "kept_but_drop": int((~keep & kept).sum()),
            "agree": int((keep == kept).sum()),
            "rules": [{"step": r.step, "column": r.column,
                       "rejects_keep": int((masks[(r.index, r.column)][rows] & keep).sum()),
                       "passes_drop": int((~masks[(r.index, r.column)][rows] & ~keep).sum())}
                      for r in evaluation.rules],
        }

    def propose(self, steps: list[tuple[str, Rules]], evaluation: Evaluation) -> list[dict[str, Any]]:
        """Per rule and side (min for a min or drop_bottom rule, max for max or drop_top),
        the threshold that agrees best with the labels on that score (ties: the looser), and
        the clips the rules would keep with it in place of the rule's bound."""
        rows, keep = self.rows()
        out = []
        for rule in evaluation.rules:
            values = self.data.values.get(rule.column)
            if values is None:
                continue
            v = values[rows]
            has = ~np.isnan(v)
            sides = [s for s, keys in (("min", ("min", "drop_bottom")), ("max", ("max", "drop_top")))
                     if any(k in rule.bounds for k in keys)]
            for side in sides:
                threshold, agree = best_threshold(v[has], keep[has], side)
                bounds = {k: b for k, b in rule.effective.items() if k != side}
                if threshold is not None:
                    bounds[side] = threshold
                trial = [(name, {c: (bounds if (name, c) == (rule.step, rule.column) else b)
                                 for c, b in rules.items() if (name, c) != (rule.step, rule.column) or bounds})
                         for name, rules in steps]
                out.append({"step": rule.step, "column": rule.column, "side": side, "value": threshold,
                            "agree": agree, "of": int(has.sum()), "kept": self.data.evaluate(trial).kept})
        return out


def best_threshold(values: np.ndarray, keep: np.ndarray, side: str) -> tuple[float | None, int]:
    """The `side` ("min" or "max") threshold over labelled `values` that agrees with the most
    labels (keep: value passes it; drop: value fails it), and that count. Candidates: no bound
    (None), each labelled value, and just past the last one; of equal agreement the looser
    wins (the lowest min, the highest max, no bound loosest of all)."""
    if side == "max":  # a max on v is a min on -v
        t, agree = best_threshold(-values, keep, "min")
        return (None if t is None else -t), agree
    order = np.argsort(values, kind="stable")
    v, k = values[order], keep[order]
    n_keep, n = int(k.sum()), int(v.size)
    best, best_agree = None, n_keep  # no bound: every labelled keep agrees, no drop does
    # Each labelled value (a min there passes it), and just above the highest (passes none).
    candidates = np.append(np.unique(v), np.nextafter(v[-1], np.inf)) if n else v
    # With min t: keep-labelled v >= t pass, drop-labelled v < t fail.
    keep_below = np.searchsorted(v[k], candidates, side="left")
    drop_below = np.searchsorted(v[~k], candidates, side="left")
    agree = (n_keep - keep_below) + drop_below
    if n and candidates.size:
        i = int(np.argmax(agree))  # the first maximum: the lowest, loosest min
        if agree[i] > best_agree:
            best, best_agree = float(candidates[i]), int(agree[i])
    return best, best_agree
