"""The report page: one self-contained HTML file built from the summary (summary.py).

Everything the page shows is inline: plots and thumbnails as data:image URLs, kept clips as
data:video/mp4 URLs (H.264, which Chromium and Firefox play). No script, font or style is
loaded from anywhere, so the page opens from disk with no server and no network, and it can
be mailed or archived as one file. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from html import escape
from typing import Any

from curation.report.summary import format_outcomes
from stages.rules import fmt

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 16px 48px;color:#212121;background:#fafafa}
h1{font-size:1.5em;margin:16px 0 4px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:16px 0 6px}
nav a{margin-right:12px}
table{border-collapse:collapse;margin:6px 0;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#eceff1}td.l,th.l{text-align:left}
.muted{color:#757575}.bad{color:#c62828}.good{color:#2e7d32}
.headline{font-size:1.1em;margin:8px 0}
.plots img{margin:4px;border:1px solid #ddd;background:#fff}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 12px}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:.75em;width:230px}
.card.rej{border-top:3px solid #c62828}.card.kept{border-top:3px solid #2e7d32}
.card img,.card video{display:block;max-width:100%}
.card .v{font-weight:bold}.noimg{height:48px;background:#eee;color:#999;text-align:center;line-height:48px}
.videos .card{width:340px}
.dedup-pair{display:inline-block;vertical-align:top;margin:4px;padding:4px;border:1px solid #ddd;background:#fff}
.dedup-pair .card{width:200px}
code{font-size:.95em}.scroll{overflow-x:auto}.tall{max-height:420px;overflow-y:auto;display:inline-block}
"""


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"  # tables: 4 significant digits are enough to read
    if isinstance(value, int):
        return f"{value:,}"
    return e(value)


def _table(header: list[str], rows: list[list[Any]], left: int | set[int] = 1, cls: str = "") -> str:
    """A table; columns in `left` (a set, or the first `left` columns) are left-aligned text."""
    lefts = left if isinstance(left, set) else set(range(left))
    out = [f'<div class="scroll"><table class="{cls}"><tr>']
    out += [f'<th class="{"l" if i in lefts else ""}">{e(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="{"l" if i in lefts else ""}">{v if isinstance(v, RawHtml) else _num(v)}</td>'
            for i, v in enumerate(row)) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


class RawHtml(str):
    """Already-escaped markup for a table cell."""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _card(item: dict[str, Any], caption: dict[str, Any] | None, thumb: str | None, kind: str,
          column: str) -> str:
    img = (f'<img src="{thumb}" alt="keyframes of {e(item["clip_id"])}">' if thumb
           else '<div class="noimg">no keyframes stored</div>')
    lines = [f'<span class="v">{e(column)} = {fmt(item["value"])}</span> '
             f'<span class="muted">({"outside" if kind == "rej" else "inside"} by {fmt(item["distance"])})</span>']
    if caption:
        lines.append(f'{e(caption["source"])} @ {fmt(caption["start_s"] or 0.0)}s')
        lines.append(", ".join(f"{e(k)} {v:.4g}" if isinstance(v, float) else f"{e(k)} {e(v)}"
                               for k, v in caption["scores"].items() if k != column))
        if caption["reasons"]:
            lines.append('<span class="bad">' + e(", ".join(caption["reasons"])) + "</span>")
    title = e(item["clip_id"])
    return f'<div class="card {kind}" title="{title}">{img}' + "<br>".join(lines) + "</div>"


def render(summary: dict[str, Any], images: dict[str, str], thumbs: dict[str, str],
           videos: dict[str, str], captions: dict[str, dict[str, Any]]) -> str:
    """The page: a header, then one section per part of the summary, in the order of the nav."""
    parts = _header(summary)
    parts += _funnel_section(summary, images)
    parts += _rules_section(summary, images)
    parts += _errors_section(summary)
    parts += _sources_section(summary)
    parts += _scores_section(summary, images)
    parts += _galleries_section(summary, thumbs, captions)
    parts.append(render_dedup(summary.get("dedup"), thumbs, fmt))  # the near-duplicate section (below)
    parts += _videos_section(summary, videos, captions)
    return "\n".join(parts)


