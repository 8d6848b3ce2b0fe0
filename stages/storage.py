"""Sources in object storage (s3://, gs://, az://, any fsspec filesystem): listing, fetching.

A source named by a URI is read through fsspec (`s3fs` for s3://, installed with this
package; `gcsfs` for gs:// and `adlfs` for az:// when installed): the standard credential
chains apply (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_REGION, AWS_ENDPOINT_URL for MinIO, R2 or a local endpoint, instance roles; GCS
application-default credentials), nothing is configured here.

Listing (`list_objects`) is streamed page by page on S3 (1000 keys a request, in the store's
key order, each page retried on its own by s3fs); other filesystems list through fsspec's
`find`. An object's version (S3 ETag, GCS generation, Azure etag) goes into its source id, so
a replaced object is a new source.

Fetching: a worker copies a source into a local temporary file with a few large ranged reads
in parallel (`fetch`: parts of PART_BYTES, up to PARALLEL_PARTS at once), and a unit's next
source is fetched while the current one decodes (`Prefetcher`). PyAV then reads a local file:
seeking in an MP4 whose index sits at its end costs nothing, and every byte is fetched once.
Temporary files live in a folder per process under the system temporary directory
(`curate-fetch-<pid>-*`), are deleted as soon as their source is split, and folders left by
processes that died (SIGKILL) are swept by the next Prefetcher.

Errors name the object, never a credential or a presigned URL's query string
(stages/redaction.py's `redact`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.redaction import redact  # noqa: F401 - storage.redact, used across the package

log = logging.getLogger(__name__)

PART_BYTES = 16 * 2**20  # one ranged read
PARALLEL_PARTS = 8  # ranged reads of one object at once
TEMP_PREFIX = "curate-fetch-"
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# What this process did with object stores (the run record and the benchmark read it): objects
# fetched, their bytes and seconds, and requests that failed and were retried or given up on
# (503 SlowDown, a reset connection, a timeout), counted as botocore decides on each attempt.
FETCHED = {"objects": 0, "bytes": 0, "seconds": 0.0, "failed_requests": 0}
_LOCK = threading.Lock()
_SESSIONS: dict[int, Any] = {}  # by process id (a forked child makes its own)


class StorageError(OSError):
    """An object-store operation that failed; the message is redacted."""


class StoreUnavailable(StorageError):
    """The store kept failing (server errors, throttling, lost connections) past the retry
    budget: not the source's fault, so the run stops (exit 1) instead of recording a row."""


def counters() -> dict[str, float]:
    with _LOCK:
        return dict(FETCHED)


def counted_since(before: dict[str, float]) -> dict[str, float]:
    """What FETCHED gained since `before` (a `counters()` snapshot)."""
    now = counters()
    return {k: now[k] - before.get(k, 0) for k in now}


def _on_attempt(**kwargs: Any) -> None:
    """botocore's needs-retry event, once per attempt: count the failed ones."""
    response = kwargs.get("response")
    status = (response[1].get("ResponseMetadata", {}).get("HTTPStatusCode", 200)
              if response and len(response) > 1 and isinstance(response[1], dict) else 200)
    if kwargs.get("caught_exception") is not None or status >= 500 or status == 429:
        with _LOCK:
            FETCHED["failed_requests"] += 1


