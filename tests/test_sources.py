"""Source discovery and unit planning."""

from __future__ import annotations

import glob
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from curation.sources import (VIDEO_EXTENSIONS, SourceError, _video_files, discover, iter_sources, plan_units,
                              sorted_paths)


def test_files_dirs_globs_and_list_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    for rel in ("a/x.mp4", "a/deep/y.MOV", "a/readme.txt", "z.mkv"):
        (tmp_path / rel).write_bytes(b"data")
    (tmp_path / "list.txt").write_text("# my list\nz.mkv\na/readme.txt\n")
    from_dir = {p.path for p in discover([str(tmp_path / "a")])}
    assert from_dir == {str((tmp_path / "a/x.mp4").resolve()), str((tmp_path / "a/deep/y.MOV").resolve())}
    from_glob = {p.path for p in discover([str(tmp_path / "**/*.mp4")])}
    assert from_glob == {str((tmp_path / "a/x.mp4").resolve())}
    # Named explicitly (here through a list file), a non-video file is taken: it becomes an error row.
    from_list = {p.path for p in discover([f"@{tmp_path / 'list.txt'}"])}
    assert from_list == {str((tmp_path / "z.mkv").resolve()), str((tmp_path / "a/readme.txt").resolve())}
    both = discover([str(tmp_path / "a"), str(tmp_path / "a/x.mp4")])
    assert len(both) == 2  # deduplicated


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        discover([str(tmp_path / "nope")])
    with pytest.raises(SourceError, match="matches no files"):
        discover([str(tmp_path / "*.mp4")])


def test_units_are_deterministic_and_cover_every_source(tmp_path):
    for i in range(7):
        (tmp_path / f"v{i}.mp4").write_bytes(b"x")
    sources = discover([str(tmp_path)])
    units = plan_units(sources, 3)
    assert [len(u.sources) for u in units] == [3, 3, 1]
    assert [u.unit_id for u in units] == [u.unit_id for u in plan_units(discover([str(tmp_path)]), 3)]
    assert sorted(s.path for u in units for s in u.sources) == sorted(s.path for s in sources)


def _tree(root):
    """Names that sort differently as strings and as paths ('a/...' before 'a.b', 'a b', 'a-b'),
    upper case, non-video files, a hidden file, a symlinked folder (not entered) and a
    symlinked file (taken)."""
    rels = ["a/x.mp4", "a/deep/y.MOV", "a/readme.txt", "a.b/x.mp4", "a b/x.mp4", "a-b/x.mp4", "ab.mp4",
            "a.mp4", "Z.mkv", "z/.hidden.mp4", "z/w.webm", "é/ü.mp4", "a/deep/deeper/v.ts"]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"data")
    (root / "link").symlink_to(root / "a", target_is_directory=True)
    (root / "linked.mp4").symlink_to(root / "a.mp4")


def test_folder_and_glob_listings_keep_the_path_order(tmp_path):
    """The streamed listing gives exactly what sorting Path objects gave (the order units are
    planned in), without holding a Path per source."""
    _tree(tmp_path)
    expected = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    listed = [Path(s.path) for s in iter_sources([str(tmp_path)])]
    assert listed == [p.resolve() for p in expected]
    assert not any("link/" in str(p) for p in expected)
    globbed = sorted(Path(p) for p in glob.glob(str(tmp_path / "**" / "*.mp4"), recursive=True))
    assert list(sorted_paths(str(p) for p in reversed(globbed))) == globbed
    # Sorted in runs of 2 spilled to files and merged: the same order, and the files go after.
    spill = tmp_path / "spill"
    spill.mkdir()
    assert list(sorted_paths((str(p) for p in reversed(globbed)), chunk=2, spill_dir=str(spill))) == globbed
    assert len(globbed) > 4 and not any(spill.iterdir())
    assert [Path(s.path) for s in iter_sources([str(tmp_path / "**" / "*.mp4")])] == [p.resolve() for p in globbed]


def test_a_large_folder_is_listed_in_little_memory(tmp_path):
    """20,000 sources in one folder, gathered 1,024 at a time: the listing's Python heap stays
    under 1 MB at its peak (the names sit in Arrow buffers, about 20 bytes each, and at most
    a gathering's worth are Python objects). Holding a Path object per source, as a sorted
    listing did, takes about 300 bytes each: 6 MB. The sorted runs are spilled to files and
    merged, so Arrow holds about one run too, not every name (400 KB here, sorted)."""
    n = 20_000
    for i in range(n):
        (tmp_path / f"src{i:08d}.mp4").touch()
    assert len(list(sorted_paths(_video_files(tmp_path), chunk=1024))) == n  # Arrow's kernels load on first use
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        count, first, arrow = 0, None, 0
        for path in sorted_paths(_video_files(tmp_path), root=tmp_path, chunk=1024):
            count += 1
            first = first or path
            arrow = max(arrow, pa.total_allocated_bytes() - arrow_before)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and first == tmp_path / "src00000000.mp4"
    assert peak < 1_000_000, f"listing {n:,} files peaked at {peak:,} bytes of Python heap"
    assert arrow < 150_000, f"listing {n:,} files held {arrow:,} bytes of Arrow memory"
