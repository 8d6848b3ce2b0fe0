"""The dedup section's defaults, and the settings a pass runs with (`settings`)."""

from __future__ import annotations

from typing import Any

from curation.dedup import budget

# Defaults of eps per embedding: perceptual measured on generated re-uploads (README), CLIP's
# the usual near-duplicate cut for normalised CLIP image vectors.
DEFAULT_EPS = {"perceptual": 0.3, "image_embedding": 0.1}
DEFAULT_MIN_MATCH = 0.85  # bench/dedup_bench.py --signatures: midway between the hardest negative and the weakest copy
DEFAULT_MAX_SHIFT_S = 2.0
# Candidates a clip gets per bucket, its most similar ones: bounds the temporal checks at about
# n x 2 x CANDIDATES_PER_CLIP however alike the vectors of a corpus are (a thousand chunks of
# static cameras); a group larger than that is still joined through its members' pairs.
CANDIDATES_PER_CLIP = 16
DEFAULT_MEMORY_MB = budget.DEFAULT_MEMORY_MB


def settings(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The dedup section's values with their defaults filled in (for the resolved embedding)."""
    return {"embedding": kind, "eps": float(opts.get("eps") or DEFAULT_EPS[kind]),
            "min_match": float(opts.get("min_match") or DEFAULT_MIN_MATCH),
            "max_shift_s": float(opts["max_shift_s"] if opts.get("max_shift_s") is not None
                                 else DEFAULT_MAX_SHIFT_S),
            "bucket_size": int(opts.get("bucket_size", 1000)),
            "memory_mb": float(opts.get("memory_mb") or DEFAULT_MEMORY_MB)}
