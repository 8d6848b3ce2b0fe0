"""filter: threshold stored scores with rules {column: {min, max}}; drops nothing.

Adds `keep` (bool) and `reject_reasons` (list of strings). Every rule is evaluated on every
row and every failed rule is recorded:
  "motion_score<0.5"      below min          "motion_score>30"   above max
  "motion_score:missing"  the score is NaN or null (a failed or skipped stage): never a pass
  "split_error"           the source could not be split (an error row, not a clip)
Reasons already present (from an earlier filter step) are kept, so a cheap filter early in
the pipeline and a final filter at the end accumulate; keep = no reasons at all. Within a
step, rules are evaluated in column-name order (stages/rules.py says why).

Percentile rules ({drop_bottom: 0.25} / {drop_top: 0.25}, stages/rules.py) need the whole
run's values, which one batch does not have: this stage skips them, and
`curation.finalize.finalize` resolves them after the last unit is committed and evaluates
every rule of every filter step again over the stored scores.
"""

from __future__ import annotations

from stages.rules import (  # noqa: F401  (re-exported: the rule language lives in stages.rules)
    Rules,
    absolute_rules,
    fmt,
    percentile_rules,
    rule_reasons,
    validate_rules,
)
from stages.base import Batch, Stage, produced_columns


class FilterStage(Stage):
    """Evaluate every absolute rule on every row; record keep and all reasons."""

    name = "filter"
    outputs = ("keep", "reject_reasons")

    def __init__(self, rules: dict[str, dict[str, float]] | None = None):
        # Any column some stage produces; the config check narrows this to the numeric scores
        # columns of the data contract (curation.schema.NUMERIC_COLUMNS).
        self.rules = validate_rules(rules or {}, sorted(produced_columns() - set(self.outputs)))
        self.inline_rules = absolute_rules(self.rules)

    @property
    def percentile_rules(self) -> Rules:
        """Rules resolved over the whole run at its end (skipped here)."""
        return percentile_rules(self.rules)

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
            for column, bounds in self.inline_rules.items():
                values = batch.get(column)
                row_reasons.extend(rule_reasons(values[i] if values is not None else None, column, bounds))
            row_reasons = list(dict.fromkeys(row_reasons))  # dedupe, keep order
            reasons.append(row_reasons)
            keep.append(not row_reasons)
        return {**batch, "keep": keep, "reject_reasons": reasons}
