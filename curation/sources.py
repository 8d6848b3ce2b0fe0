"""Find the source files of a run and cut them into work units.

Inputs may be files, directories (searched recursively for video extensions), globs
(`footage/**/*.mp4`) or list files (`@list.txt`, or any .txt/.list/.lst file: one path per
line, relative to the list file, `#` comments). Files named explicitly or by a glob or a
list are taken whatever their content: a file that is not a video becomes an error row of
the split stage, not a crash. Probing and decoding happen on the workers (stages/split/);
here only names and sizes are read, so discovery stays fast on large trees.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from curation.schema import source_id_for

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".mxf", ".ogv"}
LIST_EXTENSIONS = {".txt", ".list", ".lst"}


class SourceError(ValueError):
    """An input that names nothing (missing path, empty glob)."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute
    source_id: str
    size_bytes: int


@dataclass(frozen=True)
class Unit:
    unit_id: str
    sources: tuple[Source, ...]


def _expand(item: str, in_list: bool = False) -> list[Path]:
    if item.startswith("@") and not in_list:
        return _read_list(Path(item[1:]))
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
            return _read_list(path)
        return [path]
    raise SourceError(f"input not found: {item}")


def _read_list(path: Path) -> list[Path]:
    if not path.is_file():
        raise SourceError(f"list file not found: {path}")
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line)
        if not entry.is_absolute():
            entry = path.parent / entry
        out.extend(_expand(str(entry), in_list=True))  # entries are never lists themselves
    return out


def discover(inputs: list[str]) -> list[Source]:
    """Every source file named by `inputs`, deduplicated, sorted by absolute path."""
    if not inputs:
        raise SourceError("no --input given")
    seen: dict[str, Source] = {}
    for item in inputs:
        for path in _expand(item):
            resolved = str(path.resolve())
            if resolved not in seen:
                seen[resolved] = Source(resolved, source_id_for(resolved), path.stat().st_size)
    return [seen[k] for k in sorted(seen)]


def plan_units(sources: list[Source], sources_per_unit: int) -> list[Unit]:
    """Cut sorted sources into units; a unit's id is a hash of its sources' ids."""
    units = []
    for start in range(0, len(sources), sources_per_unit):
        chunk = tuple(sources[start:start + sources_per_unit])
        digest = hashlib.sha1(",".join(s.source_id for s in chunk).encode()).hexdigest()[:16]
        units.append(Unit(f"u{digest}", chunk))
    return units
