"""Paths in OUT_DIR, local or in an object store, behind one small pathlib-like API.

`out_path("runs/a")` is a `pathlib.Path`; `out_path("s3://bucket/runs/a")` (gs://, az://, any
fsspec filesystem stages/storage.py resolves) is a `StorePath`, which offers the part of
pathlib the output code uses: `/`, name, stem, parent, exists, is_dir, iterdir, glob (one
level), read_bytes/read_text, write_bytes/write_text, unlink, mkdir. The functions below
(`write_bytes_atomic`, `read_table`, `write_table`, `parquet_file`, `rmtree`, ...) take
either kind.

How a write stays atomic, so a reader never sees a partial file:
- a local file is written under a temporary name and renamed (fsynced where it matters);
- an object is written by one PUT (a multipart upload for large ones), which the store makes
  visible whole or not at all. Object stores have no rename, so nothing is ever renamed there:
  callers write under final names (curation/writer.py makes them unique per attempt), and
  the ledger entry, written last, is the commit.

Listings are never answered from fsspec's directory cache: other processes (the workers)
write the same prefixes, so each listing and existence check asks the store.
Errors from the store are redacted (storage.redact) and raised as storage.StorageError (a
missing or forbidden object) or storage.StoreUnavailable (the store failed past its retries).
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import functools
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import pyarrow as pa
import pyarrow.parquet as pq

from curation import schema
from stages import storage


UPLOAD_PART_BYTES = 64 * 2**20  # a part of a multipart upload to S3 (used above twice this size)
# Objects this process read, wrote, deleted and listings it made in OUT_DIRs (a local file
# counts as an object): bench/scale_bench.py reads them from the file CURATE_IO_STATS names.
OBJECTS = {"read": 0, "written": 0, "deleted": 0, "listed": 0}


def _count(kind: str, n: int = 1) -> None:
    OBJECTS[kind] += n


def _dump_counts() -> None:
    target = os.environ.get("CURATE_IO_STATS")
    if target:
        with open(target, "w") as f:
            json.dump(OBJECTS, f)


atexit.register(_dump_counts)


class StorePath:
    """A path in an object store: `protocol://path`, on a filesystem from storage.filesystem."""

    def __init__(self, uri: str, _fs: Any = None, _path: str | None = None):
        if _fs is None:
            _fs, _path = storage.filesystem(uri)
        self.fs = _fs
        self.path = _path.rstrip("/")
        protocol = _fs.protocol[0] if isinstance(_fs.protocol, (tuple, list)) else _fs.protocol
        self.protocol = protocol

    # ---- names --------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.path.lstrip('/')}"

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __lt__(self, other: "StorePath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> "StorePath":
        return StorePath("", self.fs, posixpath.join(self.path, str(part)))

    def joinpath(self, *parts: str) -> "StorePath":
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        name = self.name
        return name[:name.rfind(".")] if "." in name[1:] else name

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name[1:] else ""

    @property
    def parent(self) -> "StorePath":
        return StorePath("", self.fs, posixpath.dirname(self.path))

    # ---- the store ----------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:  # a missing object, or a missing bucket: named
            raise FileNotFoundError(storage.redact(f"{self}: not found ({exc})")) from None
        except Exception as exc:  # noqa: BLE001 - redacted, and sorted into object / store errors
            raise storage._store_error(str(self), exc) from None

    def _fresh(self) -> None:
        self.fs.invalidate_cache(self.path)
        self.fs.invalidate_cache(posixpath.dirname(self.path))

    def _ask(self, fn: Any) -> Any:
        """fn(path) answered by the store, not by a cached listing."""
        self._fresh()
        return self._call(fn, self.path)

    def exists(self) -> bool:
        return bool(self._ask(self.fs.exists))

    def is_dir(self) -> bool:
        return bool(self._ask(self.fs.isdir))

    def is_file(self) -> bool:
        return bool(self._ask(self.fs.isfile))

    def size(self) -> int:
        return int(self._ask(self.fs.size))

    def iterdir(self) -> Iterator["StorePath"]:
        """The entries directly under this prefix (none when it holds nothing)."""
        _count("listed")
        self._fresh()
        try:
            names = self._call(self.fs.ls, self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        own = self.path.strip("/")
        return iter(sorted(StorePath("", self.fs, n.rstrip("/")) for n in names
                           if n.rstrip("/").strip("/") != own))

    def glob(self, pattern: str) -> Iterator["StorePath"]:
        """Entries directly under this prefix whose name matches `pattern` (no '/' in it)."""
        if "/" in pattern:
            raise ValueError(f"StorePath.glob takes one level only, not {pattern!r}")
        return iter([p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)])

    def rglob(self, pattern: str) -> Iterator["StorePath"]:
        self._fresh()
        try:
            names = self._call(self.fs.find, self.path)
        except FileNotFoundError:
            return iter(())
        return iter(sorted(StorePath("", self.fs, n) for n in names
                           if fnmatch.fnmatchcase(posixpath.basename(n), pattern)))

    def read_bytes(self) -> bytes:
        _count("read")
        return self._call(self.fs.cat_file, self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        _count("written")
        self._call(self.fs.pipe_file, self.path, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        return self._call(self.fs.open, self.path, mode, **kwargs)

    def unlink(self, missing_ok: bool = False) -> None:
        _count("deleted")
        try:
            self._call(self.fs.rm_file, self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._fresh()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders, a prefix exists once it holds objects."""

    def upload_from(self, local: Path) -> None:
        """Copy the local file or folder `local` here (a folder: every file, recursively)."""
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            target = self if f == local else self / f.relative_to(local).as_posix()
            target._put(f)

    def _put(self, local: Path) -> None:
        """One file: one PUT, or on S3 above 2 x UPLOAD_PART_BYTES a multipart upload (parts,
        then a complete, each request retried by the client)."""
        kwargs = {"chunksize": UPLOAD_PART_BYTES} if self.protocol in ("s3", "s3a") else {}
        _count("written")
        self._call(self.fs.put_file, str(local), self.path, **kwargs)


