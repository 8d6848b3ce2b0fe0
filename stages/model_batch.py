"""How a model stage works through a batch: which rows, their keyframes, one forward pass.

A model stage scores clips, not rows: a source-error row (start_frame null) is no clip and
gets null outputs and no error; with a `keep` column, rows an earlier filter rejected can be
skipped. ocr, aesthetics and clip_similarity then all do the same thing, written once in
forward_keyframes: decode the keyframes of the rows to score (a clip that fails to decode
fails alone), run the model once on every keyframe of the batch, and hand each clip its
keyframes' share of the result; when the pass itself fails (out of memory, a bad input
shape), every clip of the pass gets that error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.base import Batch

log = logging.getLogger(__name__)


def is_clip_row(batch: Batch, i: int) -> bool:
    """False for a source-error row (not a clip: null outputs, no error)."""
    return batch["start_frame"][i] is not None if "start_frame" in batch else True


def is_kept(batch: Batch, i: int) -> bool:
    """A row still kept by earlier filter steps (no `keep` column: everything is kept)."""
    keep = batch.get("keep")
    return keep is None or keep[i] is None or bool(keep[i])


def nan_list(n: int) -> list[float]:
    return [math.nan] * n


def error_text(exc: BaseException) -> str:
    """The text of an error column: "<exception type>: <message>"."""
    return f"{type(exc).__name__}: {exc}"


def decode_rows(batch: Batch, rows: list[int], decode: Callable[[bytes], Any], errors: list[str | None]):
    """Decode the keyframes of `rows` with `decode`; a clip that fails gets its error, alone.

    Returns (decoded images of all good rows in order, the row of each image, the good rows).
    """
    images, owner, good = [], [], []
    for i in rows:
        try:
            frames = [decode(j) for j in batch["keyframes"][i] or []]
            if not frames:
                raise ValueError("clip has no keyframes")
        except Exception as exc:  # noqa: BLE001 - a bad clip is a per-clip failure
            errors[i] = error_text(exc)
            continue
        images += frames
        owner += [i] * len(frames)
        good.append(i)
    return images, owner, good


@dataclass
class Keyframes:
    """The decoded keyframes of the clips in one forward pass."""

    images: list  # every keyframe of every clip in `rows`, clip by clip
    owner: np.ndarray  # (N_images,) the batch row each image belongs to
    rows: list[int]  # the batch rows in the pass, ascending

    def by_clip(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(position in rows, batch row, (N_images,) bool mask of its images) per clip."""
        for r, i in enumerate(self.rows):
            yield r, i, self.owner == i


def forward_keyframes(batch: Batch, rows: list[int], decode: Callable[[bytes], Any],
                      forward: Callable[[Keyframes], Any], errors: list[str | None],
                      what: str) -> tuple[Keyframes, Any] | None:
    """Decode the keyframes of `rows`, run forward(keyframes) once on all of them.

    Writes into `errors` the decode error of each clip that fails to decode (it is left out
    of the pass) and, when forward raises, that error for every clip of the pass. Returns
    (the keyframes, forward's result) for the caller to split by clip with by_clip(), or
    None when forward failed or no clip had keyframes to run. `what` names the pass in the log.
    """
    images, owner, good = decode_rows(batch, rows, decode, errors)
    if not good:
        return None
    keyframes = Keyframes(images, np.asarray(owner), good)
    try:
        result = forward(keyframes)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: every clip of the pass failed
        log.exception("%s failed for %d keyframes of %d clips", what, len(images), len(good))
        for i in good:
            errors[i] = error_text(exc)
        return None
    return keyframes, result
