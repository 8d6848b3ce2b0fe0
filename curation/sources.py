"""Find the source files of a run and cut them into work units.

Inputs may be files, directories (searched recursively for video extensions), globs
(`footage/**/*.mp4`) or list files (`@list.txt`, or any .txt/.list/.lst file: one path per
line, relative to the list file, `#` comments), and the same in object storage by URI
(`s3://bucket/raw/` for the video objects under a prefix, `s3://bucket/raw/**/*.mp4`,
`s3://bucket/lists/a.txt`, list lines that are URIs; stages/storage.py). An object's
source id is its URI with its version (ETag, generation), so a replaced object is new. Files named explicitly or by a glob or a
list are taken whatever their content: a file that is not a video becomes an error row of
the split stage, not a crash. Probing and decoding happen on the workers (stages/split/);
here only names and sizes are read, so discovery stays fast on large trees.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import heapq
import itertools
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stages import storage
from curation.schema import source_id_for

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".mxf", ".ogv"}
LIST_EXTENSIONS = {".txt", ".list", ".lst"}


class SourceError(ValueError):
    """An input that names nothing (missing path, empty glob)."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute, or a URI
    source_id: str
    size_bytes: int


@dataclass(frozen=True)
class Unit:
    unit_id: str
    sources: tuple[Source, ...]


Entry = Path | storage.ObjectInfo


def _expand(item: str, in_list: bool = False) -> Iterator[Entry]:
    """The entries an input names, in order; object listings are streamed page by page."""
    if item.startswith("@") and not in_list:
        yield from _read_list(item[1:])
        return
    if storage.is_uri(item):
        if "?" in item:  # a presigned URL: its query string is a credential, never recorded
            raise SourceError(f"input {storage.redact(item)}: URLs with a query string (presigned) are not "
                              "supported; name the object by s3:// or gs:// URI with credentials instead")
        yield from _expand_uri(item, in_list)
        return
    if any(ch in item for ch in "*?["):
        found = 0
        for found, match in enumerate(sorted_paths(str(Path(p)) for p in glob.iglob(item, recursive=True)
                                                   if os.path.isfile(p)), 1):
            yield match
        if not found:
            raise SourceError(f"input glob matches no files: {item}")
        return
    path = Path(item)
    if path.is_dir():
        yield from sorted_paths(_video_files(path), root=path)
    elif path.is_file():
        if path.suffix.lower() in LIST_EXTENSIONS and not in_list:
            yield from _read_list(str(path))
        else:
            yield path
    else:
        raise SourceError(f"input not found: {item}")


def _video_files(folder: Path) -> Iterator[bytes]:
    """The video files under `folder`, recursively (symlinked folders are not entered, as
    Path.rglob does not), as paths relative to it in bytes, in no particular order; one
    folder's scan open at a time, so nothing grows with a folder's size. Unreadable
    subfolders are logged and passed over."""
    stack = [b""]
    root = os.fsencode(folder)
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root + b"/" + rel if rel else root) as entries:
                for entry in entries:
                    name = rel + b"/" + entry.name if rel else entry.name
                    if entry.is_dir() and not entry.is_symlink():
                        stack.append(name)
                    elif os.path.splitext(entry.name)[1].lower().decode(errors="replace") in VIDEO_EXTENSIONS \
                            and entry.is_file():
                        yield name
        except OSError as exc:
            if not rel:
                raise
            log.warning("input folder %s: cannot read %s (%s); its files are not listed", folder, os.fsdecode(rel),
                        exc.strerror or exc)


