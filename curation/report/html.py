"""The report page: one self-contained HTML file, from the summary (summary.py) and its
media, through the templates the report shares with the review page (curation/templates/:
report.html, with base.html, macros.html and style.css). This module only shapes the few
tables whose rows are not the summary's own into rows for the template's table macro.

Everything the page shows is inline: plots and thumbnails as data:image URLs, kept clips as
data:video/mp4 URLs (H.264, which Chromium and Firefox play). No script, font or style is
loaded from anywhere, so the page opens from disk with no server and no network, and it can
be mailed or archived as one file. Every string from the data is HTML-escaped (the templates
autoescape).
"""

from __future__ import annotations

from typing import Any

from curation import templates
from curation.report.summary import format_outcomes

QUANTILES = ["p0", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99", "p100"]


def render(summary: dict[str, Any], images: dict[str, str], thumbs: dict[str, str],
           videos: dict[str, str], captions: dict[str, dict[str, Any]]) -> str:
    """The page: a header, then one section per part of the summary, in the order of the nav."""
    t = summary["totals"]
    return templates.render(
        "report.html", summary=summary, images=images, thumbs=thumbs, videos=videos, captions=captions,
        outcomes=format_outcomes(t["source_outcomes"]) if t.get("source_outcomes") else "",
        quantile_names=QUANTILES, funnel_rows=funnel_rows, overlap_rows=overlap_rows,
        combination_rows=combination_rows, reason_rows=reason_rows, error_rows=error_rows,
        rules_by_id=lambda rules: {r["id"]: r for r in rules})


def funnel_rows(funnel: list[dict[str, Any]]) -> list[list[Any]]:
    return [[row["label"], row["removed"] if row["rule"] else "",
             templates.minutes(row["removed_duration_s"]) if row["rule"] else "",
             row["remaining"], templates.minutes(row["remaining_duration_s"])] for row in funnel]


def overlap_rows(labels: list[str], matrix: list[list[int]]) -> list[list[Any]]:
    return [[labels[i]] + list(row) for i, row in enumerate(matrix)]


def combination_rows(rules: list[dict[str, Any]], combinations: list[dict[str, Any]]) -> list[list[Any]]:
    by_id = {r["id"]: r["label"] for r in rules}
    return [[" + ".join(by_id.get(i, i) for i in c["rules"]), c["clips"]] for c in combinations]


def reason_rows(reasons: dict[str, dict[str, int]]) -> list[list[Any]]:
    return [[k, v["total"], v["only_this"]] for k, v in reasons.items()]


def error_rows(errors: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[stage, x["reason"], x["count"], x["example"]] for stage, err in errors.items() for x in err["reasons"]]