AnyPath = Union[Path, StorePath]


def is_remote(path: Any) -> bool:
    return isinstance(path, StorePath) or storage.is_uri(str(path))


def out_path(path: str | Path | StorePath) -> AnyPath:
    """A Path for a local folder (a file:// URI included), a StorePath for an object-store URI."""
    if isinstance(path, (Path, StorePath)):
        return path
    text = str(path)
    if storage.is_uri(text):
        return StorePath(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text)


def absolute(path: str) -> str:
    """An absolute local path, or the URI as it is (a string either way)."""
    return path if storage.is_uri(path) else os.path.abspath(path)


def work_dir(out_dir: str | AnyPath, given: str | None = None) -> Path:
    """The local folder where `curate train` and `curate ablate` keep checkpoints and runs for
    OUT_DIR: `given` if set; else OUT_DIR itself when local; else, for an object-store OUT_DIR,
    ./curate-work/<scheme>/<bucket>/<prefix> under the current folder (the same command run
    from the same folder finds it again to resume)."""
    if given:
        return Path(given)
    path = out_path(out_dir)
    if isinstance(path, StorePath):
        return Path("curate-work") / path.protocol / path.path.strip("/")
    return path


# ---- writing ------------------------------------------------------------------------------------

def tmp_name(path: Path) -> Path:
    """A private temporary name beside a local `path` (two attempts at one unit never share one)."""
    return path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def write_bytes_atomic(path: AnyPath, data: bytes, durable: bool = True) -> None:
    """Write `data` so that a reader sees the old file or the whole new one: a temporary name
    and a rename on a local disk (`durable` also fsyncs first), one PUT on an object store."""
    if isinstance(path, StorePath):
        path.write_bytes(data)
        return
    _count("written")
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: AnyPath, obj: Any, durable: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), durable)


def write_table(path: AnyPath, table: pa.Table, row_group_size: int | None = None) -> None:
    """A Parquet file (zstd), atomically as `staged_file` says."""
    with staged_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size,
                       write_statistics=schema.statistics_columns(table.schema))


# ---- reading ------------------------------------------------------------------------------------

READ_BLOCK = 8 * 2**20  # a ranged read of a Parquet file in a store (s3fs's own default is 50 MB)


