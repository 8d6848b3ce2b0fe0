"""Latent mode: every shard row encoded once by the frozen autoencoder, stored as parquet, streamed like the shards.

One latent file per shard row group, holding the same rows in the same order (before any
`select`), with the columns
    latent         binary: float32 bytes of (C, T, h, w) in the video stages, (K, C, h, w) in the
                   image stage (one latent per keyframe); null when the row could not be encoded
    latent_shape   list<int32>
    latent_stride  int32: the frame stride of the encoded window
training/stream.py reads a piece's shard columns (without video and keyframes) and appends
these, so latent pieces are ordered, selected and streamed exactly as pixel pieces are.

The frames are fixed per row (no random crop): the image stage encodes every keyframe and picks
one at random per step; the video stages encode one window of num_frames frames frame_stride
apart from the middle of the clip. The folder's name hashes the settings that determine the
latents, a file's name hashes its shard's path, size and row group, so a changed setting or
shard never reads stale latents and new shards reuse the existing files.

Rank r of W encodes the missing row groups r, r+W, ... (each file written atomically), then all
ranks meet at a barrier; a killed build resumes with the files it had finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from training.config import TrainConfig
from training.data import decode_jpeg, decode_video, load_autoencoder, resize_center_crop
from training.stream import DataPlan, latent_file, read_row_group

log = logging.getLogger(__name__)

LATENT_SCHEMA = pa.schema([("latent", pa.binary()), ("latent_shape", pa.list_(pa.int32())),
                           ("latent_stride", pa.int32())])


def latent_dir_for(cfg: TrainConfig, cache_dir: str) -> str:
    size = [cfg.resolution_px] + ([cfg.width_px] if cfg.width_px else [])  # square: the key it always had
    key = json.dumps([os.path.abspath(cfg.latent_autoencoder), *size, cfg.is_video,
                      cfg.num_frames, cfg.frame_stride])
    return os.path.join(cache_dir, f"latents-{hashlib.sha1(key.encode()).hexdigest()[:16]}")


def latent_frames(row: dict, cfg: TrainConfig) -> tuple[np.ndarray, int]:
    """The fixed frames a row's latent encodes (uint8 (N, H, W, 3)) and their stride."""
    if not cfg.is_video and row.get("keyframes"):
        return np.stack([decode_jpeg(k) for k in row["keyframes"]]), 1
    if row.get("video") is None:
        raise ValueError("the row has no video")
    frames = decode_video(row["video"])
    n = cfg.num_frames if cfg.is_video else 3
    step = cfg.frame_stride if cfg.is_video else max(1, (len(frames) - 1) // 2)
    used = min(step, max(1, (len(frames) - 1) // max(1, n - 1)))
    start = max(0, (len(frames) - ((n - 1) * used + 1)) // 2)
    return frames[np.minimum(start + used * np.arange(n), len(frames) - 1)], used


def encode_row_group(vae, cfg: TrainConfig, path: str, row_group: int) -> pa.Table:
    """The latent columns of one shard row group (null latent for a row that cannot be decoded)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    rows = read_row_group(path, row_group, ["clip_id", "video", "keyframes"]).to_pylist()
    latents, shapes, strides = [], [], []
    with torch.no_grad():
        for row in rows:
            try:
                frames, stride = latent_frames(row, cfg)
            except Exception as exc:  # noqa: BLE001  (a bad row; skipped and counted at training time)
                log.warning("latent cache: clip %s cannot be decoded: %s", row["clip_id"], exc)
                latents.append(None), shapes.append(None), strides.append(None)
                continue
            pix = resize_center_crop(frames, cfg.resolution_px, cfg.frame_width)  # (3, N, H, W)
            lat = vae.encode(pix.permute(1, 0, 2, 3)).latent_dist.mean * scale  # (N, C, h, w)
            lat = (lat.permute(1, 0, 2, 3) if cfg.is_video else lat).contiguous().float()
            latents.append(lat.numpy().tobytes())
            shapes.append(list(lat.shape))
            strides.append(stride)
    return pa.Table.from_arrays([pa.array(latents, pa.binary()), pa.array(shapes, pa.list_(pa.int32())),
                                 pa.array(strides, pa.int32())], schema=LATENT_SCHEMA)


def build_latents(plan: DataPlan, cfg: TrainConfig, cache_dir: str, vae=None, rank: int = 0,
                  world_size: int = 1) -> DataPlan:
    """Encode the plan's row groups that have no latent file yet (this rank's share); the plan in latent mode."""
    latent_dir = latent_dir_for(cfg, cache_dir)
    groups = sorted({(p.path, p.row_group) for p in plan.pieces})
    missing = [g for i, g in enumerate(groups)
               if i % world_size == rank and not os.path.exists(latent_file(latent_dir, *g))]
    if missing:
        vae = vae if vae is not None else load_autoencoder(cfg.latent_autoencoder)
        os.makedirs(latent_dir, exist_ok=True)
        log.info("rank %d encodes %d of %d row groups into %s", rank, len(missing), len(groups), latent_dir)
        for path, rg in missing:
            target = latent_file(latent_dir, path, rg)
            tmp = f"{target}.tmp-{rank}-{os.getpid()}"
            pq.write_table(encode_row_group(vae, cfg, path, rg), tmp)
            os.replace(tmp, target)  # atomic: a file that exists is complete
    else:
        log.info("latent cache hit for this rank's row groups: %s", latent_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank's share is written before anyone reads
    return replace(plan, latent_dir=latent_dir)
