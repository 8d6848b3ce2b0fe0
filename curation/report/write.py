"""`write_report`: OUT/report/ (the package docstring says what is in it). The summary is
computed once per call (summary.py, the near-duplicate section from dedup.py) and handed to each
output: sources.csv as it is computed, the plots, thumbnails and videos (media.py), the page
(html.py) and summary.json."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from curation import outdir
from curation.report import media
from curation.report.summary import summarize
from curation.writer import OutputStore, write_atomic_bytes, write_json

log = logging.getLogger("curation.report")


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
    from curation.report.dedup import dedup_section, wanted_clips  # noqa: PLC0415
    from curation.report.html import render  # noqa: PLC0415

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
    summary["dedup"] = dedup_section(store, work["run"], work["paths"])  # run.json as summarize read it
    thumbs, captions = media.gallery_thumbnails(store, summary["galleries"], wanted_clips(summary["dedup"]),
                                                thumb_height_px)
    videos = media.kept_videos(store, summary["galleries"], work["spread_kept"], captions, max_videos,
                               max_video_bytes)
    summary["videos"] = list(videos)
    # Proxy-model studies of this output (`curate ablate`, training/study/), linked from the page.
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
