"""The source split: held-out sources drawn by a seeded hash, stratified by whether they have kept clips."""

from __future__ import annotations

import hashlib
import math

from training.study.spec import StudyError


# ---- the split --------------------------------------------------------------------------

def _rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def split_sources(sources: list[str], has_kept: dict[str, bool], fraction: float, seed: int,
                  explicit: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(training sources, held-out sources): a seeded hash order, stratified by has_kept."""
    sources = sorted(set(sources))
    if len(sources) < 2:
        raise StudyError(f"a source split needs at least 2 sources with decodable clips, found {len(sources)}")
    if explicit:
        held = sorted(set(explicit))
        unknown = [s for s in held if s not in sources]
        if unknown:
            raise StudyError(f"held-out source {unknown[0]!r} has no decodable clip in this output")
    else:
        held = []
        for group in (True, False):
            members = sorted((s for s in sources if has_kept.get(s, False) == group), key=lambda s: _rank(seed, s))
            k = int(math.floor(fraction * len(members) + 0.5))
            if group and len(members) >= 2:
                k = max(k, 1)
            held += members[:min(k, len(members) - (1 if group else 0))]
        if not held:  # too few sources for the stratified rule: one held out by the hash
            held = [min(sources, key=lambda s: _rank(seed, s))]
    train = [s for s in sources if s not in set(held)]
    if not train:
        raise StudyError("every source is held out: nothing to train on")
    return train, sorted(held)

