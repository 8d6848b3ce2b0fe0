"""Benchmark of `curate report` (and `curate refilter`) on a large synthetic run.

    python bench/report_bench.py                 # 100k clips
    python bench/report_bench.py --clips 20000 --keep-dir /tmp/bench_out

Builds an OUT_DIR with the layout curation/writer.py writes (scores/, clips/, shards/,
ledger/, run.json) from random scores: no video is decoded, keyframes are tiny JPEGs and only
one clip in `--video-every` carries a (tiny, real H.264) video. The rules are the SVD paper's
percentile calibration (drop the 25% most static, the 25% with most text, the bottom 25%
aesthetics, the bottom 50% caption similarity) plus an absolute duration rule, in two filter
steps. keep/reject_reasons and shards come from `curation.finalize.apply_rules`, the same code
as the end-of-run pass. Prints the time of that pass, of the report, and the page's size.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import schema  # noqa: E402
from curation.writer import OutputStore, write_json, write_parquet_atomic  # noqa: E402

log = logging.getLogger("bench")

SVD_RULES_CONFIG = {
    "run": {"sources_per_unit": 50, "shard_target_mb": 256.0, "store_all_clips": True},
    "steps": [
        {"name": "split", "stage": "split", "args": {"min_duration_s": 2.0}, "ray": {}},
        {"name": "filter_cheap", "stage": "filter", "ray": {}, "args": {"rules": {
            "motion_score": {"drop_bottom": 0.25},
            "text_area_ratio": {"drop_top": 0.25},
            "aesthetic_score": {"drop_bottom": 0.25}}}},
        {"name": "filter", "stage": "filter", "ray": {}, "args": {"rules": {
            "clip_similarity": {"drop_bottom": 0.5},
            "duration_s": {"min": 2.5}}}},
    ],
}


def tiny_jpegs(n: int = 8, size: tuple[int, int] = (32, 18)) -> list[bytes]:
    """A few distinct, tiny JPEG keyframes (solid colours with a bar)."""
    from PIL import Image, ImageDraw

    out = []
    for k in range(n):
        im = Image.new("RGB", size, ((37 * k) % 256, (91 * k + 60) % 256, (53 * k + 120) % 256))
        ImageDraw.Draw(im).rectangle((k * 3 % size[0], 4, k * 3 % size[0] + 5, 12), fill="white")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=60)
        out.append(buf.getvalue())
    return out


def tiny_mp4(frames: int = 12, size: tuple[int, int] = (64, 36), fps: int = 12) -> bytes:
    """A real, tiny H.264 mp4 (so the page's video elements have something to play)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[:, (i * 4) % size[0]:(i * 4) % size[0] + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_synthetic_run(out_dir: Path, n_clips: int, seed: int = 0, clips_per_source: int = 20,
                       sources_per_unit: int = 50, video_every: int = 5,
                       config: dict | None = None) -> dict:
    """Write a complete synthetic OUT_DIR with about n_clips clips; returns the config dict."""
    from curation.finalize import apply_rules

    config = config or SVD_RULES_CONFIG
    rng = np.random.default_rng(seed)
    store = OutputStore(out_dir)
    for d in (store.scores_dir, store.shards_dir, store.clips_dir, store.ledger_dir):
        d.mkdir(parents=True, exist_ok=True)
    jpegs = tiny_jpegs()
    video = tiny_mp4()
    n_sources = max(1, n_clips // clips_per_source)
    clip_no = 0
    for u, first in enumerate(range(0, n_sources, sources_per_unit)):
        unit_id = f"u{u:015x}"
        rows: dict[str, list] = {f.name: [] for f in schema.SCORES_SCHEMA}
        payload: dict[str, list] = {"clip_id": [], "video": [], "keyframes": []}
        source_ids = []
        for s in range(first, min(n_sources, first + sources_per_unit)):
            path = f"/data/raw/source_{s:06d}.mp4"
            sid = schema.source_id_for(path)
            source_ids.append(sid)
            broken = rng.random() < 0.005
            count = 1 if broken else clips_per_source
            t = 0.0
            for c in range(count):
                dur = None if broken else float(rng.uniform(2.0, 10.0))
                fps = 24.0
                start = None if broken else int(round(t * fps))
                end = None if broken else start + int(round(dur * fps))
                cid = schema.clip_id_for(sid, start, end)
                flow_failed = not broken and rng.random() < 0.01
                values = {
                    "clip_id": cid, "source_id": sid, "source_path": path,
                    "start_frame": start, "end_frame": end, "start_s": None if broken else t,
                    "duration_s": dur, "fps": None if broken else fps,
                    "width": None if broken else 568, "height": None if broken else 320,
                    "motion_score": float("nan") if broken or flow_failed else float(rng.lognormal(0.5, 1.0)),
                    "text_area_ratio": None if broken else float(rng.beta(0.5, 12)),
                    "aesthetic_score": None if broken else float(rng.normal(5.0, 0.8)),
                    "clip_similarity": None if broken else float(rng.normal(0.28, 0.04)),
                    "split_error": "InvalidDataError: Invalid data found when processing input" if broken else None,
                    "motion_error": "RuntimeError: optical flow failed" if flow_failed else None,
                    "keep": None, "reject_reasons": None,
                }
                for k in rows:
                    rows[k].append(values.get(k))
                if not broken:
                    payload["clip_id"].append(cid)
                    payload["video"].append(video if clip_no % video_every == 0 else None)
                    payload["keyframes"].append([jpegs[(clip_no + k) % len(jpegs)] for k in range(3)])
                    clip_no += 1
                    t += dur
        table = schema.batch_to_table(rows)
        write_parquet_atomic(store.scores_dir / f"{unit_id}.parquet", schema.conform(table, schema.SCORES_SCHEMA))
        write_parquet_atomic(store.clips_dir / f"{unit_id}.parquet",
                             schema.conform(schema.batch_to_table(payload), schema.CLIPS_SCHEMA), row_group_size=64)
        write_json(store.ledger_dir / f"{unit_id}.json", {
            "unit_id": unit_id, "source_ids": source_ids, "rows": table.num_rows,
            "clips": len(payload["clip_id"]), "kept": 0, "source_errors": table.num_rows - len(payload["clip_id"]),
            "stage_seconds": {}, "scores_file": f"{unit_id}.parquet", "clips_file": f"{unit_id}.parquet",
            "shard_files": [], "committed_at": time.time()})
    write_json(store.run_json, {"status": "complete", "config": config, "config_fingerprint": "synthetic",
                                "clips": clip_no})
    apply_rules(out_dir, config)  # keep/reject_reasons/shards exactly as the end-of-run pass writes them
    return config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=100_000)
    p.add_argument("--keep-dir", default=None, help="build here and keep it (default: a temp dir)")
    p.add_argument("--video-every", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from curation.finalize import apply_rules
    from curation.report import format_summary, write_report

    tmp = None
    if args.keep_dir:
        out = Path(args.keep_dir)
        shutil.rmtree(out, ignore_errors=True)
    else:
        tmp = tempfile.mkdtemp(prefix="report_bench")
        out = Path(tmp) / "out"
    try:
        started = time.perf_counter()
        make_synthetic_run(out, args.clips, video_every=args.video_every)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        result = apply_rules(out, SVD_RULES_CONFIG)  # a second pass: nothing to rewrite
        noop_s = time.perf_counter() - started
        started = time.perf_counter()
        tighter = json.loads(json.dumps(SVD_RULES_CONFIG))
        tighter["steps"][-1]["args"]["rules"]["duration_s"] = {"min": 3.0}
        changed = apply_rules(out, tighter)  # what `curate refilter` does: every unit rewritten
        changed_s = time.perf_counter() - started
        apply_rules(out, SVD_RULES_CONFIG)
        started = time.perf_counter()
        summary = write_report(out)
        report_s = time.perf_counter() - started
        print(format_summary(summary))
        print()
        print(f"clips                 {summary['totals']['clips']:,} in {len(OutputStore(out).committed())} units")
        print(f"build (incl. 1st pass) {build_s:.1f} s")
        print(f"refilter, no change   {noop_s:.1f} s ({result['units_rewritten']} units rewritten)")
        print(f"refilter, duration_s min 2.5 -> 3: {changed_s:.1f} s ({changed['units_rewritten']} units "
              f"rewritten, kept {result['kept']:,} -> {changed['kept']:,})")
        print(f"report                {report_s:.1f} s")
        print(f"page                  {summary['page']['bytes'] / 1024:.0f} KB, "
              f"{summary['page']['thumbnails']} thumbnails, {summary['page']['videos']} videos")
        print(f"summary.json          {(out / 'report' / 'summary.json').stat().st_size / 1024:.0f} KB")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
