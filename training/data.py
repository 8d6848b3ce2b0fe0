"""Training samples from the curated shards (DESIGN.md section 3): decode, sample frames, resize, batch.

Reads only shard columns named in curation.schema. For each row it produces
    x                (C, H, W) image stage, (C, T, H, W) video stages; pixels in [-1, 1]
                     (or autoencoder latents times its scaling factor in latent mode)
    caption          (D,) the shards' caption_embedding; zeros when null
    caption_valid    bool; False when caption_embedding is null (the model uses its null embedding)
    fps_id           SVD micro-conditioning, adjusted for the frame stride (see `adjusted_fps_id`)
    motion_bucket_id the shard value; DEFAULT_MOTION_BUCKET_ID when null

Stage 1 takes one frame per sample: a random keyframe (JPEG) if the row has keyframes, else a
random frame of the clip. Stages 2-3 take `num_frames` frames `frame_stride` apart at a random
start. Stage 3 first keeps the rows passing a {column: {min, max}} predicate (`select_mask`).

Randomness of a sample depends only on (seed, step, index), never on a process-global RNG, so
a resumed run and a run with more data-loader workers see exactly the same batches.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from curation.schema import DEFAULT_MOTION_BUCKET_ID, SHARDS_SCHEMA, conform, fps_id_for
from curation.writer import OutputStore

from training.config import TrainConfig

log = logging.getLogger(__name__)

# SVD's default conditioning is 7 fps (fps_id 6) when a clip's frame rate is unknown.
DEFAULT_FPS_ID = 6
# Columns the trainer reads; predicate columns are added per run.
TRAIN_COLUMNS = ["clip_id", "video", "keyframes", "caption_embedding", "fps", "fps_id", "motion_bucket_id"]
for _name in TRAIN_COLUMNS:
    assert SHARDS_SCHEMA.get_field_index(_name) >= 0, _name


# ---- reading and selecting --------------------------------------------------------------

def shard_paths(out_dir: str) -> list[str]:
    """The shard files the ledger lists (committed units only), in unit order.

    Refuses (ValueError) an output whose run or refilter did not finish: training on part of
    a corpus, or on shards a refilter left half rewritten, would be silently wrong.
    """
    store = OutputStore(out_dir)
    problem = store.not_ready_reason()
    if problem:
        raise ValueError(problem)
    paths = [str(p) for p in store.committed_files("shards")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is listed in the ledger but missing ({len(missing)} files); "
                                "the output is damaged")
    if not paths:
        raise FileNotFoundError(f"no shards in {out_dir}: no committed unit kept a clip")
    return paths


def columns_for(cfg: TrainConfig) -> list[str]:
    return TRAIN_COLUMNS + [c for c in cfg.select if c not in TRAIN_COLUMNS]


def read_shards(paths: list[str], columns: list[str]) -> pa.Table:
    """Read the given columns of local parquet shards into one table (missing columns become nulls)."""
    tables = []
    for path in paths:
        present = set(pq.read_schema(path).names)
        tables.append(pq.read_table(path, columns=[c for c in columns if c in present]))
    table = pa.concat_tables(tables, promote_options="default")
    schema = pa.schema([SHARDS_SCHEMA.field(c) for c in columns])
    return conform(table, schema)


def select_mask(table: pa.Table, select: dict[str, dict[str, float]]) -> np.ndarray:
    """Rows passing every {column: {min, max}} bound (inclusive). Null/NaN fails, as in the filter."""
    keep = np.ones(table.num_rows, dtype=bool)
    for column, bounds in select.items():
        if column not in table.column_names:
            raise ValueError(f"select: column {column!r} is not in the shards")
        values = np.array([np.nan if v is None else float(v) for v in table.column(column).to_pylist()])
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values)
            if "min" in bounds:
                ok &= values >= float(bounds["min"])
            if "max" in bounds:
                ok &= values <= float(bounds["max"])
        keep &= ok
    return keep


def apply_select(table: pa.Table, select: dict[str, dict[str, float]]) -> pa.Table:
    """The rows of `table` passing `select`; an error with the columns' ranges when none does."""
    if not select:
        return table
    mask = select_mask(table, select)
    if not mask.any():
        ranges = {c: _range(table.column(c).to_pylist()) for c in select}
        raise ValueError(f"select={json.dumps(select)} keeps 0 of {table.num_rows} shard rows; "
                         f"column ranges in the shards: {ranges}. Loosen it with --set 'select={{...}}'")
    log.info("select %s keeps %d of %d rows", json.dumps(select), int(mask.sum()), table.num_rows)
    return table.filter(pa.array(mask))


