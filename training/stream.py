"""The trainer's data stream: the shard files the ledger lists, read by row group, with bounded memory.

Plan (metadata only, `plan_data`): the corpus is a list of pieces, one per parquet row group
(after the stage's `select`, whose predicate columns are the only ones read up front). A
corpus with fewer pieces than data streams has its largest pieces split into row ranges.

Order (pure functions of the plan, no data read): the global batch of step s is drawn from
S independent streams (S = cfg.data_streams, or the number of ranks), batch_size / S rows
from each, stream-major. In epoch e every stream j takes the pieces perm_e[j::S] of a
permutation of all pieces seeded by (seed, e), groups consecutive pieces into windows of at
least shuffle_buffer_rows rows, and emits each window's rows in an order seeded by
(seed, e, j, window). Each stream runs through its epochs independently, so stream j has
consumed exactly s * batch_size / S rows before step s: the position is a function of the
step, and a resumed run seeks there by metadata (whole epochs and windows skipped unread).

Reading (`StreamDataset`): rank r reads only its streams r, r+W, ..., and only the windows
it samples from. Memory per stream is one window: shuffle_buffer_rows rows plus at most one
row group, independent of corpus size. With K DataLoader workers, worker k builds the
batches of steps start + k, start + k + K, ... (it walks every stream of the rank but reads
only the windows its steps touch), so the batches are the same for any K, any start step,
and any number of ranks dividing S; with data_streams=0 (one stream per rank) they depend
on the number of ranks.

Bad rows: a row that cannot become a sample (undecodable video, missing latent, wrong
caption size) gets weight 0 in its slot and is reported with the batch; the loop counts them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from curation import outdir
from curation.schema import SHARDS_SCHEMA, conform

from training.config import TrainConfig
from training.data import FrameCache, columns_for, row_sample, select_mask

log = logging.getLogger(__name__)

# Columns of the shards needed only to decode pixels (left out of latent-mode reads).
PIXEL_COLUMNS = ("video", "keyframes")


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of one row group of a shard file, counted after the stage's `select`."""

    path: str
    row_group: int
    lo: int
    hi: int

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class DataPlan:
    pieces: tuple[Piece, ...]
    columns: tuple[str, ...]  # shard columns each read takes
    select: dict
    num_streams: int
    seed: int
    buffer_rows: int
    caption_dim: int  # of the shards' caption_embedding; 0 when every row's is null
    latent_dir: str = ""  # latent mode: folder of latent pieces (training/latents.py)

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.pieces)


# ---- plan (metadata and predicate columns only) ------------------------------------------

