"""Every number of the report, computed from the written tables and run.json only: no page,
no image (the page is curation/report_html.py, plots and thumbnails curation/report_media.py).

`summarize(out_dir)` -> (summary, working data for the page): totals, the cascade funnel, the
rules with their counts, overlaps, errors per stage, per-source rows, per-score statistics and
histograms, and the clips each rule's gallery shows. `funnel(out_dir)`: the short funnel
(sources, clips, kept, rejections per reason). curation/report.py's docstring says where each
number comes from.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir, schema
from curation.report_rules import DUPLICATE_REASON, attribute_reason, rules_of_run, unexplained_rule
from curation.writer import OutputStore
from stages.rules import ABSOLUTE_KEYS

log = logging.getLogger(__name__)

QUANTILES = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
HISTOGRAM_BINS = 40
MAX_COMBINATIONS = 15


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

def status_of(status: str | None) -> str:
    """A non-clip row's status; outputs written before source_status existed read as unreadable."""
    return status or "unreadable"


def source_outcomes(table: pa.Table, is_clip: np.ndarray) -> dict[str, int]:
    """Distinct sources per status of their non-clip rows (a source counts once per status)."""
    rows = table.filter(pa.array(~is_clip)).select(["source_id", "source_status"]).to_pylist()
    pairs = {(r["source_id"], status_of(r["source_status"])) for r in rows}
    return dict(sorted(Counter(status for _, status in pairs).items()))


def format_outcomes(outcomes: dict[str, int]) -> str:
    """'2 unreadable, 1 no_clips': sources without clips by status (empty when there are none)."""
    return ", ".join(f"{n} {status}" for status, n in outcomes.items())


# ---- reading ------------------------------------------------------------------------------------

def read_scores_with_units(store: OutputStore) -> pa.Table:
    """Every committed scores row, conformed to the contract, plus the unit it is stored in."""
    tables = []
    for unit_id, entry in store.committed().items():
        path = store.scores_dir / entry["scores_file"]
        if not path.exists():
            log.warning("%s is listed in the ledger but missing; skipped", path)
            continue
        t = schema.conform(outdir.read_table(path), schema.SCORES_SCHEMA)
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
            idx = attribute_reason(str(reason), rules)
            if not idx:  # a reason no configured rule explains (e.g. an older config): its own line
                rules.append(unexplained_rule(str(reason)))
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


def _rule_counts(rules: list[dict[str, Any]], matrix: np.ndarray, clips: pa.Table) -> None:
    """Per rule: clips it rejected, clips only it rejected, rejected ones with no value."""
    single = matrix.sum(axis=1) == 1  # clips rejected by exactly one rule
    for i, r in enumerate(rules):
        only = matrix[:, i] & single
        values = _floats(clips, r["column"])
        r.update({"rejected": int(matrix[:, i].sum()), "only_this": int(only.sum()),
                  "missing": 0 if r["step"] == "dedup" else int((matrix[:, i] & np.isnan(values)).sum())})
        # A rule on a skipped stage's column still in the config (rules_of_run): not applied
        # unless it rejected clips.
        if r.get("stage_skipped") and r["rejected"] == 0:
            r["applied"] = False


