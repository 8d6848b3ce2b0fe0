"""The files of a dedup pass's temporary folder: what it keeps per row, out of memory.

Rows. A clip is a row: its place among the clips that have a vector, in the order of the payload
files (the order of scores/). Everything kept per row lives in files of a temporary folder
(`Workdir`): `RowFile` (fixed-width records, read and written a block or a set of rows at a time
through a mapping opened for that access only, so its pages leave the process after it) and
`BytesFile` (values of any length: clip ids, signatures). Work that needs rows together (the
copies of a clip, the members of a group) sorts records in partitions (`Parts`) of a quarter of
memory_mb. `BytesLog`: (row, bytes) records read back whole (a partition's signatures).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.dedup.arrow_bytes import binary_buffers
from curation.dedup.budget import Budget

GATHER_BYTES = 1 << 16  # values gathered from a read span at a time (their index: 8 bytes a byte)


class RowFile:
    """Fixed-width records, one per row, in a file: appended in order or created with n zeroed
    records; read by blocks (plain reads) or by sets of rows (a mapping per `budget.map_rows`
    rows, closed after: its pages do not stay in the process)."""

    def __init__(self, path: Path, dtype: Any, n: int = 0, budget: Budget = Budget()):
        self.path, self.dtype, self.n, self.budget = Path(path), np.dtype(dtype), int(n), budget
        with open(self.path, "wb") as f:
            f.truncate(self.n * self.dtype.itemsize)  # a sparse file of zeros

    @classmethod
    def existing(cls, path: Path, dtype: Any, budget: Budget = Budget()) -> RowFile:
        self = cls.__new__(cls)
        self.path, self.dtype, self.budget = Path(path), np.dtype(dtype), budget
        self.n = self.path.stat().st_size // self.dtype.itemsize
        return self

    def __len__(self) -> int:
        return self.n

    def _empty(self, m: int) -> np.ndarray:
        return np.empty(m, self.dtype)

    def _records(self, values: np.ndarray) -> np.ndarray:
        """values as contiguous records (a dtype with a shape, like vectors, takes (m, d) arrays)."""
        if self.dtype.shape:
            return np.ascontiguousarray(values, self.dtype.base).reshape((-1,) + self.dtype.shape)
        return np.ascontiguousarray(values, self.dtype)

    def append(self, records: np.ndarray) -> None:
        records = self._records(records)
        with open(self.path, "ab") as f:
            f.write(records.tobytes())
        self.n += len(records)

    def read(self, start: int, stop: int) -> np.ndarray:
        count = max(0, min(stop, self.n) - start)
        with open(self.path, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            out = np.fromfile(f, self.dtype, count)
        return out

    def write(self, start: int, records: np.ndarray) -> None:
        """Overwrite rows start..start + len(records)."""
        records = self._records(records)
        with open(self.path, "r+b") as f:
            f.seek(start * self.dtype.itemsize)
            f.write(records.tobytes())

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, records) of consecutive blocks: of `rows`, else of as many as the budget's
        block_rows allows when each row costs 64 bytes or twice its size while processed."""
        rows = rows or self.budget.block_rows(max(64, 2 * self.dtype.itemsize))
        for start in range(0, self.n, rows):
            yield start, self.read(start, start + rows)

    def _chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in `rows`, sorted rows) per mapping, in row order."""
        order = np.argsort(rows, kind="stable")
        step = self.budget.map_rows(self.dtype.itemsize)
        for s in range(0, order.size, step):
            at = order[s:s + step]
            yield at, rows[at]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The records of `rows` (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64)
        out = self._empty(rows.size)
        if rows.size == 0:
            return out
        for at, sorted_rows in self._chunks(rows):
            mapped = np.memmap(self.path, self.dtype, "r", shape=(self.n,))
            out[at] = mapped[sorted_rows]
            del mapped  # unmapped: its pages leave the process
        return out

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write `values` at `rows` (distinct rows)."""
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return
        values = np.asarray(values, self.dtype.base if self.dtype.shape else self.dtype)
        if values.shape[:1] != rows.shape:
            values = np.broadcast_to(values, rows.shape + self.dtype.shape)
        for at, sorted_rows in self._chunks(rows):
            mapped = np.memmap(self.path, self.dtype, "r+", shape=(self.n,))
            mapped[sorted_rows] = values[at]
            mapped.flush()
            del mapped


