"""`curate report OUT`: filter statistics of a run, computed from the written tables only.

`funnel(out_dir)` / `format_funnel(f)`: the short funnel (sources, clips, kept, rejections per
reason) as a dict and as text.

`write_report(out_dir, to=None)` writes OUT/report/ (or the folder `to`; either may be an
object-store URI, curation/outdir.py):
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
  run.json's resolved_rules (thresholds of percentile rules, curation/finalize.py);
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

The parts: the numbers (curation/report_summary.py, with the rules of a run in
curation/report_rules.py), the pictures (curation/report_media.py), the page
(curation/report_html.py); this module writes them and prints the terminal tables.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from curation import outdir
from curation import report_media as media
# funnel and summarize are imported from here by the CLI, the tests and the benches.
from curation.report_summary import format_outcomes, funnel, summarize  # noqa: F401
from curation.writer import OutputStore, write_atomic_bytes, write_json

log = logging.getLogger(__name__)


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



SOURCES_CSV_HEADER = ["source_id", "source_path", "clips", "kept", "clip_minutes", "top_rejection_rule",
                      "top_rejection_clips", "error"]


class SourcesCsv:
    """sources.csv, written row by row as the summary finishes each source (in the order of
    the scores: a unit's sources together), into a local file that becomes the report's."""

    def __init__(self, local: Path):
        self.file = open(local, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(SOURCES_CSV_HEADER)

    def __call__(self, s: dict[str, Any]) -> None:
        top = s["top_rejection"] or {}
        self.writer.writerow([s["source_id"], s["source_path"], s["clips"], s["kept"], s["clip_minutes"],
                              top.get("rule", ""), top.get("clips", ""), s["error"] or ""])

    def close(self) -> None:
        self.file.close()


def _page_record(summary: dict[str, Any], path: Path, page: bytes, thumbs: dict[str, str],
                 videos: dict[str, str], started: float) -> dict[str, Any]:
    """summary["page"]: where the page is, its size and what it embeds."""
    shown = [item["clip_id"] for g in summary["galleries"].values() for item in g["rejected"] + g["kept_strip"]]
    return {"path": str(path), "bytes": len(page),
            "thumbnails": sum(cid in thumbs for cid in shown),  # images on the page
            "thumbnail_clips": len(thumbs), "videos": len(videos),
            "seconds": round(time.monotonic() - started, 3)}


def write_report(out_dir: str | Path, to: str | Path | None = None, max_gallery: int = 12, max_strip: int = 6, max_videos: int = 6,
                 max_video_bytes: int = 3 * 1024 * 1024, max_source_rows: int = 200,
                 thumb_height_px: int = 64) -> dict[str, Any]:
    """Write OUT/report/ (index.html, summary.json, sources.csv, plots/*.png); return the summary."""
    from curation.dedup_report import dedup_section, wanted_clips  # noqa: PLC0415
    from curation.report_html import render  # noqa: PLC0415

    started = time.monotonic()
    report_dir = outdir.out_path(to) if to is not None else OutputStore(out_dir).root / "report"
    (report_dir / "plots").mkdir(parents=True, exist_ok=True)
    with outdir.staged_file(report_dir / "sources.csv") as local:
        sources = SourcesCsv(local)
        try:
            summary, work = summarize(out_dir, max_gallery, max_strip, max_source_rows, on_source=sources,
                                      max_videos=max_videos)
        finally:
            sources.close()
    store: OutputStore = work["store"]
    summary["sources"]["csv"] = "sources.csv"

    # Plots: PNG files next to the page, and the same bytes inline in it.
    images = media.plot_images(summary, work["rules"])
    for name, png in images.items():
        write_atomic_bytes(report_dir / "plots" / f"{name}.png", png)
    summary["plots"] = [f"plots/{name}.png" for name in images]

    # Thumbnails for the gallery clips, the kept strips and the near-duplicate pairs; videos
    # for a few kept clips.
    summary["dedup"] = dedup_section(store, store.read_run(), work["paths"])
    thumbs, captions = media.gallery_thumbnails(store, summary["galleries"], wanted_clips(summary["dedup"]),
                                                thumb_height_px)
    videos = media.kept_videos(store, summary["galleries"], work["spread_kept"], captions, max_videos,
                               max_video_bytes)
    summary["videos"] = list(videos)
    # Proxy-model studies of this output (`curate ablate`, training/study.py), linked from the page.
    # The links are relative, so only a report in OUT/report/ has them.
    studies = store.root / "study"
    summary["studies"] = [] if to is not None or not studies.is_dir() else sorted(
        p.name for p in studies.iterdir() if (p / "index.html").exists())

    # The page, then summary.json with the page's own numbers.
    page = render(summary, images={k: media.data_url("image/png", v) for k, v in images.items()},
                  thumbs=thumbs, videos=videos, captions=captions).encode("utf-8")
    write_atomic_bytes(report_dir / "index.html", page)
    summary["page"] = _page_record(summary, report_dir / "index.html", page, thumbs, videos, started)
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
