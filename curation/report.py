"""`curate report OUT`: filter statistics of a run, computed from the written tables only.

`funnel(out_dir)` / `format_funnel(f)`: the short funnel (sources, clips, kept, rejections per
reason) as a dict and as text.

`write_report(out_dir)` writes OUT/report/:
    index.html    one self-contained page (images, plots and videos inline as data: URLs;
                  opens from disk with no server and no network)
    summary.json  every number on the page (returned as a dict too)
    sources.csv   the per-source table in full (the page shows the largest sources)
    plots/*.png   funnel, one histogram per score (kept/rejected, thresholds drawn), overlaps
`format_summary(summary)` is the headline table for the terminal.
With a dedup section in the run's config, the page also has a near-duplicates section
(curation/dedup_report.py) and the reasons "duplicate_of:<clip_id>" count as one rule.

Where the numbers come from:
- rules: run.json's config (every filter step's args.rules, pipeline order) plus
  run.json's resolved_rules (thresholds of percentile rules, curation/refilter.py);
  run.json's skipped_steps / rules_not_applied mark rules that were not applied;
- which rule rejected a clip: the stored reject_reasons, each reason attributed to the rule on
  its column ("motion_score<1" -> the motion_score rule; when two steps rule the same column
  the threshold in the reason picks the step, and ":missing" counts for each of them);
- cascade: rules in pipeline order, each removing the clips no earlier rule removed, so the
  last line equals the kept clips; "only this rule": clips whose every reason is that rule's;
  overlaps: clips rejected by both of two rules, and the most frequent exact combinations.
Source-error rows ("split_error") are not clips: they are counted per stage under errors, and
per source by their source_status (unreadable, decode_error, no_clips, worker_died,
timed_out; curation/schema.py) in totals.source_outcomes, so sources that decoded but had no
shot long enough are told apart from unreadable ones.

Size at scale: plots are drawn from histogram counts; galleries show at most
`max_gallery` rejected clips per rule (the most borderline ones, then a spread of the rest)
and `max_strip` kept clips just inside the threshold; at most `max_videos` kept clips are
embedded as playable H.264 (and at most `max_video_bytes` in all). Keyframes and videos are
read only for those clips, one parquet row group at a time.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema
from stages.rules import (
    ABSOLUTE_KEYS,
    effective_bounds,
    fmt,
    is_percentile,
    reason_column,
    validate_rules,
)
from curation.report_html import format_outcomes
from curation.writer import OutputStore, write_atomic_bytes, write_json

log = logging.getLogger(__name__)

QUANTILES = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
HISTOGRAM_BINS = 40
MAX_COMBINATIONS = 15
DUPLICATE_REASON = "duplicate_of"  # reasons "duplicate_of:<clip_id>" (curation/dedup.py)


# ---- the short funnel (kept for `curate report` callers and tests) ------------------------------

def funnel(out_dir: str | Path) -> dict[str, Any]:
    store = OutputStore(out_dir)
    if not store.ledger_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a curation output (no ledger/); run `curate run` first")
    rows = store.read_scores().to_pylist()
    clips = [r for r in rows if r["start_frame"] is not None]
    failed_sources = {r["source_id"] for r in rows if r["split_error"] is not None}
    outcomes = Counter(status_of(r.get("source_status")) for r in rows
                       if r["split_error"] is not None and r["start_frame"] is None)
    by_reason: Counter[str] = Counter()
    alone: Counter[str] = Counter()
    for r in clips:
        reasons = [DUPLICATE_REASON if x.startswith(DUPLICATE_REASON + ":") else x for x in r["reject_reasons"] or []]
        by_reason.update(reasons)
        if len(reasons) == 1:
            alone[reasons[0]] += 1
    errors = {col: sum(1 for r in rows if r.get(col) is not None) for col in schema.ERROR_COLUMNS}
    run = store.read_run()
    return {
        "status": run.get("status", "unknown"),
        "sources": len({r["source_id"] for r in rows}),
        "source_errors": len(failed_sources),
        "source_outcomes": dict(sorted(outcomes.items())),
        "clips": len(clips),
        "kept": sum(1 for r in clips if r["keep"]),
        "clip_hours": sum(r["duration_s"] or 0 for r in clips) / 3600,
        "kept_hours": sum(r["duration_s"] or 0 for r in clips if r["keep"]) / 3600,
        "rejections": {reason: {"total": n, "only_this": alone.get(reason, 0)}
                       for reason, n in by_reason.most_common()},
        "errors": {k: v for k, v in errors.items() if v},
        "source_error_reasons": sorted({r["split_error"] for r in rows if r["split_error"]}),
    }


def format_funnel(f: dict[str, Any]) -> str:
    lines = [
        f"run status      {f['status']}",
        f"sources         {f['sources']}",
        f"source errors   {f['source_errors']}"
        + (f"  ({format_outcomes(f['source_outcomes'])})" if f["source_outcomes"] else ""),
        f"clips           {f['clips']}  ({f['clip_hours'] * 60:.1f} min)",
        f"kept            {f['kept']}  ({f['kept_hours'] * 60:.1f} min)"
        + (f"  {100 * f['kept'] / f['clips']:.1f}%" if f["clips"] else ""),
        "",
        f"{'rejected by':<40}{'total':>8}{'only this':>11}",
    ]
    for reason, n in f["rejections"].items():
        lines.append(f"{reason:<40}{n['total']:>8}{n['only_this']:>11}")
    if not f["rejections"]:
        lines.append("(no clip rejected)")
    if f["errors"]:
        lines += ["", "errors by stage"] + [f"  {k:<30}{v:>6}" for k, v in f["errors"].items()]
    for reason in f["source_error_reasons"]:
        lines.append(f"  source error: {reason}")
    return "\n".join(lines)


def status_of(status: str | None) -> str:
    """A non-clip row's status; outputs written before source_status existed read as unreadable."""
    return status or "unreadable"