class BytesFile:
    """Values of any length per row (None: no value): the bytes in one file, appended in row
    order, and each row's (offset, length + 1) in a RowFile of n rows (0: no value)."""

    INDEX = np.dtype([("off", "<i8"), ("len", "<i8")])

    def __init__(self, folder: Path, name: str, n: int, budget: Budget = Budget()):
        self.data = Path(folder) / f"{name}.bytes"
        self.data.write_bytes(b"")
        self.index = RowFile(Path(folder) / f"{name}.index", self.INDEX, n, budget)
        self.size = 0

    def _store(self, values: list[bytes | None]) -> np.ndarray:
        """Append the values' bytes; their index records."""
        lengths = np.array([-1 if v is None else len(v) for v in values], np.int64)
        index = np.empty(len(values), self.INDEX)
        index["off"] = self.size + np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
        index["len"] = lengths + 1
        blob = b"".join(v for v in values if v)
        with open(self.data, "ab") as f:
            f.write(blob)
        self.size += len(blob)
        return index

    def put(self, rows: np.ndarray, values: list[bytes | None]) -> None:
        """Store the values of `rows` (each once; rows of a file of n rows)."""
        self.index.put(rows, self._store(values))

    def append(self, values: list[bytes | None]) -> None:
        """The values of the next rows (a file grown row by row)."""
        self.index.append(self._store(values))

    def append_binary(self, values: pa.Array | pa.ChunkedArray) -> None:
        """append() of an Arrow string or binary array, from its buffers."""
        offsets, data, valid = binary_buffers(values)
        index = np.empty(len(valid), self.INDEX)
        index["off"] = self.size + offsets[:-1]
        index["len"] = np.where(valid, np.diff(offsets) + 1, 0)
        with open(self.data, "ab") as f:
            f.write(data)
        self.size += len(data)
        self.index.append(index)

    def has(self, rows: np.ndarray) -> np.ndarray:
        return self.index.take(rows)["len"] > 1

    def take_binary(self, rows: np.ndarray) -> pa.Array:
        """The values of `rows` (any order) as an Arrow binary array (nulls: no value), without a
        Python object per value: one read of the span they are in when that is dense (rows
        stored near one another), else a read per value."""
        index = self.index.take(np.asarray(rows, np.int64))
        valid = index["len"] > 0
        lens = np.maximum(index["len"] - 1, 0)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        total = int(offsets[-1])
        if total:
            lo, hi = int(index["off"][valid].min()), int((index["off"] + lens)[valid].max())
            if hi - lo <= 4 * total + (1 << 20):
                with open(self.data, "rb") as f:
                    f.seek(lo)
                    span = np.fromfile(f, np.uint8, hi - lo)
                buffer = pa.allocate_buffer(total)  # Arrow's memory: the array keeps it, no copy
                data = np.frombuffer(buffer, np.uint8)
                src = index["off"] - lo
                i = 0
                while i < len(index):  # gathered about GATHER_BYTES at a time (an int64 index a byte)
                    j = min(len(index), max(i + 1, int(np.searchsorted(offsets, offsets[i] + GATHER_BYTES, "right")) - 1))
                    rel = offsets[i:j] - offsets[i]
                    at = np.repeat(src[i:j] - rel, lens[i:j]) + np.arange(offsets[j] - offsets[i])
                    data[offsets[i]:offsets[j]] = span[at]
                    i = j
            else:
                values = self.take(np.asarray(rows, np.int64))
                buffer = pa.py_buffer(b"".join(v for v in values if v))
        else:
            buffer = pa.py_buffer(b"")
        kind = pa.binary() if total < 2**31 else pa.large_binary()
        width = np.int32 if kind == pa.binary() else np.int64
        mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
        return pa.Array.from_buffers(kind, len(index), [mask, pa.py_buffer(offsets.astype(width).tobytes()),
                                                        buffer])

    def take(self, rows: np.ndarray) -> list[bytes | None]:
        """The values of `rows` (any order); reads each value's bytes from the file."""
        index = self.index.take(np.asarray(rows, np.int64))
        out: list[bytes | None] = [None] * len(index)
        order = np.argsort(index["off"], kind="stable")
        with open(self.data, "rb") as f:
            for k in order:
                length = int(index["len"][k]) - 1
                if length >= 0:
                    f.seek(int(index["off"][k]))
                    out[k] = f.read(length)
        return out


