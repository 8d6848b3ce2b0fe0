"""Training samples from shard rows (DESIGN.md section 3): decode, sample frames, resize.

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

A sample's randomness comes from a generator the caller seeds (training/stream.py seeds it with
(seed, step, slot in the global batch)), never from a process-global RNG. The order in which
rows are read, and the reading itself, live in training/stream.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from curation.schema import DEFAULT_MOTION_BUCKET_ID, SHARDS_SCHEMA, conform, fps_id_for
from curation import outdir
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
    files = store.committed_files("shards")
    paths = [str(p) for p in files]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is listed in the ledger but missing ({len(missing)} files); "
                                "the output is damaged")
    if not paths:
        raise FileNotFoundError(f"no shards in {out_dir}: no committed unit kept a clip")
    return paths


def columns_for(cfg: TrainConfig) -> list[str]:
    return TRAIN_COLUMNS + [c for c in cfg.select if c not in TRAIN_COLUMNS]


def read_shards(paths: list[str], columns: list[str]) -> pa.Table:
    """Read the given columns of parquet shards (local paths or URIs) into one table (missing columns become nulls)."""
    tables = []
    for path in paths:
        present = set(outdir.read_schema(path).names)
        tables.append(outdir.read_table(path, columns=[c for c in columns if c in present]))
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


def resize_short_side(frames: np.ndarray, size_px: int, width_px: int | None = None) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, H', W', 3), scaled (antialiased bilinear) to the smallest
    size that covers size_px x width_px (square when width_px is None: min(H', W') = size_px)."""
    h, w = frames.shape[1:3]
    width_px = width_px or size_px
    scale = max(size_px / h, width_px / w)
    nh, nw = max(size_px, round(h * scale)), max(width_px, round(w * scale))
    if (nh, nw) == (h, w):
        return frames
    x = torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def center_crop_tensor(frames: np.ndarray, size_px: int, width_px: int | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) covering size_px x width_px -> float (3, T, size_px, width_px) in [-1, 1]
    (centre crop; square when width_px is None)."""
    width_px = width_px or size_px
    h, w = frames.shape[1:3]
    top, left = (h - size_px) // 2, (w - width_px) // 2
    crop = np.array(frames[:, top:top + size_px, left:left + width_px], dtype=np.float32)
    return torch.from_numpy(crop).permute(3, 0, 1, 2) / 127.5 - 1.0


def resize_center_crop(frames: np.ndarray, size_px: int, width_px: int | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, size_px, width_px) in [-1, 1]: scaled to cover, centre crop."""
    return center_crop_tensor(resize_short_side(frames, size_px, width_px), size_px, width_px)


# ---- samples ----------------------------------------------------------------------------

class FrameCache:
    """Decoded clips kept resized (uint8, covering resolution_px x width_px) up to a byte budget.

    Keyed by a row's place in the corpus; a sample never depends on whether its clip was
    cached (the header's frame count places the window either way), so exact resume holds.
    """

    def __init__(self, budget_mb: int):
        self.budget_bytes = budget_mb * 2 ** 20
        self.items: dict[Any, tuple[int, np.ndarray]] = {}
        self.nbytes = 0

    def get(self, key: Any, video: bytes, size_px: int, width_px: int | None = None) -> tuple[int, np.ndarray] | None:
        if key is not None and key in self.items:
            return self.items[key]
        if key is None or self.nbytes >= self.budget_bytes:
            return None
        item = (video_frame_count(video), resize_short_side(decode_video(video), size_px, width_px))
        self.items[key] = item
        self.nbytes += item[1].nbytes
        return item