def _overlaps(matrix: np.ndarray, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Clips rejected by both of two rules, and the most frequent exact combinations."""
    pair = (matrix.T.astype(np.int64) @ matrix.astype(np.int64)) if rules else np.zeros((0, 0), np.int64)
    combos: list[dict[str, Any]] = []
    if rules and matrix.any():
        rejected_rows = matrix[matrix.any(axis=1)]
        patterns, counts = np.unique(rejected_rows, axis=0, return_counts=True)
        for k in np.argsort(-counts, kind="stable")[:MAX_COMBINATIONS]:
            combos.append({"rules": [rules[i]["id"] for i in np.flatnonzero(patterns[k])],
                           "clips": int(counts[k])})
    return {"rules": [r["id"] for r in rules], "matrix": pair.tolist(), "combinations": combos}


def _totals(table: pa.Table, is_clip: np.ndarray, keep: np.ndarray, duration: np.ndarray,
            sources: int) -> dict[str, Any]:
    dur = np.nan_to_num(duration)
    return {
        "sources": sources,
        "source_errors": int((~is_clip).sum()),
        "source_outcomes": source_outcomes(table, is_clip),
        "clips": int(is_clip.sum()),
        "kept": int(keep.sum()),
        "rejected": int((~keep).sum()),
        "clip_duration_s": float(dur.sum()),
        "kept_duration_s": float(dur[keep].sum()),
    }


def _run_notes(run: dict[str, Any]) -> dict[str, Any]:
    """What run.json says about rules not applied, resolved thresholds and refilters."""
    return {
        "skipped_steps": run.get("skipped_steps") or [],
        "rules_not_applied": run.get("rules_not_applied") or [],
        "resolved_rules": run.get("resolved_rules") or {},
        "refilters": len(run.get("refilters") or []),
        # A refilter killed part-way: the tables may mix old and new rules until it is rerun.
        "unfinished_refilter": next((r["overrides"] for r in (run.get("refilters") or [])
                                     if r.get("finished") is False), None),
    }


def _read_run(store: OutputStore) -> dict[str, Any]:
    """run.json, with near-duplicate removal's record (curation/dedup.py) under "dedup"."""
    run = store.read_run()
    if (store.root / "dedup" / "dedup.json").exists():
        run["dedup"] = json.loads((store.root / "dedup" / "dedup.json").read_text())
    return run


def summarize(out_dir: str | Path, max_gallery: int = 12, max_strip: int = 6) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, working data for the page) from OUT's tables and run.json."""
    store = OutputStore(out_dir)
    if not store.ledger_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a curation output (no ledger/); run `curate run` first")
    run = _read_run(store)
    table = read_scores_with_units(store)
    is_clip = ~(pc.is_valid(table.column("split_error")).to_numpy(zero_copy_only=False)
                & pc.is_null(table.column("start_frame")).to_numpy(zero_copy_only=False))
    keep_all = pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False).astype(bool)
    clips = table.filter(pa.array(is_clip))
    keep = keep_all[is_clip]

    # Which rules rejected each clip; per rule counts; the cascade in pipeline order.
    rules = rules_of_run(run)
    matrix, reasons = _membership(clips, rules)
    _rule_counts(rules, matrix, clips)
    duration = _floats(clips, "duration_s")
    funnel_rows = _funnel_rows(matrix, rules, duration, keep)
    for i, r in enumerate(rules):
        r["cascade_removed"] = funnel_rows[i + 1]["removed"]

    # Per source (error rows too), per score, and the clips each rule's gallery shows.
    matrix_all = np.zeros((table.num_rows, len(rules)), dtype=bool)
    matrix_all[is_clip] = matrix
    sources = _sources(table, is_clip, keep_all, matrix_all, rules)
    score_columns = list(dict.fromkeys(schema.SCORE_COLUMNS + ["duration_s"]
                                       + [r["column"] for r in rules if r["step"] != "dedup"]))
    scores = {c: _score_stats(c, _floats(clips, c), keep, rules) for c in score_columns}
    galleries = _galleries(clips, matrix, keep, rules, max_gallery, max_strip)

    summary = {
        "out_dir": str(store.root),
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": run.get("status", "unknown"),
        "config_fingerprint": run.get("config_fingerprint"),
        "totals": _totals(table, is_clip, keep, duration, len(sources)),
        "funnel": funnel_rows,
        "rules": [{k: v for k, v in r.items()} for r in rules],
        "reasons": reasons,
        "overlaps": _overlaps(matrix, rules),
        "errors": _errors(table),
        "sources": {"total": len(sources), "rows": sources},
        "scores": scores,
        "galleries": galleries,
        **_run_notes(run),
    }
    work = {"store": store, "clips": clips, "keep": keep, "rules": rules}
    return summary, work