def _header(summary: dict[str, Any]) -> list[str]:
    """Head, title line, an unfinished refilter's warning, the headline numbers, nav, studies."""
    t = summary["totals"]
    pct = f"{100 * t['kept'] / t['clips']:.1f}%" if t["clips"] else "-"
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>",  # no favicon request to the file system
        f"<title>curation report: {e(summary['out_dir'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Curation report</h1><div class='muted'>{e(summary['out_dir'])} &middot; run "
        f"{e(summary['status'])} &middot; config {e(summary['config_fingerprint'])} &middot; "
        f"generated {e(summary['generated_at'])}"
        + (f" &middot; {summary['refilters']} refilter(s)" if summary.get("refilters") else "") + "</div>",
        (f"<p class='bad'><b>A refilter did not finish</b> "
         f"(--set {e(' --set '.join(summary['unfinished_refilter']))}): "
         "the tables may mix old and new rules; run the same refilter again.</p>"
         if summary.get("unfinished_refilter") else ""),
        f"<p class='headline'><b>{t['sources']:,}</b> sources"
        + (f" ({e(format_outcomes(t['source_outcomes']))})" if t.get("source_outcomes") else "")
        + " &rarr; "
        f"<b>{t['clips']:,}</b> clips ({_minutes(t['clip_duration_s'])} min) &rarr; "
        f"<b class='good'>{t['kept']:,}</b> kept ({_minutes(t['kept_duration_s'])} min, {pct})</p>",
        "<nav><a href='#funnel'>funnel</a><a href='#rules'>rules</a><a href='#errors'>errors</a>"
        "<a href='#sources'>sources</a><a href='#scores'>scores</a><a href='#galleries'>galleries</a>"
        "<a href='#videos'>kept clips</a>" + ("<a href='#dedup'>near-duplicates</a>" if summary.get("dedup") else "")
        + "</nav>",
        ("<p>Does curation help? Proxy-model studies (<code>curate ablate</code>): " + ", ".join(
            f"<a href='../study/{e(n)}/index.html'>{e(n)}</a>" for n in summary["studies"]) + "</p>"
         if summary.get("studies") else ""),
    ]