def row_frames(row: dict, cfg: TrainConfig, rng: np.random.Generator, cache: FrameCache | None = None,
               key: Any = None) -> tuple[np.ndarray, int]:
    """The uint8 frames (T, H, W, 3) of one sample of a shard row and the stride they were taken at.

    Stage 1 takes a random keyframe when the row has keyframes; otherwise (and in stages 2-3)
    `num_frames` frames `frame_stride` apart at a random start. Raises on an undecodable row.
    """
    if not cfg.is_video and row.get("keyframes"):
        keyframes = row["keyframes"]
        jpeg = keyframes[int(rng.integers(len(keyframes)))]
        return resize_short_side(decode_jpeg(jpeg)[None], cfg.resolution_px, cfg.frame_width), 1
    video = row.get("video")
    if video is None:
        raise ValueError("the row has no video")
    cached = cache.get(key, video, cfg.resolution_px, cfg.frame_width) if cache is not None else None
    if cached is not None:
        count, frames = cached
        idx, stride = frame_indices(count or len(frames), cfg.num_frames, cfg.frame_stride, rng)
        return frames[np.minimum(idx, len(frames) - 1)], stride
    count = video_frame_count(video)
    if count > 0:
        idx, stride = frame_indices(count, cfg.num_frames, cfg.frame_stride, rng)
        frames = decode_video(video, stop_after=int(idx.max()) + 1)
    else:
        frames = decode_video(video)
        idx, stride = frame_indices(len(frames), cfg.num_frames, cfg.frame_stride, rng)
    return resize_short_side(frames[np.minimum(idx, len(frames) - 1)], cfg.resolution_px, cfg.frame_width), stride


def row_latent(row: dict, is_video: bool, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """The cached latent of a row (training/latents.py): (C, T, h, w), or one random keyframe's (C, 1, h, w)."""
    if row.get("latent") is None:
        raise ValueError("the row has no latent (the autoencoder could not encode it)")
    latent = torch.frombuffer(bytearray(row["latent"]), dtype=torch.float32).reshape(row["latent_shape"])
    if is_video:
        return latent, int(row["latent_stride"])  # (C, T, h, w)
    return latent[int(rng.integers(latent.shape[0]))][:, None], 1  # (K, C, h, w) -> (C, 1, h, w)


def row_sample(row: dict, cfg: TrainConfig, caption_dim: int, rng: np.random.Generator,
               cache: FrameCache | None = None, key: Any = None) -> dict[str, Any]:
    """One training sample (see the module docstring) of a shard row; raises ValueError on a bad row."""
    if "latent_shape" in row:
        x, stride = row_latent(row, cfg.is_video, rng)
    else:
        frames, stride = row_frames(row, cfg, rng, cache, key)  # (T, h, w, 3), covering the frame size
        x = center_crop_tensor(frames, cfg.resolution_px, cfg.frame_width)  # (3, T, H, W)
    if not cfg.is_video:
        x = x[:, 0]  # (C, H, W)
    cap = row.get("caption_embedding")
    if cap is not None and caption_dim > 0 and len(cap) != caption_dim:
        raise ValueError(f"caption_embedding has {len(cap)} values, the run's caption_dim is {caption_dim}")
    valid = cap is not None and caption_dim > 0
    caption = torch.tensor(cap, dtype=torch.float32) if valid else torch.zeros(max(caption_dim, 1))
    motion = row.get("motion_bucket_id")
    return {
        "x": x,
        "caption": caption,
        "caption_valid": torch.tensor(valid),
        "fps_id": torch.tensor(adjusted_fps_id(row.get("fps"), row.get("fps_id"), stride)),
        "motion_bucket_id": torch.tensor(DEFAULT_MOTION_BUCKET_ID if motion is None else motion),
    }


class ShardDataset(Dataset):
    """Samples of an in-memory shard table, indexed by (step, row): for the tests.

    Training streams the shards instead (training/stream.py); both build samples with `row_sample`.
    """

    def __init__(self, table: pa.Table, cfg: TrainConfig, caption_dim: int):
        self.table, self.cfg, self.caption_dim = table, cfg, caption_dim
        self.cache = FrameCache(cfg.frame_cache_mb)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, index = key
        row = self.table.slice(index, 1).to_pylist()[0]
        rng = np.random.default_rng([self.cfg.seed, step, index])
        return row_sample(row, self.cfg, self.caption_dim, rng, self.cache, index)


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