def source_outcomes(table: pa.Table, is_clip: np.ndarray) -> dict[str, int]:
    """Distinct sources per status of their non-clip rows (a source counts once per status)."""
    rows = table.filter(pa.array(~is_clip)).select(["source_id", "source_status"]).to_pylist()
    pairs = {(r["source_id"], status_of(r["source_status"])) for r in rows}
    return dict(sorted(Counter(status for _, status in pairs).items()))


# ---- reading ------------------------------------------------------------------------------------

def read_scores_with_units(store: OutputStore) -> pa.Table:
    """Every committed scores row, conformed to the contract, plus the unit it is stored in."""
    tables = []
    for unit_id, entry in store.committed().items():
        path = store.scores_dir / entry["scores_file"]
        if not path.exists():
            log.warning("%s is listed in the ledger but missing; skipped", path)
            continue
        t = schema.conform(pq.read_table(path), schema.SCORES_SCHEMA)
        tables.append(t.append_column("unit_id", pa.array([unit_id] * t.num_rows, pa.string())))
    if not tables:
        empty = schema.SCORES_SCHEMA.empty_table()
        return empty.append_column("unit_id", pa.array([], pa.string()))
    return pa.concat_tables(tables)


def _floats(table: pa.Table, column: str) -> np.ndarray:
    """A column as float64 with NaN for null (absent columns: all NaN)."""
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


# ---- rules --------------------------------------------------------------------------------------

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
    if dedup is not None:  # near-duplicate removal (curation/dedup.py) acts like one more rule
        entry = _rule_entry("dedup", DUPLICATE_REASON, {}, None, True, "near-duplicate removal", False)
        entry["threshold"] = f"cosine >= {fmt(1 - (run.get('dedup') or {}).get('eps', dedup.get('eps') or 0))}"
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


def _attribute(reason: str, rules: list[dict[str, Any]]) -> list[int]:
    """Indices of the rules a stored reason belongs to (see the module docstring)."""
    column = reason_column(reason)
    candidates = [i for i, r in enumerate(rules) if r["column"] == column]
    if len(candidates) <= 1 or reason.endswith(":missing"):
        return candidates
    op, value = reason[len(column)], reason[len(column) + 1:]
    key = "min" if op == "<" else "max"
    exact = [i for i in candidates if key in rules[i]["effective"] and fmt(rules[i]["effective"][key]) == value]
    return exact[:1] or candidates[:1]


# ---- statistics ---------------------------------------------------------------------------------

