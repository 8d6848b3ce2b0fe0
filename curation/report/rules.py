"""The filter rules of a run as the report shows them, and which rule a stored reason is about.

`rules_of_run(run)`: every filter step's rules from run.json's config, in pipeline order, with
the thresholds a percentile rule resolved to (run.json's resolved_rules, curation/finalize.py)
and whether the rule was applied (run.json's skipped_steps / rules_not_applied); with a dedup
section, near-duplicate removal counts as one more rule. `attribute_reason(reason, rules)`: the
rules a stored reason belongs to ("motion_score<1" -> the motion_score rule; when two steps rule
the same column the threshold in the reason picks the step, and ":missing" counts for each).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from curation import schema
from stages.rules import effective_bounds, fmt, is_percentile, reason_column, validate_rules

log = logging.getLogger(__name__)

DUPLICATE_REASON = "duplicate_of"  # reasons "duplicate_of:<clip_id>" (curation/dedup/)


def _not_applied_items(run: dict[str, Any]) -> list[dict[str, Any]]:
    """run.json's rules_not_applied, normalised to {step, column, bounds, reason}.

    curation/preflight.py writes {"step", "column", "rule": bounds}; plain strings
    ("column" or "step.column") are accepted too.
    """
    items = []
    for item in run.get("rules_not_applied") or []:
        if isinstance(item, str):
            parts = item.split(".")
            items.append({"step": parts[0] if len(parts) > 1 else None, "column": parts[-1],
                          "bounds": {}, "reason": None})
        elif isinstance(item, dict):
            rule = item.get("rule")
            column = item.get("column") or (rule if isinstance(rule, str) else None)
            if column:
                items.append({"step": item.get("step"), "column": column,
                              "bounds": dict(rule) if isinstance(rule, dict) else dict(item.get("bounds") or {}),
                              "reason": item.get("reason")})
    return items


def _rule_entry(step: str | None, column: str, bounds: dict[str, float], resolved: dict[str, Any] | None,
                applied: bool, note: str | None, stage_skipped: bool) -> dict[str, Any]:
    percentile = is_percentile(bounds)
    effective = effective_bounds(bounds, resolved)
    if applied and percentile and not effective and note is None:
        note = ("no value to rank: every clip lacks it" if resolved
                else "percentile rule not resolved (the end-of-run pass did not run)")
    return {"id": f"{step}.{column}" if step else column, "step": step, "column": column, "bounds": bounds,
            "percentile": percentile, "resolved": resolved, "effective": effective,
            "applied": applied, "stage_skipped": stage_skipped, "note": note}


def rules_of_run(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The filter rules of a run, in pipeline order, with thresholds and applied status.

    Rules preflight dropped (their stage was skipped) are not in the recorded config; they
    come from rules_not_applied and are listed, not applied, after their step's rules.
    """
    resolved_all = run.get("resolved_rules") or {}
    not_applied = _not_applied_items(run)
    skipped_note: dict[str, str] = {}
    for s in run.get("skipped_steps") or []:
        first_line = str(s.get("reason") or "").strip().splitlines()[:1]
        for column in s.get("columns") or []:
            skipped_note.setdefault(column, f"stage {s.get('step')} skipped"
                                    + (f": {first_line[0].rstrip(':')}" if first_line else ""))
    raw_steps = [(s.get("name", "filter"), (s.get("args") or {}).get("rules") or {})
                 for s in (run.get("config") or {}).get("steps", []) if s.get("stage") == "filter"]
    rules: list[dict[str, Any]] = []
    matched: set[int] = set()
    for step, raw in raw_steps:
        try:
            checked = validate_rules(raw, schema.NUMERIC_COLUMNS)
        except ValueError as exc:  # a run.json written by another version: show, do not fail
            log.warning("filter step %s: %s", step, exc)
            checked = {c: dict(b) for c, b in raw.items() if isinstance(b, dict)}
        for column, bounds in checked.items():
            k = next((k for k, x in enumerate(not_applied)
                      if x["column"] == column and x["step"] in (None, step)), None)
            if k is not None:
                matched.add(k)
                note = not_applied[k]["reason"] or skipped_note.get(column) or "not applied"
            else:
                note = skipped_note.get(column)
            # A rule on a skipped stage's column that is still in the config counts as not
            # applied unless it rejected clips (decided in summarize).
            rules.append(_rule_entry(step, column, bounds, (resolved_all.get(step) or {}).get(column),
                                     k is None, note, column in skipped_note))
        for k, x in enumerate(not_applied):
            if k not in matched and x["step"] == step:
                matched.add(k)
                rules.append(_rule_entry(step, x["column"], x["bounds"], None, False,
                                         x["reason"] or skipped_note.get(x["column"]) or "not applied",
                                         x["column"] in skipped_note))
    for k, x in enumerate(not_applied):
        if k not in matched:
            rules.append(_rule_entry(x["step"], x["column"], x["bounds"], None, False,
                                     x["reason"] or skipped_note.get(x["column"]) or "not applied",
                                     x["column"] in skipped_note))
    dedup = (run.get("config") or {}).get("dedup")
    if dedup is not None:  # near-duplicate removal (curation/dedup/) acts like one more rule
        entry = _rule_entry("dedup", DUPLICATE_REASON, {}, None, True, "near-duplicate removal", False)
        done = run.get("dedup") or {}
        entry["threshold"] = (f"cosine >= {fmt(1 - done.get('eps', dedup.get('eps') or 0))}, match >= "
                              f"{fmt(done.get('min_match', dedup.get('min_match') or 0))}")
        rules.append(entry)
    columns = Counter(r["column"] for r in rules)
    for r in rules:
        r["label"] = r["column"] if columns[r["column"]] == 1 else r["id"]
        r["threshold"] = r.get("threshold") or threshold_text(r)
    return rules


def threshold_text(rule: dict[str, Any]) -> str:
    b, e = rule["bounds"], rule["effective"]
    parts = []
    for key, word in (("drop_bottom", "bottom"), ("drop_top", "top")):
        if key in b:
            parts.append(f"drop {word} {100 * b[key]:g}%")
    spec = " & ".join(parts)
    if "min" in e and "max" in e:
        rng = f"{fmt(e['min'])} <= x <= {fmt(e['max'])}"
    elif "min" in e:
        rng = f"min {fmt(e['min'])}"
    elif "max" in e:
        rng = f"max {fmt(e['max'])}"
    else:
        rng = "unresolved"
    return f"{spec} -> {rng}" if spec else rng


def attribute_reason(reason: str, rules: list[dict[str, Any]]) -> list[int]:
    """Indices of the rules a stored reason belongs to (see the module docstring)."""
    column = reason_column(reason)
    candidates = [i for i, r in enumerate(rules) if r["column"] == column]
    if len(candidates) <= 1 or reason.endswith(":missing"):
        return candidates
    op, value = reason[len(column)], reason[len(column) + 1:]
    key = "min" if op == "<" else "max"
    exact = [i for i in candidates if key in rules[i]["effective"] and fmt(rules[i]["effective"][key]) == value]
    return exact[:1] or candidates[:1]


def unexplained_rule(reason: str) -> dict[str, Any]:
    """A rule line for a reason no configured rule explains (e.g. an older config)."""
    column = reason_column(reason)
    return {"id": column, "step": None, "column": column, "bounds": {}, "percentile": False,
            "resolved": None, "effective": {}, "applied": True, "stage_skipped": False,
            "note": "not in the run's config", "label": column, "threshold": "?"}
