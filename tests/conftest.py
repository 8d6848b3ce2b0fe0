"""Shared fixtures: small synthetic footage with known ground truth, a Ray cluster helper."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from curation import synth  # noqa: E402

# Small sources: 320x180, a few seconds each. Hard cuts at known frames.
FOOTAGE = {
    "cuts.mp4": (24, (320, 180), [
        {"frames": 60, "seed": 1},
        {"frames": 70, "seed": 2, "motion": "pan", "speed_px_per_frame": 2.0},
        {"frames": 55, "seed": 3, "motion": "square", "speed_px_per_frame": 4.0},
    ]),
    "pan.mp4": (25, (320, 180), [
        {"frames": 75, "seed": 11, "motion": "pan", "speed_px_per_frame": 1.0},
        {"frames": 75, "seed": 12, "motion": "pan", "speed_px_per_frame": 6.0},
    ]),
    "ntsc.mp4": (29.97, (320, 180), [
        {"frames": 90, "seed": 21, "motion": "square", "speed_px_per_frame": 3.0},
        {"frames": 80, "seed": 22},
    ]),
}


@pytest.fixture(scope="session")
def footage(tmp_path_factory) -> tuple[Path, dict]:
    """A folder with three good sources and three bad files; ground truth by file name."""
    root = tmp_path_factory.mktemp("footage")
    truth = {}
    for name, (fps, size, spec) in FOOTAGE.items():
        truth[name] = synth.make_video(root / name, spec, fps, size)
    synth.write_corrupt_video(root / "truncated.mp4", root / "cuts.mp4", mode="truncate")
    synth.write_zero_byte(root / "empty.mp4")
    synth.write_not_a_video(root / "notes.mp4")
    return root, truth


@pytest.fixture
def ray_tmp():
    """A short private temp dir for Ray's session files, removed afterwards (after shutting
    down a Ray session a test left running there: a later test would otherwise attach to a
    session whose files are gone)."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(path, ignore_errors=True)