def _open(path: StorePath) -> Any:
    _count("read")
    return path.open("rb", cache_type="readahead", block_size=READ_BLOCK)


def _source(path: str | AnyPath) -> Any:
    """What pyarrow reads: a local path string, or an open file of the store."""
    path = out_path(path)
    return _open(path) if isinstance(path, StorePath) else str(path)


def read_many(paths: list[AnyPath]) -> list[bytes]:
    """The contents of many small files, in order (on a store: fetched concurrently)."""
    remote = [p for p in paths if isinstance(p, StorePath)]
    if not remote:
        _count("read", len(paths))
        return [p.read_bytes() for p in paths]
    fs = remote[0].fs
    if len(remote) < len(paths) or any(p.fs is not fs for p in remote):
        return [p.read_bytes() for p in paths]
    _count("read", len(remote))
    got = remote[0]._call(fs.cat, [p.path for p in remote], on_error="raise")
    if isinstance(got, bytes):  # fsspec answers one path with its bytes
        got = {remote[0].path: got}
    by_path = {k.strip("/"): v for k, v in got.items()}
    return [by_path[p.path.strip("/")] for p in remote]


def read_table(path: str | AnyPath, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    path = out_path(path)
    if isinstance(path, StorePath):
        with _open(path) as f:
            return pq.read_table(f, columns=columns, **kwargs)
    _count("read")
    return pq.read_table(path, columns=columns, **kwargs)


def read_schema(path: str | AnyPath) -> pa.Schema:
    path = out_path(path)
    if isinstance(path, StorePath):
        with _open(path) as f:
            return pq.read_schema(f)
    return pq.read_schema(path)


@functools.lru_cache(maxsize=4)
def _cached_parquet_file(key: str, pid: int) -> pq.ParquetFile:
    return parquet_file(key)


def open_parquet(path: str | AnyPath) -> pq.ParquetFile:
    """parquet_file, kept open for the next reads of the same file (a few at a time): readers
    that take a file's row groups one by one parse its footer once, not once per row group.
    Safe because a data file's name is never reused for other content (names are unique per
    attempt and per compaction). Per process: a forked data-loader worker opens its own."""
    return _cached_parquet_file(str(path), os.getpid())


def parquet_file(path: str | AnyPath, **kwargs: Any) -> pq.ParquetFile:
    """A ParquetFile to read row groups from (on a store: an open file, read in ranges)."""
    source = _source(path)
    if isinstance(source, str):
        _count("read")
    return pq.ParquetFile(source, **kwargs)


def size(path: AnyPath) -> int:
    return path.size() if isinstance(path, StorePath) else path.stat().st_size


def resolved(path: AnyPath) -> AnyPath:
    """An absolute local path, or the URI as it is."""
    return path if isinstance(path, StorePath) else path.resolve()


STAGE_PREFIX = "curate-stage-"  # $TMPDIR/curate-stage-<pid>-*: a file on its way to a store
_SWEPT: list[int] = []


@contextlib.contextmanager
def staged_file(path: AnyPath) -> Iterator[Path]:
    """A local file to write `path`'s content into (for writers that need a file name); when
    the block ends without error it becomes `path` atomically: renamed after an fsync on a local
    disk, uploaded in one PUT to a store (the local copy, in the temporary folder, deleted)."""
    if not isinstance(path, StorePath):
        _count("written")
    if isinstance(path, StorePath):
        if not _SWEPT:  # staged files of processes that were killed while uploading
            storage.sweep_orphans(prefix=STAGE_PREFIX)
            _SWEPT.append(os.getpid())
        fd, name = tempfile.mkstemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", suffix=path.suffix)
        os.close(fd)
        try:
            yield Path(name)
            path.upload_from(Path(name))
        finally:
            os.unlink(name)
        return
    tmp = tmp_name(path)
    yield tmp
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rmtree(path: AnyPath) -> None:
    """Delete a folder (or prefix) and everything under it; nothing when it does not exist."""
    if isinstance(path, StorePath):
        if path.exists():
            path._call(path.fs.rm, path.path, recursive=True)
            path._fresh()
        return
    shutil.rmtree(path, ignore_errors=True)
