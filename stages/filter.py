"""filter: threshold stored scores with rules {column: {min, max}}; drops nothing.

Adds `keep` (bool) and `reject_reasons` (list of strings). Every rule is evaluated on every
row and every failed rule is recorded:
  "motion_score<0.5"      below min          "motion_score>30"   above max
  "motion_score:missing"  the score is NaN or null (a failed or skipped stage): never a pass
  "split_error"           the source could not be split (an error row, not a clip)
Reasons already present (from an earlier filter step) are kept, so a cheap filter early in
the pipeline and a final filter at the end accumulate; keep = no reasons at all.
"""

from __future__ import annotations

import math
from typing import Any

from curation.schema import SCORES_SCHEMA
from stages.base import Batch, Stage

NUMERIC_COLUMNS = sorted(
    f.name for f in SCORES_SCHEMA
    if str(f.type) in ("double", "float", "int32", "int64") and f.name not in ("start_frame", "end_frame")
)


def validate_rules(rules: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Checked, normalised rules; ValueError names the offending column or key."""
    if not isinstance(rules, dict):
        raise ValueError("rules must be a mapping {column: {min, max}}")
    checked: dict[str, dict[str, float]] = {}
    for column, bounds in rules.items():
        if column not in NUMERIC_COLUMNS:
            raise ValueError(f"rules.{column}: unknown column; allowed: {', '.join(NUMERIC_COLUMNS)}")
        if not isinstance(bounds, dict) or not bounds:
            raise ValueError(f"rules.{column} must be a mapping with min and/or max")
        unknown = sorted(set(bounds) - {"min", "max"})
        if unknown:
            raise ValueError(f"rules.{column}: unknown key(s) {unknown}; allowed: min, max")
        for key, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"rules.{column}.{key} must be a number, got {value!r}")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise ValueError(f"rules.{column}: min {bounds['min']} > max {bounds['max']}")
        checked[column] = {k: float(v) for k, v in bounds.items()}
    return checked


def fmt(value: float) -> str:
    return f"{value:g}"


def rule_reasons(row_value: Any, column: str, bounds: dict[str, float]) -> list[str]:
    """The reasons one rule gives for one value (empty when it passes)."""
    if row_value is None or (isinstance(row_value, float) and math.isnan(row_value)):
        return [f"{column}:missing"]
    reasons = []
    if "min" in bounds and row_value < bounds["min"]:
        reasons.append(f"{column}<{fmt(bounds['min'])}")
    if "max" in bounds and row_value > bounds["max"]:
        reasons.append(f"{column}>{fmt(bounds['max'])}")
    return reasons


class FilterStage(Stage):
    """Evaluate every rule on every row; record keep and all reasons."""

    name = "filter"
    outputs = ("keep", "reject_reasons")

    def __init__(self, rules: dict[str, dict[str, float]] | None = None):
        self.rules = validate_rules(rules or {})

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["clip_id"])
        previous = batch.get("reject_reasons") or [None] * n
        keep, reasons = [], []
        for i in range(n):
            row_reasons = list(previous[i] or [])
            if batch["split_error"][i] is not None and batch["start_frame"][i] is None:
                # A source-error row is not a clip; its scores are absent, not failed.
                reasons.append(list(dict.fromkeys(row_reasons + ["split_error"])))
                keep.append(False)
                continue
            for column, bounds in self.rules.items():
                values = batch.get(column)
                row_reasons.extend(rule_reasons(values[i] if values is not None else None, column, bounds))
            row_reasons = list(dict.fromkeys(row_reasons))  # dedupe, keep order
            reasons.append(row_reasons)
            keep.append(not row_reasons)
        return {**batch, "keep": keep, "reject_reasons": reasons}