def _membership(clips: pa.Table, rules: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """(bool matrix clips x rules: the rule rejected the clip, {reason: {total, only_this}})."""
    n = clips.num_rows
    reasons_col = clips.column("reject_reasons").combine_chunks() if n else pa.array([], pa.list_(pa.string()))
    flat = pc.list_flatten(reasons_col)
    # "duplicate_of:<clip_id>" names a clip: one reason for the counts, not one per kept clip.
    flat = pc.if_else(pc.starts_with(flat, DUPLICATE_REASON + ":"), pa.scalar(DUPLICATE_REASON),
                      flat).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(reasons_col).to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(reasons_col), 0).to_numpy(zero_copy_only=False)
    matrix = np.zeros((n, len(rules)), dtype=bool)
    reasons: dict[str, dict[str, int]] = {}
    if flat.size:
        uniq, inverse = np.unique(flat.astype(str), return_inverse=True)
        alone = lengths[parents] == 1
        for u, reason in enumerate(uniq):
            rows = parents[inverse == u]
            reasons[str(reason)] = {"total": int(rows.size), "only_this": int(alone[inverse == u].sum())}
            idx = _attribute(str(reason), rules)
            if not idx:
                # A reason no configured rule explains (e.g. an older config): its own line.
                rules.append({"id": reason_column(str(reason)), "step": None, "column": reason_column(str(reason)),
                              "bounds": {}, "percentile": False, "resolved": None, "effective": {},
                              "applied": True, "stage_skipped": False, "note": "not in the run's config",
                              "label": reason_column(str(reason)), "threshold": "?"})
                matrix = np.concatenate([matrix, np.zeros((n, 1), dtype=bool)], axis=1)
                idx = [len(rules) - 1]
            for i in idx:
                matrix[rows, i] = True
    reasons = dict(sorted(reasons.items(), key=lambda kv: -kv[1]["total"]))
    return matrix, reasons


def _funnel_rows(matrix: np.ndarray, rules: list[dict[str, Any]], duration: np.ndarray,
                 keep: np.ndarray) -> list[dict[str, Any]]:
    dur = np.nan_to_num(duration)
    rows = [{"label": "clips", "rule": None, "removed": 0, "removed_duration_s": 0.0,
             "remaining": int(matrix.shape[0]), "remaining_duration_s": float(dur.sum())}]
    gone = np.zeros(matrix.shape[0], dtype=bool)
    for i, r in enumerate(rules):
        new = matrix[:, i] & ~gone
        gone |= matrix[:, i]
        rows.append({"label": f"{r['label']} ({r['threshold']})" + ("" if r["applied"] else " [not applied]"),
                     "rule": r["id"],
                     "removed": int(new.sum()), "removed_duration_s": float(dur[new].sum()),
                     "remaining": int((~gone).sum()), "remaining_duration_s": float(dur[~gone].sum())})
    rows.append({"label": "kept", "rule": None, "removed": 0, "removed_duration_s": 0.0,
                 "remaining": int(keep.sum()), "remaining_duration_s": float(dur[keep].sum())})
    return rows


def _errors(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per stage: rows with an error, grouped by the error's type (text before the first ':')."""
    out = {}
    for column in schema.ERROR_COLUMNS:
        if column not in table.column_names:
            continue
        values = [v for v in table.column(column).to_pylist() if v is not None]
        if not values:
            continue
        groups: dict[str, list[str]] = {}
        for v in values:
            groups.setdefault(v.split(":", 1)[0].strip()[:80] or "error", []).append(v)
        out[column[: -len("_error")]] = {
            "rows": len(values),
            "reasons": [{"reason": k, "count": len(v), "example": v[0][:300]}
                        for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))],
        }
    return out