class Parts:
    """Records of one numpy dtype spread over `count` partition files by a partition number per
    record, kept in the order added within a partition; writes buffered up to the budget's
    buffer_bytes over all partitions; each partition read back whole."""

    def __init__(self, folder: Path, name: str, dtype: Any, count: int, budget: Budget = Budget()):
        self.dtype, self.count, self.budget = np.dtype(dtype), int(count), budget
        self.files = [Path(folder) / f"{name}-{p:05d}.part" for p in range(self.count)]
        for f in self.files:
            f.write_bytes(b"")
        self.pending: list[list[np.ndarray]] = [[] for _ in range(self.count)]
        self.buffered = 0
        self.sizes = np.zeros(self.count, np.int64)

    def add(self, records: np.ndarray, part: np.ndarray | int) -> None:
        if not len(records):
            return
        if self.count == 1 or np.isscalar(part):
            p = 0 if self.count == 1 else int(part)
            self.pending[p].append(np.array(records, self.dtype))
            self.sizes[p] += len(records)
        else:
            part = np.asarray(part, np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(self.count + 1))
            for p in np.flatnonzero(np.diff(bounds)):
                self.pending[p].append(np.array(records[order[bounds[p]:bounds[p + 1]]], self.dtype))
                self.sizes[p] += bounds[p + 1] - bounds[p]
        self.buffered += records.nbytes
        if self.buffered >= self.budget.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for p, pending in enumerate(self.pending):
            if pending:
                with open(self.files[p], "ab") as f:
                    for block in pending:
                        f.write(block.tobytes())
                pending.clear()
        self.buffered = 0

    def read(self, p: int) -> np.ndarray:
        self.flush()
        return np.fromfile(self.files[p], self.dtype)

    def row_file(self, p: int) -> RowFile:
        """Partition p as a RowFile (read in blocks or by rows)."""
        self.flush()
        return RowFile.existing(self.files[p], self.dtype, self.budget)

    def remove(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


def mix_part(values: np.ndarray, count: int) -> np.ndarray:
    """A partition number per integer value, spread evenly (Fibonacci hashing)."""
    if count == 1:
        return np.zeros(len(values), np.int64)
    h = np.asarray(values).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(32)) % np.uint64(count)).astype(np.int64)


class BytesLog:
    """(row, bytes) records appended to one file, read back as {row: bytes}."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.write_bytes(b"")

    def add(self, rows: np.ndarray, values: list[bytes | None]) -> None:
        with open(self.path, "ab") as f:
            for r, v in zip(rows.tolist(), values):
                v = v or b""
                f.write(np.array([r, len(v)], "<i8").tobytes() + v)

    def read(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        data = self.path.read_bytes()
        at = 0
        while at < len(data):
            r, length = np.frombuffer(data[at:at + 16], "<i8")
            at += 16
            if length:
                out[int(r)] = data[at:at + int(length)]
            at += int(length)
        return out


# ---- the temporary folder ----------------------------------------------------------------------

class Workdir:
    """A temporary folder for one dedup pass (removed after it), in `parent` or the system's
    temporary folder; refuses to start when the disk holds less than `need_bytes`."""

    def __init__(self, parent: str | None = None, need_bytes: int = 0):
        self.parent = parent
        self.need = need_bytes

    def __enter__(self) -> Path:
        root = self.parent or tempfile.gettempdir()
        free = shutil.disk_usage(root).free
        if self.need and free < self.need:
            raise OSError(f"dedup: {self.need / 2**30:.1f} GB of temporary files needed in {root}, "
                          f"{free / 2**30:.1f} GB free; set TMPDIR to a larger disk")
        self.path = Path(tempfile.mkdtemp(prefix="dedup-", dir=root))
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