def _funnel_section(summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    return [
        "<h2 id='funnel'>Funnel (pipeline order)</h2>",
        _table(["step", "removed", "removed min", "clips left", "min left"], [
            [row["label"], row["removed"] if row["rule"] else "",
             _minutes(row["removed_duration_s"]) if row["rule"] else "",
             row["remaining"], _minutes(row["remaining_duration_s"])] for row in summary["funnel"]]),
        f"<div class='plots'><img id='plot-funnel' class='plot' src='{images['funnel']}' alt='funnel'></div>",
    ]


def _rules_section(summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    """The rules table, overlaps, frequent combinations, reasons as stored, what was not applied."""
    rules = summary["rules"]
    parts = ["<h2 id='rules'>Rules</h2>"]
    rows = []
    for r in rules:
        status = "applied" if r["applied"] else "<span class='bad'>not applied</span>"
        if r.get("note"):
            status += f" <span class='muted'>({e(r['note'])})</span>"
        rows.append([r["label"], r["step"] or "", r["threshold"], r["rejected"], r["only_this"],
                     r["missing"], r["cascade_removed"], RawHtml(status)])
    parts.append(_table(["rule", "step", "threshold", "rejected", "only this rule", "missing value",
                         "removed in cascade", "status"], rows, left=3) if rows
                 else "<p class='muted'>No filter rules in this run.</p>")
    ov = summary["overlaps"]
    if len(ov["rules"]) >= 2:
        labels = [r["label"] for r in rules]
        parts.append("<h3>Overlaps: clips rejected by both rules</h3>")
        parts.append(_table([""] + labels, [[labels[i]] + list(row) for i, row in enumerate(ov["matrix"])]))
        if "overlaps" in images:
            parts.append(f"<div class='plots'><img class='plot' src='{images['overlaps']}' alt='overlaps'></div>")
    if ov["combinations"]:
        parts.append("<h3>Most frequent combinations of rejecting rules</h3>")
        by_id = {r["id"]: r["label"] for r in rules}
        parts.append(_table(["rules", "clips"], [[" + ".join(by_id.get(i, i) for i in c["rules"]), c["clips"]]
                                                 for c in ov["combinations"]]))
    if summary["reasons"]:
        parts.append("<h3>Reasons as stored</h3>")
        parts.append(_table(["reason", "clips", "only this reason"],
                            [[k, v["total"], v["only_this"]] for k, v in summary["reasons"].items()]))
    return parts + _not_applied(summary)


def _not_applied(summary: dict[str, Any]) -> list[str]:
    """Skipped steps (with preflight's reason) and every rule not applied."""
    if not (summary["skipped_steps"] or summary["rules_not_applied"]):
        return []
    parts = ["<h3>Not applied</h3><ul>"]
    for s in summary["skipped_steps"]:
        parts.append(f"<li>step <b>{e(s.get('step'))}</b> skipped; columns not computed: "
                     f"{e(', '.join(s.get('columns') or []))}"
                     f"<pre class='muted'>{e(s.get('reason', ''))}</pre></li>")
    for r in summary["rules"]:
        if not r["applied"]:
            parts.append(f"<li>rule not applied: <b>{e(r['label'])}</b> {e(r['threshold'])}"
                         f" (step {e(r['step'])}): {e(r['note'] or '')}</li>")
    parts.append("</ul>")
    return parts


def _errors_section(summary: dict[str, Any]) -> list[str]:
    parts = ["<h2 id='errors'>Errors by stage</h2>"]
    if summary["errors"]:
        rows = [[stage, x["reason"], x["count"], x["example"]] for stage, err in summary["errors"].items()
                for x in err["reasons"]]
        parts.append(_table(["stage", "reason", "rows", "example"], rows, left={0, 1, 3}))
    else:
        parts.append("<p class='muted'>No errors.</p>")
    return parts


def _sources_section(summary: dict[str, Any]) -> list[str]:
    src = summary["sources"]
    return [
        f"<h2 id='sources'>Sources</h2><p class='muted'>{len(src['rows'])} of {src['total']} sources "
        f"(most clips first); all in <a href='{e(src.get('csv', 'sources.csv'))}'>sources.csv</a></p>",
        "<div class='tall'>",
        _table(["source", "clips", "kept", "clip min", "top rejection", "error"], [
            [s["source_path"], s["clips"], s["kept"], f"{s['clip_minutes']:.1f}",
             f"{s['top_rejection']['rule']} ({s['top_rejection']['clips']})" if s["top_rejection"] else "",
             RawHtml(f"<span class='bad'>{e(s['error'][:120])}</span>") if s["error"] else ""]
            for s in src["rows"]], left={0, 4, 5}),
        "</div>",
    ]


def _scores_section(summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    """Quantiles of every score, then its histogram (kept/rejected, thresholds drawn)."""
    qnames = ["p0", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99", "p100"]
    qrows = []
    for column, st in summary["scores"].items():
        if st.get("computed"):
            qrows.append([column, st["values"], st["missing"], st["mean"]] + [st["quantiles"][q] for q in qnames])
        else:
            qrows.append([column, 0, st["missing"], RawHtml("<span class='muted'>not computed</span>")]
                         + [""] * len(qnames))
    parts = ["<h2 id='scores'>Scores</h2>", _table(["score", "values", "missing", "mean"] + qnames, qrows),
             "<div class='plots'>"]
    for column in summary["scores"]:
        key = f"score_{column}"
        if key in images:
            parts.append(f"<img class='plot' id='plot-{e(column)}' src='{images[key]}' alt='histogram of {e(column)}'>")
    parts.append("</div>")
    return parts


def _galleries_section(summary: dict[str, Any], thumbs: dict[str, str],
                       captions: dict[str, dict[str, Any]]) -> list[str]:
    """Per rule: rejected clips, borderline first, and the kept clips just inside the threshold."""
    parts = ["<h2 id='galleries'>Rejection galleries</h2><p class='muted'>Per rule: rejected clips "
             "ordered by distance to the threshold, borderline first (the closest, then a spread of the "
             "rest), and the kept clips just inside the threshold. Keyframes: first, middle, last.</p>"]
    by_id = {r["id"]: r for r in summary["rules"]}
    for rule_id, g in summary["galleries"].items():
        r = by_id[rule_id]
        parts.append(f"<section class='rule-gallery' data-rule='{e(rule_id)}'><h3>{e(r['label'])}: "
                     f"{e(r['threshold'])}</h3><div class='muted'>{g['rejected_total']:,} rejected"
                     f" ({g['rejected_missing']:,} with no value, not shown); showing {len(g['rejected'])}</div>")
        parts.append("<div class='gallery rejected'>" + "".join(
            _card(item, captions.get(item["clip_id"]), thumbs.get(item["clip_id"]), "rej", r["column"])
            for item in g["rejected"]) + "</div>")
        if g["kept_strip"]:
            parts.append("<div class='muted'>kept, just inside the threshold</div><div class='gallery kept'>" + "".join(
                _card(item, captions.get(item["clip_id"]), thumbs.get(item["clip_id"]), "kept", r["column"])
                for item in g["kept_strip"]) + "</div>")
        parts.append("</section>")
    if not summary["galleries"]:
        parts.append("<p class='muted'>No rule with a threshold.</p>")
    return parts


def _videos_section(summary: dict[str, Any], videos: dict[str, str],
                    captions: dict[str, dict[str, Any]]) -> list[str]:
    """Playable kept clips, with their source, start and scores; the page's end."""
    parts = [f"<h2 id='videos'>Kept clips</h2><p class='muted'>{len(videos)} of {summary['totals']['kept']:,} "
             "kept clips, playable (borderline kept clips first, then a spread over the run).</p>"
             "<div class='gallery videos'>"]
    for cid, url in videos.items():
        c = captions.get(cid) or {}
        scores = ", ".join(f"{e(k)} {v:.4g}" if isinstance(v, float) else f"{e(k)} {e(v)}"
                           for k, v in c.get("scores", {}).items())
        parts.append(f"<div class='card kept' title='{e(cid)}'><video controls muted loop playsinline "
                     f"preload='auto' src='{url}'></video>{e(c.get('source', ''))} @ "
                     f"{fmt(c.get('start_s') or 0.0)}s<br>{scores}</div>")
    parts.append("</div></body></html>")
    return parts


# ---- the near-duplicate section (its numbers: dedup.py) -----------------------------------------

def render_dedup(section: dict[str, Any] | None, thumbs: dict[str, str],
                 fmt: Callable[[float], str] = lambda v: f"{v:.4g}") -> str:
    """The section's HTML (empty when the run has no dedup section)."""
    if section is None:
        return ""
    out = ["<h2 id='dedup'>Near-duplicates</h2>"]
    if "missing" in section:
        return out[0] + f"<p class='muted'>{escape(section['missing'])}</p>"
    sim = section.get("similarity")
    out.append(f"<p><b>{section['duplicates']:,}</b> duplicates rejected "
               f"({section['duplicate_minutes']:.1f} min) in <b>{section['groups']:,}</b> groups of "
               f"{section['clips_in_groups']:,} clips; {section['clips_embedded']:,} clips compared: "
               f"candidates by <code>{escape(section['embedding'])}</code> vectors, cosine &ge; "
               f"{fmt(section['min_cosine'])} (eps {fmt(section['eps'])}), duplicates when their temporal "
               f"signatures match at &ge; {fmt(section.get('min_match', 0.0))} within a shift of "
               f"{fmt(section.get('max_shift_s', 0.0))} s; kept: passing the rules first, then "
               f"{escape(', '.join(section['keep_by']) or 'clip_id')}"
               + (f". Match score of the duplicates: min {fmt(sim['min'])}, median {fmt(sim['median'])}, "
                  f"max {fmt(sim['max'])}" if sim else "") + ".</p>")
    if section["pairs"]:
        out.append("<p class='muted'>Example pairs, least similar first: duplicate (rejected) | kept.</p>"
                   "<div class='gallery dedup-pairs'>")
        for p in section["pairs"]:
            cards = []
            for cid, src, start, cls in ((p["duplicate"], p["duplicate_source"], p["duplicate_start_s"], "rej"),
                                         (p["kept"], p["kept_source"], p["kept_start_s"], "kept")):
                img = (f"<img src='{thumbs[cid]}' alt='keyframes of {escape(cid)}'>" if cid in thumbs
                       else "<div class='noimg'>no keyframes stored</div>")
                cards.append(f"<div class='card {cls}' title='{escape(cid)}'>{img}{escape(src)} @ "
                             f"{fmt(start or 0.0)}s</div>")
            shift = "" if p.get("shift_s") is None else f", shift {fmt(p['shift_s'])} s"
            out.append(f"<div class='dedup-pair'><b>match {fmt(p['similarity'])}{shift}</b>"
                       + ("" if p["kept_passes"] else " <span class='bad'>(kept clip fails other rules)</span>")
                       + "<div class='gallery'>" + "".join(cards) + "</div></div>")
        out.append("</div>")
    return "\n".join(out)
