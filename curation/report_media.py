"""The report's pictures: plots, keyframe thumbnails and playable kept clips, as bytes and as
data: URLs for the page (curation/report_html.py), from the summary (curation/report_summary.py).

Size at scale: plots are drawn from the summary's histogram counts; thumbnails are made only
for the clips the galleries, the kept strips and the near-duplicate pairs show; at most
`max_videos` kept clips are embedded as playable H.264 (at most `max_video_bytes` in all).
Keyframes and videos are read only for those clips, one parquet row group at a time.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation import outdir, schema
from curation.writer import OutputStore


def plot_images(summary: dict[str, Any], rules: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes by name: the funnel, the overlaps (two rules or more), a histogram per computed score."""
    from curation import plots  # noqa: PLC0415  (matplotlib: only when a page is written)

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
    return images


def read_payload(store: OutputStore, ledger: dict[str, dict[str, Any]], wanted: dict[str, set[str]],
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
            pf = outdir.parquet_file(path)
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


def clip_caption(clips: pa.Table, row: int) -> dict[str, Any]:
    """The scores and identity shown under a thumbnail."""
    r = clips.slice(row, 1).to_pylist()[0]
    shown = {c: r.get(c) for c in ["duration_s"] + schema.SCORE_COLUMNS
             if r.get(c) is not None and not (isinstance(r.get(c), float) and np.isnan(r.get(c)))}
    return {"clip_id": r["clip_id"], "source": Path(r["source_path"]).name, "start_s": r["start_s"],
            "scores": shown, "reasons": r["reject_reasons"] or [], "keep": bool(r["keep"])}


def _wanted(clips: pa.Table, rows: Any) -> dict[str, set[str]]:
    """{unit_id: clip_ids} of the clips at `rows` of the report's clips table."""
    units = clips.column("unit_id").to_pylist()
    ids = clips.column("clip_id").to_pylist()
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(units[row], set()).add(ids[row])
    return wanted


def gallery_thumbnails(store: OutputStore, ledger: dict[str, dict[str, Any]], clips: pa.Table,
                       galleries: dict[str, dict[str, Any]], dedup_wanted: dict[str, set[str]],
                       height_px: int) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(thumbnail data: URL, caption) by clip_id for the gallery clips and the kept strips, and
    thumbnails for the near-duplicate pairs (`dedup_wanted`, curation/dedup_report.py)."""
    rows = {item["row"] for g in galleries.values() for item in g["rejected"] + g["kept_strip"]}
    keyframes = read_payload(store, ledger, _wanted(clips, rows), "keyframes")
    keyframes.update(read_payload(store, ledger, dedup_wanted, "keyframes"))
    thumbs = {}
    for cid, frames in keyframes.items():
        jpeg = thumbnail(frames, height_px)
        if jpeg is not None:
            thumbs[cid] = data_url("image/jpeg", jpeg)
    ids = clips.column("clip_id").to_pylist()
    captions = {ids[row]: clip_caption(clips, row) for row in rows}
    return thumbs, captions


def video_candidates(keep: np.ndarray, galleries: dict[str, dict[str, Any]], max_videos: int) -> list[int]:
    """Rows of kept clips to embed: borderline kept clips first (round robin over rules), then
    kept clips spread over the run; at most 4 * max_videos (some may lack a stored video)."""
    candidates: list[int] = []
    strips = [g["kept_strip"] for g in galleries.values()]
    for k in range(max(map(len, strips), default=0)):
        candidates += [s[k]["row"] for s in strips if k < len(s)]
    kept_rows = np.flatnonzero(keep)
    if kept_rows.size:
        spread = np.linspace(0, kept_rows.size - 1, min(kept_rows.size, 4 * max_videos)).round().astype(int)
        candidates += kept_rows[np.unique(spread)].tolist()
    return list(dict.fromkeys(candidates))[: 4 * max_videos]


def kept_videos(store: OutputStore, ledger: dict[str, dict[str, Any]], clips: pa.Table, keep: np.ndarray,
                galleries: dict[str, dict[str, Any]], captions: dict[str, dict[str, Any]],
                max_videos: int, max_video_bytes: int) -> dict[str, str]:
    """{clip_id: data:video/mp4 URL} of at most max_videos kept clips, max_video_bytes in all;
    their captions are added to `captions`."""
    candidates = video_candidates(keep, galleries, max_videos)
    video_bytes = read_payload(store, ledger, _wanted(clips, candidates), "video")
    ids = clips.column("clip_id").to_pylist()
    videos: dict[str, str] = {}
    budget = max_video_bytes
    for row in candidates:
        data = video_bytes.get(ids[row])
        if len(videos) >= max_videos or not data or len(data) > budget:
            continue
        budget -= len(data)
        videos[ids[row]] = data_url("video/mp4", data)
        captions.setdefault(ids[row], clip_caption(clips, row))
    return videos
