"""`curate export`: the committed shards in the formats other trainers read.

    webdataset  DIR/<piece>.tar: one sample per clip, keyed by clip_id (WebDataset's
                "<key>.<ext>" members, consecutive per sample):
                  mp4                    the clip (the shard's H.264 bytes, unchanged)
                  jpg                    the middle keyframe (what image loaders read)
                  kf<i>.jpg              every keyframe, in the shard's order (first, middle, last)
                  txt                    the caption ("" when the clip has none)
                  json                   scores, caption, fps_id, motion_bucket_id, source and
                                         frame range (SAMPLE_JSON_COLUMNS; NaN written as null)
                  image_embedding.npy    float32 vectors, when the shard has them
                  caption_embedding.npy
    files       DIR/videos/<piece>/<clip_id>.mp4 and DIR/meta.csv in Open-Sora's column
                convention (v1.2 tools/datasets/datautil.py TRAIN_COLUMNS: path, text, num_frames,
                fps, height, width, aspect_ratio = height / width, resolution = height * width;
                aes and match as its scorers name them), then this project's own columns; and
                DIR/meta.json, the same clips as EasyAnimate / VideoX-Fun list them ({file_path
                relative to DIR, text, type: "video", width, height})
    hf          DIR/data/train-<k>-of-<n>.parquet (every shard column; embeddings list<float32>)
                and DIR/README.md, a dataset card whose `configs` names the files, so
                `datasets.load_dataset(DIR)` and `ray.data.read_parquet(DIR/data)` open it as is

Safe at any size. Only the shard files the ledger lists are read, and only from an output whose
run and refilters finished (`OutputStore.not_ready_reason`). The work is cut into pieces (a tar,
a parquet file, a folder of mp4s) planned deterministically from the shards' row groups, about
`target_mb` each; a piece is read one row-group batch at a time and written under a temporary
name, then renamed (for `files`: its mp4s, then its part of the table, the piece's commit point).
DIR/export.json records the plan's fingerprint at the start and the finished manifest last, so a
killed export rerun with the same command skips finished pieces, rewrites partial ones and ends
with every selected clip exactly once. A rerun with other options or on changed data refuses
(or starts over with overwrite=True).

This module needs only pyarrow and numpy: `webdataset` and `datasets` are the readers, used in
the tests, never here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import outdir, schema
from curation.writer import OutputError, OutputStore, write_atomic_bytes, write_json
from stages import rules

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "files", "hf")
MANIFEST = "export.json"
BATCH_ROWS = 16  # rows decoded from a shard at a time: a few videos, whatever the row group size

# Scalar columns of a webdataset sample's json: identity, scores, filter outcome, caption, SVD
# micro-conditioning. The payload travels as its own members (mp4, jpg, npy).
SAMPLE_JSON_COLUMNS = [f.name for f in schema.SCORES_SCHEMA] + [
    "caption", "caption_source", "fps_id", "motion_bucket_id"]

# Open-Sora v1.2: tools/datasets/datautil.py TRAIN_COLUMNS (path, text, num_frames, fps, height,
# width, aspect_ratio, resolution) and the scorers' column names (tools/scoring/README.md:
# aes = aesthetic score, match = CLIP image-text similarity). Its `flow` (UniMatch flow) and
# `ocr` (count of text boxes) measure other things than motion_score and text_area_ratio, so
# those keep their own names rather than pass for Open-Sora's scores.
OPENSORA_COLUMNS = ["path", "text", "num_frames", "fps", "height", "width", "aspect_ratio",
                    "resolution", "aes", "match"]
FILES_EXTRA_COLUMNS = ["clip_id", "source_id", "source_path", "start_frame", "end_frame", "start_s",
                       "duration_s", "motion_score", "text_area_ratio", "fps_id", "motion_bucket_id",
                       "caption_source"]


class ExportError(OutputError):
    """The export cannot run as asked (bad selection, unfinished output, foreign DIR)."""


# ---- the selection ----------------------------------------------------------------------

def parse_select(select: Any) -> rules.Rules:
    """{column: {min, max}} (a dict, or its JSON/YAML text), checked by the filter's rule code."""
    if select is None or select == "" or select == {}:
        return {}
    if isinstance(select, str):
        import yaml

        try:
            select = yaml.safe_load(select)
        except yaml.YAMLError as exc:
            raise ExportError(f"--select is not JSON/YAML {{column: {{min, max}}}}: {exc}") from None
    try:
        checked = rules.validate_rules(select, schema.NUMERIC_COLUMNS)
    except ValueError as exc:
        raise ExportError(f"--select: {str(exc).removeprefix('rules.')}") from None
    percentile = rules.percentile_rules(checked)
    if percentile:
        raise ExportError(f"--select.{next(iter(percentile))}: only min/max bounds select an export "
                          "(drop_bottom/drop_top are resolved per run by `curate refilter`)")
    return checked


