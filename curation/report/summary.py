"""Every number of the report, computed from the written tables and run.json only: no page,
no image, no HTML (the page is html.py, plots and thumbnails media.py).

`summarize(out_dir)` -> (summary, working data for the page): totals, the cascade funnel, the
rules with their counts, overlaps, errors per stage, per-source rows, per-score statistics and
histograms, and the clips each rule's gallery shows. `funnel(out_dir)`: the short funnel
(sources, clips, kept, rejections per reason). The package's docstring (curation/report/__init__.py)
says where each number comes from.

At any size: the scores are streamed a row group at a time, the columns the report needs only
(curation/columns.py), into aggregates whose size is set by the rules and the page, not by the
corpus:
- pass 1 (aggregates.py): counts, the cascade, overlaps and exact combinations, errors by type, the
  per-source rows (a source's rows are contiguous: they are a unit's, and a unit is never
  split between files), handed to `on_source` (the report writes sources.csv from them) with
  the largest `max_source_rows` kept for the page, each score's count, mean and kept share,
  and per rule the `max_gallery` * 2/3 rejected clips nearest its threshold and the kept
  clips just inside it (bounded heaps);
- quantiles by exact order statistics (a few passes over one column each);
- pass 2: the histograms over the range those quantiles give, and the galleries' spread
  (the rejected clips at evenly spaced ranks of distance past the threshold).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation import columns, schema
from curation.report.aggregates import Membership, Pass1, caption_of, distance, keep_of, status_of, top_rejection
from curation.report.rules import rules_of_run
from curation.writer import OutputStore
from stages.rules import ABSOLUTE_KEYS

log = logging.getLogger(__name__)

QUANTILES = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
RANGE_QUANTILES = [0.005, 0.995]  # a histogram's range: the central 99% (and every threshold)
HISTOGRAM_BINS = 40
MAX_COMBINATIONS = 15
MAX_ERROR_EXAMPLES = 20  # distinct source errors the short funnel lists
ID_COLUMNS = ["clip_id", "source_id", "source_path", "start_frame", "start_s", "split_error", "source_status",
              "keep", "reject_reasons"]


def format_outcomes(outcomes: dict[str, int]) -> str:
    """'2 unreadable, 1 no_clips': sources without clips by status (empty when there are none)."""
    return ", ".join(f"{n} {status}" for status, n in outcomes.items())


def _store(out_dir: str | Path) -> OutputStore:
    store = OutputStore(out_dir)
    if not (store.remote or store.ledger_dir.is_dir()) or not store.run_json.exists():
        raise FileNotFoundError(f"{out_dir} is not a curation output (no ledger/); run `curate run` first")
    return store


def _rule_values(paths: list[Any], rule_index: int, rule: dict[str, Any], membership: Membership):
    """The distances past the threshold of the clips a rule rejected that have a value
    (for order statistics: a callable giving them again on each pass)."""
    wanted = sorted({"clip_id", "split_error", "start_frame", "reject_reasons", rule["column"]})

    def values():
        for table in columns.scan(paths, wanted):
            clips = table.filter(pa.array(columns.is_clip(table)))
            m = membership.matrix(clips)
            v = columns.floats(clips, rule["column"])
            rejected = m[:, rule_index] & ~np.isnan(v)
            yield distance(v[rejected], rule["effective"])
    return values


def _quantiles(paths: list[Any], column: str, n: int) -> dict[float, float]:
    """{q: the q-quantile of the column's clip values} as np.quantile computes it (linear)."""
    def values():
        for table in columns.scan(paths, [column, "split_error", "start_frame"]):
            v = columns.floats(table, column)[columns.is_clip(table)]
            yield v[~np.isnan(v)]
    qs = QUANTILES + RANGE_QUANTILES
    where = {q: (n - 1) * q for q in qs}
    ranks = {int(np.floor(x)) for x in where.values()} | {int(np.ceil(x)) for x in where.values()}
    found = columns.order_statistics(values, ranks)
    out = {}
    for q, x in where.items():
        lo, hi = int(np.floor(x)), int(np.ceil(x))
        out[q] = float(np.quantile(np.array([found[lo], found[hi]]), x - lo)) if hi > lo else found[lo]
    return out


# ---- the summary ------------------------------------------------------------------------------

def _funnel_rows(p: Pass1) -> list[dict[str, Any]]:
    rows = [{"label": "clips", "rule": None, "removed": 0, "removed_duration_s": 0.0,
             "remaining": p.clips, "remaining_duration_s": p.clip_s}]
    remaining, remaining_s = p.clips, p.clip_s
    for i, r in enumerate(p.rules):
        remaining -= int(p.removed[i])
        remaining_s -= float(p.removed_s[i])
        rows.append({"label": f"{r['label']} ({r['threshold']})" + ("" if r["applied"] else " [not applied]"),
                     "rule": r["id"], "removed": int(p.removed[i]), "removed_duration_s": float(p.removed_s[i]),
                     "remaining": remaining, "remaining_duration_s": remaining_s})
    rows.append({"label": "kept", "rule": None, "removed": 0, "removed_duration_s": 0.0,
                 "remaining": p.kept, "remaining_duration_s": p.kept_s})
    return rows


def _overlaps(p: Pass1) -> dict[str, Any]:
    combos = [{"rules": [p.rules[i]["id"] for i in pattern], "clips": n}
              for pattern, n in sorted(p.combos.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_COMBINATIONS]]
    return {"rules": [r["id"] for r in p.rules], "matrix": p.pairs.tolist(), "combinations": combos}


def _errors(p: Pass1) -> dict[str, dict[str, Any]]:
    out = {}
    for column in schema.ERROR_COLUMNS:
        groups = p.errors.get(column)
        if groups:
            out[column[: -len("_error")]] = {
                "rows": sum(g[0] for g in groups.values()),
                "reasons": [{"reason": k, "count": g[0], "example": g[1]}
                            for k, g in sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))]}
    return out


