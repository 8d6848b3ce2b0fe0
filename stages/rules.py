"""Filter rules: parsing, evaluation, and resolution of percentile rules.

One rule constrains one numeric scores column. Two forms:

    {min: 1.0, max: 30}          absolute: reject values below min / above max
    {drop_bottom: 0.25}          percentile: reject the lowest 25% of the run's values
    {drop_top: 0.25}             percentile: reject the highest 25%
    {drop_bottom: 0.1, drop_top: 0.1}  both ends

Within a filter step rules are evaluated in column-name order (so reject_reasons come out
in that order whatever order the YAML had); filter steps in pipeline order.

A rule is either absolute or percentile, never both (the resolved min/max of a percentile rule
would silently fight a hand-written one). Fractions are strictly between 0 and 1, and
drop_bottom + drop_top < 1.

Percentile rules cannot be evaluated on one batch: they need every committed clip's value, so
the filter stage skips them inline and `curation.finalize.finalize` resolves them at the end
of the run (`resolve_steps`, one `resolve_percentile` per rule) and evaluates every rule again
over the stored scores (`effective_steps`, then `evaluate_rows`). This module holds that logic;
curation/finalize.py only reads the stored scores and writes the results. The resolution
convention, over the n non-missing values of clip rows (source-error rows are not clips),
sorted ascending as s[0..n-1], with k = floor(q * n):

    drop_bottom q -> min = s[k]          values < min are rejected
    drop_top q    -> max = s[n - 1 - k]  values > max are rejected

so exactly k clips are dropped at each end when the values are distinct, and fewer (never
more) when values tie at the threshold: a tie is never split arbitrarily. Missing values are
rejected as "<column>:missing" by every rule, as with absolute rules.

Reason strings are the same for both forms ("motion_score<2.31457", "motion_score:missing"),
so a reader of the scores table does not need to know how the threshold was chosen; run.json
records the resolved numbers under "resolved_rules".
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

ABSOLUTE_KEYS = ("min", "max")
PERCENTILE_KEYS = ("drop_bottom", "drop_top")

Rules = dict[str, dict[str, float]]


# ---- parsing ----------------------------------------------------------------------------------

def validate_rules(rules: Any, columns: Collection[str] | None = None) -> Rules:
    """Checked, normalised rules; ValueError names the offending column or key.

    `columns` are the numeric scores columns a rule may name (curation.schema.NUMERIC_COLUMNS:
    the data contract lives above this floor, so the caller that knows it passes it in; the
    config check does for every filter step). None skips the column check.
    """
    if not isinstance(rules, dict):
        raise ValueError("rules must be a mapping {column: {min, max} or {drop_bottom, drop_top}}")
    checked: Rules = {}
    for column, bounds in rules.items():
        if columns is not None and column not in columns:
            raise ValueError(f"rules.{column}: unknown column; allowed: {', '.join(columns)}")
        if not isinstance(bounds, dict) or not bounds:
            raise ValueError(f"rules.{column} must be a mapping with min and/or max, "
                             "or drop_bottom and/or drop_top")
        unknown = sorted(set(bounds) - set(ABSOLUTE_KEYS) - set(PERCENTILE_KEYS))
        if unknown:
            raise ValueError(f"rules.{column}: unknown key(s) {unknown}; "
                             "allowed: min, max, drop_bottom, drop_top")
        for key, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"rules.{column}.{key} must be a number, got {value!r}")
        absolute = [k for k in bounds if k in ABSOLUTE_KEYS]
        percentile = [k for k in bounds if k in PERCENTILE_KEYS]
        if absolute and percentile:
            raise ValueError(f"rules.{column}: {percentile[0]} cannot be mixed with {absolute[0]} "
                             "in one rule (a percentile rule resolves its own threshold)")
        for key in percentile:
            if not 0.0 < bounds[key] < 1.0:
                raise ValueError(f"rules.{column}.{key} must be a fraction strictly between 0 and 1, "
                                 f"got {bounds[key]!r}")
        if len(percentile) == 2 and bounds["drop_bottom"] + bounds["drop_top"] >= 1.0:
            raise ValueError(f"rules.{column}: drop_bottom + drop_top must be < 1")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise ValueError(f"rules.{column}: min {bounds['min']} > max {bounds['max']}")
        checked[column] = {k: float(v) for k, v in bounds.items()}
    # Columns in name order: run.json is written with sorted keys, so this is the one order
    # a fresh run, `curate refilter` and the report can all agree on for reasons and cascade.
    return dict(sorted(checked.items()))


def is_percentile(bounds: dict[str, float]) -> bool:
    return any(k in bounds for k in PERCENTILE_KEYS)


def absolute_rules(rules: Rules) -> Rules:
    return {c: b for c, b in rules.items() if not is_percentile(b)}


def percentile_rules(rules: Rules) -> Rules:
    return {c: b for c, b in rules.items() if is_percentile(b)}


def filter_steps(config: dict[str, Any]) -> list[tuple[str, Rules]]:
    """[(step name, validated rules)] of the filter steps of a config dict, in pipeline order."""
    steps = []
    for step in config.get("steps", []):
        if step.get("stage") == "filter":
            steps.append((step.get("name", "filter"),
                          validate_rules((step.get("args") or {}).get("rules") or {})))
    return steps


# ---- evaluation -------------------------------------------------------------------------------

def fmt(value: float) -> str:
    return f"{value:g}"


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rule_reasons(row_value: Any, column: str, bounds: dict[str, float]) -> list[str]:
    """The reasons one absolute rule gives for one value (empty when it passes)."""
    if is_missing(row_value):
        return [f"{column}:missing"]
    reasons = []
    if "min" in bounds and row_value < bounds["min"]:
        reasons.append(f"{column}<{fmt(bounds['min'])}")
    if "max" in bounds and row_value > bounds["max"]:
        reasons.append(f"{column}>{fmt(bounds['max'])}")
    return reasons


def is_source_error(split_error: Any, start_frame: Any) -> bool:
    """A row that is not a clip: the source could not be split."""
    return split_error is not None and start_frame is None


def rule_checks(is_error: np.ndarray, values: dict[str, np.ndarray],
                steps: Sequence[Rules]) -> list[tuple[int, str, str, np.ndarray]]:
    """Every check of every (absolute) rule, in evaluation order: (step index, column, reason,
    the clip rows it rejects). A rule's checks are "<column>:missing", then its min, then its
    max; source-error rows are never rejected by a rule (they are "split_error"). The one
    evaluation both `evaluate_rows` (refilter, the end-of-run pass) and the review page's
    counts are built from, so they cannot disagree."""
    n = int(is_error.shape[0])
    clip = ~is_error
    out = []
    for index, rules in enumerate(steps):
        for column, bounds in rules.items():
            v = values.get(column)
            if v is None:
                v = np.full(n, np.nan)
            missing = np.isnan(v)
            out.append((index, column, f"{column}:missing", clip & missing))
            with np.errstate(invalid="ignore"):
                if "min" in bounds:
                    out.append((index, column, f"{column}<{fmt(bounds['min'])}", clip & ~missing & (v < bounds["min"])))
                if "max" in bounds:
                    out.append((index, column, f"{column}>{fmt(bounds['max'])}", clip & ~missing & (v > bounds["max"])))
    return out


def evaluate_rows(is_error: np.ndarray, values: dict[str, np.ndarray],
                  steps: Sequence[Rules]) -> tuple[list[bool], list[list[str]]]:
    """keep and reject_reasons of every row under the (absolute) rules of each filter step.

    is_error: bool per row, the row is a source error (`is_source_error`); values: float64
    per row for each ruled column, NaN where missing (a column absent from it is missing for
    every row). Same reasons, order and de-duplication as the filter stage applied step after
    step, so a row's reasons are identical to a fresh run's; vectorised per rule (`rule_checks`)
    because refilter runs it over every clip of a run.
    """
    n = int(is_error.shape[0])
    reasons: list[list[str]] = [[] for _ in range(n)]
    for _, _, reason, mask in rule_checks(is_error, values, steps):
        for i in np.flatnonzero(mask):
            reasons[i].append(reason)
    for i in np.flatnonzero(is_error):
        reasons[i] = ["split_error"]
    reasons = [list(dict.fromkeys(r)) if len(r) > 1 else r for r in reasons]
    return [not r for r in reasons], reasons


def float_values(column_values: Any) -> np.ndarray:
    """A pyarrow column (or a list) as float64 with NaN for null."""
    if hasattr(column_values, "to_numpy"):
        import pyarrow as pa
        import pyarrow.compute as pc

        return pc.cast(column_values, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.asarray([np.nan if is_missing(v) else v for v in column_values], dtype=np.float64)


# ---- percentile resolution --------------------------------------------------------------------

def resolve_percentile(values: np.ndarray | Iterable[float | None], bounds: dict[str, float]) -> dict[str, Any]:
    """Absolute min/max for a percentile rule over the run's values (see the module docstring).

    Returns {"min"/"max": threshold, "drop_bottom"/"drop_top": q, "values": n}; with no
    non-missing value there is nothing to rank and the thresholds are None (every clip is
    then rejected as missing anyway).
    """
    arr = np.asarray(values, dtype=np.float64) if isinstance(values, np.ndarray) else float_values(list(values))
    return resolve_sorted(np.sort(arr[~np.isnan(arr)]), bounds)


def resolve_sorted(arr: np.ndarray, bounds: dict[str, float]) -> dict[str, Any]:
    """`resolve_percentile` over values already sorted ascending, without NaN (the review
    page keeps each column sorted, so a dragged percentile resolves without a sort)."""
    n = int(arr.size)
    out: dict[str, Any] = {k: bounds[k] for k in PERCENTILE_KEYS if k in bounds}
    out["values"] = n
    for key, rank in percentile_ranks(bounds, n).items():
        out[key] = float(arr[rank]) if n else None
    return out


def percentile_ranks(bounds: dict[str, float], n: int) -> dict[str, int]:
    """{"min"/"max": the 0-based rank, in ascending order of n values, a percentile rule takes
    its threshold at} (module docstring); a reader that cannot sort the values (curation/
    finalize.py streams them) finds the values at these ranks."""
    ranks = {}
    # The epsilon keeps q * n = 25.000000000000004 or 24.999999999999996 at 25.
    if "drop_bottom" in bounds:
        ranks["min"] = min(n - 1, int(math.floor(bounds["drop_bottom"] * n + 1e-9)))
    if "drop_top" in bounds:
        ranks["max"] = n - 1 - min(n - 1, int(math.floor(bounds["drop_top"] * n + 1e-9)))
    return ranks


def effective_bounds(bounds: dict[str, float], resolved: dict[str, Any] | None) -> dict[str, float]:
    """The min/max a rule applies: its own, or those resolved for a percentile rule."""
    if not is_percentile(bounds):
        return dict(bounds)
    resolved = resolved or {}
    return {k: resolved[k] for k in ABSOLUTE_KEYS if resolved.get(k) is not None}


def resolve_steps(steps: Sequence[tuple[str, Rules]],
                  values: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """{step: {column: resolved}} for every percentile rule of every filter step.

    values: each ruled column's values over the run's clip rows (source-error rows are not
    clips), NaN where missing; a column absent from it has no value to rank.
    """
    resolved: dict[str, dict[str, Any]] = {}
    for step_name, rules in steps:
        for column, bounds in percentile_rules(rules).items():
            resolved.setdefault(step_name, {})[column] = resolve_percentile(values.get(column, np.zeros(0)), bounds)
    return resolved


def effective_steps(steps: Sequence[tuple[str, Rules]], resolved: Mapping[str, dict[str, Any]]) -> list[Rules]:
    """Every filter step's rules as absolute min/max (what `evaluate_rows` takes): percentile
    rules replaced by their resolution, in the same step and column order."""
    return [{c: effective_bounds(b, resolved.get(name, {}).get(c)) for c, b in rules.items()}
            for name, rules in steps]


def reason_column(reason: str) -> str:
    """The column a reason string is about ("motion_score<1" -> "motion_score")."""
    for i, ch in enumerate(reason):
        if ch in "<>:":
            return reason[:i]
    return reason
