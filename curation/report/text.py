"""`curate report`'s terminal tables: the short funnel (`format_funnel`) and the summary's
headline table (`format_summary`)."""

from __future__ import annotations

from typing import Any

from curation.report.summary import format_outcomes


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