def _score_stats(p: Pass1, column: str, paths: list[Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """A score's statistics without its histogram counts, and the histogram's edges."""
    st = p.stats[column]
    thresholds = [(f"{r['label']} {k}", float(r["effective"][k])) for r in p.rules
                  if r["column"] == column and r["applied"] for k in ABSOLUTE_KEYS if k in r["effective"]]
    out: dict[str, Any] = {"values": st["values"], "missing": st["missing"],
                           "thresholds": [{"label": lbl, "value": v} for lbl, v in thresholds]}
    if not st["values"]:
        out["computed"] = False
        return out, None
    q = _quantiles(paths, column, st["values"])
    lo = min([q[RANGE_QUANTILES[0]]] + [t for _, t in thresholds])
    hi = max([q[RANGE_QUANTILES[1]]] + [t for _, t in thresholds])
    if hi > lo:
        edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    else:  # np.histogram_bin_edges over the values themselves
        vmin, vmax = q[0.0], q[1.0]
        edges = np.linspace(vmin - 0.5, vmax + 0.5, HISTOGRAM_BINS + 1) if vmin == vmax else \
            np.linspace(vmin, vmax, HISTOGRAM_BINS + 1)
    out.update({"computed": True, "mean": st["sum"] / st["values"],
                "quantiles": {f"p{round(k * 100)}": q[k] for k in QUANTILES},
                "kept": st["kept"], "rejected": st["rejected"]})
    return out, edges


def summarize(out_dir: str | Path, max_gallery: int = 12, max_strip: int = 6, max_source_rows: int = 200,
              on_source: Callable[[dict[str, Any]], None] | None = None,
              max_videos: int = 6) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, working data for the page) from OUT's tables and run.json (module docstring).
    `on_source(row)` gets every source's row as it is finished (sources.csv)."""
    started = time.monotonic()
    store = _store(out_dir)
    run = _read_run(store)
    paths = store.ledger().files("scores")
    rules = rules_of_run(run)
    score_columns = list(dict.fromkeys(schema.SCORE_COLUMNS + ["duration_s"]
                                       + [r["column"] for r in rules if r["step"] != "dedup"]))
    wanted = list(dict.fromkeys(ID_COLUMNS + score_columns + schema.ERROR_COLUMNS))

    # Pass 1: counts, the cascade, overlaps, errors, sources, score counts, nearest clips.
    rows_out: list[dict[str, Any]] = []
    kept_before = int(run.get("kept") or 0)  # kept clips spread over the run, for the page's videos
    video_ranks = set(np.unique(np.linspace(0, kept_before - 1, min(kept_before, 4 * max_videos)).round()
                                .astype(int)).tolist()) if kept_before else set()
    p = Pass1(rules, score_columns, max_gallery, max_strip,
              (lambda row: on_source(top_rejection(row, rules))) if on_source else None, max_source_rows,
              video_ranks)
    for table in columns.scan(paths, wanted):
        p.add(table)
    for row in p.sources.rows():
        rows_out.append(top_rejection(row, rules) if "by_rule" in row else row)
    _applied_or_not(p)

    # Quantiles and histogram ranges; the galleries' spread ranks.
    scores, edges = {}, {}
    for column in score_columns:
        scores[column], e = _score_stats(p, column, paths)
        if e is not None:
            edges[column] = e
    spread = _spread_targets(p, paths, max_gallery)

    # Pass 2: histograms and the spread picks.
    _pass2(p, paths, wanted, scores, edges, spread)
    galleries = _galleries(p, spread)

    summary = {
        "out_dir": str(store.root),
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": run.get("status", "unknown"),
        "config_fingerprint": run.get("config_fingerprint"),
        "totals": {"sources": p.sources.count, "source_errors": p.rows - p.clips,
                   "source_outcomes": dict(sorted(p.sources.outcomes.items())), "clips": p.clips,
                   "kept": p.kept, "rejected": p.clips - p.kept, "clip_duration_s": p.clip_s,
                   "kept_duration_s": p.kept_s},
        "funnel": _funnel_rows(p),
        "rules": [dict(r) for r in rules],
        "reasons": p.membership.reasons(),
        "overlaps": _overlaps(p),
        "errors": _errors(p),
        "sources": {"total": p.sources.count, "rows": rows_out},
        "scores": scores,
        "galleries": galleries,
        **_run_notes(run),
    }
    log.info("report: %d clips summarised in %.1fs", p.clips, time.monotonic() - started)
    return summary, {"store": store, "run": run, "rules": rules, "paths": paths, "spread_kept": p.spread_kept}


def _applied_or_not(p: Pass1) -> None:
    """Per rule: its counts; a rule on a skipped stage's column still in the config
    (rules_of_run) is not applied unless it rejected clips."""
    funnel = _funnel_rows(p)
    for i, r in enumerate(p.rules):
        r.update({"rejected": int(p.rejected[i]), "only_this": int(p.only[i]),
                  "missing": 0 if r["step"] == "dedup" else int(p.missing[i]),
                  "cascade_removed": funnel[i + 1]["removed"]})
        if r.get("stage_skipped") and r["rejected"] == 0:
            r["applied"] = False


def _spread_targets(p: Pass1, paths: list[Any], max_gallery: int) -> dict[int, dict[str, Any]]:
    """Per rule with more rejected clips than its nearest ones: the distances at evenly spaced
    ranks over the rest (the spread), to be picked in pass 2."""
    out = {}
    for i, rule in enumerate(p.rules):
        total = int(p.rejected_valued[i]) if i < p.rejected_valued.size else 0
        n_spread = max_gallery - p.n_near
        rest = total - p.n_near
        if i not in p.near or rest <= 0 or n_spread <= 0:
            continue
        picks = np.unique(np.linspace(0, rest - 1, min(n_spread, rest)).round().astype(int)) + p.n_near
        found = columns.order_statistics(_rule_values(paths, i, rule, p.membership), picks.tolist())
        out[i] = {"distances": sorted(found[r] for r in picks.tolist()), "picked": {}}
    return out


def _pass2(p: Pass1, paths: list[Any], wanted: list[str], scores: dict[str, Any],
           edges: dict[str, np.ndarray], spread: dict[int, dict[str, Any]]) -> None:
    hist = {c: (np.zeros(HISTOGRAM_BINS, np.int64), np.zeros(HISTOGRAM_BINS, np.int64), 0) for c in edges}
    near_ids = {i: {item["clip_id"] for _, item in heap} for i, heap in p.near.items()}
    if edges or spread:
        for table in columns.scan(paths, wanted):
            clips = table.filter(pa.array(columns.is_clip(table)))
            keep = keep_of(clips)
            for column, e in edges.items():
                v = columns.floats(clips, column)
                ok = ~np.isnan(v)
                binned = np.clip(v[ok], e[0], e[-1])
                k, r, clipped = hist[column]
                hist[column] = (k + np.histogram(binned[keep[ok]], e)[0], r + np.histogram(binned[~keep[ok]], e)[0],
                                clipped + int(((v[ok] < e[0]) | (v[ok] > e[-1])).sum()))
            if spread:
                matrix = p.membership.matrix(clips)
                for i, s in spread.items():
                    _pick_spread(p.rules[i], i, s, clips, matrix, near_ids[i])
    for column, (k, r, clipped) in hist.items():
        scores[column]["histogram"] = {"edges": edges[column].tolist(), "kept": k.tolist(),
                                       "rejected": r.tolist(), "clipped": clipped}


def _pick_spread(rule: dict[str, Any], i: int, s: dict[str, Any], clips: pa.Table, matrix: np.ndarray,
                 near: set[str]) -> None:
    """For each spread distance, the clip at it with the smallest clip_id (not among the nearest)."""
    values = columns.floats(clips, rule["column"])
    dist = distance(values, rule["effective"])
    rejected = np.flatnonzero(matrix[:, i] & ~np.isnan(values))
    ids = clips.column("clip_id")
    for d in set(s["distances"]):
        for j in rejected[dist[rejected] == d].tolist():
            cid = ids[j].as_py()
            if cid in near:
                continue
            best = s["picked"].get(d)
            if best is None or cid < best["clip_id"]:
                s["picked"][d] = {"clip_id": cid, "value": float(values[j]), "distance": float(dist[j]),
                                  "caption": caption_of(clips, j)}


def _galleries(p: Pass1, spread: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for i, rule in enumerate(p.rules):
        if not rule["effective"] or not rule["applied"]:
            continue
        near = [item for _, item in sorted(p.near.get(i, []), key=lambda t: t[0], reverse=True)]
        picked = [s for d, s in sorted((spread.get(i) or {}).get("picked", {}).items())]
        strip = [item for _, item in sorted(p.strip.get(i, []), key=lambda t: t[0], reverse=True)]
        out[rule["id"]] = {"rejected_total": int(p.rejected[i]),
                           "rejected_missing": int(p.missing[i]) if rule["step"] != "dedup" else 0,
                           "rejected": near + picked, "kept_strip": strip}
    return out


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
    """run.json, with near-duplicate removal's record (curation/dedup/) under "dedup"."""
    run = store.read_run()
    if (store.root / "dedup" / "dedup.json").exists():
        run["dedup"] = json.loads((store.root / "dedup" / "dedup.json").read_text())
    return run


# ---- the short funnel (kept for `curate report` callers and tests) ------------------------------

def funnel(out_dir: str | Path) -> dict[str, Any]:
    """Sources, clips, kept, rejections per reason, errors per stage: one streamed pass."""
    store = _store(out_dir)
    wanted = ["source_id", "split_error", "start_frame", "source_status", "keep", "reject_reasons",
              "duration_s"] + schema.ERROR_COLUMNS
    membership = Membership([])
    sources = failed = 0
    last, source_failed = None, False
    outcomes: Counter[str] = Counter()
    seen_status: set[str] = set()
    clips = kept = 0
    clip_s = kept_s = 0.0
    errors: Counter[str] = Counter()
    error_reasons: set[str] = set()
    for table in columns.scan(store.ledger().files("scores"), list(dict.fromkeys(wanted))):
        is_clip = columns.is_clip(table)
        keep = keep_of(table) & is_clip
        dur = np.nan_to_num(columns.floats(table, "duration_s"))
        clips += int(is_clip.sum())
        kept += int(keep.sum())
        clip_s += float(dur[is_clip].sum())
        kept_s += float(dur[keep].sum())
        membership.matrix(table.filter(pa.array(is_clip)), count=True)
        statuses = table.column("source_status").to_pylist()
        split_errors = table.column("split_error").to_pylist()
        for k, sid in enumerate(table.column("source_id").to_pylist()):
            if sid != last:  # a source's rows are contiguous
                outcomes.update(seen_status)
                failed += source_failed
                seen_status, last, source_failed = set(), sid, False
                sources += 1
            if not is_clip[k]:
                seen_status.add(status_of(statuses[k]))
            if split_errors[k]:
                source_failed = True
                if len(error_reasons) < MAX_ERROR_EXAMPLES:
                    error_reasons.add(split_errors[k])
        for column in schema.ERROR_COLUMNS:
            errors[column] += table.num_rows - table.column(column).null_count
    outcomes.update(seen_status)
    failed += source_failed
    run = store.read_run()
    return {
        "status": run.get("status", "unknown"), "sources": sources, "source_errors": failed,
        "source_outcomes": dict(sorted(outcomes.items())), "clips": clips, "kept": kept,
        "clip_hours": clip_s / 3600, "kept_hours": kept_s / 3600,
        "rejections": membership.reasons(), "errors": {k: v for k, v in errors.items() if v},
        "source_error_reasons": sorted(error_reasons),
    }
