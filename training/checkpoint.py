"""The checkpoint files of a training stage: listed, loaded, the newest that loads, written durably.

checkpoint-<step>.pt in a stage's run_dir (what it holds: training/loop.py's docstring); the last
KEEP_CHECKPOINTS are kept.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import torch

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3


# ---- checkpoints ------------------------------------------------------------------------

def checkpoint_paths(run_dir: str) -> list[str]:
    """Checkpoints in run_dir, oldest first."""
    paths = glob.glob(os.path.join(run_dir, "checkpoint-*.pt"))
    return sorted(paths, key=lambda p: int(re.findall(r"checkpoint-(\d+)\.pt$", p)[0]))


def latest_checkpoint(run_dir: str) -> str | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict; only tensors and plain values are stored, so weights_only loading works."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_good_checkpoint(run_dir: str) -> tuple[str | None, dict | None]:
    """The newest checkpoint of run_dir that loads, and its dict; (None, None) when there is none.

    A checkpoint that cannot be read (truncated by a crash of the storage, say) is skipped with a
    warning for the one before it; the steps since that one are trained again.
    """
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            state = load_checkpoint(path)
            if not {"model", "ema", "optimizer", "config", "step"} <= set(state):
                raise ValueError(f"keys {sorted(state)}")
            return path, state
        except Exception as exc:  # noqa: BLE001  (any unreadable file: zip, pickle, EOF errors)
            log.warning("checkpoint %s cannot be read (%s: %s); falling back to the previous one",
                        path, type(exc).__name__, exc)
    return None, None


def save_checkpoint(run_dir: str, state: dict) -> str:
    """Write checkpoint-<step>.pt durably (temporary file, fsync, rename, fsync of the folder); keep the last few."""
    path = os.path.join(run_dir, f"checkpoint-{state['step']:07d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written checkpoint
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
    for old in checkpoint_paths(run_dir)[:-KEEP_CHECKPOINTS]:
        os.remove(old)
    return path