def plan_data(paths: list[str], cfg: TrainConfig, num_streams: int) -> DataPlan:
    """The pieces of the shard files `paths` for `cfg`'s stage; ValueError when no row is left."""
    pieces, total, ranges = [], 0, {c: [np.inf, -np.inf] for c in cfg.select}
    for path in paths:
        meta = outdir.parquet_file(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            total += n
            if cfg.select:
                table = read_row_group(path, rg, list(cfg.select))
                _widen(ranges, table)
                n = int(select_mask(table, cfg.select).sum())
            if n:
                pieces.append(Piece(outdir.absolute(path), rg, 0, n))
    if not pieces:
        if cfg.select:
            shown = {c: r if np.isfinite(r[0]) else None for c, r in ranges.items()}
            raise ValueError(f"select={cfg.select} keeps 0 of {total} shard rows; column ranges in the "
                             f"shards: {shown}. Loosen it with --set 'select={{...}}'")
        raise ValueError(f"the {len(paths)} shard files hold no rows")
    if cfg.select:
        log.info("select %s keeps %d of %d rows", cfg.select, sum(p.num_rows for p in pieces), total)
    pieces = split_pieces(pieces, num_streams)
    columns = tuple(columns_for(cfg))
    return DataPlan(tuple(pieces), columns, dict(cfg.select), num_streams, cfg.seed,
                    cfg.shuffle_buffer_rows, caption_dim_of_pieces(pieces, cfg.select))


def _widen(ranges: dict[str, list[float]], table: pa.Table) -> None:
    for column, r in ranges.items():
        values = np.array([np.nan if v is None else float(v) for v in table.column(column).to_pylist()])
        values = values[np.isfinite(values)]
        if len(values):
            r[0], r[1] = min(r[0], float(values.min())), max(r[1], float(values.max()))


def split_pieces(pieces: list[Piece], count: int) -> list[Piece]:
    """Halve the largest pieces until there are at least `count` (every stream needs one per epoch)."""
    pieces = list(pieces)
    while len(pieces) < count:
        i = max(range(len(pieces)), key=lambda k: pieces[k].num_rows)
        p = pieces[i]
        if p.num_rows < 2:
            raise ValueError(f"{sum(q.num_rows for q in pieces)} rows cannot feed {count} data streams "
                             f"(one per rank, or data_streams): use fewer workers or data_streams")
        mid = p.lo + p.num_rows // 2
        pieces[i:i + 1] = [Piece(p.path, p.row_group, p.lo, mid), Piece(p.path, p.row_group, mid, p.hi)]
    return pieces


def caption_dim_of_pieces(pieces: list[Piece], select: dict) -> int:
    """Dimension of caption_embedding from the first row group that has one (0 if none has).

    Rows whose embedding has another size are bad rows at training time (see row_sample).
    """
    for piece in pieces:
        column = read_piece(piece, ["caption_embedding"], select).column("caption_embedding")
        dims = {len(v) for v in column.to_pylist() if v is not None}
        if len(dims) > 1:
            raise ValueError(f"caption_embedding has several dimensions in {piece.path}: {sorted(dims)}")
        if dims:
            return dims.pop()
    return 0


# ---- reading ----------------------------------------------------------------------------

def read_row_group(path: str, row_group: int, columns: list[str]) -> pa.Table:
    """The given shard columns of one row group (columns a file lacks become nulls)."""
    f = outdir.open_parquet(path)
    present = set(f.schema_arrow.names)
    table = f.read_row_group(row_group, columns=[c for c in columns if c in present])
    return conform(table, pa.schema([SHARDS_SCHEMA.field(c) for c in columns]))


def latent_file(latent_dir: str, path: str, row_group: int) -> str:
    """Where the latent cache (training/latents.py writes it) keeps one row group's latents."""
    key = f"{outdir.absolute(path)}:{outdir.size(outdir.out_path(path))}:{row_group}"
    return os.path.join(latent_dir, f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.parquet")


def read_piece(piece: Piece, columns: list[str], select: dict, latent_dir: str = "") -> pa.Table:
    """A piece's rows: its row group, filtered by `select`, sliced to [lo, hi); plus latents in latent mode."""
    read = list(dict.fromkeys(list(columns) + list(select)))
    table = read_row_group(piece.path, piece.row_group, read)
    if latent_dir:
        latents = pq.read_table(latent_file(latent_dir, piece.path, piece.row_group))
        for name in latents.column_names:
            table = table.append_column(name, latents.column(name))
    if select:
        table = table.filter(pa.array(select_mask(table, select)))
    return table.slice(piece.lo, piece.num_rows)


# ---- order (metadata only) --------------------------------------------------------------

def epoch_pieces(plan: DataPlan, epoch: int, stream: int) -> np.ndarray:
    """Indices of the pieces stream `stream` reads in `epoch`, in reading order."""
    perm = np.random.default_rng([plan.seed, epoch]).permutation(len(plan.pieces))
    return perm[stream::plan.num_streams]


def windows_of(plan: DataPlan, piece_ids: np.ndarray) -> list[list[int]]:
    """Consecutive pieces grouped until each group holds at least buffer_rows rows (the last may hold fewer)."""
    out: list[list[int]] = [[]]
    rows = 0
    for p in piece_ids:
        if rows >= plan.buffer_rows:
            out.append([])
            rows = 0
        out[-1].append(int(p))
        rows += plan.pieces[p].num_rows
    return out


@dataclass
class RowStream:
    """The rows of one stream from `position` on (rows consumed since step 0), across epochs."""

    plan: DataPlan
    stream: int
    position: int
    read_window: Callable[[list[int]], pa.Table]
    reads: list[tuple[int, int]] = field(default_factory=list)  # (epoch, piece) of every window read

    def __post_init__(self) -> None:
        self.epoch, left = 0, self.position
        while left >= (n := self._epoch_rows(self.epoch)):  # whole epochs, by metadata
            left -= n
            self.epoch += 1
        self._start_epoch()
        while left >= len(self.order):  # whole windows, unread
            left -= len(self.order)
            self._next_window()
        self.offset = left

    def _epoch_rows(self, epoch: int) -> int:
        return sum(self.plan.pieces[p].num_rows for p in epoch_pieces(self.plan, epoch, self.stream))

    def _start_epoch(self) -> None:
        self.windows = windows_of(self.plan, epoch_pieces(self.plan, self.epoch, self.stream))
        self.w = -1
        self._next_window()

    def _next_window(self) -> None:
        self.w += 1
        if self.w == len(self.windows):
            self.epoch += 1
            self._start_epoch()
            return
        ids = self.windows[self.w]
        rows = [self.plan.pieces[p].num_rows for p in ids]
        self.order = np.random.default_rng([self.plan.seed, self.epoch, self.stream, self.w]).permutation(sum(rows))
        self.starts = np.cumsum([0] + rows)  # window row -> piece: searchsorted
        self.offset, self.table = 0, None

    def take(self, n: int, load: bool) -> list[tuple[Any, dict | None]]:
        """The next n rows as (key, row); with load=False they are skipped unread (row None)."""
        out = []
        while len(out) < n:
            if self.offset == len(self.order):
                self._next_window()
            i = int(self.order[self.offset])
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            key = (self.windows[self.w][k], i - int(self.starts[k]))  # (piece, row in piece)
            row = None
            if load:
                if self.table is None:
                    self.table = self.read_window(self.windows[self.w])
                    self.reads.extend((self.epoch, p) for p in self.windows[self.w])
                row = self.table.slice(i, 1).to_pylist()[0]
            out.append((key, row))
            self.offset += 1
        return out


# ---- the dataset --------------------------------------------------------------------------

class StreamDataset(IterableDataset):
    """This rank's part of the global batch of every step from start_step on, as collated batches.

    A batch holds x, caption, caption_valid, fps_id, motion_bucket_id (as data.row_sample), plus
    weight (0 for a bad row's placeholder), stream (the data stream of each slot), bad_rows
    (messages) and reads ((epoch, piece) of the windows read for it, for accounting).
    """

    def __init__(self, plan: DataPlan, cfg: TrainConfig, x_shape: tuple[int, ...], rank: int = 0,
                 world_size: int = 1, start_step: int = 0):
        if plan.num_streams % world_size:
            raise ValueError(f"data_streams={plan.num_streams} must be a multiple of the {world_size} workers")
        if cfg.batch_size % plan.num_streams:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {plan.num_streams} "
                             f"data streams (data_streams, or one per worker)")
        self.plan, self.cfg, self.x_shape, self.start_step = plan, cfg, x_shape, start_step
        self.streams = list(range(rank, plan.num_streams, world_size))
        self.rows_per_stream = cfg.batch_size // plan.num_streams
        self.columns = [c for c in plan.columns if not (plan.latent_dir and c in PIXEL_COLUMNS)]

    def __len__(self) -> int:
        return max(0, self.cfg.total_steps - self.start_step)

    def read_window(self, piece_ids: list[int]) -> pa.Table:
        tables = [read_piece(self.plan.pieces[p], self.columns, self.plan.select, self.plan.latent_dir)
                  for p in piece_ids]
        return pa.concat_tables(tables)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = [RowStream(self.plan, j, self.start_step * self.rows_per_stream, self.read_window)
                   for j in self.streams]
        cache = FrameCache(self.cfg.frame_cache_mb)
        for step in range(self.start_step, self.cfg.total_steps):
            mine = (step - self.start_step) % workers == worker
            rows = [s.take(self.rows_per_stream, load=mine) for s in streams]
            if mine:
                reads = [r for s in streams for r in s.reads]
                for s in streams:
                    s.reads.clear()
                yield self.batch(step, rows, cache, reads)

    def batch(self, step: int, rows: list[list[tuple[Any, dict]]], cache: FrameCache,
              reads: list[tuple[int, int]]) -> dict[str, Any]:
        samples, weights, slots, bad = [], [], [], []
        for j, stream_rows in zip(self.streams, rows):
            for i, (key, row) in enumerate(stream_rows):
                slot = j * self.rows_per_stream + i  # place in the global batch
                rng = np.random.default_rng([self.cfg.seed, step, slot])
                try:
                    samples.append(row_sample(row, self.cfg, self.cfg.caption_dim, rng, cache, key))
                    weights.append(1.0)
                except Exception as exc:  # noqa: BLE001  (any undecodable row; counted and capped by the loop)
                    samples.append(self.placeholder())
                    weights.append(0.0)
                    bad.append(f"clip {row.get('clip_id')} ({os.path.basename(self.plan.pieces[key[0]].path)} "
                               f"row group {self.plan.pieces[key[0]].row_group}): {type(exc).__name__}: {exc}")
                slots.append(j)
        out = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        out.update(weight=torch.tensor(weights), stream=torch.tensor(slots), bad_rows=bad,
                   reads=torch.tensor(reads, dtype=torch.int64).reshape(-1, 2))
        return out

    def placeholder(self) -> dict[str, torch.Tensor]:
        dim = max(self.cfg.caption_dim, 1)
        return {"x": torch.zeros(self.x_shape), "caption": torch.zeros(dim), "caption_valid": torch.tensor(False),
                "fps_id": torch.tensor(0), "motion_bucket_id": torch.tensor(0)}
