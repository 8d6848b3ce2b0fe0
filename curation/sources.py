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

import glob
import hashlib
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

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


def _expand(item: str, in_list: bool = False) -> list[Path | storage.ObjectInfo]:
    if item.startswith("@") and not in_list:
        return _read_list(item[1:])
    if storage.is_uri(item):
        if "?" in item:  # a presigned URL: its query string is a credential, never recorded
            raise SourceError(f"input {storage.redact(item)}: URLs with a query string (presigned) are not "
                              "supported; name the object by s3:// or gs:// URI with credentials instead")
        return _expand_uri(item, in_list)
    if any(ch in item for ch in "*?["):
        matches = [Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise SourceError(f"input glob matches no files: {item}")
        return matches
    path = Path(item)
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    if path.is_file():
        if path.suffix.lower() in LIST_EXTENSIONS and not in_list:
            return _read_list(str(path))
        return [path]
    raise SourceError(f"input not found: {item}")


def _expand_uri(uri: str, in_list: bool) -> list[Path | storage.ObjectInfo]:
    """An object, a prefix (its video objects, recursively), a glob or a remote list file."""
    if any(ch in uri for ch in "*?["):
        matches: list[Path | storage.ObjectInfo] = list(storage.glob_objects(uri))
        if not matches:
            raise SourceError(f"input glob matches no objects: {uri}")
        return matches
    info = None if uri.endswith("/") else storage.object_info(uri)
    if info is not None:
        if Path(uri).suffix.lower() in LIST_EXTENSIONS and not in_list:
            return _read_list(uri)
        return [info]
    found: list[Path | storage.ObjectInfo] = [
        o for o in storage.list_objects(uri) if Path(o.uri).suffix.lower() in VIDEO_EXTENSIONS]
    if not found:
        raise SourceError(f"input not found: no object or video objects under {uri}")
    return found


def _read_list(where: str) -> list[Path | storage.ObjectInfo]:
    """The entries of a list file (local or remote): paths relative to its folder, or URIs."""
    if storage.is_uri(where):
        text, parent = storage.read_text(where), where.rsplit("/", 1)[0]
    else:
        path = Path(where)
        if not path.is_file():
            raise SourceError(f"list file not found: {path}")
        text, parent = path.read_text(), str(path.parent)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not storage.is_uri(line) and not Path(line).is_absolute():
            line = f"{parent}/{line}"
            if storage.is_uri(line):  # s3://bucket/lists/../raw/a.mp4 -> s3://bucket/raw/a.mp4
                scheme, rest = line.split("://", 1)
                line = f"{scheme}://{posixpath.normpath(rest)}"
        out.extend(_expand(line, in_list=True))  # entries are never lists themselves
    return out


def _source(entry: Path | storage.ObjectInfo) -> Source:
    if isinstance(entry, storage.ObjectInfo):  # the version makes a replaced object a new source
        key = f"{entry.uri}@{entry.version}" if entry.version else entry.uri
        return Source(entry.uri, source_id_for(key), entry.size)
    resolved = str(entry.resolve())
    return Source(resolved, source_id_for(resolved), entry.stat().st_size)


def discover(inputs: list[str]) -> list[Source]:
    """Every source named by `inputs` (files, or objects by URI), deduplicated, sorted by path."""
    if not inputs:
        raise SourceError("no --input given")
    seen: dict[str, Source] = {}
    started = last = time.monotonic()
    for item in inputs:
        for entry in _expand(item):
            source = _source(entry)
            seen.setdefault(source.path, source)
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("discovering sources: %d so far, %.0fs", len(seen), last - started)
    return [seen[k] for k in sorted(seen)]


def plan_units(sources: list[Source], sources_per_unit: int) -> list[Unit]:
    """Cut sorted sources into units; a unit's id is a hash of its sources' ids."""
    units = []
    for start in range(0, len(sources), sources_per_unit):
        chunk = tuple(sources[start:start + sources_per_unit])
        digest = hashlib.sha1(",".join(s.source_id for s in chunk).encode()).hexdigest()[:16]
        units.append(Unit(f"u{digest}", chunk))
    return units
