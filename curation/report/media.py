"""The report's pictures: plots, keyframe thumbnails and playable kept clips, as bytes and as
data: URLs for the page (html.py), from the summary (summary.py).

Size at scale: plots are drawn from the summary's histogram counts; thumbnails are made only
for the clips the galleries, the kept strips and the near-duplicate pairs show; at most
`max_videos` kept clips are embedded as playable H.264 (at most `max_video_bytes` in all).
Keyframes and videos are read only for those clips, one parquet row group at a time.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import outdir
from curation.writer import OutputStore


def plot_images(summary: dict[str, Any], rules: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes by name: the funnel, the overlaps (two rules or more), a histogram per computed score."""
    from curation.report import plots  # noqa: PLC0415  (matplotlib: only when a page is written)

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


def read_payload(paths: list[Any], wanted: set[str], column: str) -> dict[str, Any]:
    """{clip_id: value of `column`} for the `wanted` clips found in the parquet files `paths`,
    reading their clip_id column and then only the row groups that hold wanted clips."""
    found: dict[str, Any] = {}
    if not wanted:
        return found
    want = pa.array(sorted(wanted), pa.string())
    for path in paths:
        if len(found) == len(wanted):
            break
        pf = outdir.parquet_file(path)
        hit = np.flatnonzero(pc.is_in(pf.read(columns=["clip_id"]).column("clip_id"), value_set=want)
                             .to_numpy(zero_copy_only=False))
        if not hit.size:
            continue
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        for g in sorted({int(g) for g in np.searchsorted(starts, hit, side="right") - 1}):
            t = pf.read_row_group(g, columns=["clip_id", column])  # one row group at a time
            t = t.filter(pc.is_in(t.column("clip_id"), value_set=want))
            for cid, value in zip(t.column("clip_id").to_pylist(), t.column(column).to_pylist()):
                if value is not None:
                    found[cid] = value
    return found


def payload(store: OutputStore, wanted: set[str], column: str) -> dict[str, Any]:
    """read_payload from clips/, then from shards/ for clips not found there (outputs with
    run.store_all_clips=false store only the kept clips' payload)."""
    ledger = store.ledger()
    found = read_payload(ledger.files("clips"), wanted, column)
    if len(found) < len(wanted):
        found.update(read_payload(ledger.files("shards"), wanted - found.keys(), column))
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


def gallery_thumbnails(store: OutputStore, galleries: dict[str, dict[str, Any]], dedup_wanted: set[str],
                       height_px: int) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(thumbnail data: URL, caption) by clip_id for the gallery clips and the kept strips, and
    thumbnails for the near-duplicate pairs (`dedup_wanted`, dedup.py). The gallery items
    carry their captions (summary.py); they are taken off them."""
    captions = {}
    for g in galleries.values():
        for item in g["rejected"] + g["kept_strip"]:
            captions[item["clip_id"]] = item.pop("caption")
    keyframes = payload(store, set(captions) | dedup_wanted, "keyframes")
    thumbs = {}
    for cid, frames in keyframes.items():
        jpeg = thumbnail(frames, height_px)
        if jpeg is not None:
            thumbs[cid] = data_url("image/jpeg", jpeg)
    return thumbs, captions


def video_candidates(galleries: dict[str, dict[str, Any]], spread_kept: list[dict[str, Any]],
                     max_videos: int) -> list[str]:
    """clip_ids of kept clips to embed: borderline kept clips first (round robin over rules),
    then kept clips spread over the run; at most 4 * max_videos (some may lack a stored video)."""
    candidates: list[str] = []
    strips = [g["kept_strip"] for g in galleries.values()]
    for k in range(max(map(len, strips), default=0)):
        candidates += [s[k]["clip_id"] for s in strips if k < len(s)]
    candidates += [c["clip_id"] for c in spread_kept]
    return list(dict.fromkeys(candidates))[: 4 * max_videos]


def kept_videos(store: OutputStore, galleries: dict[str, dict[str, Any]], spread_kept: list[dict[str, Any]],
                captions: dict[str, dict[str, Any]], max_videos: int, max_video_bytes: int) -> dict[str, str]:
    """{clip_id: data:video/mp4 URL} of at most max_videos kept clips, max_video_bytes in all;
    their captions are added to `captions`."""
    candidates = video_candidates(galleries, spread_kept, max_videos)
    video_bytes = payload(store, set(candidates), "video")
    spread = {c["clip_id"]: c for c in spread_kept}
    videos: dict[str, str] = {}
    budget = max_video_bytes
    for cid in candidates:
        data = video_bytes.get(cid)
        if len(videos) >= max_videos or not data or len(data) > budget:
            continue
        budget -= len(data)
        videos[cid] = data_url("video/mp4", data)
        if cid in spread:
            captions.setdefault(cid, spread[cid])
    return videos