def select_mask(batch: pa.RecordBatch | pa.Table, select: rules.Rules) -> np.ndarray:
    """Rows passing every bound, as the filter evaluates them (inclusive; missing fails)."""
    if not select:
        return np.ones(batch.num_rows, dtype=bool)
    values = {c: rules.float_values(batch.column(c)) for c in select}
    keep, _ = rules.evaluate_rows(np.zeros(batch.num_rows, dtype=bool), values, [select])
    return np.asarray(keep, dtype=bool)


# ---- the plan ---------------------------------------------------------------------------

@dataclass
class Piece:
    """One output piece: consecutive (shard file, row group) chunks of about target_mb."""

    index: int
    chunks: list[tuple[str, int]] = field(default_factory=list)
    rows: int = 0  # selected rows
    est_bytes: float = 0.0


def plan_pieces(shards: list[Path], select: rules.Rules, target_mb: float) -> list[Piece]:
    """Deterministic pieces over the ledger-ordered shards: only footers and the select columns
    are read here. A row group's share of a piece is its bytes times its selected fraction."""
    target_bytes = target_mb * 1024 * 1024
    pieces: list[Piece] = []
    current = Piece(0)
    for path in shards:
        pf = outdir.parquet_file(path)
        missing = [c for c in select if c not in pf.schema_arrow.names]
        if missing:
            raise ExportError(f"--select: column {missing[0]!r} is not in {path.name}")
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            chosen = int(select_mask(pf.read_row_group(rg, columns=list(select)), select).sum()) if select else n
            if not chosen:
                continue
            current.chunks.append((path.name, rg))
            current.rows += chosen
            current.est_bytes += pf.metadata.row_group(rg).total_byte_size * chosen / n
            if current.est_bytes >= target_bytes:
                pieces.append(current)
                current = Piece(len(pieces))
    if current.chunks:
        pieces.append(current)
    return pieces