def _sources(table: pa.Table, is_clip: np.ndarray, keep: np.ndarray, matrix_all: np.ndarray,
             rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source: clips, kept, minutes, unreadable (split_error), most frequent rejecting rule."""
    ids = table.column("source_id").to_numpy(zero_copy_only=False).astype(str)
    if not ids.size:
        return []
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    paths = table.column("source_path").to_pylist()
    errors = table.column("split_error").to_pylist()
    dur = np.nan_to_num(_floats(table, "duration_s"))
    clips = np.bincount(inverse, weights=is_clip, minlength=uniq.size)
    kept = np.bincount(inverse, weights=keep & is_clip, minlength=uniq.size)
    minutes = np.bincount(inverse, weights=dur * is_clip, minlength=uniq.size) / 60
    by_rule = np.stack([np.bincount(inverse, weights=matrix_all[:, i], minlength=uniq.size)
                        for i in range(len(rules))], axis=1) if rules else np.zeros((uniq.size, 0))
    rows = []
    for s in range(uniq.size):
        top = None
        if by_rule.shape[1] and by_rule[s].max() > 0:
            i = int(by_rule[s].argmax())
            top = {"rule": rules[i]["label"], "clips": int(by_rule[s, i])}
        err = errors[first[s]] if not is_clip[first[s]] else None
        rows.append({"source_id": str(uniq[s]), "source_path": paths[first[s]], "clips": int(clips[s]),
                     "kept": int(kept[s]), "clip_minutes": round(float(minutes[s]), 3),
                     "top_rejection": top, "error": err})
    rows.sort(key=lambda r: (-r["clips"], r["error"] is None, r["source_path"]))
    return rows


def _score_stats(column: str, values: np.ndarray, keep: np.ndarray,
                 rules: list[dict[str, Any]]) -> dict[str, Any]:
    ok = ~np.isnan(values)
    thresholds = [(f"{r['label']} {k}", float(r["effective"][k])) for r in rules
                  if r["column"] == column and r["applied"] for k in ABSOLUTE_KEYS if k in r["effective"]]
    stats: dict[str, Any] = {"values": int(ok.sum()), "missing": int((~ok).sum()),
                             "thresholds": [{"label": lbl, "value": v} for lbl, v in thresholds]}
    if not ok.any():
        stats["computed"] = False
        return stats
    v = values[ok]
    k = keep[ok]
    # Range: the central 99% and every threshold; the outer tails are clipped into the end
    # bins (counts stay complete) so one extreme clip does not squash the plot.
    p_lo, p_hi = np.quantile(v, [0.005, 0.995])
    lo = min([float(p_lo)] + [t for _, t in thresholds])
    hi = max([float(p_hi)] + [t for _, t in thresholds])
    edges = np.histogram_bin_edges(v, bins=HISTOGRAM_BINS, range=(lo, hi) if hi > lo else None)
    v_binned = np.clip(v, edges[0], edges[-1])
    stats.update({
        "computed": True,
        "mean": float(v.mean()),
        "quantiles": {f"p{round(q * 100)}": float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))},
        "kept": int(k.sum()), "rejected": int((~k).sum()),
        "histogram": {"edges": edges.tolist(),
                      "kept": np.histogram(v_binned[k], edges)[0].tolist(),
                      "rejected": np.histogram(v_binned[~k], edges)[0].tolist(),
                      "clipped": int(((v < edges[0]) | (v > edges[-1])).sum())},
    })
    return stats


def _distance_inside_and_outside(values: np.ndarray, effective: dict[str, float]) -> np.ndarray:
    """Signed distance to the rule's threshold: > 0 outside (rejected side), <= 0 inside."""
    d = np.full(values.shape, -np.inf)
    if "min" in effective:
        d = np.maximum(d, effective["min"] - values)
    if "max" in effective:
        d = np.maximum(d, values - effective["max"])
    return d


def _spread_pick(order: np.ndarray, n_near: int, n_spread: int) -> np.ndarray:
    """The first n_near of `order`, then n_spread evenly spaced over the rest (in order)."""
    near = order[:n_near]
    rest = order[n_near:]
    if rest.size and n_spread:
        picks = np.unique(np.linspace(0, rest.size - 1, min(n_spread, rest.size)).round().astype(int))
        near = np.concatenate([near, rest[picks]])
    return near


def _galleries(clips: pa.Table, matrix: np.ndarray, keep: np.ndarray, rules: list[dict[str, Any]],
               max_gallery: int, max_strip: int) -> dict[str, dict[str, Any]]:
    """Per rule: rejected clips by distance to the threshold (borderline first, sampled), and
    the kept clips just inside it."""
    out = {}
    ids = clips.column("clip_id").to_numpy(zero_copy_only=False)
    for i, r in enumerate(rules):
        if not r["effective"] or not r["applied"]:
            continue
        values = _floats(clips, r["column"])
        dist = _distance_inside_and_outside(values, r["effective"])
        rejected = matrix[:, i] & ~np.isnan(values)
        rej_idx = np.flatnonzero(rejected)
        rej_idx = rej_idx[np.lexsort((ids[rej_idx], dist[rej_idx]))]  # ties: by clip_id, stable
        n_near = max(1, (2 * max_gallery) // 3)
        picked = _spread_pick(rej_idx, n_near, max_gallery - n_near)
        inside = np.flatnonzero(keep & ~np.isnan(values))
        inside = inside[np.lexsort((ids[inside], -dist[inside]))][:max_strip]  # closest first
        out[r["id"]] = {
            "rejected_total": int(matrix[:, i].sum()),
            "rejected_missing": int((matrix[:, i] & np.isnan(values)).sum()),
            "rejected": [{"row": int(j), "clip_id": str(ids[j]), "value": float(values[j]),
                          "distance": float(dist[j])} for j in picked],
            "kept_strip": [{"row": int(j), "clip_id": str(ids[j]), "value": float(values[j]),
                            "distance": float(-dist[j])} for j in inside],
        }
    return out


# ---- payload (thumbnails, videos) ---------------------------------------------------------------

def _read_payload(store: OutputStore, ledger: dict[str, dict[str, Any]], wanted: dict[str, set[str]],
                  column: str) -> dict[str, Any]:
    """{clip_id: value of `column`} for the wanted clips of each unit, reading only the row
    groups that hold them: clips/<unit>.parquet, else the unit's shards (kept clips only)."""
    found: dict[str, Any] = {}
    for unit_id, ids in wanted.items():
        entry = ledger.get(unit_id, {})
        files = [store.clips_dir / (entry.get("clips_file") or f"{unit_id}.parquet")]
        if not files[0].exists():
            files = [store.shards_dir / n for n in entry.get("shard_files", [])]
        for path in files:
            if not path.exists():
                continue
            pf = pq.ParquetFile(path)
            all_ids = pf.read(columns=["clip_id"]).column("clip_id").to_pylist()
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            rows = [k for k, cid in enumerate(all_ids) if cid in ids]
            groups = sorted({int(np.searchsorted(starts, k, side="right") - 1) for k in rows})
            if not groups:
                continue
            t = pf.read_row_groups(groups, columns=["clip_id", column])
            for cid, value in zip(t.column("clip_id").to_pylist(), t.column(column).to_pylist()):
                if cid in ids and value is not None:
                    found[cid] = value
    return found


def thumbnail(keyframes: list[bytes], height_px: int = 64) -> bytes | None:
    """The clip's keyframes (first, middle, last) side by side, downscaled, as JPEG bytes."""
    from PIL import Image

    frames = []
    for data in keyframes or []:
        try:
            im = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # noqa: BLE001 - a broken keyframe must not break the report
            continue
        if im.height > height_px:  # only ever shrink: small keyframes stay as they are
            w = max(1, round(im.width * height_px / im.height))
            im = im.resize((w, height_px), Image.BILINEAR)
        frames.append(im)
    if not frames:
        return None
    strip = Image.new("RGB", (sum(f.width for f in frames) + 2 * (len(frames) - 1),
                              max(f.height for f in frames)), "white")
    x = 0
    for f in frames:
        strip.paste(f, (x, 0))
        x += f.width + 2
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---- the report ---------------------------------------------------------------------------------

def summarize(out_dir: str | Path, max_gallery: int = 12, max_strip: int = 6) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, working data for the page) from OUT's tables and run.json."""
    store = OutputStore(out_dir)
    if not store.ledger_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a curation output (no ledger/); run `curate run` first")
    run = store.read_run()
    if (store.root / "dedup" / "dedup.json").exists():  # near-duplicate removal's record (curation/dedup.py)
        run["dedup"] = json.loads((store.root / "dedup" / "dedup.json").read_text())
    table = read_scores_with_units(store)
    is_clip = ~(pc.is_valid(table.column("split_error")).to_numpy(zero_copy_only=False)
                & pc.is_null(table.column("start_frame")).to_numpy(zero_copy_only=False))
    keep_all = pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False).astype(bool)
    clips = table.filter(pa.array(is_clip))
    keep = keep_all[is_clip]
    rules = rules_of_run(run)
    matrix, reasons = _membership(clips, rules)
    single = matrix.sum(axis=1) == 1  # clips rejected by exactly one rule
    for i, r in enumerate(rules):
        only = matrix[:, i] & single
        values = _floats(clips, r["column"])
        r.update({"rejected": int(matrix[:, i].sum()), "only_this": int(only.sum()),
                  "missing": 0 if r["step"] == "dedup" else int((matrix[:, i] & np.isnan(values)).sum())})
        if r.get("stage_skipped") and r["rejected"] == 0:
            r["applied"] = False
    duration = _floats(clips, "duration_s")
    funnel_rows = _funnel_rows(matrix, rules, duration, keep)
    for i, r in enumerate(rules):
        r["cascade_removed"] = funnel_rows[i + 1]["removed"]

    pair = (matrix.T.astype(np.int64) @ matrix.astype(np.int64)) if rules else np.zeros((0, 0), np.int64)
    combos: list[dict[str, Any]] = []
    if rules and matrix.any():
        rejected_rows = matrix[matrix.any(axis=1)]
        patterns, counts = np.unique(rejected_rows, axis=0, return_counts=True)
        for k in np.argsort(-counts, kind="stable")[:MAX_COMBINATIONS]:
            combos.append({"rules": [rules[i]["id"] for i in np.flatnonzero(patterns[k])],
                           "clips": int(counts[k])})

    matrix_all = np.zeros((table.num_rows, len(rules)), dtype=bool)
    matrix_all[is_clip] = matrix
    sources = _sources(table, is_clip, keep_all, matrix_all, rules)

    score_columns = list(dict.fromkeys(schema.SCORE_COLUMNS + ["duration_s"]
                                       + [r["column"] for r in rules if r["step"] != "dedup"]))
    scores = {c: _score_stats(c, _floats(clips, c), keep, rules) for c in score_columns}
    galleries = _galleries(clips, matrix, keep, rules, max_gallery, max_strip)

    dur = np.nan_to_num(duration)
    summary = {
        "out_dir": str(store.root),
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": run.get("status", "unknown"),
        "config_fingerprint": run.get("config_fingerprint"),
        "totals": {
            "sources": len(sources),
            "source_errors": int((~is_clip).sum()),
            "source_outcomes": source_outcomes(table, is_clip),
            "clips": int(clips.num_rows),
            "kept": int(keep.sum()),
            "rejected": int((~keep).sum()),
            "clip_duration_s": float(dur.sum()),
            "kept_duration_s": float(dur[keep].sum()),
        },
        "funnel": funnel_rows,
        "rules": [{k: v for k, v in r.items()} for r in rules],
        "reasons": reasons,
        "overlaps": {"rules": [r["id"] for r in rules], "matrix": pair.tolist(), "combinations": combos},
        "errors": _errors(table),
        "sources": {"total": len(sources), "rows": sources},
        "scores": scores,
        "galleries": galleries,
        "skipped_steps": run.get("skipped_steps") or [],
        "rules_not_applied": run.get("rules_not_applied") or [],
        "resolved_rules": run.get("resolved_rules") or {},
        "refilters": len(run.get("refilters") or []),
        # A refilter killed part-way: the tables may mix old and new rules until it is rerun.
        "unfinished_refilter": next((r["overrides"] for r in (run.get("refilters") or [])
                                     if r.get("finished") is False), None),
    }
    work = {"store": store, "clips": clips, "keep": keep, "rules": rules}
    return summary, work


