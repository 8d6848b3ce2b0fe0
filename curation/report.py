"""`curate report OUT`: the funnel of a run, computed from the written scores tables only.

Prints sources, source errors, clips, kept clips, rejections per rule (in total and by that
rule alone) and per-stage error counts. Also returns the same numbers as a dict.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from curation import schema
from curation.writer import OutputStore


def funnel(out_dir: str | Path) -> dict[str, Any]:
    store = OutputStore(out_dir)
    if not store.ledger_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a curation output (no ledger/); run `curate run` first")
    rows = store.read_scores().to_pylist()
    clips = [r for r in rows if r["start_frame"] is not None]
    failed_sources = {r["source_id"] for r in rows if r["split_error"] is not None}
    by_reason: Counter[str] = Counter()
    alone: Counter[str] = Counter()
    for r in clips:
        reasons = r["reject_reasons"] or []
        by_reason.update(reasons)
        if len(reasons) == 1:
            alone[reasons[0]] += 1
    errors = {col: sum(1 for r in rows if r.get(col) is not None) for col in schema.ERROR_COLUMNS}
    run = store.read_run()
    return {
        "status": run.get("status", "unknown"),
        "sources": len({r["source_id"] for r in rows}),
        "source_errors": len(failed_sources),
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
        f"source errors   {f['source_errors']}",
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