def fingerprint(fmt: str, select: rules.Rules, target_mb: float, shards: list[Path],
                pieces: list[Piece]) -> str:
    """What makes two exports the same: options, the shard files (immutable under their names)
    and the plan."""
    key = {"format": fmt, "select": select, "target_mb": target_mb,
           "shards": [[p.name, outdir.size(p)] for p in shards],
           "pieces": [p.chunks for p in pieces]}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_piece(shards_dir: Path, piece: Piece, select: rules.Rules,
               columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The selected rows of a piece, BATCH_ROWS at a time (memory: a few videos)."""
    for name, rg in piece.chunks:
        pf = outdir.open_parquet(shards_dir / name)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=columns):
            mask = select_mask(batch, select)
            if mask.all():
                yield batch
            elif mask.any():
                yield batch.filter(pa.array(mask))


# ---- pieces of each format --------------------------------------------------------------

def json_value(value: Any) -> Any:
    """JSON has no NaN: a failed score is null, as in the tables' missing values."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def npy_bytes(values: list[float]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def sample_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A clip as WebDataset members (extension, bytes), see the module docstring."""
    keyframes = row.get("keyframes") or []
    members = [("mp4", row["video"])]
    if keyframes:
        members.append(("jpg", keyframes[len(keyframes) // 2]))
    members += [(f"kf{i}.jpg", kf) for i, kf in enumerate(keyframes)]
    members.append(("txt", (row.get("caption") or "").encode("utf-8")))
    meta = {c: json_value(row.get(c)) for c in SAMPLE_JSON_COLUMNS}
    members.append(("json", json.dumps(meta, sort_keys=True).encode("utf-8")))
    for name in ("image_embedding", "caption_embedding"):
        if row.get(name) is not None:
            members.append((f"{name}.npy", npy_bytes(row[name])))
    return members


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # same bytes on every rerun
    tar.addfile(info, io.BytesIO(data))


def write_tar_piece(path: outdir.AnyPath, batches: Iterator[pa.RecordBatch]) -> int:
    rows = 0
    with outdir.staged_file(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for batch in batches:
            for row in batch.to_pylist():
                for ext, data in sample_members(row):
                    add_member(tar, f"{row['clip_id']}.{ext}", data)
                rows += 1
            tar.members.clear()  # tarfile keeps every member's header for reading back: not needed
    return rows


def write_parquet_piece(path: outdir.AnyPath, batches: Iterator[pa.RecordBatch]) -> int:
    rows = 0
    with outdir.staged_file(path) as tmp, \
            pq.ParquetWriter(tmp, schema.SHARDS_SCHEMA, compression="zstd",
                             write_statistics=schema.statistics_columns(schema.SHARDS_SCHEMA)) as writer:
        for batch in batches:
            table = schema.conform(pa.Table.from_batches([batch]), schema.SHARDS_SCHEMA)
            writer.write_table(table, row_group_size=64)
            rows += table.num_rows
    return rows


def opensora_row(row: dict[str, Any], video_path: Path) -> dict[str, Any]:
    height, width = row.get("height"), row.get("width")
    out = {
        "path": str(video_path), "text": row.get("caption") or "",
        "num_frames": row["end_frame"] - row["start_frame"], "fps": row.get("fps"),
        "height": height, "width": width,
        "aspect_ratio": height / width if height and width else None,
        "resolution": height * width if height and width else None,
        "aes": row.get("aesthetic_score"), "match": row.get("clip_similarity"),
    }
    out.update({c: row.get(c) for c in FILES_EXTRA_COLUMNS})
    return {k: json_value(v) for k, v in out.items()}


def write_files_piece(root: Path, name: str, batches: Iterator[pa.RecordBatch]) -> int:
    """The piece's mp4s (each renamed into place), then its part of meta.csv: the commit point."""
    folder = root / "videos" / name
    outdir.rmtree(folder)  # leftovers of a killed attempt at this piece
    folder.mkdir(parents=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=OPENSORA_COLUMNS + FILES_EXTRA_COLUMNS, lineterminator="\n")
    rows = 0
    for batch in batches:
        for row in batch.to_pylist():
            video_path = folder / f"{row['clip_id']}.mp4"
            write_atomic_bytes(video_path, row["video"], durable=False)
            writer.writerow(opensora_row(row, outdir.resolved(video_path)))
            rows += 1
    if not outdir.is_remote(folder):
        fsync_dir(folder)
    write_atomic_bytes(root / ".parts" / f"{name}.csv", buf.getvalue().encode("utf-8"))
    return rows


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the export -------------------------------------------------------------------------

def piece_name(fmt: str, piece: Piece, total: int) -> str:
    if fmt == "hf":
        return f"train-{piece.index:05d}-of-{total:05d}"  # the Hub's split-file naming
    return f"{piece.index:06d}"


def piece_done_path(root: Path, fmt: str, name: str) -> Path:
    """The file whose presence means the piece is finished."""
    return {"webdataset": root / f"{name}.tar", "hf": root / "data" / f"{name}.parquet",
            "files": root / ".parts" / f"{name}.csv"}[fmt]


def prepare_dir(root: Path, fmt: str, fp: str, overwrite: bool) -> None:
    """Make DIR ready: refuse a foreign or different export, remove partial files of a killed one."""
    manifest_path = root / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if previous is None and root.is_dir() and any(root.iterdir()):
        # Never delete what is not ours, --overwrite or not.
        raise ExportError(f"{root} is not empty and holds no {MANIFEST} of an earlier export: "
                          "choose an empty or new --to")
    if previous is not None and overwrite:
        log.info("--overwrite: removing the earlier export in %s", root)
        outdir.rmtree(root)
    elif previous is not None and previous.get("fingerprint") != fp:
        raise ExportError(
            f"{root} holds an export made with other options or from other data "
            f"(fingerprint {previous.get('fingerprint')}, now {fp}); choose another --to or pass --overwrite")
    subdirs = {"webdataset": [], "hf": ["data"], "files": ["videos", ".parts"]}[fmt]
    for sub in [root] + [root / s for s in subdirs]:
        sub.mkdir(parents=True, exist_ok=True)
    for tmp in root.rglob(".tmp-*"):  # partial files of a killed attempt
        log.info("removing partial file of an earlier attempt: %s", tmp)
        tmp.unlink()


def export(out_dir: str | Path, fmt: str, to: str | Path, select: Any = None, target_mb: float = 256.0,
           overwrite: bool = False) -> dict[str, Any]:
    """Export the committed, selected clips of OUT_DIR to `to` in `fmt`; returns the manifest."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not target_mb > 0:
        raise ExportError(f"--target-mb must be > 0, got {target_mb}")
    select = parse_select(select)
    store = OutputStore(out_dir)
    problem = store.not_ready_reason()
    if problem:
        raise ExportError(problem)
    shards = store.committed_files("shards")
    missing = [p for p in shards if not p.exists()]
    if missing:
        raise ExportError(f"{missing[0]} is listed in the ledger but missing ({len(missing)} files); "
                          "the output is damaged")
    root, source = outdir.resolved(outdir.out_path(to)), outdir.resolved(store.root)
    if str(root).rstrip("/") == str(source).rstrip("/") or str(root).startswith(str(source).rstrip("/") + "/"):
        raise ExportError(f"--to {root} must not be inside OUT_DIR {out_dir}")
    pieces = plan_pieces(shards, select, target_mb)
    if not pieces:
        raise ExportError(f"nothing to export from {out_dir}: " + (
            f"--select {json.dumps(select)} keeps none of the shards' clips" if select
            else "no committed unit kept a clip"))
    fp = fingerprint(fmt, select, target_mb, shards, pieces)
    prepare_dir(root, fmt, fp, overwrite)
    manifest = {"format": fmt, "fingerprint": fp, "source": str(source),
                "select": select, "target_mb": target_mb, "status": "running",
                "started_at": time.time(), "pieces": len(pieces)}
    write_json(root / MANIFEST, manifest)
    done = write_pieces(root, fmt, pieces, store.shards_dir, select)
    finish(root, fmt, pieces)
    manifest.update(status="complete", finished_at=time.time(), clips=sum(d["rows"] for d in done),
                    pieces=done)
    write_json(root / MANIFEST, manifest)  # last: the export is whole iff status is complete
    return manifest


def write_pieces(root: Path, fmt: str, pieces: list[Piece], shards_dir: Path,
                 select: rules.Rules) -> list[dict[str, Any]]:
    """Write every piece not finished yet; [{name, rows, shards}] in plan order."""
    done, t_log, skipped = [], time.monotonic(), 0
    for piece in pieces:
        name = piece_name(fmt, piece, len(pieces))
        if piece_done_path(root, fmt, name).exists():
            skipped += 1
        else:
            batches = read_piece(shards_dir, piece, select)
            if fmt == "webdataset":
                rows = write_tar_piece(root / f"{name}.tar", batches)
            elif fmt == "hf":
                rows = write_parquet_piece(root / "data" / f"{name}.parquet", batches)
            else:
                rows = write_files_piece(root, name, batches)
            if rows != piece.rows:
                raise RuntimeError(f"piece {name}: wrote {rows} rows, planned {piece.rows}")
        done.append({"name": name, "rows": piece.rows, "shards": sorted({c[0] for c in piece.chunks})})
        if time.monotonic() - t_log > 10 or len(done) == len(pieces):
            log.info("export: %d/%d pieces done (%d already there), %d clips", len(done), len(pieces),
                     skipped, sum(d["rows"] for d in done))
            t_log = time.monotonic()
    return done


HF_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
---
# Curated video clips

Exported by `curate export --format hf` from {source}: {clips} clips, one row per clip, with every
column of the curation shards (DESIGN.md section 3): `video` (H.264 mp4 bytes), `keyframes`
(JPEG bytes), `caption`, the scores, `image_embedding`/`caption_embedding` (float32 lists),
`fps_id` and `motion_bucket_id` (SVD micro-conditioning).
Selection: `{select}`.
"""


def finish(root: Path, fmt: str, pieces: list[Piece]) -> None:
    """What is written once every piece is there: the files tables, the dataset card."""
    names = [piece_name(fmt, p, len(pieces)) for p in pieces]
    if fmt == "files":
        write_files_tables(root, names)
    elif fmt == "hf":
        manifest = json.loads((root / MANIFEST).read_text())
        card = HF_CARD.format(source=manifest["source"], clips=sum(p.rows for p in pieces),
                              select=json.dumps(manifest["select"]))
        write_atomic_bytes(root / "README.md", card.encode("utf-8"))


def write_files_tables(root: Path, names: list[str]) -> None:
    """meta.csv (Open-Sora, absolute paths) and meta.json (EasyAnimate / VideoX-Fun: file_path
    relative to DIR, its --train_data_dir), streamed from the pieces' parts: memory is one row."""
    parts = [root / ".parts" / f"{name}.csv" for name in names]
    with outdir.staged_file(root / "meta.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        csv.writer(out, lineterminator="\n").writerow(OPENSORA_COLUMNS + FILES_EXTRA_COLUMNS)
        for part in parts:
            out.write(part.read_text(encoding="utf-8"))

    base = str(outdir.resolved(root)).rstrip("/") + "/"
    with outdir.staged_file(root / "meta.json") as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        first = True
        for part in parts:
            for row in csv.DictReader(io.StringIO(part.read_text(encoding="utf-8"), newline=""),
                                      fieldnames=OPENSORA_COLUMNS + FILES_EXTRA_COLUMNS):
                path = row["path"][len(base):] if row["path"].startswith(base) else os.path.relpath(row["path"], base)
                entry = {"file_path": path, "text": row["text"],
                         "type": "video", "width": int(row["width"]), "height": int(row["height"])}
                out.write(("\n  " if first else ",\n  ") + json.dumps(entry))
                first = False
        out.write("\n]\n")
