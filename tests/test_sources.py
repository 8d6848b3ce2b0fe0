"""Source discovery and unit planning."""

from __future__ import annotations

import pytest

from curation.sources import SourceError, discover, plan_units


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
