"""Arrow string and binary arrays as numpy bytes and back, from their buffers: no Python object
per value (clip ids and signatures of 10^7 clips)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def binary_buffers(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An Arrow string or binary array's bytes without a Python object per value: each value's
    offset into `data` (n + 1, from 0), the values' bytes (uint8) and which are not null."""
    arr = pc.cast(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values, pa.large_binary())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    buffer = arr.buffers()[2]
    data = np.frombuffer(buffer, np.uint8) if buffer is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], data[offsets[0]:offsets[-1]], valid


def fixed_bytes(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """Strings as numpy bytes of `width` (their UTF-8, whose byte order is the strings' order),
    from the Arrow buffers (no Python object per value)."""
    offsets, data, _ = binary_buffers(column)
    lens = np.diff(offsets)
    if lens.size and lens.max() > width:
        raise ValueError(f"dedup: a clip id longer than the {width} bytes the groups cache recorded")
    out = np.zeros((len(lens), width), np.uint8)
    for j in range(int(lens.max()) if lens.size else 0):  # a byte position at a time: no int64 per byte
        has = lens > j
        out[has, j] = data[offsets[:-1][has] + j]
    return out.view(f"S{width}").ravel()


def arrow_strings(values: np.ndarray) -> pa.Array:
    """numpy bytes (UTF-8) as Arrow strings."""
    return pa.array(values, pa.binary()).cast(pa.string())