def _clip_caption(clips: pa.Table, row: int) -> dict[str, Any]:
    """The scores and identity shown under a thumbnail."""
    r = clips.slice(row, 1).to_pylist()[0]
    shown = {c: r.get(c) for c in ["duration_s"] + schema.SCORE_COLUMNS
             if r.get(c) is not None and not (isinstance(r.get(c), float) and np.isnan(r.get(c)))}
    return {"clip_id": r["clip_id"], "source": Path(r["source_path"]).name, "start_s": r["start_s"],
            "scores": shown, "reasons": r["reject_reasons"] or [], "keep": bool(r["keep"])}


def write_report(out_dir: str | Path, max_gallery: int = 12, max_strip: int = 6, max_videos: int = 6,
                 max_video_bytes: int = 3 * 1024 * 1024, max_source_rows: int = 200,
                 thumb_height_px: int = 64) -> dict[str, Any]:
    """Write OUT/report/ (index.html, summary.json, sources.csv, plots/*.png); return the summary."""
    from curation import plots
    from curation.dedup_report import dedup_section, wanted_clips  # noqa: PLC0415
    from curation.report_html import render  # noqa: PLC0415

    started = time.monotonic()
    summary, work = summarize(out_dir, max_gallery, max_strip)
    store: OutputStore = work["store"]
    clips: pa.Table = work["clips"]
    rules = work["rules"]
    report_dir = store.root / "report"
    (report_dir / "plots").mkdir(parents=True, exist_ok=True)

    # Plots: PNG files next to the page, and the same bytes inline in it.
    images: dict[str, bytes] = {}
    f = summary["funnel"]
    images["funnel"] = plots.funnel_plot([row["label"] for row in f], [row["remaining"] for row in f])
    if len(rules) >= 2:
        images["overlaps"] = plots.overlap_heatmap([r["label"] for r in rules],
                                                   np.asarray(summary["overlaps"]["matrix"]))
    for column, st in summary["scores"].items():
        if st.get("computed"):
            h = st["histogram"]
            label = column + (f"  ({h['clipped']:,} outliers in the end bins)" if h["clipped"] else "")
            images[f"score_{column}"] = plots.score_histogram(
                label, np.asarray(h["edges"]), np.asarray(h["kept"]), np.asarray(h["rejected"]),
                [(t["label"], t["value"]) for t in st["thresholds"]])
    for name, png in images.items():
        write_atomic_bytes(report_dir / "plots" / f"{name}.png", png)
    summary["plots"] = [f"plots/{name}.png" for name in images]

    # Thumbnails for the gallery clips and the kept strips; videos for a few kept clips.
    units = clips.column("unit_id").to_pylist()
    gallery_rows = {item["row"] for g in summary["galleries"].values()
                    for item in g["rejected"] + g["kept_strip"]}
    wanted: dict[str, set[str]] = {}
    ids = clips.column("clip_id").to_pylist()
    for row in gallery_rows:
        wanted.setdefault(units[row], set()).add(ids[row])
    ledger = store.committed()
    keyframes = _read_payload(store, ledger, wanted, "keyframes")
    summary["dedup"] = dedup_section(store, store.read_run(), clips)
    keyframes.update(_read_payload(store, ledger, wanted_clips(summary["dedup"]), "keyframes"))
    thumbs = {}
    for cid, frames in keyframes.items():
        jpeg = thumbnail(frames, thumb_height_px)
        if jpeg is not None:
            thumbs[cid] = data_url("image/jpeg", jpeg)
    captions = {ids[row]: _clip_caption(clips, row) for row in gallery_rows}

    # Borderline kept clips first (round robin over rules), then kept clips spread over the run.
    keep = work["keep"]
    candidates: list[int] = []
    strips = [g["kept_strip"] for g in summary["galleries"].values()]
    for k in range(max(map(len, strips), default=0)):
        candidates += [s[k]["row"] for s in strips if k < len(s)]
    kept_rows = np.flatnonzero(keep)
    if kept_rows.size:
        spread = np.linspace(0, kept_rows.size - 1, min(kept_rows.size, 4 * max_videos)).round().astype(int)
        candidates += kept_rows[np.unique(spread)].tolist()
    candidates = list(dict.fromkeys(candidates))[: 4 * max_videos]
    wanted_v: dict[str, set[str]] = {}
    for row in candidates:
        wanted_v.setdefault(units[row], set()).add(ids[row])
    video_bytes = _read_payload(store, ledger, wanted_v, "video")
    videos: dict[str, str] = {}
    budget = max_video_bytes
    for row in candidates:
        data = video_bytes.get(ids[row])
        if len(videos) >= max_videos or not data or len(data) > budget:
            continue
        budget -= len(data)
        videos[ids[row]] = data_url("video/mp4", data)
        captions.setdefault(ids[row], _clip_caption(clips, row))
    summary["videos"] = list(videos)

    # The per-source table in full as CSV (the page shows the largest sources).
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["source_id", "source_path", "clips", "kept", "clip_minutes", "top_rejection_rule",
                "top_rejection_clips", "error"])
    for s in summary["sources"]["rows"]:
        top = s["top_rejection"] or {}
        w.writerow([s["source_id"], s["source_path"], s["clips"], s["kept"], s["clip_minutes"],
                    top.get("rule", ""), top.get("clips", ""), s["error"] or ""])
    write_atomic_bytes(report_dir / "sources.csv", buf.getvalue().encode())

    all_sources = summary["sources"]["rows"]
    summary["sources"]["rows"] = all_sources[:max_source_rows]
    summary["sources"]["csv"] = "sources.csv"
    # Proxy-model studies of this output (`curate ablate`, training/study.py), linked from the page.
    summary["studies"] = sorted(p.parent.name for p in (store.root / "study").glob("*/index.html"))
    page = render(summary, images={k: data_url("image/png", v) for k, v in images.items()},
                  thumbs=thumbs, videos=videos, captions=captions)
    write_atomic_bytes(report_dir / "index.html", page.encode("utf-8"))
    shown = [item["clip_id"] for g in summary["galleries"].values() for item in g["rejected"] + g["kept_strip"]]
    summary["page"] = {"path": str(report_dir / "index.html"), "bytes": len(page.encode("utf-8")),
                       "thumbnails": sum(cid in thumbs for cid in shown),  # images on the page
                       "thumbnail_clips": len(thumbs), "videos": len(videos),
                       "seconds": round(time.monotonic() - started, 3)}
    for g in summary["galleries"].values():  # row numbers are internal to this report
        for item in g["rejected"] + g["kept_strip"]:
            item.pop("row", None)
    write_json(report_dir / "summary.json", summary)
    log.info("report: %s (%.0f KB, %d thumbnails, %d videos) in %.1fs", report_dir / "index.html",
             summary["page"]["bytes"] / 1024, summary["page"]["thumbnails"], len(videos),
             summary["page"]["seconds"])
    return json.loads(json.dumps(summary, default=str))