def sorted_paths(paths: Iterable[str | bytes], root: Path | None = None, chunk: int = 65536,
                 spill_dir: str | None = None) -> Iterator[Path]:
    """`paths` (relative to `root` when given) sorted as Path objects sort (part by part),
    without a Path object (some 500 bytes) per path. They are gathered `chunk` at a time into
    Arrow binary and sorted; a listing of more than one chunk writes each sorted run to a
    temporary file (under `spill_dir`, by default the system's temporary folder; about 35 MB
    for 10^6 sources) and merges the runs as it reads them back, a few KB of each at a time.
    So a listing's memory is about one chunk whatever its size: holding every path, sorted
    or not, was 100 MB at 10^6 sources and would be 1 GB at 10^7. Parts are compared by
    joining them with NUL, which sorts below every character a name can hold."""
    with contextlib.ExitStack() as stack:
        runs: list[Iterator[bytes]] = []
        first: pa.Array | None = None  # the first run stays in memory until a second comes
        spill: str | None = None
        batch = max(64, min(RUN_BATCH, chunk // 16))  # keys of a run read back at a time
        for gathered in _batched((os.fsencode(p).replace(b"/", b"\0") for p in paths), chunk):
            run = pa.array(gathered, pa.binary())
            run = run.take(pc.sort_indices(run))
            del gathered
            if first is None and not runs:
                first = run
                continue
            if spill is None:
                spill = stack.enter_context(tempfile.TemporaryDirectory(prefix="curate-listing-", dir=spill_dir))
                runs.append(_spilled(first, spill, 0, stack, batch))
                first = None
            runs.append(_spilled(run, spill, len(runs), stack, batch))
        keys = heapq.merge(*runs) if runs else _read_back(first, batch) if first is not None else iter(())
        for key in keys:
            name = os.fsdecode(key.replace(b"\0", b"/"))
            yield root / name if root is not None else Path(name)


RUN_BATCH = 1024  # at most, keys of a run read back at a time


def _batched(items: Iterable[bytes], n: int) -> Iterator[list[bytes]]:
    items = iter(items)
    while batch := list(itertools.islice(items, n)):
        yield batch


def _spilled(run: pa.Array, folder: str, k: int, stack: contextlib.ExitStack, batch: int) -> Iterator[bytes]:
    """A sorted run written to a file of `folder` and read back in small batches."""
    path = os.path.join(folder, f"run-{k:06d}.arrow")
    table = pa.table({"key": run})
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch)
    reader = pa.ipc.open_file(stack.enter_context(pa.OSFile(path)))
    return (key for i in range(reader.num_record_batches) for key in reader.get_batch(i).column(0).to_pylist())


def _read_back(run: pa.Array, batch: int) -> Iterator[bytes]:
    for start in range(0, len(run), batch):
        yield from run.slice(start, batch).to_pylist()


def _expand_uri(uri: str, in_list: bool) -> Iterator[Entry]:
    """An object, a prefix (its video objects, recursively), a glob or a remote list file."""
    found = 0
    if any(ch in uri for ch in "*?["):
        for found, obj in enumerate(storage.glob_objects(uri), 1):
            yield obj
        if not found:
            raise SourceError(f"input glob matches no objects: {uri}")
        return
    info = None if uri.endswith("/") else storage.object_info(uri)
    if info is not None:
        if Path(uri).suffix.lower() in LIST_EXTENSIONS and not in_list:
            yield from _read_list(uri)
        else:
            yield info
        return
    for obj in storage.list_objects(uri):
        if Path(obj.uri).suffix.lower() in VIDEO_EXTENSIONS:
            found += 1
            yield obj
    if not found:
        raise SourceError(f"input not found: no object or video objects under {uri}")


def _read_list(where: str) -> Iterator[Entry]:
    """The entries of a list file (local or remote): paths relative to its folder, or URIs."""
    if storage.is_uri(where):
        text, parent = storage.read_text(where), where.rsplit("/", 1)[0]
    else:
        path = Path(where)
        if not path.is_file():
            raise SourceError(f"list file not found: {path}")
        text, parent = path.read_text(), str(path.parent)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not storage.is_uri(line) and not Path(line).is_absolute():
            line = f"{parent}/{line}"
            if storage.is_uri(line):  # s3://bucket/lists/../raw/a.mp4 -> s3://bucket/raw/a.mp4
                scheme, rest = line.split("://", 1)
                line = f"{scheme}://{posixpath.normpath(rest)}"
        yield from _expand(line, in_list=True)  # entries are never lists themselves


def _source(entry: Entry) -> Source:
    if isinstance(entry, storage.ObjectInfo):  # the version makes a replaced object a new source
        key = f"{entry.uri}@{entry.version}" if entry.version else entry.uri
        return Source(entry.uri, source_id_for(key), entry.size)
    resolved = str(entry.resolve())
    return Source(resolved, source_id_for(resolved), entry.stat().st_size)


def iter_sources(inputs: list[str]) -> Iterator[Source]:
    """The sources named by `inputs`, input by input, each in its listing's order (sorted
    for local folders and globs, the store's key order for objects), streamed: the first
    comes before a long listing ends. Every input is checked for at least one entry first,
    so a wrong input fails before anything starts. With several inputs or a list file a
    source named twice comes once (paths are remembered: memory grows with the sources then;
    one folder, glob or prefix needs no such memory)."""
    if not inputs:
        raise SourceError("no --input given")
    streams = []
    for item in inputs:  # a missing input or an empty listing raises here, at once
        stream = _expand(item)
        first = next(stream, None)
        if first is None:
            raise SourceError(f"input names no source: {item}")
        streams.append(itertools.chain([first], stream))
    # One folder, glob or prefix names each source once; lists and several inputs may repeat.
    lists = any(i.startswith("@") or Path(i).suffix.lower() in LIST_EXTENSIONS for i in inputs)
    seen: set[str] | None = set() if len(inputs) > 1 or lists else None
    for stream in streams:
        for entry in stream:
            source = _source(entry)
            if seen is not None:
                if source.path in seen:
                    continue
                seen.add(source.path)
            yield source


def discover(inputs: list[str]) -> list[Source]:
    """Every source named by `inputs` (files, or objects by URI), deduplicated, sorted by path."""
    return sorted(iter_sources(inputs), key=lambda s: s.path)


class UnitFeed:
    """Units planned as the listing goes: iterate it once. Sources already committed (their
    ids in `done`) are skipped; units of `per_unit` of the others are formed in listing
    order, so the same listing and the same committed sources give the same units. Keeps
    counts (sources listed, to do, units, bytes) and the units given out and not yet
    `finished` (the ones still open at the end were never committed); nothing per source or
    per finished unit, so its memory does not grow with the listing."""

    def __init__(self, sources: Iterable[Source], per_unit: int, done: set[str] | None = None):
        self.sources, self.per_unit, self.done = sources, per_unit, done or set()
        self.listed = self.todo = self.units = self.todo_bytes = 0
        self.complete = False  # the listing has ended
        self.open: dict[str, Unit] = {}  # given out, not finished
        self.started = time.monotonic()

    def __iter__(self) -> Iterator[Unit]:
        chunk: list[Source] = []
        last = time.monotonic()
        for source in self.sources:
            self.listed += 1
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("listing sources: %d so far (%d to do), %.0fs", self.listed, self.todo,
                         last - self.started)
            if source.source_id in self.done:
                continue
            self.todo += 1
            self.todo_bytes += source.size_bytes
            chunk.append(source)
            if len(chunk) == self.per_unit:
                yield self._unit(chunk)
                chunk = []
        if chunk:
            yield self._unit(chunk)
        self.complete = True
        log.info("listing done: %d sources, %d to do in %d units, %.0fs", self.listed, self.todo, self.units,
                 time.monotonic() - self.started)

    def _unit(self, chunk: list[Source]) -> Unit:
        unit = make_unit(tuple(chunk))
        self.units += 1
        self.open[unit.unit_id] = unit
        return unit

    def finished(self, unit_id: str) -> Unit:
        return self.open.pop(unit_id)


def make_unit(sources: tuple[Source, ...]) -> Unit:
    """A unit of these sources; its id is a hash of their ids."""
    digest = hashlib.sha1(",".join(s.source_id for s in sources).encode()).hexdigest()[:16]
    return Unit(f"u{digest}", sources)


def plan_units(sources: list[Source], sources_per_unit: int) -> list[Unit]:
    """Cut sorted sources into units; a unit's id is a hash of its sources' ids."""
    return [make_unit(tuple(sources[i:i + sources_per_unit])) for i in range(0, len(sources), sources_per_unit)]