def _range(values: list) -> list | None:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return [min(finite), max(finite)] if finite else None


def caption_dim_of(table: pa.Table) -> int:
    """Dimension of the shards' caption_embedding; 0 when every row's is null. Mixed sizes are an error."""
    dims = {len(v) for v in table.column("caption_embedding").to_pylist() if v is not None}
    if len(dims) > 1:
        raise ValueError(f"caption_embedding has several dimensions in the shards: {sorted(dims)}")
    return dims.pop() if dims else 0


# ---- video I/O --------------------------------------------------------------------------

def decode_video(data: bytes, stop_after: int | None = None) -> np.ndarray:
    """The frames of an mp4 (bytes) as uint8 RGB (N, H, W, 3); with stop_after, only the first stop_after."""
    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if stop_after is not None and len(frames) >= stop_after:
                break
    if not frames:
        raise ValueError("video has no decodable frames")
    return np.stack(frames)


def video_frame_count(data: bytes) -> int:
    """Frame count from the mp4 header (0 when the container does not say)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return int(container.streams.video[0].frames or 0)


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """uint8 RGB frames (T, H, W, 3), even H and W, as H.264 mp4 bytes (PyAV's bundled libx264)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ---- frame sampling ---------------------------------------------------------------------

def frame_indices(num_available: int, num_frames: int, stride: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`num_frames` indices `stride` apart at a random start; returns (indices, stride used).

    A clip too short for the stride gets the largest stride that fits; a clip shorter than
    num_frames repeats its last frame (and reports stride 1).
    """
    if num_frames == 1:
        return np.array([rng.integers(num_available)]), stride
    used = min(stride, max(1, (num_available - 1) // (num_frames - 1)))
    span = (num_frames - 1) * used + 1
    start = int(rng.integers(num_available - span + 1)) if span <= num_available else 0
    idx = start + used * np.arange(num_frames)
    return np.minimum(idx, num_available - 1), used


def adjusted_fps_id(fps: float | None, fps_id: int | None, stride: int) -> int:
    """fps_id of the sampled clip: taking every stride-th frame divides the frame rate by stride.

    Uses the row's fps when known (fps_id_for(fps / stride), the schema's mapping), else the
    shard's fps_id (which is fps - 1), else DEFAULT_FPS_ID.
    """
    if fps is not None and np.isfinite(fps) and fps > 0:
        return fps_id_for(fps / stride)  # type: ignore[return-value]
    if fps_id is not None:
        return fps_id_for((fps_id + 1) / stride)  # type: ignore[return-value]
    return DEFAULT_FPS_ID


def resize_short_side(frames: np.ndarray, size_px: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, H', W', 3) with min(H', W') = size_px (antialiased bilinear)."""
    h, w = frames.shape[1:3]
    scale = size_px / min(h, w)
    nh, nw = max(size_px, round(h * scale)), max(size_px, round(w * scale))
    if (nh, nw) == (h, w):
        return frames
    x = torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def center_crop_tensor(frames: np.ndarray, size_px: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) with short side size_px -> float (3, T, size, size) in [-1, 1] (centre crop)."""
    h, w = frames.shape[1:3]
    top, left = (h - size_px) // 2, (w - size_px) // 2
    crop = np.array(frames[:, top:top + size_px, left:left + size_px], dtype=np.float32)
    return torch.from_numpy(crop).permute(3, 0, 1, 2) / 127.5 - 1.0


def resize_center_crop(frames: np.ndarray, size_px: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, size, size) in [-1, 1]: short side to size, centre crop."""
    return center_crop_tensor(resize_short_side(frames, size_px), size_px)


# ---- dataset ----------------------------------------------------------------------------

class ShardDataset(Dataset):
    """Samples of one stage from a shard table; indexed by (step, row) so randomness is reproducible."""

    def __init__(self, table: pa.Table, cfg: TrainConfig, caption_dim: int,
                 latents: "LatentCache | None" = None):
        self.cfg, self.caption_dim, self.latents = cfg, caption_dim, latents
        self.videos = table.column("video").to_pylist()
        self.keyframes = table.column("keyframes").to_pylist()
        self.captions = table.column("caption_embedding").to_pylist()
        self.fps = table.column("fps").to_pylist()
        self.fps_ids = table.column("fps_id").to_pylist()
        self.motion = table.column("motion_bucket_id").to_pylist()
        self._frame_cache: dict[int, tuple[int, np.ndarray]] = {}  # row -> (header frame count, frames)
        self._cache_bytes = 0

    def __len__(self) -> int:
        return len(self.videos)

    def frames(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The uint8 frames (T, H, W, 3) of one sample and the stride they were taken at."""
        if not self.cfg.is_video and self.keyframes[index]:
            jpeg = self.keyframes[index][int(rng.integers(len(self.keyframes[index])))]
            return resize_short_side(decode_jpeg(jpeg)[None], self.cfg.resolution_px), 1
        video = self.videos[index]
        if video is None:
            raise ValueError(f"shard row {index} has no video")
        # Clips decoded once and kept resized (uint8, short side = resolution_px) while the cache
        # has room; otherwise decode up to the last frame needed. The header's frame count places
        # the window in both cases, so a sample does not depend on the cache's state (exact resume).
        cached = self._frame_cache.get(index)
        if cached is None:
            count = video_frame_count(video)
            if self._cache_bytes < self.cfg.frame_cache_mb * 2 ** 20:
                cached = (count, resize_short_side(decode_video(video), self.cfg.resolution_px))
                self._frame_cache[index] = cached
                self._cache_bytes += cached[1].nbytes
        if cached is not None:
            count, frames = cached
            count = count or len(frames)
            idx, stride = frame_indices(count, self.cfg.num_frames, self.cfg.frame_stride, rng)
            return frames[np.minimum(idx, len(frames) - 1)], stride
        if count > 0:
            idx, stride = frame_indices(count, self.cfg.num_frames, self.cfg.frame_stride, rng)
            frames = decode_video(video, stop_after=int(idx.max()) + 1)
        else:
            frames = decode_video(video)
            idx, stride = frame_indices(len(frames), self.cfg.num_frames, self.cfg.frame_stride, rng)
        return resize_short_side(frames[np.minimum(idx, len(frames) - 1)], self.cfg.resolution_px), stride

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, index = key
        rng = np.random.default_rng([self.cfg.seed, step, index])
        if self.latents is not None:
            x, stride = self.latents.get(index, rng)
        else:
            frames, stride = self.frames(index, rng)  # (T, h, w, 3), short side = resolution_px
            x = center_crop_tensor(frames, self.cfg.resolution_px)  # (3, T, S, S)
        if not self.cfg.is_video:
            x = x[:, 0]  # (C, H, W)
        cap = self.captions[index]
        valid = cap is not None and self.caption_dim > 0 and len(cap) == self.caption_dim
        caption = torch.tensor(cap, dtype=torch.float32) if valid else torch.zeros(max(self.caption_dim, 1))
        motion = self.motion[index]
        return {
            "x": x,
            "caption": caption,
            "caption_valid": torch.tensor(valid),
            "fps_id": torch.tensor(adjusted_fps_id(self.fps[index], self.fps_ids[index], stride)),
            "motion_bucket_id": torch.tensor(DEFAULT_MOTION_BUCKET_ID if motion is None else motion),
        }


class StepBatchSampler(Sampler):
    """Yields, for steps start_step..total_steps-1, this rank's (step, row) keys of the global batch.

    Rows are visited in a fresh permutation every epoch (seeded by seed and epoch), so the
    batch of step s is a function of s alone: resuming at step s needs no sampler state.
    """

    def __init__(self, num_rows: int, batch_size: int, total_steps: int, seed: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} workers")
        self.num_rows, self.batch_size, self.total_steps = num_rows, batch_size, total_steps
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size

    def global_batch(self, step: int) -> list[int]:
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.num_rows)
            perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            out.append(int(perm[pos]))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            rows = self.global_batch(step)[self.rank::self.world_size]
            yield [(step, r) for r in rows]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


# ---- latent mode ------------------------------------------------------------------------

def load_autoencoder(path: str):
    """A frozen diffusers AutoencoderKL from a local folder (config.json + weights), via its own loader."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"latent_autoencoder: no AutoencoderKL (config.json) at {path!r} "
                                f"(config key latent_autoencoder; set it to a local diffusers model folder)")
    import curation  # noqa: F401  (installs the torchvision shim before diffusers imports it)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path)
    vae.eval().requires_grad_(False)
    return vae


def autoencoder_factor(vae) -> int:
    """Spatial downsampling of the autoencoder."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class LatentCache:
    """Latents of every row, computed once with the frozen autoencoder and cached on disk.

    The frames are fixed per row (no random crop): the image stage encodes every keyframe and
    picks one at random per step; the video stages encode one window of num_frames frames
    frame_stride apart from the middle of the clip. The cache file's name hashes everything
    that determines its content, so a changed setting never reads stale latents.
    """

    items: list[torch.Tensor]  # per row: (K, C, h, w) keyframe latents, or (C, T, h, w)
    strides: list[int]
    is_video: bool

    @classmethod
    def build(cls, dataset: ShardDataset, clip_ids: list[str], cfg: TrainConfig, cache_dir: str,
              vae=None) -> "LatentCache":
        key = json.dumps([os.path.abspath(cfg.latent_autoencoder), clip_ids, cfg.resolution_px,
                          cfg.is_video, cfg.num_frames, cfg.frame_stride])
        path = os.path.join(cache_dir, f"latents-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")
        if os.path.exists(path):
            log.info("latent cache hit: %s", path)
            saved = torch.load(path)
            return cls(saved["items"], saved["strides"], saved["is_video"])
        vae = vae if vae is not None else load_autoencoder(cfg.latent_autoencoder)
        scale = float(getattr(vae.config, "scaling_factor", 1.0))
        items, strides = [], []
        log.info("encoding %d rows with the autoencoder into %s", len(dataset), path)
        with torch.no_grad():
            for i in range(len(dataset)):
                if not cfg.is_video and dataset.keyframes[i]:
                    frames, stride = np.stack([decode_jpeg(k) for k in dataset.keyframes[i]]), 1
                else:
                    all_frames = decode_video(dataset.videos[i])
                    n = cfg.num_frames if cfg.is_video else 3
                    step = cfg.frame_stride if cfg.is_video else max(1, (len(all_frames) - 1) // 2)
                    used = min(step, max(1, (len(all_frames) - 1) // max(1, n - 1)))
                    start = max(0, (len(all_frames) - ((n - 1) * used + 1)) // 2)
                    idx = np.minimum(start + used * np.arange(n), len(all_frames) - 1)
                    frames, stride = all_frames[idx], used
                pix = resize_center_crop(frames, cfg.resolution_px)  # (3, N, S, S)
                lat = vae.encode(pix.permute(1, 0, 2, 3)).latent_dist.mean * scale  # (N, C, h, w)
                items.append(lat.permute(1, 0, 2, 3).contiguous() if cfg.is_video else lat)
                strides.append(stride)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"items": items, "strides": strides, "is_video": cfg.is_video}, tmp)
        os.replace(tmp, path)
        return cls(items, strides, cfg.is_video)

    def get(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        if self.is_video:
            return item, self.strides[index]
        k = int(rng.integers(item.shape[0]))
        return item[k][:, None], 1  # (C, 1, h, w)