def format_summary(summary: dict[str, Any]) -> str:
    """The headline table printed by `curate report`."""
    t = summary["totals"]
    pct = f" ({100 * t['kept'] / t['clips']:.1f}%)" if t["clips"] else ""
    warning = []
    if summary.get("unfinished_refilter"):
        warning = [f"WARNING: `curate refilter --set {' --set '.join(summary['unfinished_refilter'])}` did "
                   "not finish; run it again before trusting these numbers", ""]
    lines = warning + [
        f"run {summary['status']} | {t['sources']} sources"
        f"{' (' + format_outcomes(t['source_outcomes']) + ')' if t['source_outcomes'] else ''} | "
        f"{t['clips']} clips, {t['clip_duration_s'] / 60:.1f} min -> {t['kept']} kept, "
        f"{t['kept_duration_s'] / 60:.1f} min{pct}",
        "",
        f"{'funnel (pipeline order)':<48}{'removed':>9}{'left':>9}{'min left':>10}",
    ]
    for row in summary["funnel"]:
        removed = f"{row['removed']:>9}" if row["rule"] else " " * 9
        lines.append(f"{row['label'][:47]:<48}{removed}{row['remaining']:>9}"
                     f"{row['remaining_duration_s'] / 60:>10.1f}")
    lines += ["", f"{'rule':<24}{'threshold':<28}{'rejected':>9}{'only':>7}{'missing':>9}  note"]
    for r in summary["rules"]:
        note = (r["note"] or "") if r["applied"] else f"NOT APPLIED: {r['note'] or ''}".rstrip(": ")
        lines.append(f"{r['label'][:23]:<24}{r['threshold'][:27]:<28}{r['rejected']:>9}"
                     f"{r['only_this']:>7}{r['missing']:>9}  {note}")
    if not summary["rules"]:
        lines.append("(no filter rules)")
    if summary["errors"]:
        lines.append("")
        for stage, e in summary["errors"].items():
            reasons = ", ".join(f"{x['reason']} {x['count']}" for x in e["reasons"][:4])
            lines.append(f"errors in {stage}: {e['rows']} ({reasons})")
    not_computed = [c for c, s in summary["scores"].items() if not s.get("computed")]
    if not_computed:
        lines.append(f"not computed: {', '.join(not_computed)}")
    if "page" in summary:
        lines += ["", f"report: {summary['page']['path']} ({summary['page']['bytes'] / 1024:.0f} KB)"]
    return "\n".join(lines)