def is_uri(path: str) -> bool:
    """True for a URI with a scheme other than file:// (s3://bucket/key, gs://..., az://...)."""
    m = _URI.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URI; a missing backend is a clear error."""
    import fsspec

    protocol = _URI.match(uri).group(1).lower()
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        options["session"] = _counting_session()
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]  # one instance per endpoint
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        package = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}.get(protocol)
        hint = f" (pip install {package})" if package else ""
        raise StorageError(f"no filesystem for {protocol}:// here{hint}: {exc}") from None
    except ValueError as exc:
        raise StorageError(f"unknown storage scheme {protocol}:// ({exc})") from None
    return fs, fs._strip_protocol(uri)


def _counting_session() -> Any:
    """This process's aiobotocore session for S3, with `_on_attempt` on its events: every
    client made from it counts its failed attempts, also those s3fs makes anew after lost
    connections. Credentials still come from the standard chain when a client is made."""
    pid = os.getpid()
    with _LOCK:
        if pid not in _SESSIONS:
            from aiobotocore.session import AioSession

            session = AioSession()
            session.register("needs-retry.s3", _on_attempt)
            _SESSIONS[pid] = session
        return _SESSIONS[pid]


def _uri(fs: Any, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.lstrip('/')}"


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str | None  # ETag, generation: part of the source id


def _version(info: dict[str, Any]) -> str | None:
    """The object's version: its ETag or generation where the store gives one, else its
    modification time and size (a replaced object still reads as new)."""
    for key in ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(key):
            return f"{info[key]}-{info.get('size')}"
    return None


def _info(fs: Any, info: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(_uri(fs, info["name"]), int(info.get("size") or 0), _version(info))


def _store_error(uri: str, exc: BaseException) -> StorageError:
    """A missing or forbidden object is the object's problem (StorageError: a row); anything
    else the store answered after its retries is the store's (StoreUnavailable: stop)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return StorageError(redact(f"{uri}: not found: {exc}"))
    if isinstance(exc, PermissionError):
        return StorageError(redact(f"{uri}: access denied: {exc}"))
    if "credentials" in f"{type(exc).__name__} {exc}".lower():
        return StoreUnavailable(redact(f"{uri}: no credentials on this machine ({exc}); set the standard "
                                       "variables (AWS_ACCESS_KEY_ID, ...) where every worker starts, or give "
                                       "the nodes an instance role"))
    return StoreUnavailable(redact(f"{uri}: the store failed after its retries ({type(exc).__name__}: {exc}); "
                                   "rerun the same command to resume"))


def object_info(uri: str) -> ObjectInfo | None:
    """The object's size and version; None when `uri` names no object (a prefix, or nothing)."""
    fs, path = filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - credentials, network: said once, clearly
        raise _store_error(uri, exc) from None
    return _info(fs, info) if info.get("type") != "directory" else None


def list_objects(uri: str) -> Iterator[ObjectInfo]:
    """Every object under the prefix `uri` (recursively), page by page on S3."""
    fs, path = filesystem(uri)
    prefix = path.rstrip("/") + "/"
    try:
        if hasattr(fs, "_iterdir") and fs.protocol[0] in ("s3", "s3a"):
            from fsspec.asyn import sync

            bucket, key = prefix.split("/", 1)
            pages = fs._iterdir(bucket, prefix=key, delimiter="")
            while True:
                try:
                    info = sync(fs.loop, pages.__anext__)
                except StopAsyncIteration:
                    return
                if info.get("type") == "file" and not info["name"].endswith("/"):
                    yield _info(fs, info)
        else:
            for name, info in sorted(fs.find(prefix, detail=True).items()):
                if info.get("type") != "directory":
                    yield _info(fs, info)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _store_error(uri, exc) from None


def glob_pattern(pattern: str) -> re.Pattern:
    """A regex for a glob over '/'-separated names: ** spans folders, * and ? do not."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_objects(uri: str) -> Iterator[ObjectInfo]:
    """The objects whose URI matches the glob `uri`, listed under its fixed prefix."""
    first = min(uri.find(c) for c in "*?[" if c in uri)
    prefix = uri[:uri.rfind("/", 0, first) + 1]
    regex = glob_pattern(uri)
    for obj in list_objects(prefix):
        if regex.match(obj.uri):
            yield obj


def read_text(uri: str) -> str:
    """A small remote object (a list file) as text."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path).decode()
    except Exception as exc:  # noqa: BLE001
        raise _store_error(uri, exc) from None


