"""split_standin: rows of the real schema without decoding anything, for rehearsals at scale.

bench/scale_bench.py runs the pipeline's control plane (listing, units, Ray tasks, in-flight
markers, the commit protocol, kills, resume, checkpoints) over 10^5 sources in minutes, and
fabricates committed outputs of 10^5 to 10^7 clip rows for every reader. Never for curation:
the values are random.

Per source, deterministic from its id: a number of clips (Poisson, `clips_per_source` on
average; a share `error_share` of the sources are unreadable and give one error row instead),
durations of 2-10 s, a frame rate of 24, 25 or 30, and per clip: three keyframes (a real JPEG
padded to `keyframe_bytes`: readers decode them), a temporal signature of its real size (64
bytes per quarter second), an image embedding of `embedding_dims` float32, scores for every
score column, and a video payload of `video_bytes` (small; not decodable: the bench records
its nominal size apart). `table_for(...)` builds the same rows for many sources at once,
vectorised, for fabricating outputs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import time

import numpy as np
import pyarrow as pa

from stages.base import Batch, Stage, clip_id_for

SIGNATURE_BYTES_PER_S = 4 * 64  # stages/signature.py: 4 samples a second, 8x8 bytes each


@functools.lru_cache(maxsize=4)
def _jpeg(size_px: int = 64) -> bytes:
    """A real JPEG (a gradient with a bar), decodable by PIL and OpenCV."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size_px, size_px * 9 // 16), (90, 120, 160))
    ImageDraw.Draw(im).rectangle((size_px // 4, 4, size_px // 2, 12), fill="white")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def keyframe(nbytes: int, k: int) -> bytes:
    """A decodable JPEG of about `nbytes` (bytes past its end marker are ignored by decoders)."""
    base = _jpeg()
    return base + bytes([k % 251]) * max(0, nbytes - len(base))


def _seed(source_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(source_id.encode(), digest_size=8).digest(), "little")


def table_for(source_ids: list[str], paths: list[str], seed: int, clips_per_source: float = 10.0,
              error_share: float = 0.03, keyframe_bytes: int = 15_000, video_bytes: int = 256,
              embedding_dims: int = 512, with_payload: bool = True) -> pa.Table:
    """The rows of these sources (module docstring), vectorised over all of them."""
    rng = np.random.default_rng(seed)
    n_src = len(source_ids)
    error = rng.random(n_src) < error_share
    counts = np.where(error, 1, np.maximum(1, rng.poisson(clips_per_source, n_src)))
    src = np.repeat(np.arange(n_src), counts)
    n = int(src.size)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.arange(n) - first[src]  # clip number within its source
    is_error = error[src]
    fps = rng.choice([24.0, 25.0, 30.0], n_src)[src]
    dur = np.round(rng.uniform(2.0, 10.0, n), 3)
    frames = np.round(dur * fps).astype(np.int64)
    ends = np.cumsum(frames)  # clips follow each other in their source
    start = ends - frames
    start = start - start[first[src]]
    end = start + frames
    sids = [source_ids[s] for s in src]
    clip_ids = [clip_id_for(sid, None, None) if e else clip_id_for(sid, int(a), int(b))
                for sid, e, a, b in zip(sids, is_error, start, end)]

    def masked(values, dtype):
        return pa.array(values, dtype, mask=is_error)

    columns = {
        "clip_id": pa.array(clip_ids, pa.string()),
        "source_id": pa.array(sids, pa.string()),
        "source_path": pa.array([paths[s] for s in src], pa.string()),
        "start_frame": masked(start, pa.int64()), "end_frame": masked(end, pa.int64()),
        "start_s": masked(start / fps, pa.float64()), "duration_s": masked(dur, pa.float64()),
        "fps": masked(fps, pa.float64()), "width": masked(np.full(n, 568), pa.int32()),
        "height": masked(np.full(n, 320), pa.int32()),
        "dark_frames_trimmed": masked(np.zeros(n, np.int32), pa.int32()),
        "motion_score": masked(rng.gamma(2.0, 2.0, n), pa.float64()),
        "text_area_ratio": masked(rng.beta(0.5, 12.0, n), pa.float64()),
        "aesthetic_score": masked(rng.normal(5.0, 0.8, n), pa.float64()),
        "clip_similarity": masked(rng.normal(0.28, 0.04, n), pa.float64()),
        "split_error": pa.array(["unreadable: stand-in error" if e else None for e in is_error], pa.string()),
        "source_status": pa.array(["unreadable" if e else None for e in is_error], pa.string()),
    }
    if with_payload:
        columns.update(_payload(rng, is_error, dur, keyframe_bytes, video_bytes, embedding_dims))
    return pa.table(columns)


def _payload(rng: np.random.Generator, is_error: np.ndarray, dur: np.ndarray, keyframe_bytes: int,
             video_bytes: int, embedding_dims: int) -> dict[str, pa.Array]:
    """The payload columns, built from flat buffers (no Python object per value)."""
    n = int(is_error.size)
    ok = ~is_error
    valid = pa.array(ok)

    def binary(lengths: np.ndarray, blob: bytes) -> pa.Array:
        """Binary values of `lengths` bytes, the first bytes of `blob` repeated as needed."""
        total = int(lengths.sum())
        data = (blob * (total // max(1, len(blob)) + 1))[:total]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.Array.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets.tobytes()),
                                                                pa.py_buffer(data)])

    kf = binary(np.full(3 * n, len(keyframe(keyframe_bytes, 0))), keyframe(keyframe_bytes, 0))
    keyframes = pa.ListArray.from_arrays(pa.array(np.arange(0, 3 * n + 1, 3, dtype=np.int32)), kf,
                                         mask=pa.array(is_error))
    sig_len = (np.round(SIGNATURE_BYTES_PER_S * np.nan_to_num(dur)) // 64 * 64).astype(np.int64)
    sig_blob = rng.integers(0, 256, int(SIGNATURE_BYTES_PER_S * 12), dtype=np.uint8).tobytes()
    emb = rng.normal(size=(n, embedding_dims)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, n * embedding_dims + 1, embedding_dims,
                                                            dtype=np.int32)),
                                         pa.array(emb.ravel()), mask=pa.array(is_error))
    return {"video": pc_where(valid, binary(np.full(n, video_bytes), b"\0")),
            "keyframes": keyframes,
            "temporal_signature": pc_where(valid, binary(sig_len * ok, sig_blob)),
            "image_embedding": embedding}


def pc_where(valid: pa.Array, values: pa.Array) -> pa.Array:
    """values, null where not valid."""
    import pyarrow.compute as pc

    return pc.if_else(valid, values, pa.scalar(None, values.type))


class StandinSplitStage(Stage):
    """The split step of a rehearsal (module docstring): rows without decoding."""

    name = "split_standin"
    fan_out = True
    outputs = ("clip_id", "source_id", "source_path", "unit_id", "start_frame", "end_frame", "start_s",
               "duration_s", "fps", "width", "height", "dark_frames_trimmed", "split_error", "source_status",
               "motion_score", "text_area_ratio", "aesthetic_score", "clip_similarity",
               "video", "keyframes", "temporal_signature", "image_embedding")

    def __init__(self, clips_per_source: float = 10.0, error_share: float = 0.03, keyframe_bytes: int = 15_000,
                 video_bytes: int = 256, embedding_dims: int = 512, work_s: float = 0.0):
        """`work_s`: seconds each source takes (a sleep standing in for its decode), so a
        rehearsal's units have a body of known length."""
        if clips_per_source <= 0:
            raise ValueError(f"clips_per_source must be > 0, got {clips_per_source}")
        if not 0.0 <= error_share <= 1.0:
            raise ValueError(f"error_share must be within 0-1, got {error_share}")
        for name, value in (("keyframe_bytes", keyframe_bytes), ("video_bytes", video_bytes),
                            ("embedding_dims", embedding_dims)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not work_s >= 0.0:
            raise ValueError(f"work_s must be >= 0, got {work_s}")
        self.work_s = work_s
        self.params = dict(clips_per_source=clips_per_source, error_share=error_share,
                           keyframe_bytes=keyframe_bytes, video_bytes=video_bytes, embedding_dims=embedding_dims)

    def __call__(self, batch: Batch) -> Batch:
        if self.work_s:
            time.sleep(self.work_s * len(batch["source_id"]))
        parts = [table_for([sid], [path], _seed(sid), **self.params).to_pydict()
                 for sid, path in zip(batch["source_id"], batch["source_path"])]
        out = {name: [v for p in parts for v in p[name]] for name in parts[0]} if parts else {}
        unit = batch.get("unit_id") or [None] * len(batch["source_id"])
        counts = [len(p["clip_id"]) for p in parts]
        out["unit_id"] = [u for u, c in zip(unit, counts) for _ in range(c)]
        return out
