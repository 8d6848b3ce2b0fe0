"""The numbers of the report's near-duplicate section (its HTML: html.render_dedup): counts from
OUT/dedup/dedup.json, example pairs from OUT/dedup/duplicates.parquet (curation/dedup/), with
the temporal match score and the time shift at which the clips matched; `wanted_clips`: the
clips whose keyframe thumbnails the pairs show (media.py).

Example pairs: the least similar duplicates first (the borderline decisions a reader should
check against min_match), then the most similar; at most `max_pairs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, outdir
from curation.writer import OutputStore


def dedup_section(store: OutputStore, run: dict[str, Any], paths: list[Any],
                  max_pairs: int = 8) -> dict[str, Any] | None:
    """The section's numbers and example pairs (None when the run has no dedup section); the
    shown clips' details and the duplicates' minutes streamed from the scores `paths`."""
    if (run.get("config") or {}).get("dedup") is None:
        return None
    summary_path, table_path = store.root / "dedup" / "dedup.json", store.root / "dedup" / "duplicates.parquet"
    if not summary_path.exists() or not table_path.exists():
        return {"settings": run["config"]["dedup"], "missing": "dedup has not run on this output yet"}
    section = json.loads(summary_path.read_text())
    dups = outdir.read_table(table_path).sort_by([("similarity", "ascending"), ("clip_id", "ascending")])
    n = dups.num_rows
    half = max_pairs // 2
    picks = list(range(min(n, half))) + list(range(max(half, n - (max_pairs - half)), n))
    rows = dups.take(pa.array(sorted(set(picks)), pa.int64())).to_pylist() if n else []
    shown = pa.array(sorted({r["clip_id"] for r in rows} | {r["duplicate_of"] for r in rows}), pa.string())
    duplicates = dups.column("clip_id").combine_chunks()
    info: dict[str, dict[str, Any]] = {}
    minutes = 0.0
    for table in columns.scan(paths, ["clip_id", "source_path", "start_s", "keep", "duration_s"]):
        hit = pc.is_in(table.column("clip_id"), value_set=shown)
        if pc.any(hit).as_py():
            info.update({r["clip_id"]: r for r in table.filter(hit).to_pylist()})
        minutes += float(pc.sum(table.filter(pc.is_in(table.column("clip_id"), value_set=duplicates))
                                .column("duration_s")).as_py() or 0.0) / 60
    pairs = []
    for r in rows:
        a, b = info.get(r["clip_id"], {}), info.get(r["duplicate_of"], {})
        pairs.append({"duplicate": r["clip_id"], "kept": r["duplicate_of"], "similarity": r["similarity"],
                      "shift_s": r.get("shift_s"),
                      "duplicate_source": Path(a.get("source_path") or "?").name, "duplicate_start_s": a.get("start_s"),
                      "kept_source": Path(b.get("source_path") or "?").name, "kept_start_s": b.get("start_s"),
                      "kept_passes": bool(b.get("keep"))})
    if n:
        sims = dups.column("similarity").to_numpy()
        section["similarity"] = {"min": float(sims.min()), "median": float(sorted(sims)[n // 2]),
                                 "max": float(sims.max())}
    section["duplicate_minutes"] = minutes
    section["pairs"] = pairs
    return section


def wanted_clips(section: dict[str, Any] | None) -> set[str]:
    """The clip_ids whose keyframes the example pairs show."""
    return {cid for p in (section or {}).get("pairs", []) for cid in (p["duplicate"], p["kept"])}