def fetch(uri: str, dest: str | Path, size: int | None = None) -> int:
    """Copy the object to the local file `dest` with ranged reads, PARALLEL_PARTS at once;
    returns the bytes fetched. Raises StorageError (redacted) when the object cannot be read."""
    fs, path = filesystem(uri)
    started = time.monotonic()
    try:
        if size is None:
            size = int(fs.size(path))
        ranges = [(s, min(size, s + PART_BYTES)) for s in range(0, size, PART_BYTES)] or [(0, 0)]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            def part(r: tuple[int, int]) -> int:
                data = fs.cat_file(path, start=r[0], end=r[1]) if r[1] > r[0] else b""
                if len(data) != r[1] - r[0]:
                    raise StorageError(f"{uri}: short read at {r[0]}: {len(data)} of {r[1] - r[0]} bytes "
                                       "(the object changed while it was read?)")
                os.pwrite(fd, data, r[0])
                return len(data)
            if len(ranges) == 1:
                got = part(ranges[0])
            else:
                with ThreadPoolExecutor(min(PARALLEL_PARTS, len(ranges)), thread_name_prefix="fetch") as pool:
                    got = sum(pool.map(part, ranges))
        finally:
            os.close(fd)
    except Exception as exc:  # noqa: BLE001
        raise _store_error(uri, exc) from None
    with _LOCK:
        FETCHED["objects"] += 1
        FETCHED["bytes"] += got
        FETCHED["seconds"] += time.monotonic() - started
    return got


# ---- temporary copies ---------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphans(prefix: str = TEMP_PREFIX, root: str | None = None) -> list[Path]:
    """Temporary files and folders `<prefix><pid>-*` of processes that no longer run."""
    found = []
    for entry in Path(root or tempfile.gettempdir()).glob(prefix + "*"):
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            found.append(entry)
    return found


def sweep_orphans(root: str | None = None, prefix: str = TEMP_PREFIX) -> int:
    """Remove the temporary folders (fetches) or files (`prefix`) of processes that no longer
    run; returns how many."""
    found = orphans(prefix, root)
    for entry in found:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return len(found)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))


class Prefetcher:
    """Fetches the remote ones of `paths`, in order, at most `ahead` beyond the oldest one not
    yet taken, on a background thread: the next source downloads while this one decodes.

    `take(uri)` waits for its copy and returns the local path (raising the fetch's error);
    `release(uri)` deletes it. `close()` stops the thread and deletes the folder, whatever
    happened. While open, `local_copy` finds its copies (the split stage reads them)."""

    def __init__(self, paths: list[str], sizes: dict[str, int] | None = None, ahead: int = 1):
        self.order = [p for p in dict.fromkeys(paths) if is_uri(p)]
        self.sizes = sizes or {}
        self.ahead = ahead
        self.futures: dict[str, Future] = {p: Future() for p in self.order}
        self.taken: set[str] = set()
        self.dir: Path | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        if self.order:
            sweep_orphans()
            self.dir = temp_dir()
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for k, uri in enumerate(self.order):
            with self._cond:  # wait while `ahead` fetched copies are not taken yet
                self._cond.wait_for(lambda: self._stop or sum(
                    1 for u in self.order[:k] if u not in self.taken) < self.ahead)
                if self._stop:
                    return
            future = self.futures[uri]
            try:
                local = self.dir / f"{k:05d}{Path(uri).suffix[:12]}"
                fetch(uri, local, self.sizes.get(uri))
                future.set_result(str(local))
            except BaseException as exc:  # noqa: BLE001 - handed to take()
                future.set_exception(exc)

    def take(self, uri: str) -> str:
        with self._cond:
            self.taken.add(uri)
            self._cond.notify_all()
        return self.futures[uri].result()

    def release(self, uri: str) -> None:
        future = self.futures.get(uri)
        if future is not None and future.done() and future.exception() is None:
            Path(future.result()).unlink(missing_ok=True)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Prefetcher":
        with _LOCK:
            for uri in self.order:
                _ACTIVE[uri] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            for uri in self.order:
                if _ACTIVE.get(uri) is self:
                    del _ACTIVE[uri]
        self.close()


_ACTIVE: dict[str, Prefetcher] = {}


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path to read `path` from: itself when local; for a URI, the open Prefetcher's
    copy or one fetched now, deleted on exit (errors included)."""
    if not is_uri(path):
        yield path
        return
    with _LOCK:
        prefetcher = _ACTIVE.get(path)
    if prefetcher is not None:
        try:
            yield prefetcher.take(path)
        finally:
            prefetcher.release(path)
        return
    folder = temp_dir()
    try:
        local = folder / f"source{Path(path).suffix[:12]}"
        fetch(path, local)
        yield str(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
